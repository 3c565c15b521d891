//! Missed-event recovery as a client sees it: resubscribing with `since`, the offsets of
//! delivered events and publish answers, the history API.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::{clients_on_both_cores, updated, Client, HttpResponse, Server, API_KEY};

/// The next text frame as the server wrote it (control frames and presence skipped).
pub fn recv_text(c: &mut Client) -> String {
    loop {
        match c.ws.read().expect("read a frame") {
            tungstenite::Message::Text(t) if !t.contains("\"presence.") => return t.to_string(),
            _ => continue,
        }
    }
}

/// Subscribes with `since` (when given) and returns what came before the ack, and the ack.
pub fn resubscribe(
    c: &mut Client,
    conversation: &str,
    since: Option<(u64, &str)>,
) -> (Vec<Value>, Value) {
    let mut event = json!({"type": "subscribe", "conversationId": conversation, "id": "re"});
    if let Some((offset, epoch)) = since {
        event["since"] = json!({"offset": offset, "epoch": epoch});
    }
    c.send(&event);
    let mut before = Vec::new();
    loop {
        let v = c.recv();
        if v["id"] == "re" {
            assert_eq!(v["type"], "ack", "{v}");
            return (before, v);
        }
        before.push(v);
    }
}

pub fn offsets(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["offset"].as_u64().expect("offset"))
        .collect()
}

/// Publishes `n` updates of `conversation` from `seq` and returns the offsets given.
pub fn publish(server: &Server, conversation: &str, seq: std::ops::Range<usize>) -> Vec<u64> {
    let events: Vec<Value> = seq.map(|i| updated(conversation, i)).collect();
    let r = server.publish(&json!({"tenantId": "t1", "events": events}));
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()["offsets"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect()
}

/// A client of `user` (tenant `t1`) on each core.
pub fn one_per_core(server: &Server, user: &str) -> Vec<(Client, u64)> {
    let mut clients = clients_on_both_cores(server, user, 1);
    clients.sort_by_key(|(_, core)| *core);
    clients.dedup_by_key(|(_, core)| *core);
    clients
}

pub fn history(server: &Server, tenant: &str, conversation: &str, query: &str) -> HttpResponse {
    let auth = format!("Bearer {API_KEY}");
    let path = format!("/v1/history/{tenant}/{conversation}{query}");
    server.http("GET", &path, &[("Authorization", &auth)], b"")
}

/// Publishes `total` events of `c1` (tenant `t1`) in batches of 5, hundreds a second, through
/// each of `servers` in turn, while a client reconnects again and again (to each server in
/// turn) and resubscribes from the last offset it saw: every offset must reach it once and in
/// order, replayed or live, and each recovery must succeed. Returns how often it reconnected.
pub fn reconnect_while_publishing(servers: Arc<Vec<Server>>, total: u64, epoch: &str) -> usize {
    // Every offset up to this one has been fanned out (a publish is answered after).
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (servers, published) = (servers.clone(), published.clone());
        std::thread::spawn(move || {
            for (batch, from) in (0..total as usize).step_by(5).enumerate() {
                let via = &servers[batch % servers.len()];
                let given = publish(via, "c1", from..from + 5);
                published.store(*given.last().unwrap(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let (mut last, mut reconnects) = (0, 0);
    while published.load(Ordering::SeqCst) < total {
        let mut c = servers[reconnects % servers.len()].connect("t1", "u1");
        let (replayed, ack) = resubscribe(&mut c, "c1", Some((last, epoch)));
        assert_eq!(ack["recovered"], true, "{ack}");
        for offset in offsets(&replayed) {
            assert_eq!(offset, last + 1, "replayed out of order or twice");
            last = offset;
        }
        assert_eq!(ack["offset"], last, "the ack follows what was sent");
        // A few live events (ones known to be out), then the connection drops again.
        for _ in 0..3 {
            if last >= published.load(Ordering::SeqCst) {
                break;
            }
            let offset = offsets(&[c.recv()])[0];
            assert_eq!(
                offset,
                last + 1,
                "a live event lost or repeated after the ack"
            );
            last = offset;
        }
        reconnects += 1;
    }
    publisher.join().unwrap();
    let mut c = servers[0].connect("t1", "u1");
    let (replayed, ack) = resubscribe(&mut c, "c1", Some((last, epoch)));
    assert_eq!(offsets(&replayed), ((last + 1)..=total).collect::<Vec<_>>());
    assert_eq!(ack["offset"], total);
    reconnects
}

/// POSTs `body` to `/v1/publish` with the test API key, as it is.
pub fn publish_raw(server: &Server, body: &str) -> HttpResponse {
    let auth = format!("Bearer {API_KEY}");
    server.http(
        "POST",
        "/v1/publish",
        &[("Authorization", &auth)],
        body.as_bytes(),
    )
}
