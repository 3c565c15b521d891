//! Long-polling a session: an answer at once when events are queued, a wait of
//! `fallback.poll_timeout_ms` when none are, an early answer when one arrives during the wait,
//! the cursor (acknowledging, repeatable after a lost answer), and bad cursors.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

#[test]
fn a_poll_answers_at_once_when_events_are_queued_and_waits_otherwise() {
    let server = Server::start("[fallback]\npoll_timeout_ms = 400");
    let s = server.session("t1", "u1");
    s.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "s"}));
    let mut cursor = 0;
    let answered = s.poll_until(&mut cursor, 2);
    assert_eq!(answered[1]["type"], "ack");
    // Nothing queued: the poll waits its timeout and answers with no events.
    let started = Instant::now();
    assert_eq!(s.poll(cursor), (vec![], cursor));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "answered after {waited:?}"
    );
    // An event published while the poll waits ends the wait.
    let server = &server;
    std::thread::scope(|scope| {
        let polling = scope.spawn(|| {
            let started = Instant::now();
            let (events, next) = s.poll(cursor);
            (events, next, started.elapsed())
        });
        wait_for("the poll to be attached", || {
            (server.metric("fanfare_sessions_open{transport=\"poll\"}") == 1).then_some(())
        });
        server.publish_ok("t1", vec![updated("c1", 7)]);
        let (events, next, took) = polling.join().unwrap();
        assert_eq!(events, vec![updated("c1", 7)]);
        assert_eq!(next, cursor + 1);
        assert!(took < Duration::from_secs(5), "answered after {took:?}");
    });
}

#[test]
fn the_cursor_acknowledges_and_a_lost_answer_can_be_polled_again() {
    let server = Server::start("[fallback]\npoll_timeout_ms = 200");
    let s = server.session("t1", "u1");
    s.post_ok(&json!({"type": "subscribe", "conversationId": "c1", "id": "s"}));
    let mut cursor = 0;
    s.poll_until(&mut cursor, 2);
    server.publish_ok("t1", (0..3).map(|i| updated("c1", i)).collect());
    let mut after = cursor;
    let first = s.poll_until(&mut after, 3);
    // The answer was lost: the same cursor gets the same events again.
    let (again, next) = s.poll(cursor);
    assert_eq!((again, next), (first, after));
    assert_eq!(server.metric("fanfare_session_resumes_total"), 1);
    // Polling from `after` acknowledges them: an earlier cursor has lost them.
    assert_eq!(s.poll(after), (vec![], after));
    let (events, next) = s.poll(cursor);
    assert_eq!(events[0]["code"], "overloaded", "{events:?}");
    assert_eq!(events.len(), 1);
    assert_eq!(next, after);
}

#[test]
fn bad_cursors_get_400_and_leave_the_session_alone() {
    let server = Server::start("");
    let s = server.session("t1", "u1");
    for query in ["cursor=abc", "cursor=-1", "cursor=1.5", "cursor=99"] {
        let r = s.request("GET", &format!("{}?{query}", s.path("poll")), b"");
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.json()["error"], "bad_request");
    }
    assert_eq!(s.poll(0).0[0]["type"], "session.ready");
}

#[test]
fn a_poll_whose_client_left_detaches_at_once() {
    // A poll timeout far beyond the test's deadline: only the client's leaving can detach it.
    let server = Server::start("[fallback]\npoll_timeout_ms = 600000");
    let s = server.session("t1", "u1");
    let mut raw = std::net::TcpStream::connect(s.addr).unwrap();
    let request = format!(
        "GET {}?cursor=1&token={} HTTP/1.1\r\nHost: x\r\n\r\n",
        s.path("poll"),
        s.token
    );
    std::io::Write::write_all(&mut raw, request.as_bytes()).unwrap();
    wait_for("the poll to be attached", || {
        (server.metric("fanfare_sessions_open{transport=\"poll\"}") == 1).then_some(())
    });
    drop(raw);
    wait_for("the session to count as detached", || {
        (server.metric("fanfare_sessions_open{transport=\"none\"}") == 1).then_some(())
    });
    // And it serves the next poll as before.
    s.post_ok(&json!({"type": "ping", "id": "p"}));
    assert_eq!(s.poll(1).0, vec![json!({"type": "pong", "id": "p"})]);
}
