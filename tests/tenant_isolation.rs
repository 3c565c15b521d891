//! Tenants never see each other's events, even for the same conversation id.
mod support;

use serde_json::json;
use support::*;

#[test]
fn same_conversation_id_in_two_tenants_never_shares_an_event() {
    let server = Server::start("[server]\nshards = 2");
    let mut a = server.connect("tenant-a", "u1");
    let mut b = server.connect("tenant-b", "u1");
    a.subscribe("c1");
    b.subscribe("c1");
    server.publish_ok("tenant-a", vec![updated("c1", 1)]);
    server.publish_ok("tenant-b", vec![updated("c1", 2)]);
    assert_eq!(a.recv()["seq"], 1);
    assert_eq!(b.recv()["seq"], 2);
    // Nothing else was queued for either: the next frame each sees is its own pong.
    assert_eq!(a.request(json!({"type": "ping"}), "p")["type"], "pong");
    assert_eq!(b.request(json!({"type": "ping"}), "p")["type"], "pong");
}
