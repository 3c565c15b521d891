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
fn start_and_stop_many_times_without_a_hang() {
    // The cross-core mesh is wired at every start: a start-up hang would show here
    // (FIELD-NOTES: glommio channel_mesh can hang at connect without a periodic timer).
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
