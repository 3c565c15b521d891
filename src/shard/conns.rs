//! This core's connections, by tenant (for presence delivery) and id, and with
//! `presence.mode = "watch"` by the users they watch.
//!
//! Invariants: lives on one core; a connection is here from its `register` to its
//! `unregister` (the shard's), and an empty tenant is removed; a connection is among a user's
//! watchers exactly while that user is on its watch list, and a user without watchers is
//! removed, so a presence change costs its watchers, never the tenant.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::handle::{ConnHandle, Flush};
use crate::mesh::Fanned;
use crate::metrics::CoreStats;
use crate::presence::UserKey;
use crate::route::{held_key, Map, Set};

/// Connections by id: a set of handles looked up by their `id` (8 bytes an entry, where a map
/// from id to handle takes 16).
type Conns = Set<ById>;

/// A handle that hashes and compares as its id.
struct ById(Rc<ConnHandle>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.hash(state)
    }
}

impl std::borrow::Borrow<u64> for ById {
    fn borrow(&self) -> &u64 {
        &self.0.id
    }
}

pub struct Connections {
    tenants: RefCell<Map<Arc<str>, Conns>>,
    watchers: RefCell<Map<UserKey, Conns>>,
    /// With `server.write_delay_ms`: presence frames are paced like events.
    flush: Option<Rc<Flush>>,
}

impl Connections {
    pub fn new(flush: Option<Rc<Flush>>) -> Connections {
        Connections {
            tenants: RefCell::default(),
            watchers: RefCell::default(),
            flush,
        }
    }

    /// `tenant`, or the equal key this core already holds for it (its connections share one).
    pub fn tenant_key(&self, tenant: Box<str>) -> Arc<str> {
        held_key(&self.tenants.borrow(), &tenant).unwrap_or_else(|| tenant.into())
    }

    pub(super) fn insert(&self, conn: Rc<ConnHandle>) {
        self.tenants
            .borrow_mut()
            .entry(conn.tenant.clone())
            .or_default()
            .insert(ById(conn));
    }

    /// False when `conn` was not here.
    pub(super) fn remove(&self, conn: &ConnHandle) -> bool {
        let mut tenants = self.tenants.borrow_mut();
        let Some(conns) = tenants.get_mut(&conn.tenant) else {
            return false;
        };
        if !conns.remove(&conn.id) {
            return false;
        }
        if conns.is_empty() {
            tenants.remove(&conn.tenant);
        }
        true
    }

    /// How many clients this core holds.
    pub fn len(&self) -> usize {
        self.tenants
            .borrow()
            .values()
            .map(|conns| conns.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.borrow().is_empty()
    }

    /// Calls `f` on every connection of this core.
    pub fn for_each(&self, mut f: impl FnMut(&Rc<ConnHandle>)) {
        for c in self
            .tenants
            .borrow()
            .values()
            .flat_map(|conns| conns.iter())
        {
            f(&c.0);
        }
    }

    /// Queues `out` to every connection of `tenant` on this core; how many got it.
    pub fn push_to_tenant(&self, tenant: &str, out: &Fanned, stats: &CoreStats) -> u64 {
        self.push_to(self.tenants.borrow().get(tenant), out, stats)
    }

    /// `conn` watches `user` of its tenant from now on.
    pub fn watch(&self, conn: &Rc<ConnHandle>, user: &Arc<str>) {
        let key = (conn.tenant.clone(), user.clone());
        self.watchers
            .borrow_mut()
            .entry(key)
            .or_default()
            .insert(ById(conn.clone()));
    }

    /// `conn` no longer watches `user`.
    pub fn unwatch(&self, conn: &ConnHandle, user: &Arc<str>) {
        let key = (conn.tenant.clone(), user.clone());
        let mut watchers = self.watchers.borrow_mut();
        if let Some(conns) = watchers.get_mut(&key) {
            conns.remove(&conn.id);
            if conns.is_empty() {
                watchers.remove(&key);
            }
        }
    }

    /// Queues `out` to this core's watchers of `user`; how many got it.
    pub fn push_to_watchers(&self, user: &UserKey, out: &Fanned, stats: &CoreStats) -> u64 {
        self.push_to(self.watchers.borrow().get(user), out, stats)
    }

    /// Queues `out` to `conns`, paced; how many got it.
    fn push_to(&self, conns: Option<&Conns>, out: &Fanned, stats: &CoreStats) -> u64 {
        let conns = conns.into_iter().flat_map(|c| c.iter().map(|c| &*c.0));
        crate::rooms::push_all(conns, out, stats, self.flush.as_deref())
    }
}
