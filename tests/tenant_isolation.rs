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
    // c1 and the sentinel have different owners: either may come first; anything leaked from
    // the other tenant would come before the sentinel, and fail here.
    a.recv_in_any_order(&[updated("c1", 1), updated(&sentinel_a, 3)]);
    b.recv_in_any_order(&[updated("c1", 2), updated(&sentinel_b, 4)]);
}

/// A small seeded generator (xorshift64*): the same run for a seed on every machine.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n as u64) as usize
    }
}

#[test]
fn random_tenants_users_and_conversations_on_two_instances_never_cross() {
    use std::collections::{BTreeMap, BTreeSet};
    let redis = Redis::start();
    let config = format!(
        "[server]\nshards = 2\n[broker]\nkind = \"redis\"\nredis_url = \"{}\"\n",
        redis.url()
    );
    let servers = [Server::start(&config), Server::start(&config)];
    for s in &servers {
        wait_for("readyz 200", || {
            (s.http("GET", "/readyz", &[], b"").status == 200).then_some(())
        });
    }
    let seed = std::env::var("ISOLATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC0FFEE);
    let mut rng = Rng(seed.max(1));
    // Tenants share user and conversation ids: only the tenant tells them apart.
    let (tenants, users, conversations) = (
        ["t0", "t1", "t2"],
        ["u0", "u1", "u2"],
        ["c0", "c1", "c2", "c3"],
    );
    let mut clients: Vec<(Client, &str, BTreeSet<&str>)> = (0..24)
        .map(|_| {
            let (tenant, user) = (tenants[rng.below(3)], users[rng.below(3)]);
            let mut c = servers[rng.below(2)].connect(tenant, user);
            let subs: BTreeSet<&str> = (0..1 + rng.below(3))
                .map(|_| conversations[rng.below(4)])
                .collect();
            for conv in &subs {
                c.subscribe(conv);
            }
            (c, tenant, subs)
        })
        .collect();
    // Random events through either instance, then an end marker per tenant and conversation.
    let mut sent: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for n in 0..120 {
        let (tenant, conv) = (tenants[rng.below(3)], conversations[rng.below(4)]);
        *sent.entry((tenant, conv)).or_default() += 1;
        let event = serde_json::json!({"type": "conversation.updated", "conversationId": conv, "tenant": tenant, "n": n});
        servers[rng.below(2)].publish_ok(tenant, vec![event]);
    }
    for tenant in tenants {
        for conv in conversations {
            let end = serde_json::json!({"type": "conversation.updated", "conversationId": conv, "tenant": tenant, "end": true});
            servers[rng.below(2)].publish_ok(tenant, vec![end]);
        }
    }
    for (c, tenant, subs) in &mut clients {
        let mut ended: BTreeSet<String> = BTreeSet::new();
        let mut got: BTreeMap<String, usize> = BTreeMap::new();
        while ended.len() < subs.len() {
            let v = c.recv();
            let conv = v["conversationId"].as_str().unwrap().to_string();
            assert_eq!(v["tenant"], *tenant, "an event of another tenant: {v}");
            assert!(
                subs.contains(conv.as_str()),
                "an event of a conversation not subscribed: {v}"
            );
            if v["end"] == true {
                ended.insert(conv);
            } else {
                assert!(
                    !ended.contains(&conv),
                    "an event after its conversation's end: {v}"
                );
                *got.entry(conv).or_default() += 1;
            }
        }
        for conv in subs.iter() {
            let expected = sent.get(&(*tenant, *conv)).copied().unwrap_or(0);
            assert_eq!(
                got.get(*conv).copied().unwrap_or(0),
                expected,
                "{tenant}/{conv}: every event once"
            );
        }
    }
}
