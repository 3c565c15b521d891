//! Presence bookkeeping, free of I/O so that its rules are unit-tested on their own.
//!
//! - [`Owned`]: on the core that owns a user (`shard_for(tenant:user)`), how many connections the
//!   user has, and the offline grace: a user whose last connection left goes offline only if no
//!   connection came back within the grace period (a generation number cancels stale timers).
//! - [`Replica`]: on every core, the online users of each tenant, kept current by the owners'
//!   broadcasts, so that snapshots are answered locally.
//! - [`Throttle`]: on a conversation's owner, the last forwarded typing event per user.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::Xxh3Builder;

use crate::shard::RoomKey;

type Map<K, V> = HashMap<K, V, Xxh3Builder>;

/// A user within a tenant.
pub type UserKey = (Arc<str>, Arc<str>);

#[derive(Default)]
struct UserState {
    connections: u32,
    online: bool,
    /// Bumped by every change, so that a grace timer can tell it is stale.
    generation: u64,
}

#[derive(Default)]
pub struct Owned {
    users: Map<UserKey, UserState>,
}

impl Owned {
    /// A connection of `user` opened; true when the user just came online.
    pub fn up(&mut self, user: &UserKey) -> bool {
        let state = self.users.entry(user.clone()).or_default();
        state.connections += 1;
        state.generation += 1;
        !std::mem::replace(&mut state.online, true)
    }

    /// A connection of `user` closed; when it was the last, the generation to pass to
    /// [`Owned::expire`] once the grace period is over.
    pub fn down(&mut self, user: &UserKey) -> Option<u64> {
        let state = self.users.get_mut(user)?;
        state.connections = state.connections.saturating_sub(1);
        state.generation += 1;
        (state.connections == 0).then_some(state.generation)
    }

    /// The grace period of `generation` is over; true when the user went offline.
    pub fn expire(&mut self, user: &UserKey, generation: u64) -> bool {
        match self.users.get(user) {
            Some(s) if s.connections == 0 && s.generation == generation => {
                self.users.remove(user);
                true
            }
            _ => false,
        }
    }
}

#[derive(Default)]
pub struct Replica {
    online: Map<Arc<str>, HashSet<Arc<str>, Xxh3Builder>>,
}

impl Replica {
    pub fn apply(&mut self, (tenant, user): &UserKey, online: bool) {
        if online {
            self.online
                .entry(tenant.clone())
                .or_default()
                .insert(user.clone());
        } else if let Some(users) = self.online.get_mut(tenant) {
            users.remove(user);
            if users.is_empty() {
                self.online.remove(tenant);
            }
        }
    }

    /// The tenant's online users, sorted.
    pub fn snapshot(&self, tenant: &str) -> Vec<Arc<str>> {
        let mut users: Vec<Arc<str>> = self
            .online
            .get(tenant)
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default();
        users.sort_unstable();
        users
    }
}

#[derive(Default)]
pub struct Throttle {
    last: Map<(RoomKey, Arc<str>), Instant>,
}

impl Throttle {
    /// True when `user`'s typing in `room` may be forwarded now.
    pub fn allow(
        &mut self,
        room: &RoomKey,
        user: &Arc<str>,
        now: Instant,
        period: Duration,
    ) -> bool {
        match self.last.get_mut(&(room.clone(), user.clone())) {
            Some(last) if now.saturating_duration_since(*last) < period => false,
            Some(last) => {
                *last = now;
                true
            }
            None => {
                self.last.insert((room.clone(), user.clone()), now);
                true
            }
        }
    }

    /// Forgets entries older than `period`: memory stays bounded by recent typists.
    pub fn prune(&mut self, now: Instant, period: Duration) {
        self.last
            .retain(|_, last| now.saturating_duration_since(*last) < period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(u: &str) -> UserKey {
        ("t".into(), u.into())
    }

    #[test]
    fn online_once_for_many_connections() {
        let mut o = Owned::default();
        assert!(o.up(&key("a")));
        assert!(!o.up(&key("a")), "a second connection is not news");
        assert_eq!(o.down(&key("a")), None, "one connection left");
        let g = o.down(&key("a")).expect("last connection gone");
        assert!(o.expire(&key("a"), g));
        assert!(o.up(&key("a")), "online again after going offline");
    }

    #[test]
    fn reconnect_inside_the_grace_cancels_the_offline() {
        let mut o = Owned::default();
        o.up(&key("a"));
        let g = o.down(&key("a")).unwrap();
        assert!(
            !o.up(&key("a")),
            "still online during the grace: no new online"
        );
        assert!(!o.expire(&key("a"), g), "the stale timer does nothing");
        let g2 = o.down(&key("a")).unwrap();
        assert!(o.expire(&key("a"), g2));
    }

    #[test]
    fn replica_snapshots_are_sorted_per_tenant() {
        let mut r = Replica::default();
        r.apply(&key("b"), true);
        r.apply(&key("a"), true);
        r.apply(&("other".into(), "z".into()), true);
        assert_eq!(r.snapshot("t"), vec![Arc::<str>::from("a"), "b".into()]);
        r.apply(&key("a"), false);
        assert_eq!(r.snapshot("t"), vec![Arc::<str>::from("b")]);
        assert!(r.snapshot("none").is_empty());
    }

    #[test]
    fn throttle_forwards_one_per_period() {
        let mut t = Throttle::default();
        let (room, user): (RoomKey, Arc<str>) = ("t:c:c1".into(), "u".into());
        let t0 = Instant::now();
        let p = Duration::from_millis(100);
        assert!(t.allow(&room, &user, t0, p));
        assert!(!t.allow(&room, &user, t0 + Duration::from_millis(50), p));
        assert!(t.allow(&"t:c:c2".into(), &user, t0, p), "per conversation");
        assert!(t.allow(&room, &user, t0 + Duration::from_millis(100), p));
        t.prune(t0 + Duration::from_secs(1), p);
        assert!(t.last.is_empty());
    }
}
