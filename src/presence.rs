//! Presence bookkeeping, free of I/O so that its rules are unit-tested on their own.
//!
//! - [`Owned`]: on the core that owns a user (`shard_for(tenant:user)`), how many connections the
//!   user has, and the offline grace: a user whose last connection left goes offline only if no
//!   connection came back within the grace period (a generation number cancels stale timers).
//! - [`Replica`]: on every core, the online users of each tenant, kept current by the owners'
//!   broadcasts, so that snapshots are answered locally.
//! - [`Throttle`]: on a conversation's owner, the last forwarded typing event per user.

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::route::UserKey;
use crate::route::{Map, RoomKey, Set};

/// One per online user on its owner core: kept small (32 bytes), as there are as many as users.
#[derive(Default)]
struct UserState {
    /// Connections on this instance.
    local: u32,
    /// Bumped (wrapping) by every change, so that a grace timer can tell it is stale.
    generation: u32,
    online: bool,
    /// Other instances (ids) on which the user has connections: a boxed slice, since it is
    /// empty without Redis and short with it.
    remote: Box<[Arc<str>]>,
}

/// What a change means for the rest of the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// The user just came online: tell the tenant.
    Online,
    /// The user has no connection anywhere: offline unless this generation is still current
    /// after the grace period.
    Leaving(u32),
}

#[derive(Default)]
pub struct Owned {
    users: Map<UserKey, UserState>,
}

impl Owned {
    /// A connection of `user` opened on this instance. The flag is true for its first one
    /// here (the instance must then tell the others).
    pub fn up(&mut self, user: &UserKey) -> (Transition, bool) {
        let state = self.users.entry(user.clone()).or_default();
        state.local += 1;
        let first = state.local == 1;
        (settle(state), first)
    }

    /// A connection of `user` closed on this instance. The flag is true when it was the last
    /// one here.
    pub fn down(&mut self, user: &UserKey) -> (Transition, bool) {
        let Some(state) = self.users.get_mut(user) else {
            return (Transition::Unchanged, false);
        };
        state.local = state.local.saturating_sub(1);
        let last = state.local == 0;
        (settle(state), last)
    }

    /// Another instance reports that `user` has (`up`) or no longer has connections there.
    pub fn remote(&mut self, user: &UserKey, instance: &Arc<str>, up: bool) -> Transition {
        let state = match (self.users.get_mut(user), up) {
            (Some(s), _) => s,
            (None, true) => self.users.entry(user.clone()).or_default(),
            (None, false) => return Transition::Unchanged,
        };
        let known = state.remote.iter().position(|i| i == instance);
        match (known, up) {
            (None, true) => {
                state.remote = [&state.remote[..], std::slice::from_ref(instance)]
                    .concat()
                    .into()
            }
            (Some(at), false) => {
                let mut rest = std::mem::take(&mut state.remote).into_vec();
                rest.swap_remove(at);
                state.remote = rest.into();
            }
            _ => return Transition::Unchanged,
        }
        settle(state)
    }

    /// `instance` now has exactly `members` of the users this core owns (a resync after
    /// missed messages, or an empty list for an instance that is gone).
    pub fn replace_instance(
        &mut self,
        instance: &Arc<str>,
        members: &[UserKey],
    ) -> Vec<(UserKey, Transition)> {
        let mut changes = Vec::new();
        // A set: an instance may list tens of thousands of users.
        let listed: Set<&UserKey> = members.iter().collect();
        let stale: Vec<UserKey> = self
            .users
            .iter()
            .filter(|(user, s)| s.remote.contains(instance) && !listed.contains(user))
            .map(|(user, _)| user.clone())
            .collect();
        for user in stale {
            changes.push((user.clone(), self.remote(&user, instance, false)));
        }
        for user in members {
            changes.push((user.clone(), self.remote(user, instance, true)));
        }
        changes.retain(|(_, t)| *t != Transition::Unchanged);
        changes
    }

    /// The grace period of `generation` is over; true when the user went offline.
    pub fn expire(&mut self, user: &UserKey, generation: u32) -> bool {
        match self.users.get(user) {
            Some(s) if !s.online_now() && s.generation == generation => {
                self.users.remove(user);
                true
            }
            _ => false,
        }
    }

    /// Users with connections on this instance.
    pub fn local_users(&self) -> Vec<UserKey> {
        self.users
            .iter()
            .filter(|(_, s)| s.local > 0)
            .map(|(u, _)| u.clone())
            .collect()
    }
}

impl UserState {
    fn online_now(&self) -> bool {
        self.local > 0 || !self.remote.is_empty()
    }
}

/// Brings `online` in line with the connections and says what that means.
fn settle(state: &mut UserState) -> Transition {
    state.generation = state.generation.wrapping_add(1);
    match (state.online_now(), state.online) {
        (true, false) => {
            state.online = true;
            Transition::Online
        }
        (false, true) => Transition::Leaving(state.generation),
        _ => Transition::Unchanged,
    }
}

#[derive(Default)]
pub struct Replica {
    online: Map<Arc<str>, Set<Arc<str>>>,
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

    pub fn contains(&self, (tenant, user): &UserKey) -> bool {
        self.online
            .get(tenant)
            .is_some_and(|users| users.contains(user))
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

    fn leaving(t: Transition) -> u32 {
        match t {
            Transition::Leaving(g) => g,
            other => panic!("expected Leaving, got {other:?}"),
        }
    }

    #[test]
    fn online_once_for_many_connections() {
        let mut o = Owned::default();
        assert_eq!(o.up(&key("a")), (Transition::Online, true));
        assert_eq!(
            o.up(&key("a")),
            (Transition::Unchanged, false),
            "a second connection is not news"
        );
        assert_eq!(
            o.down(&key("a")),
            (Transition::Unchanged, false),
            "one connection left"
        );
        let (t, last) = o.down(&key("a"));
        assert!(last);
        assert!(o.expire(&key("a"), leaving(t)));
        assert_eq!(
            o.up(&key("a")).0,
            Transition::Online,
            "online again after going offline"
        );
    }

    #[test]
    fn reconnect_inside_the_grace_cancels_the_offline() {
        let mut o = Owned::default();
        o.up(&key("a"));
        let g = leaving(o.down(&key("a")).0);
        assert_eq!(
            o.up(&key("a")).0,
            Transition::Unchanged,
            "still online during the grace"
        );
        assert!(!o.expire(&key("a"), g), "the stale timer does nothing");
        let g2 = leaving(o.down(&key("a")).0);
        assert!(o.expire(&key("a"), g2));
    }

    #[test]
    fn other_instances_keep_a_user_online() {
        let mut o = Owned::default();
        let other: Arc<str> = "i2".into();
        assert_eq!(o.remote(&key("a"), &other, true), Transition::Online);
        assert_eq!(
            o.up(&key("a")),
            (Transition::Unchanged, true),
            "first here, but not news"
        );
        assert_eq!(
            o.down(&key("a")),
            (Transition::Unchanged, true),
            "still on i2"
        );
        let g = leaving(o.remote(&key("a"), &other, false));
        assert!(o.expire(&key("a"), g));
        assert_eq!(
            o.remote(&key("b"), &other, false),
            Transition::Unchanged,
            "unknown user leaving"
        );
    }

    #[test]
    fn replacing_an_instance_drops_missed_users_and_adds_new_ones() {
        let mut o = Owned::default();
        let other: Arc<str> = "i2".into();
        o.remote(&key("a"), &other, true);
        o.remote(&key("b"), &other, true);
        let mut changes = o.replace_instance(&other, &[key("b"), key("c")]);
        changes.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].0, key("a"));
        assert!(matches!(changes[0].1, Transition::Leaving(_)));
        assert_eq!(changes[1], (key("c"), Transition::Online));
        let gone = o.replace_instance(&other, &[]);
        assert_eq!(gone.len(), 2, "b and c leave with the instance");
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
