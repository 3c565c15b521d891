//! Typing and viewing: `presence.typing` to the conversation's other subscribers, throttled,
//! with the default conversation and the permission rules.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const CONFIG: &str = "[server]\nshards = 2\n[presence]\ntyping_throttle_ms = 300";

fn typing(conversation: Option<&str>) -> serde_json::Value {
    match conversation {
        Some(c) => json!({"type": "presence.activity", "activity": "typing", "conversationId": c}),
        None => json!({"type": "presence.activity", "activity": "typing"}),
    }
}

#[test]
fn typing_reaches_other_subscribers_but_not_the_typist() {
    let server = Server::start(CONFIG);
    let connect = |user: &str| {
        let mut c = server
            .connect_raw(&format!("/ws?token={}", token("t1", user, 60)))
            .unwrap();
        let core = core_of(&c.expect("session.ready"));
        (c, core)
    };
    let (mut alice, alice_core) = connect("alice");
    let mut alice_tab = server.connect("t1", "alice");
    let mut bob = server.connect("t1", "bob");
    // Dave types right after Alice from her core: his typing follows hers on the same route,
    // so it is the sentinel that shows what her other tab did not get.
    let mut dave = (0..200)
        .map(|_| connect("dave"))
        .find_map(|(c, core)| (core == alice_core).then_some(c))
        .expect("a connection on Alice's core");
    // Another conversation from c1's owner core: typing in c1 would reach its subscriber
    // before an event of it published afterwards.
    let elsewhere = sentinel_for("t1", ("t1", "c1"));
    let mut outsider = server.connect("t1", "carol");
    for c in [&mut alice, &mut alice_tab, &mut bob, &mut dave] {
        c.subscribe("c1");
    }
    outsider.subscribe(&elsewhere);
    assert_eq!(alice.request(typing(Some("c1")), "t")["type"], "ack");
    // Dave, a subscriber too, may get Alice's typing before his ack.
    let mut request = typing(Some("c1"));
    request["id"] = json!("t");
    dave.send(&request);
    while dave.recv()["type"] != "ack" {}
    let typed = |user| json!({"type": "presence.typing", "userId": user, "conversationId": "c1"});
    assert_eq!(bob.recv(), typed("alice"));
    assert_eq!(bob.recv(), typed("dave"));
    // Alice's other tab got Dave's typing and not hers.
    assert_eq!(alice_tab.recv(), typed("dave"));
    // A subscriber of another conversation got neither: its next frame is its own event.
    server.publish_ok("t1", vec![updated(&elsewhere, 1)]);
    assert_eq!(outsider.recv(), updated(&elsewhere, 1));
}

#[test]
fn typing_is_throttled_per_user_and_conversation_and_always_acked() {
    let server = Server::start(CONFIG);
    let mut alice = server.connect("t1", "alice");
    let mut bob = server.connect("t1", "bob");
    alice.subscribe("c1");
    alice.subscribe("c2");
    bob.subscribe("c1");
    bob.subscribe("c2");
    // A burst: every one acked, one forwarded per conversation.
    for i in 0..10 {
        assert_eq!(
            alice.request(typing(Some("c1")), &format!("a{i}"))["type"],
            "ack"
        );
    }
    assert_eq!(alice.request(typing(Some("c2")), "b")["type"], "ack");
    assert_eq!(bob.recv()["conversationId"], "c1");
    assert_eq!(
        bob.recv()["conversationId"],
        "c2",
        "the burst in c1 was cut to one"
    );
    // Typing on for a while: forwarded about once per throttle period, never faster.
    let started = Instant::now();
    let mut forwarded = vec![];
    while started.elapsed() < Duration::from_millis(1000) {
        alice.request(typing(Some("c1")), "k");
        bob.ws.get_ref().set_nonblocking(true).unwrap();
        while let Ok(tungstenite::Message::Text(t)) = bob.ws.read() {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            assert_eq!(v["type"], "presence.typing");
            forwarded.push(Instant::now());
        }
        bob.ws.get_ref().set_nonblocking(false).unwrap();
        std::thread::sleep(Duration::from_millis(20)); // the typist's own pace
    }
    assert!(
        (2..=5).contains(&forwarded.len()),
        "{} forwarded in 1 s at a 300 ms throttle",
        forwarded.len()
    );
    for pair in forwarded.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(250),
            "two typing events {:?} apart",
            pair[1] - pair[0]
        );
    }
}

#[test]
fn typing_defaults_to_the_latest_subscription_and_needs_one() {
    let server = Server::start(CONFIG);
    let mut alice = server.connect("t1", "alice");
    let mut bob = server.connect("t1", "bob");
    let e = alice.request(typing(None), "none");
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("invalid_message"))
    );
    for c in [&mut alice, &mut bob] {
        c.subscribe("c1");
        c.subscribe("c2");
    }
    alice.request(typing(None), "default");
    assert_eq!(bob.recv()["conversationId"], "c2");
    alice.request(json!({"type": "unsubscribe", "conversationId": "c2"}), "u");
    alice.request(typing(None), "default2");
    assert_eq!(
        bob.recv()["conversationId"],
        "c1",
        "the latest of the current subscriptions"
    );
}

#[test]
fn typing_where_not_subscribed_is_forbidden_and_viewing_is_acked_quietly() {
    let server = Server::start(CONFIG);
    let mut alice = server.connect("t1", "alice");
    let mut bob = server.connect("t1", "bob");
    bob.subscribe("c1");
    alice.subscribe("c2");
    let e = alice.request(typing(Some("c1")), "f");
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    alice.subscribe("c1");
    let v = alice.request(
        json!({"type": "presence.activity", "activity": "viewing", "conversationId": "c1"}),
        "v",
    );
    assert_eq!(v["type"], "ack");
    // Viewing needs no subscription (only typing does, PROTOCOL.md).
    let v = alice.request(
        json!({"type": "presence.activity", "activity": "viewing", "conversationId": "c9"}),
        "v9",
    );
    assert_eq!(v["type"], "ack", "{v}");
    // Nothing reached Bob for any of them.
    assert_eq!(bob.request(json!({"type": "ping"}), "p")["type"], "pong");
}
