//! The mesh between cores under pressure: rings far too small for the traffic. Subscriptions
//! must never be lost or undone out of order, and events dropped between cores must be
//! announced to their subscribers (`error{code:"overloaded"}`), never lost silently.
mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Rings (and outboxes) of 4 messages between the two cores, and no client rate limit in the
/// way of the churn.
const TINY_RINGS: &str = "[server]\nshards = 2\nmesh_queue_len = 4\n[limits]\nmsg_rate = 1000000.0\nmsg_burst = 1000000.0\nconnect_burst_per_ip = 5000.0";

/// Publishes `event(round)` for round 0, 1, … until `done` says every reader has what it
/// waited for: an event published while deliveries are still being dropped may be dropped too
/// (and announced), so the proof that a subscription is live is an event that arrives.
fn publish_until(server: &Server, done: impl Fn() -> bool, event: impl Fn(usize) -> Vec<Value>) {
    let deadline = Instant::now() + DEADLINE;
    for round in 0.. {
        if done() {
            return;
        }
        assert!(Instant::now() < deadline, "not every reader got its event");
        server.publish_ok("t1", event(round));
    }
}

/// Makes a blocking read of `client` give up after a short while, so that a reader thread can
/// check whether it should stop.
fn short_reads(client: &Client) {
    let timeout = Some(Duration::from_millis(100));
    client.ws.get_ref().set_read_timeout(timeout).unwrap();
}

/// The next text frame, or `None` when the short read timed out.
fn try_recv(client: &mut Client) -> Option<Value> {
    loop {
        match client.ws.read() {
            Ok(tungstenite::Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                return None
            }
            Err(e) => panic!("connection failed: {e}"),
        }
    }
}

#[test]
fn subscribe_unsubscribe_churn_across_cores_loses_no_subscription() {
    let server = Server::start(TINY_RINGS);
    let rooms = [
        conversations_owned_by(0, 2, 4),
        conversations_owned_by(1, 2, 4),
    ]
    .concat();
    let clients = clients_on_both_cores(&server, "churner", 3);
    let (churning, finished) = (AtomicBool::new(true), AtomicUsize::new(0));
    std::thread::scope(|s| {
        // Events crossing the cores all through the churn.
        s.spawn(|| {
            let mut seq = 0;
            while churning.load(Relaxed) && seq < 5_000 {
                server.publish_ok("t1", rooms.iter().map(|r| updated(r, seq)).collect());
                seq += 1;
            }
        });
        let settled: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, (mut client, _))| {
                let rooms = &rooms;
                s.spawn(move || {
                    // 400 subscribe/unsubscribe cycles, pipelined, over every room.
                    for cycle in 0..400 {
                        let room = &rooms[(cycle + i) % rooms.len()];
                        client.send(&json!({"type": "subscribe", "conversationId": room}));
                        client.send(&json!({"type": "unsubscribe", "conversationId": room}));
                    }
                    // The last subscriptions, two rooms (both owners among the clients).
                    let mine = [i, i + 5].map(|k| rooms[k % rooms.len()].clone());
                    for room in &mine {
                        let id = format!("final-{room}");
                        client
                            .send(&json!({"type": "subscribe", "conversationId": room, "id": id}));
                        let answer = loop {
                            let v = client.recv();
                            if v["id"] == id.as_str() {
                                break v;
                            }
                        };
                        assert_eq!(answer["type"], "ack", "client {i}: {answer}");
                    }
                    (client, mine)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        churning.store(false, Relaxed);
        let readers = settled.len();
        for (i, (mut client, mine)) in settled.into_iter().enumerate() {
            let finished = &finished;
            s.spawn(move || {
                short_reads(&client);
                let mut missing = mine.to_vec();
                let deadline = Instant::now() + DEADLINE;
                while !missing.is_empty() {
                    assert!(
                        Instant::now() < deadline,
                        "client {i} never got {missing:?}"
                    );
                    if let Some(v) = try_recv(&mut client).filter(|v| v.get("last").is_some()) {
                        missing.retain(|m| m != v["conversationId"].as_str().unwrap());
                    }
                }
                finished.fetch_add(1, Relaxed);
            });
        }
        let last = |round| {
            rooms
                .iter()
                .map(
                    |r| json!({"type": "conversation.updated", "conversationId": r, "last": round}),
                )
                .collect()
        };
        publish_until(&server, || finished.load(Relaxed) == readers, last);
    });
}

#[test]
fn events_dropped_between_cores_are_announced_as_overloaded() {
    let server = Server::start(TINY_RINGS);
    // A room owned by core 0 and a subscriber on core 1: every event crosses the mesh.
    let room = conversations_owned_by(0, 2, 1).remove(0);
    let mut clients = clients_on_both_cores(&server, "reader", 1);
    let at = clients.iter().position(|(_, core)| *core == 1).unwrap();
    let (mut reader, _) = clients.swap_remove(at);
    reader.subscribe(&room);
    let (saw_after, started) = (AtomicBool::new(false), Instant::now());
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            short_reads(&reader);
            let (mut last_seq, mut announced) = (None::<u64>, 0u64);
            let deadline = Instant::now() + 2 * DEADLINE;
            while !(announced > 0 && saw_after.load(Relaxed)) {
                assert!(
                    Instant::now() < deadline,
                    "no gap announced, or nothing after it"
                );
                let Some(v) = try_recv(&mut reader) else {
                    continue;
                };
                match v["type"].as_str() {
                    Some("conversation.updated") if v.get("after").is_some() => {
                        saw_after.store(announced > 0, Relaxed)
                    }
                    Some("conversation.updated") => {
                        let n = v["seq"].as_u64().unwrap();
                        assert!(last_seq < Some(n), "{n} after {last_seq:?}: out of order");
                        last_seq = Some(n);
                    }
                    Some("error") => {
                        assert_eq!(v["code"], "overloaded", "{v}");
                        assert!(v["message"].as_str().unwrap().contains(&room), "{v}");
                        announced += 1;
                    }
                    _ => panic!("unexpected frame {v}"),
                }
            }
            announced
        });
        // Bursts of 500 events in one request until the server reports dropped deliveries.
        let mut seq = 0;
        while server.metric("fanfare_mesh_overflow_total") == 0 {
            assert!(
                seq < 50_000,
                "100 bursts of 500 events never overflowed rings of 4"
            );
            server.publish_ok("t1", (seq..seq + 500).map(|n| updated(&room, n)).collect());
            seq += 500;
        }
        // The subscription outlives the gap: a later event still arrives.
        let after = |round| {
            vec![json!({"type": "conversation.updated", "conversationId": room, "after": round})]
        };
        publish_until(&server, || saw_after.load(Relaxed), after);
        let announced = watcher.join().unwrap();
        let seconds = started.elapsed().as_secs() + 1;
        assert!(
            announced <= seconds,
            "{announced} overloaded errors in {seconds} s: more than one a second"
        );
    });
}
