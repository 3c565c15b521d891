//! A session obeys a connection's limits: subscriptions, the event rate (then the session
//! ends, as a connection is closed with 4008), the outbound byte bound (typing shed first),
//! and `POST /v1/sessions` shares the per-IP bucket of `/ws` upgrades. Bad bodies get 400 or
//! 413 and bad items `invalid_message`, and the session goes on.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::session::Session;
use support::*;

#[test]
fn too_many_subscriptions_is_refused_on_the_stream() {
    let server = Server::start("[limits]\nmax_subscriptions = 2");
    let s = server.session("t1", "u1");
    let subscribe = |c: &str| json!({"type": "subscribe", "conversationId": c, "id": c});
    s.post_ok(&json!([subscribe("a"), subscribe("b"), subscribe("c")]));
    let mut cursor = 1;
    let answers = s.poll_until(&mut cursor, 3);
    assert_eq!(answers[0], json!({"type": "ack", "id": "a"}));
    assert_eq!(answers[1], json!({"type": "ack", "id": "b"}));
    assert_eq!(
        (answers[2]["id"].as_str(), answers[2]["code"].as_str()),
        (Some("c"), Some("too_many_subscriptions"))
    );
}

#[test]
fn an_event_flood_is_dropped_with_rate_limited_then_the_session_ends() {
    let server = Server::start("[limits]\nmsg_rate = 20.0\nmsg_burst = 5.0");
    let s = server.session("t1", "u1");
    let pings: Vec<_> = (0..50)
        .map(|i| json!({"type": "ping", "id": format!("{i}")}))
        .collect();
    let started = Instant::now();
    s.post_ok(&json!(pings));
    let mut cursor = 1;
    let answers = s.poll_until(&mut cursor, 6);
    let pongs = answers.iter().take_while(|a| a["type"] == "pong").count();
    assert_eq!(pongs, 5, "the burst passes: {answers:?}");
    assert_eq!(answers[5]["code"], "rate_limited");
    // Still over the limit 5 s after the first drop: the session ends.
    let ended = loop {
        assert!(
            started.elapsed() < DEADLINE,
            "the flood never ended the session"
        );
        let r = s.post(&json!([{"type": "ping"}, {"type": "ping"}, {"type": "ping"}]));
        if r.status == 404 {
            break started.elapsed();
        }
        assert_eq!(r.status, 202, "{}", r.body);
        std::thread::sleep(Duration::from_millis(20)); // the flood's own pace
    };
    assert!(
        ended >= Duration::from_millis(4900),
        "ended after {ended:?}"
    );
    assert_eq!(server.metric("fanfare_rate_limit_closes_total"), 1);
}

#[test]
fn a_full_session_loses_typing_before_any_event() {
    let server = Server::start(
        "[server]\nshards = 1\n[limits]\noutbound_queue_bytes = 8192\nmsg_rate = 100000.0\nmsg_burst = 100000.0\n[presence]\ntyping_throttle_ms = 1",
    );
    let s = server.session("t1", "reader");
    // Typing in c1, events in c2: the typists need not read the events.
    s.post_ok(&json!([
        {"type": "subscribe", "conversationId": "c1", "id": "s1"},
        {"type": "subscribe", "conversationId": "c2", "id": "s2"}
    ]));
    let mut cursor = 1;
    s.poll_until(&mut cursor, 2);
    let mut typists: Vec<Client> = (0..10)
        .map(|i| {
            let mut c = server.connect("t1", &format!("typist{i}"));
            c.subscribe("c1");
            c
        })
        .collect();
    let typing = json!({"type": "presence.activity", "activity": "typing", "conversationId": "c1"});
    let pad = "x".repeat(200);
    // Fewer event bytes than the queue holds; typing fills the rest and is shed.
    let mut seq = 0;
    while server.metric("fanfare_frames_shed_total") == 0 {
        assert!(seq < 25, "the session's queue never filled");
        let event =
            json!({"type": "conversation.updated", "conversationId": "c2", "seq": seq, "pad": pad});
        server.publish_ok("t1", vec![event]);
        seq += 1;
        for t in typists.iter_mut() {
            t.send(&typing);
        }
    }
    server.publish_ok(
        "t1",
        vec![json!({"type": "conversation.updated", "conversationId": "c2", "last": true})],
    );
    let mut sse = s.sse(Some(&cursor.to_string()));
    let (events, typed) = events_then_typing(|| sse.event().1);
    assert_eq!(events, seq);
    assert!(
        typed < seq * typists.len(),
        "{typed} typing frames: none shed"
    );
}

#[test]
fn bad_bodies_get_400_or_413_and_bad_items_invalid_message() {
    let server = Server::start("[limits]\nmax_publish_bytes = 1024");
    let s = server.session("t1", "u1");
    for body in ["not json", "[]", "[{\"type\":\"ping\"}", "", "{} {}"] {
        let r = s.request("POST", &s.path("events"), body.as_bytes());
        assert_eq!(r.status, 400, "{body:?}: {}", r.body);
        assert_eq!(r.json()["error"], "bad_request");
    }
    let big = json!({"type": "ping", "pad": "x".repeat(2000)}).to_string();
    let r = s.request("POST", &s.path("events"), big.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    s.post_ok(&json!([
        {"type": "nope", "id": "a"},
        5,
        {"type": "subscribe", "id": "b"},
        {"type": "subscribe", "conversationId": "bad id", "id": "c"},
        {"type": "ping", "id": "d"}
    ]));
    let mut cursor = 1;
    let answers = s.poll_until(&mut cursor, 5);
    for a in &answers[..4] {
        assert_eq!(a["code"], "invalid_message", "{answers:?}");
    }
    assert_eq!(answers[4], json!({"type": "pong", "id": "d"}));
}

#[test]
fn session_creation_shares_the_per_ip_bucket_of_websocket_upgrades() {
    let server = Server::start(
        "[server]\nshards = 2\n[limits]\nconnect_rate_per_ip = 0.5\nconnect_burst_per_ip = 3.0",
    );
    let t = token("t1", "u1", 60);
    let create = || server.http("POST", &format!("/v1/sessions?token={t}"), &[], b"");
    let first = Session::create(server.addr, &t);
    assert_eq!(create().status, 201);
    server.connect("t1", "u2");
    let limited = create();
    assert_eq!(limited.status, 429, "{}", limited.body);
    assert_eq!(limited.json()["error"], "rate_limited");
    assert!((1..=2).contains(&limited.retry_after_s()));
    assert!(server.connect_raw(&format!("/ws?token={t}")).is_err());
    // Before any token work: garbage gets 429, not 401.
    let r = server.http("POST", "/v1/sessions?token=garbage", &[], b"");
    assert_eq!(r.status, 429);
    assert_eq!(server.metric("fanfare_rejected_unauthorized_total"), 0);
    // Requests to an existing session are not connection attempts.
    for _ in 0..5 {
        assert_eq!(first.poll(0).0[0]["type"], "session.ready");
    }
}
