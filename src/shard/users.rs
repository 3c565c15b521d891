//! Presence on a core: a user's connections are counted on the user's owner core (the rules
//! are `presence::Owned`), whose changes are broadcast once per core; each core keeps the
//! tenant's online users (`presence::Replica`) and delivers the change to its own connections
//! of the tenant. What other instances report arrives through `cluster`.
//!
//! Invariants: runs on one core; never awaits except for room in a peer's outbox; the offline
//! grace is a timer per leaving user whose generation number cancels it on a reconnect.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Shard;
use crate::handle::Kind;
use crate::mesh::{Fanned, Message};
use crate::presence::{Transition, UserKey};
use crate::protocol::server_event;
use crate::route::{shard_for, user_key};

impl Shard {
    pub(super) fn user_owner(&self, user: &UserKey) -> usize {
        shard_for(user_key(user).as_bytes(), self.count)
    }

    /// Tells `user`'s owner that one of its connections opened or closed.
    pub(super) async fn route_connection(self: &Rc<Self>, user: UserKey, up: bool) {
        let owner = self.user_owner(&user);
        self.mesh.room(owner).await;
        self.route(owner, Message::Connection { user, up });
    }

    pub(super) fn connection_at_owner(self: &Rc<Self>, user: UserKey, up: bool) {
        let (transition, edge) = if up {
            self.users.borrow_mut().up(&user)
        } else {
            self.users.borrow_mut().down(&user)
        };
        if edge {
            self.announce_user(&user, up);
        }
        self.apply(user, transition);
    }

    pub(super) fn remote_at_owner(self: &Rc<Self>, user: UserKey, instance: Arc<str>, up: bool) {
        let transition = self.users.borrow_mut().remote(&user, &instance, up);
        self.apply(user, transition);
    }

    pub(super) fn members_here(self: &Rc<Self>, instance: &Arc<str>, users: &[UserKey]) {
        let mine: Vec<UserKey> = users
            .iter()
            .filter(|u| self.user_owner(u) == self.id)
            .cloned()
            .collect();
        let changes = self.users.borrow_mut().replace_instance(instance, &mine);
        for (user, transition) in changes {
            self.apply(user, transition);
        }
    }

    /// Acts on what a change means: tell the tenant now, or after the grace period.
    fn apply(self: &Rc<Self>, user: UserKey, transition: Transition) {
        match transition {
            Transition::Unchanged => {}
            Transition::Online => self.broadcast_presence(user, true),
            Transition::Leaving(generation) => {
                let me = self.clone();
                let grace = Duration::from_millis(self.config.presence.offline_grace_ms);
                glommio::spawn_local(async move {
                    glommio::timer::sleep(grace).await;
                    if me.users.borrow_mut().expire(&user, generation) {
                        me.broadcast_presence(user, false);
                    }
                })
                .detach();
            }
        }
    }

    /// From a user's owner: one message per core, each delivering to its own connections.
    fn broadcast_presence(self: &Rc<Self>, user: UserKey, online: bool) {
        let kind = if online { "online" } else { "offline" };
        let frame = crate::ws::text(server_event::presence(kind, &user.1).as_bytes());
        for core in (0..self.count).filter(|&c| c != self.id) {
            let msg = Message::Presence {
                user: user.clone(),
                online,
                frame: frame.clone(),
            };
            self.mesh.post(core, msg);
        }
        self.presence_here(user, online, frame);
    }

    pub(super) fn presence_here(&self, user: UserKey, online: bool, frame: Bytes) {
        self.online.borrow_mut().apply(&user, online);
        let tenants = self.tenants.borrow();
        let Some(conns) = tenants.get(&user.0) else {
            return;
        };
        let out = Fanned {
            frame,
            kind: Kind::Event,
            except: Some(user.1),
        };
        crate::rooms::push_all(conns.iter().map(|c| &*c.0), &out, self.stats());
    }

    /// The tenant's online users (cluster-wide with Redis, grace period included), sorted.
    pub fn online_users(&self, tenant: &str) -> Vec<Arc<str>> {
        self.online.borrow().snapshot(tenant)
    }
}
