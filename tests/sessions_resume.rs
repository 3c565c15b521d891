//! Resuming a session's stream: `Last-Event-ID` continues without loss (events published
//! while no stream was attached included), a stream without it starts with everything
//! retained, a resume point that is gone starts with `error{code:"overloaded"}`, and a
//! `Last-Event-ID` that is not one of the stream's ids gets `400`.
mod support;

use serde_json::json;
use support::session::Sse;
use support::*;

#[test]
fn last_event_id_resumes_without_loss() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let mut sse = s.subscribed_stream("c1");
    server.publish_ok("t1", (0..2).map(|i| updated("c1", i)).collect());
    assert_eq!(sse.event(), (Some(3), updated("c1", 0)));
    // The connection drops after event 3; event 4 was written but never read.
    drop(sse);
    server.publish_ok("t1", (2..5).map(|i| updated("c1", i)).collect());
    let mut resumed = s.sse(Some("3"));
    for (id, seq) in (4..8).zip(1..) {
        assert_eq!(resumed.event(), (Some(id), updated("c1", seq)));
    }
    assert_eq!(server.metric("fanfare_session_resumes_total"), 1);
    // The resume from 3 acknowledged 1 to 3: a stream without Last-Event-ID (from the start)
    // learns that it missed them, then gets everything still retained.
    drop(resumed);
    let mut fresh = s.sse(None);
    let (id, error) = fresh.expect("error");
    assert_eq!((id, error["code"].as_str()), (None, Some("overloaded")));
    assert_eq!(fresh.event(), (Some(4), updated("c1", 1)));
}

#[test]
fn a_stream_without_last_event_id_starts_with_everything_retained() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    s.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "s"}));
    // Handed out by a poll, but not acknowledged (no poll from a later cursor).
    let (polled, _) = s.poll(0);
    assert_eq!(polled[0]["type"], "session.ready");
    let mut sse = s.sse(None);
    assert_eq!(sse.expect("session.ready").0, Some(1));
    assert_eq!(sse.expect("ack").0, Some(2));
    server.publish_ok("t1", vec![updated("c1", 0)]);
    assert_eq!(sse.event(), (Some(3), updated("c1", 0)));
}

#[test]
fn a_resume_point_pushed_out_of_the_queue_starts_with_overloaded() {
    // A queue for a few events only.
    let server = Server::start("[limits]\noutbound_queue_bytes = 2048");
    let s = server.session("t1", "u1");
    drop(s.subscribed_stream("c1"));
    let padding = "x".repeat(300);
    let events: Vec<_> = (0..20)
        .map(|i| json!({"type": "conversation.updated", "conversationId": "c1", "seq": i, "pad": padding}))
        .collect();
    server.publish_ok("t1", events);
    let mut resumed = s.sse(Some("2"));
    let (id, error) = resumed.expect("error");
    assert_eq!((id, error["code"].as_str()), (None, Some("overloaded")));
    // Then the newest events, in order, up to the last.
    let mut seqs = Vec::new();
    while seqs.last() != Some(&19) {
        let (_, v) = resumed.expect("conversation.updated");
        seqs.push(v["seq"].as_u64().unwrap());
    }
    assert!(seqs.len() < 20 && seqs.len() >= 3, "kept {seqs:?}");
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order: {seqs:?}"
    );
    assert!(
        server.metric("fanfare_connections_open") == 0,
        "a session is not a WebSocket connection"
    );
}

#[test]
fn a_last_event_id_that_is_not_one_of_the_streams_gets_400() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    let auth = format!("Bearer {}", s.token);
    for id in ["abc", "-1", "2.0", "99"] {
        let (head, sse) = Sse::open(
            s.addr,
            &s.path("sse"),
            &[("Authorization", &auth), ("Last-Event-ID", id)],
        );
        assert_eq!(head.status, 400, "Last-Event-ID {id}: {}", head.body);
        assert!(sse.is_none());
        assert_eq!(head.json()["error"], "bad_request");
    }
    assert_eq!(s.sse(None).expect("session.ready").0, Some(1));
}
