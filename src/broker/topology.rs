//! Which Redis serves what: the hash slot of a key or channel (CRC16 of its hash tag, as Redis
//! Cluster computes it), and the map of slot ranges to the masters serving them, read from
//! `CLUSTER SLOTS`. With one Redis, that one serves every slot.

use redis::Value;

/// Redis Cluster's number of hash slots.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`: of the part between the first `{` and the next `}` when that part
/// is not empty, else of the whole key.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16-CCITT (XMODEM), the one Redis Cluster uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A master and the slot ranges it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub host: String,
    pub port: u16,
    pub ranges: Vec<(u16, u16)>,
}

impl Master {
    pub fn serves(&self, slot: u16) -> bool {
        self.ranges.iter().any(|&(lo, hi)| lo <= slot && slot <= hi)
    }

    /// A hash tag whose slot this master serves, for a channel that must live on it.
    pub fn tag(&self) -> String {
        (0u32..)
            .map(|n| n.to_string())
            .find(|tag| self.serves(slot(tag.as_bytes())))
            .unwrap_or_default()
    }
}

/// Reads a `CLUSTER SLOTS` reply into its masters, sorted by address. `queried` stands for a
/// master that gives no host of its own. `None` when the reply is not one.
pub fn read_slots(reply: &Value, queried: &str) -> Option<Vec<Master>> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut masters: Vec<Master> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            return None;
        };
        let [Value::Int(lo), Value::Int(hi), Value::Array(master), ..] = items.as_slice() else {
            return None;
        };
        let [host, Value::Int(port), ..] = master.as_slice() else {
            return None;
        };
        let host = match host {
            Value::BulkString(h) if !h.is_empty() && h.as_slice() != b"?" => {
                String::from_utf8(h.clone()).ok()?
            }
            _ => queried.to_string(),
        };
        let (lo, hi, port) = (
            u16::try_from(*lo).ok()?,
            u16::try_from(*hi).ok()?,
            u16::try_from(*port).ok()?,
        );
        if lo > hi || hi >= SLOTS {
            return None;
        }
        match masters
            .iter_mut()
            .find(|m| m.host == host && m.port == port)
        {
            Some(m) => m.ranges.push((lo, hi)),
            None => masters.push(Master {
                host,
                port,
                ranges: vec![(lo, hi)],
            }),
        }
    }
    masters.sort_by(|a, b| (&a.host, a.port).cmp(&(&b.host, b.port)));
    Some(masters)
}

/// Every slot is served by one of `masters`.
pub fn complete<'a>(masters: impl IntoIterator<Item = &'a Master>) -> bool {
    let mut ranges: Vec<(u16, u16)> = masters
        .into_iter()
        .flat_map(|m| m.ranges.iter().copied())
        .collect();
    ranges.sort_unstable();
    let mut next = 0u32;
    for (lo, hi) in ranges {
        if u32::from(lo) > next {
            return false;
        }
        next = next.max(u32::from(hi) + 1);
    }
    next == u32::from(SLOTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // From `CLUSTER KEYSLOT` of Redis 7.0.
        assert_eq!(slot(b"fanfare:t1:c:conv1"), 34);
        assert_eq!(slot(b"fanfare:presence"), 14532);
        assert_eq!(slot(b"{fanfare:presence}:x"), 14532);
        assert_eq!(slot(b"123456789"), 12739);
        // An empty tag hashes the whole key; only the first tag counts.
        assert_eq!(slot(b"a{}b"), crc16(b"a{}b") % SLOTS);
        assert_eq!(slot(b"x{y}{z}"), slot(b"y"));
    }

    #[test]
    fn cluster_slots_replies_become_masters() {
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |lo, hi, host, port| {
            Value::Array(vec![
                Value::Int(lo),
                Value::Int(hi),
                node(host, port),
                node("10.0.0.9", 1),
            ])
        };
        let reply = Value::Array(vec![
            range(8192, 16383, "b", 7001),
            range(0, 4095, "a", 7000),
            range(4096, 8191, "", 7000),
        ]);
        let masters = read_slots(&reply, "a").unwrap();
        assert_eq!(masters.len(), 2);
        assert_eq!(masters[0].ranges, vec![(0, 4095), (4096, 8191)]);
        assert!(complete(&masters));
        assert!(masters[1].serves(slot(masters[1].tag().as_bytes())));
        assert!(!complete(&masters[..1]));
        assert!(read_slots(&Value::Int(1), "a").is_none());
    }
}
