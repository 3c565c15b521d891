//! Backpressure: a client that stops reading is closed with 1013 once its queue passes
//! `limits.outbound_queue_bytes`; everyone else keeps receiving and memory stays bounded.
mod support;

use serde_json::json;
use support::*;

#[test]
fn a_client_that_never_reads_is_closed_with_1013_and_memory_stays_bounded() {
    let server = Server::start("[server]\nshards = 2\n[limits]\noutbound_queue_bytes = 1048576");
    // The slow client: a tiny receive buffer, and it stops reading after subscribing.
    let mut slow = stuck_client(&server, "slow", "c1");

    let mut fast = server.connect("t1", "fast");
    fast.subscribe("c1");
    let total = 2000;
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            for seq in 0..total {
                let e = fast.expect("conversation.updated");
                assert_eq!(e["seq"], seq, "the fast client misses nothing");
                progress.store(seq + 1, std::sync::atomic::Ordering::Relaxed);
            }
            fast
        })
    };

    let meter = server.meter();
    // 2000 events of ~10 KB: 20 MB that an unbounded queue for the slow client would keep.
    let pad = "x".repeat(10_000);
    for batch in 0..(total / 50) {
        // The fast client keeps up: at most one batch (500 KB) in flight to it.
        wait_for("the fast client to keep up", || {
            (progress.load(std::sync::atomic::Ordering::Relaxed) + 50 >= batch * 50).then_some(())
        });
        let events = (batch * 50..batch * 50 + 50).map(|seq| json!({"type": "conversation.updated", "conversationId": "c1", "seq": seq, "pad": pad})).collect();
        server.publish_ok("t1", events);
    }
    let mut fast = reader.join().expect("fast reader");
    wait_for("the slow consumer to be closed", || {
        (server.metric("fanfare_slow_consumer_closes_total") == 1).then_some(())
    });
    meter.assert_under(
        "20 MB published past a client that reads nothing",
        2.0,
        12 * 1024,
    );

    // The slow client, reading at last, finds a prefix of the events and then the 1013 close.
    let mut seen = 0;
    let closed = loop {
        match slow.ws.read().expect("frames, then the close") {
            tungstenite::Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "presence.online" {
                    continue; // the fast client's arrival
                }
                assert_eq!(v["seq"], seen, "a gap-free prefix");
                seen += 1;
            }
            tungstenite::Message::Close(Some(f)) => break u16::from(f.code),
            _ => {}
        }
    };
    assert_eq!(closed, 1013);
    assert!(
        seen < total,
        "the slow client cannot have received everything"
    );
    assert_eq!(
        fast.request(json!({"type": "ping"}), "alive")["type"],
        "pong"
    );
}

#[test]
fn a_slow_client_loses_typing_before_any_event_and_stays_open() {
    let server = Server::start(
        "[server]\nshards = 2\n[limits]\noutbound_queue_bytes = 262144\nmsg_rate = 100000.0\nmsg_burst = 100000.0\n[presence]\ntyping_throttle_ms = 1",
    );
    // Events in a conversation of c1's owner core, so that they and c1's typing reach the
    // slow client's queue in the order they were handled.
    let events_room = sentinel_for("t1", ("t1", "c1"));
    let mut slow = stuck_client(&server, "slow", "c1");
    slow.subscribe(&events_room);
    let mut typists: Vec<Client> = (0..30)
        .map(|i| {
            let mut c = server.connect("t1", &format!("typist{i}"));
            c.subscribe("c1");
            c
        })
        .collect();
    let typing = json!({"type": "presence.activity", "activity": "typing", "conversationId": "c1"});
    let pad = "x".repeat(1000);
    // Events and typing until the slow client's queue is full and typing is being shed. Fewer
    // event bytes than typing bytes a round: typing arrives later than the events it follows
    // (a loaded machine delays it more), and the queue must hold typing to shed when it fills.
    let (mut seq, mut rounds) = (0, 0);
    while server.metric("fanfare_frames_shed_total") == 0 {
        assert!(rounds < 4000, "the slow client's queue never filled");
        let events = (seq..seq + 2)
            .map(|n| json!({"type": "conversation.updated", "conversationId": events_room, "seq": n, "pad": pad}))
            .collect();
        server.publish_ok("t1", events);
        seq += 2;
        for t in typists.iter_mut() {
            t.send(&typing);
        }
        rounds += 1;
    }
    assert_eq!(
        server.metric("fanfare_slow_consumer_closes_total"),
        0,
        "closed instead of shedding"
    );
    server.publish_ok(
        "t1",
        vec![json!({"type": "conversation.updated", "conversationId": events_room, "last": true})],
    );
    // Reading at last, the slow client finds every event, in order, and only some typing.
    let (events, typed) = events_then_typing(|| slow.recv());
    assert_eq!(events, seq);
    assert!(
        typed < rounds * typists.len(),
        "{typed} typing frames: none shed"
    );
}
