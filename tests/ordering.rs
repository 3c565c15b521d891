//! Events of one conversation reach each connection in publish order.
mod support;

use support::*;

#[test]
fn hundreds_of_events_arrive_in_publish_order() {
    let server = Server::start("[server]\nshards = 2");
    let mut a = server.connect("t1", "alice");
    let mut b = server.connect("t1", "bob");
    for c in [&mut a, &mut b] {
        c.subscribe("busy");
        c.subscribe("quiet");
    }
    // Single publishes and batches, interleaved with another conversation.
    let mut seq = 0;
    for round in 0..30 {
        let batch = if round % 2 == 0 { 1 } else { 19 };
        let mut events = Vec::new();
        for _ in 0..batch {
            events.push(updated("busy", seq));
            seq += 1;
        }
        events.push(updated("quiet", round));
        server.publish_ok("t1", events);
    }
    assert!(seq >= 300);
    for c in [&mut a, &mut b] {
        let (mut busy, mut quiet) = (0, 0);
        while busy < seq || quiet < 30 {
            let e = c.expect("conversation.updated");
            if e["conversationId"] == "busy" {
                assert_eq!(e["seq"], busy);
                busy += 1;
            } else {
                assert_eq!(e["seq"], quiet);
                quiet += 1;
            }
        }
    }
}
