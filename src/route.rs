//! Ownership: which core owns a conversation, a user's presence or a client IP's rate bucket.
//!
//! One pure function, [`shard_for`]: jump consistent hash over xxh3 of the key. The same key
//! always maps to the same shard for a given shard count, and growing the count moves only
//! about `1/n` of the keys.

use std::collections::{HashMap, HashSet};

use std::net::IpAddr;
use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

/// The hash map of the per-core indexes: a small (8-byte), seeded, fast hasher, since these
/// maps are many and their keys partly come from clients. (`Xxh3Builder` would carry 216 bytes
/// in every map and build a 576-byte hasher per key.)
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A set with the same hasher as [`Map`].
pub type Set<T> = HashSet<T, foldhash::fast::RandomState>;

/// The key `map` holds equal to `key`: a shared copy, where building one would allocate.
pub fn held_key<V>(map: &Map<Arc<str>, V>, key: &str) -> Option<Arc<str>> {
    map.get_key_value(key).map(|(held, _)| held.clone())
}

/// The routing key of a conversation: `<tenantId>:c:<conversationId>` (tenant IDs contain no
/// `:`, so the key is unambiguous). It is also the Redis channel name after the prefix.
pub type RoomKey = Arc<str>;

pub fn room_key(tenant: &str, conversation: &str) -> RoomKey {
    format!("{tenant}:c:{conversation}").into()
}

/// A user: (tenant, user id).
pub type UserKey = (Arc<str>, Arc<str>);

/// The key that places a user's presence: `<tenantId>:u:<userId>`.
pub fn user_key((tenant, user): &UserKey) -> String {
    format!("{tenant}:u:{user}")
}

/// The key that places a client IP's rate bucket: IPv4 as its IPv6-mapped form.
pub fn ip_key(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The shard (0..n) that owns `key`. `n` must be at least 1.
pub fn shard_for(key: &[u8], n: usize) -> usize {
    jump_hash(xxh3_64(key), n.max(1) as i64) as usize
}

/// Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014).
fn jump_hash(mut key: u64, buckets: i64) -> i64 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b.wrapping_add(1) as f64)
            * ((1u64 << 31) as f64 / ((key >> 33).wrapping_add(1) as f64))) as i64;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| format!("tenant-{}:c:conv-{i}", i % 7).into_bytes())
            .collect()
    }

    #[test]
    fn stable_for_the_same_key() {
        for k in keys(1000) {
            assert_eq!(shard_for(&k, 8), shard_for(&k, 8));
            assert!(shard_for(&k, 8) < 8);
        }
        assert_eq!(shard_for(b"anything", 1), 0);
        assert_eq!(shard_for(b"anything", 0), 0);
    }

    #[test]
    fn spreads_evenly() {
        for n in [2usize, 3, 8, 64] {
            let mut counts = vec![0usize; n];
            let total = 100_000;
            for k in keys(total) {
                counts[shard_for(&k, n)] += 1;
            }
            let expected = (total / n) as f64;
            for (shard, &c) in counts.iter().enumerate() {
                // Five standard deviations of a fair multinomial: fails only on real skew.
                let off = (c as f64 - expected).abs();
                assert!(
                    off < 5.0 * expected.sqrt(),
                    "n={n} shard {shard} has {c}, expected about {expected}"
                );
            }
        }
    }

    #[test]
    fn growing_moves_only_a_fair_share() {
        let all = keys(50_000);
        for n in [2usize, 4, 7] {
            let moved = all
                .iter()
                .filter(|k| shard_for(k, n) != shard_for(k, n + 1))
                .count();
            let fair = all.len() / (n + 1);
            assert!(
                moved < fair * 11 / 10,
                "n={n}: {moved} moved, fair share {fair}"
            );
            // Keys that move go to the new shard only.
            assert!(all
                .iter()
                .all(|k| shard_for(k, n) == shard_for(k, n + 1) || shard_for(k, n + 1) == n));
        }
    }
}
