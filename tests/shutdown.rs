//! Graceful shutdown on SIGTERM/SIGINT, and start-up/shutdown that never hangs.
mod support;

use support::*;

#[test]
fn sigterm_closes_every_connection_with_1001_and_exits_0() {
    let mut server = Server::start("[server]\nshards = 2");
    let mut clients: Vec<Client> = (0..6)
        .map(|i| server.connect("t1", &format!("u{i}")))
        .collect();
    for c in clients.iter_mut() {
        c.subscribe("c1");
    }
    server.signal(libc::SIGTERM);
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close().code, 1001);
    }
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status}");
    assert!(server
        .logs()
        .iter()
        .any(|l| l.contains("disconnect") && l.contains("code=1001")));
}

#[test]
fn sigterm_ends_http_sessions_and_their_streams_too() {
    let mut server = Server::start("[server]\nshards = 2");
    let sessions: Vec<_> = (0..4)
        .map(|i| server.session("t1", &format!("s{i}")))
        .collect();
    let mut streams: Vec<_> = sessions[..2].iter().map(|s| s.sse(None)).collect();
    for sse in streams.iter_mut() {
        sse.expect("session.ready");
    }
    server.signal(libc::SIGTERM);
    for sse in streams.iter_mut() {
        sse.until_end();
    }
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status}");
    let closed = server
        .logs()
        .iter()
        .filter(|l| l.contains("session closed"))
        .count();
    assert_eq!(closed, 4, "every session, streaming or not, ended");
}

#[test]
fn start_and_stop_many_times_without_a_hang() {
    // The cross-core mesh is wired at every start: a start-up hang would show here
    // (FIELD-NOTES: glommio's cross-core channels can hang at connect without a periodic
    // timer), and so would a crash at exit (the exit status is the process's own).
    for round in 0..100 {
        let mut server = Server::start("[server]\nshards = 2");
        let mut c = server.connect("t1", "u1");
        c.subscribe(&format!("round-{round}"));
        server.publish_ok("t1", vec![updated(&format!("round-{round}"), round)]);
        assert_eq!(c.expect("conversation.updated")["seq"], round);
        let signal = if round % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        server.signal(signal);
        assert_eq!(c.expect_close().code, 1001);
        let status = server.wait_exit();
        assert!(status.success(), "round {round}: exit status {status}");
    }
}

#[test]
fn shutdown_flushes_queued_frames_and_ends_within_its_timeout_despite_a_stuck_client() {
    let mut server = Server::start(
        "[server]\nshards = 2\nshutdown_timeout_ms = 1500\n[limits]\noutbound_queue_bytes = 16777216",
    );
    // A client that never reads, behind a tiny receive buffer: it cannot be flushed.
    let mut stuck = stuck_client(&server, "stuck", "c1");
    let mut reader = server.connect("t1", "reader");
    reader.subscribe("c1");
    // Queued before the signal: 8 MB, more than the kernel buffers of the stuck socket hold.
    let total = 800;
    let pad = "x".repeat(10_000);
    let reading = std::thread::spawn(move || {
        for seq in 0..total {
            assert_eq!(reader.expect("conversation.updated")["seq"], seq);
        }
        reader
    });
    for batch in 0..total / 50 {
        let events = (batch * 50..batch * 50 + 50)
            .map(|seq| serde_json::json!({"type": "conversation.updated", "conversationId": "c1", "seq": seq, "pad": pad}))
            .collect();
        server.publish_ok("t1", events);
    }
    let signalled = std::time::Instant::now();
    server.signal(libc::SIGTERM);
    // The reader gets every event queued before the signal, then 1001.
    let mut reader = reading.join().expect("the reader got every event");
    assert_eq!(reader.expect_close().code, 1001);
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status}");
    // The stuck client does not hold the process beyond the shutdown timeout...
    let took = signalled.elapsed();
    assert!(
        took < std::time::Duration::from_millis(2500),
        "exited after {took:?}"
    );
    // ... and it was stuck: what it finally reads ends before the last event, with no close.
    let mut last = None;
    while let Ok(tungstenite::Message::Text(t)) = stuck.ws.read() {
        last = serde_json::from_str::<serde_json::Value>(&t).unwrap()["seq"].as_u64();
    }
    assert!(
        last < Some(total as u64 - 1),
        "the stuck client read up to {last:?}"
    );
}
