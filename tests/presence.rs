//! Presence: online/offline to the other users of the tenant, the offline grace (no flapping),
//! several connections per user, snapshots, and tenant isolation.
mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// One core: presence events of one user then reach a watcher in a fixed order, so "nothing
/// else arrived before X" is a sound check. `presence_crosses_cores` covers two cores.
const ONE_CORE: &str = "[server]\nshards = 1\n[presence]\noffline_grace_ms = 400";

fn presence(kind: &str, user: &str) -> Value {
    json!({"type": format!("presence.{kind}"), "userId": user})
}

/// Reads frames until one equal to `want`, collecting the presence frames seen on the way.
fn until(c: &mut Client, want: &Value) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv_any();
        if &v == want {
            return seen;
        }
        seen.push(v);
    }
}

#[test]
fn online_and_offline_reach_other_users_only() {
    let server = Server::start(ONE_CORE);
    let mut alice = server.connect("t1", "alice");
    let mut bob = server.connect("t1", "bob");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    // Bob never hears of himself: his next frame is the answer to his ping.
    assert_eq!(bob.request(json!({"type": "ping"}), "p")["type"], "pong");
    let left = Instant::now();
    drop(bob);
    assert_eq!(alice.recv_any(), presence("offline", "bob"));
    assert!(
        left.elapsed() >= Duration::from_millis(380),
        "offline after {:?}, before the grace",
        left.elapsed()
    );
}

#[test]
fn a_reconnect_inside_the_grace_sends_nothing() {
    let server = Server::start("[server]\nshards = 1\n[presence]\noffline_grace_ms = 1500");
    let mut alice = server.connect("t1", "alice");
    let bob = server.connect("t1", "bob");
    let dave = server.connect("t1", "dave");
    assert_eq!(
        until(&mut alice, &presence("online", "dave")),
        vec![presence("online", "bob")]
    );
    drop(bob);
    // During the grace Bob still counts as online.
    let snap = alice.request(json!({"type": "presence.query"}), "q");
    assert_eq!(snap["userIds"], json!(["alice", "bob", "dave"]));
    let _bob_again = server.connect("t1", "bob");
    // Dave leaves after Bob is back: Dave's grace ends after Bob's would have.
    drop(dave);
    let before = until(&mut alice, &presence("offline", "dave"));
    assert!(before.is_empty(), "Bob flapped: {before:?}");
    let snap = alice.request(json!({"type": "presence.query"}), "q2");
    assert_eq!(snap["userIds"], json!(["alice", "bob"]));
}

#[test]
fn several_connections_of_one_user_count_as_one() {
    let server = Server::start(ONE_CORE);
    let mut alice = server.connect("t1", "alice");
    let bob1 = server.connect("t1", "bob");
    let mut bob2 = server.connect("t1", "bob");
    let dave = server.connect("t1", "dave");
    assert_eq!(
        until(&mut alice, &presence("online", "dave")),
        vec![presence("online", "bob")],
        "one online for two connections"
    );
    // Bob's own second connection heard nothing of Bob.
    assert_eq!(
        until(&mut bob2, &presence("online", "dave")),
        Vec::<Value>::new()
    );
    drop(bob1);
    drop(bob2);
    drop(dave);
    let seen = until(&mut alice, &presence("offline", "dave"));
    assert_eq!(
        seen,
        vec![presence("offline", "bob")],
        "one offline, after the last connection"
    );
}

#[test]
fn presence_never_crosses_tenants() {
    let server = Server::start(ONE_CORE);
    let mut eve = server.connect("t2", "eve");
    let mut alice = server.connect("t1", "alice");
    let bob = server.connect("t1", "bob");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    drop(bob);
    assert_eq!(alice.recv_any(), presence("offline", "bob"));
    // Eve (another tenant) saw neither Alice nor Bob.
    assert_eq!(eve.request(json!({"type": "ping"}), "p")["type"], "pong");
    assert_eq!(
        eve.request(json!({"type": "presence.query"}), "q")["userIds"],
        json!(["eve"])
    );
}

#[test]
fn snapshots_over_websocket_and_http_agree() {
    let server = Server::start(ONE_CORE);
    let mut alice = server.connect("t1", "alice");
    let _carol = server.connect("t1", "carol");
    let _bob = server.connect("t1", "bob");
    let _other = server.connect("t2", "zed");
    until(&mut alice, &presence("online", "bob"));
    let snap = alice.request(json!({"type": "presence.query"}), "q");
    assert_eq!(
        snap,
        json!({"type": "presence.snapshot", "userIds": ["alice", "bob", "carol"], "id": "q"})
    );
    let auth = format!("Bearer {API_KEY}");
    let r = server.http("GET", "/v1/presence/t1", &[("Authorization", &auth)], b"");
    assert_eq!(
        (r.status, r.json()),
        (200, json!({"userIds": ["alice", "bob", "carol"]}))
    );
    assert_eq!(server.http("GET", "/v1/presence/t1", &[], b"").status, 401);
    assert_eq!(
        server
            .http(
                "GET",
                "/v1/presence/bad:tenant",
                &[("Authorization", &auth)],
                b""
            )
            .status,
        400
    );
    let r = server.http(
        "GET",
        "/v1/presence/nobody",
        &[("Authorization", &auth)],
        b"",
    );
    assert_eq!(r.json(), json!({"userIds": []}));
}

#[test]
fn presence_crosses_cores() {
    let server = Server::start("[server]\nshards = 2\n[presence]\noffline_grace_ms = 300");
    // Watchers on both cores.
    let mut watchers = Vec::new();
    let mut cores = std::collections::HashSet::new();
    while cores.len() < 2 {
        assert!(watchers.len() < 200, "all connections landed on one core");
        let mut c = server
            .connect_raw(&format!("/ws?token={}", token("t1", "watcher", 600)))
            .unwrap();
        let id = c.expect("session.ready")["connectionId"]
            .as_str()
            .unwrap()
            .to_string();
        cores.insert(u64::from_str_radix(&id, 16).unwrap() >> 48);
        watchers.push(c);
    }
    // Several users, so that both cores own some of them.
    let users: Vec<Client> = (0..6)
        .map(|i| server.connect("t1", &format!("user{i}")))
        .collect();
    for w in watchers.iter_mut() {
        let mut online: Vec<String> = (0..6)
            .map(|_| w.recv_any()["userId"].as_str().unwrap().to_string())
            .collect();
        online.sort();
        assert_eq!(
            online,
            (0..6).map(|i| format!("user{i}")).collect::<Vec<_>>()
        );
    }
    drop(users);
    for w in watchers.iter_mut() {
        let offline: Vec<Value> = (0..6).map(|_| w.recv_any()).collect();
        assert!(
            offline.iter().all(|v| v["type"] == "presence.offline"),
            "{offline:?}"
        );
    }
    let auth = format!("Bearer {API_KEY}");
    let r = server.http("GET", "/v1/presence/t1", &[("Authorization", &auth)], b"");
    assert_eq!(r.json(), json!({"userIds": ["watcher"]}));
}

/// With `server.write_delay_ms`, presence frames are paced like events: for a connection just
/// written to, they wait for the core's flush, in order.
#[test]
fn a_write_delay_paces_presence_frames_too() {
    let server = Server::start("[server]\nshards = 1\nwrite_delay_ms = 1000");
    let mut alice = server.connect("t1", "alice");
    // Just written to (the answer to her ping): what comes next waits.
    assert_eq!(alice.request(json!({"type": "ping"}), "p")["type"], "pong");
    let first = Instant::now();
    let _bob = server.connect("t1", "bob");
    let _carol = server.connect("t1", "carol");
    assert_eq!(alice.recv_any(), presence("online", "bob"));
    assert_eq!(alice.recv_any(), presence("online", "carol"));
    assert!(
        first.elapsed() >= Duration::from_millis(1000),
        "presence.online after {:?}, within the delay",
        first.elapsed()
    );
}
