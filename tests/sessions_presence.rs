//! A session counts for presence exactly like a connection: its user comes online when it is
//! created, is in snapshots, goes offline after the grace once it ends (no flapping when the
//! user moves between a session and a WebSocket), receives presence and typing, and types.
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

fn presence(kind: &str, user: &str) -> Value {
    json!({"type": format!("presence.{kind}"), "userId": user})
}

#[test]
fn a_sessions_user_is_online_in_snapshots_and_offline_after_the_grace() {
    let server = Server::start("[presence]\noffline_grace_ms = 400");
    let mut alice = server.connect("t1", "alice");
    let s = server.session("t1", "bob");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    let snap = alice.request(json!({"type": "presence.query"}), "q");
    assert_eq!(snap["userIds"], json!(["alice", "bob"]));
    // The session hears of others, and its own snapshot has both.
    let mut sse = s.sse(None);
    sse.expect("session.ready");
    let _carol = server.connect("t1", "carol");
    assert_eq!(sse.next().unwrap().json(), presence("online", "carol"));
    s.post_ok(&json!({"type": "presence.query", "id": "q"}));
    let (_, snap) = sse.expect("presence.snapshot");
    assert_eq!(snap["userIds"], json!(["alice", "bob", "carol"]));
    let ended = Instant::now();
    assert_eq!(s.delete().status, 204);
    loop {
        let v = alice.recv_any();
        if v == presence("offline", "bob") {
            break;
        }
        assert!(v["userId"] == "carol", "unexpected {v}");
    }
    assert!(
        ended.elapsed() >= Duration::from_millis(380),
        "offline after {:?}, before the grace",
        ended.elapsed()
    );
    let r = server.http(
        "GET",
        "/v1/presence/t1",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        b"",
    );
    assert_eq!(r.json()["userIds"], json!(["alice", "carol"]));
}

#[test]
fn moving_from_a_session_to_a_websocket_inside_the_grace_sends_nothing() {
    let server = Server::start("[server]\nshards = 1\n[presence]\noffline_grace_ms = 1500");
    let mut alice = server.connect("t1", "alice");
    let s = server.session("t1", "bob");
    let dave = server.connect("t1", "dave");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    assert_eq!(alice.recv_any(), presence("online", "dave"));
    assert_eq!(s.delete().status, 204);
    let _bob = server.connect("t1", "bob");
    // Dave leaves after Bob is back: Dave's grace ends after Bob's would have.
    drop(dave);
    assert_eq!(
        alice.recv_any(),
        presence("offline", "dave"),
        "nothing of bob before"
    );
    let snap = alice.request(json!({"type": "presence.query"}), "q");
    assert_eq!(snap["userIds"], json!(["alice", "bob"]));
}

#[test]
fn typing_crosses_between_sessions_and_connections() {
    let server = Server::start("");
    let mut alice = server.connect("t1", "alice");
    alice.subscribe("c1");
    let s = server.session("t1", "bob");
    s.post_ok(&json!([
        {"type": "subscribe", "conversationId": "c1", "id": "s"},
        {"type": "presence.activity", "activity": "typing", "id": "t"}
    ]));
    let typing = alice.expect("presence.typing");
    assert_eq!(
        (typing["userId"].as_str(), typing["conversationId"].as_str()),
        (Some("bob"), Some("c1"))
    );
    alice.send(&json!({"type": "presence.activity", "activity": "typing", "conversationId": "c1"}));
    let mut sse = s.sse(None);
    sse.expect("session.ready");
    assert_eq!(sse.expect("ack").1["id"], "s");
    assert_eq!(sse.expect("ack").1["id"], "t");
    let (_, typing) = sse.expect("presence.typing");
    assert_eq!(typing["userId"], "alice");
    // Typing where the session is not subscribed is forbidden, as for a connection.
    s.post_ok(&json!({"type": "presence.activity", "activity": "typing", "conversationId": "c9", "id": "f"}));
    let (_, refused) = sse.expect("error");
    assert_eq!(
        (refused["id"].as_str(), refused["code"].as_str()),
        (Some("f"), Some("forbidden"))
    );
}
