//! Presence on a core: a user's connections are counted on the user's owner core (the rules
//! are `presence::Owned`), whose changes are broadcast once per core; each core keeps the
//! tenant's online users (`presence::Replica`) and delivers the change to its own connections
//! of the tenant. What other instances report arrives from the cluster part.
//!
//! Interface: the shard hands [`Users`] the presence messages of the mesh; `Users` posts its
//! own broadcasts to the other cores and delivers to this core's connections ([`Connections`]).
//!
//! Invariants: runs on one core and never awaits; the offline grace is a timer per leaving
//! user whose generation number cancels it on a reconnect.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Connections;
use crate::handle::Kind;
use crate::mesh::{Fanned, Mesh, Message};
use crate::metrics::Registry;
use crate::presence::{Owned, Replica, Transition, UserKey};
use crate::protocol::server_event;
use crate::route::{shard_for, user_key};

pub struct Users {
    mesh: Rc<Mesh>,
    conns: Rc<Connections>,
    registry: Registry,
    grace: Duration,
    /// `presence.mode = "watch"`: changes go to watchers only.
    watch: bool,
    /// Users this core owns.
    owned: RefCell<Owned>,
    /// Every tenant's online users, as the owners broadcast them.
    online: RefCell<Replica>,
}

impl Users {
    pub fn new(
        mesh: Rc<Mesh>,
        conns: Rc<Connections>,
        registry: Registry,
        grace: Duration,
        watch: bool,
    ) -> Rc<Users> {
        Rc::new(Users {
            mesh,
            conns,
            registry,
            grace,
            watch,
            owned: RefCell::default(),
            online: RefCell::default(),
        })
    }

    /// The core that owns `user`'s presence.
    pub fn owner(&self, user: &UserKey) -> usize {
        shard_for(user_key(user).as_bytes(), self.mesh.cores())
    }

    /// On the owner: one of `user`'s connections on this instance opened or closed. True at
    /// the user's first or last connection here, which the other instances must hear of.
    pub fn connection(self: &Rc<Self>, user: UserKey, up: bool) -> bool {
        let (transition, edge) = if up {
            self.owned.borrow_mut().up(&user)
        } else {
            self.owned.borrow_mut().down(&user)
        };
        self.apply(user, transition);
        edge
    }

    /// On the owner: another instance reports `user`'s first or last connection there.
    pub fn remote(self: &Rc<Self>, user: UserKey, instance: &Arc<str>, up: bool) {
        let transition = self.owned.borrow_mut().remote(&user, instance, up);
        self.apply(user, transition);
    }

    /// On every core: `instance`'s full membership, of which this core applies its own users.
    pub fn members(self: &Rc<Self>, instance: &Arc<str>, users: &[UserKey]) {
        let mine: Vec<UserKey> = users
            .iter()
            .filter(|u| self.owner(u) == self.mesh.id())
            .cloned()
            .collect();
        let changes = self.owned.borrow_mut().replace_instance(instance, &mine);
        for (user, transition) in changes {
            self.apply(user, transition);
        }
    }

    /// Tells every core, this one included, `instance`'s full membership.
    pub fn members_everywhere(self: &Rc<Self>, instance: Arc<str>, users: Arc<[UserKey]>) {
        self.mesh.post_to_peers(|| Message::Members {
            instance: instance.clone(),
            users: users.clone(),
        });
        self.members(&instance, &users);
    }

    /// Acts on what a change means: tell the tenant now, or after the grace period.
    fn apply(self: &Rc<Self>, user: UserKey, transition: Transition) {
        match transition {
            Transition::Unchanged => {}
            Transition::Online => self.broadcast(user, true),
            Transition::Leaving(generation) => {
                let me = self.clone();
                let grace = self.grace;
                glommio::spawn_local(async move {
                    glommio::timer::sleep(grace).await;
                    if me.owned.borrow_mut().expire(&user, generation) {
                        me.broadcast(user, false);
                    }
                })
                .detach();
            }
        }
    }

    /// From a user's owner: one message per core, each delivering to its own connections.
    fn broadcast(&self, user: UserKey, online: bool) {
        let kind = if online { "online" } else { "offline" };
        let frame = crate::ws::text(server_event::presence(kind, &user.1).as_bytes());
        self.mesh.post_to_peers(|| Message::Presence {
            user: user.clone(),
            online,
            frame: frame.clone(),
        });
        self.presence(user, online, frame);
    }

    /// On every core: `user` went online or offline (every core keeps the replica, for its
    /// snapshots); this core's connections of the tenant, or in watch mode its watchers of the
    /// user, but the user's own, get `frame`.
    pub fn presence(&self, user: UserKey, online: bool, frame: Bytes) {
        self.online.borrow_mut().apply(&user, online);
        let out = Fanned {
            frame,
            kind: Kind::Event,
            except: Some(user.1.clone()),
            at: None,
        };
        let stats = &self.registry[self.mesh.id()];
        let sent = match self.watch {
            true => self.conns.push_to_watchers(&user, &out, stats),
            false => self.conns.push_to_tenant(&user.0, &out, stats),
        };
        stats.presence_frames_total.add(sent);
    }

    /// Whether `user` is online (cluster-wide with Redis, grace period included).
    pub fn is_online(&self, user: &UserKey) -> bool {
        self.online.borrow().contains(user)
    }

    /// The tenant's online users (cluster-wide with Redis, grace period included), sorted.
    pub fn online_users(&self, tenant: &str) -> Vec<Arc<str>> {
        self.online.borrow().snapshot(tenant)
    }

    /// The users this core owns that have a connection on this instance.
    pub fn local_users(&self) -> Vec<UserKey> {
        self.owned.borrow().local_users()
    }
}
