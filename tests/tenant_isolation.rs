//! Tenants never see each other's events, even for the same conversation id.
mod support;

use support::*;

#[test]
fn same_conversation_id_in_two_tenants_never_shares_an_event() {
    let server = Server::start("[server]\nshards = 2");
    let mut a = server.connect("tenant-a", "u1");
    let mut b = server.connect("tenant-b", "u1");
    a.subscribe("c1");
    b.subscribe("c1");
    // Each also hears a conversation that the other tenant's c1 shares its owner core with:
    // an event leaked from there would arrive before that sentinel.
    let (sentinel_a, sentinel_b) = (
        sentinel_for("tenant-a", ("tenant-b", "c1")),
        sentinel_for("tenant-b", ("tenant-a", "c1")),
    );
    a.subscribe(&sentinel_a);
    b.subscribe(&sentinel_b);
    server.publish_ok("tenant-a", vec![updated("c1", 1)]);
    server.publish_ok("tenant-b", vec![updated("c1", 2)]);
    server.publish_ok("tenant-a", vec![updated(&sentinel_a, 3)]);
    server.publish_ok("tenant-b", vec![updated(&sentinel_b, 4)]);
    assert_eq!(a.recv(), updated("c1", 1));
    assert_eq!(
        a.recv(),
        updated(&sentinel_a, 3),
        "nothing of tenant-b's came first"
    );
    assert_eq!(b.recv(), updated("c1", 2));
    assert_eq!(
        b.recv(),
        updated(&sentinel_b, 4),
        "nothing of tenant-a's came first"
    );
}
