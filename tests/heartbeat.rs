//! Heartbeat: pings every interval; a silent connection is closed with 4009 and cleaned up.
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

const CONFIG: &str = "[heartbeat]\ninterval_ms = 200\ntimeout_ms = 600";

#[test]
fn a_silent_connection_is_closed_with_4009_and_cleaned_up() {
    let server = Server::start(CONFIG);
    let mut raw = raw_upgrade(&server, "ghost");
    wait_for("the connection to register", || {
        (server.metric("fanfare_connections_open") == 1).then_some(())
    });
    let opened = Instant::now();
    // Read what the server sends, answering nothing: pings, then a 4009 close.
    let (frames, code) = read_until_close(&mut raw);
    let silent_for = opened.elapsed();
    assert_eq!(code, 4009);
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "pings were sent before the timeout"
    );
    assert!(
        silent_for >= Duration::from_millis(550),
        "closed after {silent_for:?}, before the timeout"
    );
    wait_for("clean-up", || {
        (server.metric("fanfare_connections_open") == 0).then_some(())
    });
    assert_eq!(server.metric("fanfare_heartbeat_closes_total"), 1);
}

#[test]
fn a_client_that_answers_pings_stays_connected() {
    let server = Server::start(CONFIG);
    let mut c = server.connect("t1", "alive");
    let started = Instant::now();
    let mut pings = 0;
    // tungstenite answers each ping with a pong as it reads.
    c.ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while started.elapsed() < Duration::from_millis(1500) {
        match c.ws.read() {
            Ok(tungstenite::Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("connection lost: {e}"),
        }
    }
    c.ws.get_ref().set_read_timeout(Some(DEADLINE)).unwrap();
    assert!(
        pings >= 4,
        "only {pings} pings in 1.5 s at a 200 ms interval"
    );
    assert_eq!(c.request(json!({"type": "ping"}), "still")["type"], "pong");
    assert_eq!(server.metric("fanfare_heartbeat_closes_total"), 0);
}
