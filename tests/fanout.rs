//! Fan-out across cores: many connections on one conversation, spread over both executors.
mod support;

use support::*;

#[test]
fn every_subscriber_on_every_core_gets_every_event() {
    let server = Server::start("[server]\nshards = 2");
    let mut clients = Vec::new();
    let mut cores = std::collections::HashSet::new();
    // Open connections until both cores hold some (the kernel spreads them by hash). All are
    // one user's, so that no presence frames mix into the count.
    while clients.len() < 40 || cores.len() < 2 {
        assert!(clients.len() < 400, "all connections landed on one core");
        let mut c = server
            .connect_raw(&format!("/ws?token={}", token("t1", "fan", 600)))
            .unwrap();
        let ready = c.expect("session.ready");
        cores.insert(core_of(&ready));
        clients.push(c);
    }
    // Several conversations, so that both cores own some.
    let conversations: Vec<String> = (0..6).map(|i| format!("room-{i}")).collect();
    for c in clients.iter_mut() {
        for conv in &conversations {
            c.subscribe(conv);
        }
    }
    let per_conversation = 25;
    for seq in 0..per_conversation {
        server.publish_ok(
            "t1",
            conversations.iter().map(|c| updated(c, seq)).collect(),
        );
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut next = vec![0usize; conversations.len()];
        for _ in 0..per_conversation * conversations.len() {
            let e = c.expect("conversation.updated");
            let conv = conversations
                .iter()
                .position(|x| x == e["conversationId"].as_str().unwrap())
                .unwrap();
            assert_eq!(
                e["seq"], next[conv],
                "client {i}: out of order or missing in {}",
                conversations[conv]
            );
            next[conv] += 1;
        }
    }
    let expected = (clients.len() * conversations.len() * per_conversation) as u64;
    assert_eq!(server.metric("fanfare_frames_delivered_total"), expected);
    assert_eq!(server.metric("fanfare_mesh_overflow_total"), 0);
}

/// `server.write_delay_ms`: events for a connection written to within the delay wait for the
/// core's flush and go out together, in order; an event for a connection quiet for longer is
/// written at once.
#[test]
fn a_write_delay_paces_a_busy_connection_and_not_a_quiet_one() {
    let delay = std::time::Duration::from_millis(1000);
    let server = Server::start("[server]\nshards = 1\nwrite_delay_ms = 1000");
    let mut quiet = server.connect("t1", "u1");
    quiet.subscribe("other");
    let mut busy = server.connect("t1", "u1");
    busy.subscribe("room");
    // Just written to (the subscribe's ack): the next events wait.
    let writes = server.metric("fanfare_writes_total");
    let first_published = std::time::Instant::now();
    for seq in 0..3 {
        server.publish_ok("t1", vec![updated("room", seq)]);
    }
    for seq in 0..3 {
        assert_eq!(busy.expect("conversation.updated")["seq"], seq);
    }
    assert!(
        first_published.elapsed() >= delay,
        "delivered {:?} after the first publish, within the delay",
        first_published.elapsed()
    );
    assert_eq!(
        server.metric("fanfare_writes_total") - writes,
        1,
        "three events published one after another within the delay, written together"
    );
    // Nothing was written to `quiet` since its ack, longer ago than the delay: written at once.
    let published = std::time::Instant::now();
    server.publish_ok("t1", vec![updated("other", 0)]);
    assert_eq!(quiet.expect("conversation.updated")["seq"], 0);
    assert!(
        published.elapsed() < delay,
        "a quiet connection's event waited {:?}",
        published.elapsed()
    );
}
