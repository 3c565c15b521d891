//! A session's SSE stream: the head, `id:` sequence numbers, published events and answers in
//! order, `: keepalive` every heartbeat interval, events whose JSON spans lines, a second
//! stream taking over from the first, and detaching when the client goes away.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::session::Sse;
use support::*;

#[test]
fn the_stream_carries_numbered_events_and_answers_in_order() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let auth = format!("Bearer {}", s.token);
    let (head, sse) = Sse::open(s.addr, &s.path("sse"), &[("Authorization", &auth)]);
    assert_eq!(head.status, 200);
    assert_eq!(head.header("Content-Type"), Some("text/event-stream"));
    assert_eq!(head.header("Cache-Control"), Some("no-store"));
    let mut sse = sse.unwrap();
    let (id, ready) = sse.expect("session.ready");
    assert_eq!(
        (id, ready["connectionId"].as_str()),
        (Some(1), Some(s.id.as_str()))
    );
    s.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "s"}));
    assert_eq!(
        sse.expect("ack"),
        (Some(2), json!({"type": "ack", "id": "s"}))
    );
    server.publish_ok("t1", (0..3).map(|i| updated("c1", i)).collect());
    for (i, seq) in (3..6).zip(0..) {
        assert_eq!(sse.event(), (Some(i), updated("c1", seq)));
    }
    s.post_ok(&json!([{"type": "ping", "id": "p"}, {"type": "nope", "id": "q"}]));
    assert_eq!(sse.event(), (Some(6), json!({"type": "pong", "id": "p"})));
    let (id, error) = sse.expect("error");
    assert_eq!(
        (id, error["code"].as_str()),
        (Some(7), Some("invalid_message"))
    );
    // The token may also come in the query, as EventSource cannot set headers.
    let path = format!("{}?token={}", s.path("sse"), s.token);
    let (head, _) = Sse::open(s.addr, &path, &[("Last-Event-ID", "7")]);
    assert_eq!(head.status, 200);
}

#[test]
fn a_quiet_stream_gets_a_keepalive_comment_every_heartbeat_interval() {
    let server = Server::start("[heartbeat]\ninterval_ms = 200");
    let s = server.session("t1", "u1");
    let mut sse = s.sse(None);
    sse.expect("session.ready");
    let started = Instant::now();
    for _ in 0..3 {
        let m = sse.next().expect("a keepalive");
        assert_eq!(m.comment.as_deref(), Some("keepalive"), "{m:?}");
        assert!(m.data.is_empty() && m.id.is_none());
    }
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "three keepalives within {:?}",
        started.elapsed()
    );
    // Quiet streams keep their session: nothing expired meanwhile.
    assert_eq!(server.metric("fanfare_session_expiries_total"), 0);
}

#[test]
fn an_event_whose_json_spans_lines_arrives_whole() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let mut sse = s.subscribed_stream("c1");
    let pretty = "{\n  \"tenantId\": \"t1\",\n  \"event\": {\n    \"type\": \"message.received\",\r\n    \"conversationId\": \"c1\",\n    \"messageId\": \"m1\"\n  }\n}";
    let r = server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        pretty.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let (_, event) = sse.expect("message.received");
    assert_eq!(event["messageId"], "m1");
}

#[test]
fn a_second_stream_takes_over_and_the_first_ends() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let mut first = s.sse(None);
    first.expect("session.ready");
    wait_for("the first stream to count as attached", || {
        (server.metric("fanfare_sessions_open{transport=\"sse\"}") == 1).then_some(())
    });
    let mut second = s.sse(Some("1"));
    assert!(
        first.until_end().is_empty(),
        "the first ends with nothing more"
    );
    s.post_ok(&json!({"type": "ping", "id": "p"}));
    assert_eq!(
        second.event(),
        (Some(2), json!({"type": "pong", "id": "p"}))
    );
    assert_eq!(server.metric("fanfare_sessions_open{transport=\"sse\"}"), 1);
    drop(second);
    wait_for("the session to count as detached", || {
        (server.metric("fanfare_sessions_open{transport=\"none\"}") == 1).then_some(())
    });
    assert_eq!(server.metric("fanfare_sessions_open{transport=\"sse\"}"), 0);
    assert_eq!(server.metric("fanfare_session_resumes_total"), 1);
}
