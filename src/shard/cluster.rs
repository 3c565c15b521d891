//! This instance among the others sharing a Redis: liveness, membership, and the presence news
//! that crosses instances.
//!
//! Model: each instance keeps `{<prefix>:presence}:instance:<id>` alive with a TTL
//! (`broker.instance_ttl_ms`) and lists its users in the set
//! `{<prefix>:presence}:instance:<id>:users`, beside the list of instances
//! `{<prefix>:presence}:instances` (one hash tag, the presence channel's: with Redis Cluster
//! they and the channel share a slot, so that each change and its news stay one transaction);
//! it announces a user's first and last local connection on the channel `<prefix>:presence`
//! (`up|down <instance> <tenant> <user>`, and `gone <instance>` when it stops). A user is online
//! while any instance has a connection of theirs; an instance whose key expired is gone, and
//! its users leave (after the grace) on the others. After a Redis outage every instance
//! re-announces its users and reloads the others' sets, and an instance the others took for
//! gone announces its users again, so missed messages heal.
//!
//! Interface: the shard hands [`Cluster`] what arrives on the presence channel and gets back
//! the [`News`] to route; `Cluster` reports this core's users' edges to the others, applies
//! reloaded memberships through [`Users`], and keeps the core's readiness (`/readyz`, and
//! subscribes wait for it).
//!
//! Invariants: everything here that waits on Redis runs on the cluster task ([`Cluster::run`])
//! or on a task of its own; nothing on a heartbeat, close or shutdown path waits on it.
//! What Redis holds is not trusted: IDs are checked against their patterns.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::users::Users;
use crate::broker::Broker;
use crate::config::Config;
use crate::mesh::{Latch, Mesh, Message, Verdict};
use crate::metrics::{CoreStats, Registry};
use crate::presence::UserKey;

/// How soon a reload that Redis cut short is tried again.
const RETRY: Duration = Duration::from_millis(50);

/// The presence channel, prefix stripped.
pub const PRESENCE_CHANNEL: &str = "presence";

/// What another instance said on the presence channel.
pub enum News {
    /// `user`'s first (`up`) or last connection on `instance`: for the user's owner core.
    Remote {
        user: UserKey,
        instance: Arc<str>,
        up: bool,
    },
    /// `instance` stopped: its users leave, on every core.
    Gone(Arc<str>),
}

pub struct Cluster {
    broker: Rc<Broker>,
    mesh: Rc<Mesh>,
    users: Rc<Users>,
    registry: Registry,
    /// This instance's id among the instances sharing the Redis.
    instance: Arc<str>,
    prefix: String,
    ttl_ms: u64,
    stopping: Rc<Latch>,
    /// On core 0: the presence channel's subscription is confirmed.
    presence_live: Cell<bool>,
    /// Set while this core's broker is ready (see [`Cluster::set_ready`]).
    ready: RefCell<Rc<Latch>>,
}

impl Cluster {
    pub fn new(
        broker: Rc<Broker>,
        mesh: Rc<Mesh>,
        users: Rc<Users>,
        registry: Registry,
        instance: Arc<str>,
        config: &Config,
        stopping: Rc<Latch>,
    ) -> Rc<Cluster> {
        Rc::new(Cluster {
            broker,
            mesh,
            users,
            registry,
            instance,
            prefix: config.broker.channel_prefix.clone(),
            ttl_ms: config.broker.instance_ttl_ms,
            stopping,
            presence_live: Cell::new(false),
            ready: RefCell::default(),
        })
    }

    fn stats(&self) -> &CoreStats {
        &self.registry[self.mesh.id()]
    }

    fn key(&self, what: &str) -> String {
        format!("{{{}:{PRESENCE_CHANNEL}}}:{what}", self.prefix)
    }

    /// The liveness key of `instance`.
    pub fn instance_key(&self, instance: &str) -> String {
        self.key(&format!("instance:{instance}"))
    }

    // ---- readiness ---------------------------------------------------------------------

    /// Set while this core's broker is ready; a new, unset latch after each loss.
    pub fn ready(&self) -> Rc<Latch> {
        self.ready.borrow().clone()
    }

    /// Records whether this core's broker is ready (up, and reloaded after a reconnect): for
    /// `/readyz` and for subscribes waiting on it.
    fn set_ready(&self, ready: bool) {
        self.stats().broker_up.set(u64::from(ready));
        let mut latch = self.ready.borrow_mut();
        match (ready, latch.get().is_some()) {
            (true, false) => latch.set(Verdict::Granted),
            (false, true) => *latch = Rc::new(Latch::default()),
            _ => {}
        }
    }

    /// Both Redis connections are up and, on core 0, the presence channel is subscribed: from
    /// then on no presence news is missed, and a reload of the others' state is complete.
    fn link_ready(&self) -> bool {
        self.broker.is_up() && (self.mesh.id() != 0 || self.presence_live.get())
    }

    /// The presence channel's SUBSCRIBE is confirmed.
    pub fn presence_subscribed(&self) {
        self.presence_live.set(true);
        self.broker.changes().note();
    }

    /// The subscriber connection went down.
    pub fn link_lost(&self) {
        self.set_ready(false);
        self.presence_live.set(false);
        self.broker.changes().note();
    }

    // ---- presence news -----------------------------------------------------------------

    /// Tells the other instances about a user's first or last connection here. Best effort:
    /// while Redis is down it is skipped, and the re-announce after the reconnect covers it.
    pub fn announce(&self, (tenant, user): &UserKey, up: bool) {
        let broker = self.broker.clone();
        let me = self.instance_key(&self.instance);
        let set = format!("{me}:users");
        let member = format!("{tenant} {user}");
        let note = format!(
            "{} {} {tenant} {user}",
            if up { "up" } else { "down" },
            self.instance
        );
        let ttl = self.ttl_ms;
        let instances = self.key("instances");
        let instance = self.instance.clone();
        glommio::spawn_local(async move {
            let change = if up { "SADD" } else { "SREM" };
            // The liveness key and the instance list are written with the news, so that an
            // instance that crashes right after it is still found and cleaned up.
            let commands = [
                redis::cmd("SET").arg(&me).arg(1).arg("PX").arg(ttl).clone(),
                redis::cmd("SADD").arg(&instances).arg(&*instance).clone(),
                redis::cmd(change).arg(&set).arg(&member).clone(),
                redis::cmd("PEXPIRE").arg(&set).arg(ttl).clone(),
                broker.publish(PRESENCE_CHANNEL, note.as_bytes()),
            ];
            let _ = broker.transaction(&me, &commands).await;
        })
        .detach();
    }

    /// Tells the other instances again about every user with a connection on this core.
    pub fn announce_local_users(&self) {
        for user in self.users.local_users() {
            self.announce(&user, true);
        }
    }

    /// On core 0: a message of the presence channel. `None` for this instance's own news and
    /// for what is not news (logged and counted).
    pub fn news(&self, payload: &[u8]) -> Option<News> {
        let text = String::from_utf8_lossy(payload);
        let words: Vec<&str> = text.split(' ').collect();
        match words.as_slice() {
            [verb @ ("up" | "down"), instance, tenant, user]
                if *instance != &*self.instance && is_user(tenant, user) =>
            {
                Some(News::Remote {
                    user: ((*tenant).into(), (*user).into()),
                    instance: (*instance).into(),
                    up: *verb == "up",
                })
            }
            ["gone", instance] if *instance != &*self.instance => {
                Some(News::Gone((*instance).into()))
            }
            [_, instance, ..] if *instance == &*self.instance => None,
            _ => {
                self.stats().redis_invalid_total.inc();
                warn!(message = %text, "unrecognized presence message");
                None
            }
        }
    }

    // ---- the cluster task --------------------------------------------------------------

    /// On every core until the server stops: the cluster work, on a task of its own so that
    /// heartbeats, closes and shutdown never wait on Redis. Runs `tick` after each
    /// (re)connect and every `broker.instance_ttl_ms / 3`, and keeps the core's readiness
    /// (ready only once the reload after a (re)connect is done). Wakes for those and for
    /// changes of the link (see [`Changes`](crate::broker::Changes)), never to look.
    pub async fn run(self: Rc<Self>) {
        // Well inside the TTL, so that one missed refresh does not expire this instance.
        let every = Duration::from_millis(self.ttl_ms / 3);
        let mut last = Instant::now() - every;
        let mut was_ready = false;
        while self.stopping.get().is_none() {
            let changed = self.broker.changes().next();
            let ready = self.link_ready();
            let reconnected = ready && !was_ready;
            was_ready = ready;
            let mut wait = every.saturating_sub(last.elapsed());
            if reconnected || wait.is_zero() {
                last = Instant::now();
                wait = every;
                // A reload that Redis cut short is tried again shortly.
                if !self.tick(reconnected).await && reconnected {
                    was_ready = false;
                    wait = RETRY;
                }
            }
            self.set_ready(was_ready && self.link_ready());
            let woken = async {
                changed.wait().await;
            };
            let stopped = async {
                self.stopping.wait().await;
            };
            futures_lite::future::or(
                futures_lite::future::or(woken, stopped),
                glommio::timer::sleep(wait),
            )
            .await;
        }
    }

    /// After the broker (re)connects, re-announce this core's users; on core 0 also keep this
    /// instance alive (re-announcing every core's users if the others had reaped it), notice
    /// instances that died, and after a (re)connect reload the others' memberships. False
    /// when Redis cut it short.
    async fn tick(&self, reconnected: bool) -> bool {
        let broker = &self.broker;
        if !broker.is_up() {
            return false;
        }
        if reconnected {
            self.announce_local_users();
        }
        if self.mesh.id() != 0 {
            return true;
        }
        let ttl = self.ttl_ms;
        let me = self.instance_key(&self.instance);
        let instances = self.key("instances");
        let alive = [
            redis::cmd("SET")
                .arg(&me)
                .arg(1)
                .arg("PX")
                .arg(ttl)
                .arg("GET")
                .clone(),
            redis::cmd("PEXPIRE")
                .arg(format!("{me}:users"))
                .arg(ttl)
                .clone(),
            redis::cmd("SADD")
                .arg(&instances)
                .arg(&*self.instance)
                .clone(),
        ];
        let Ok(replies) = broker.transaction(&me, &alive).await else {
            return false;
        };
        // The liveness key had expired, or the instance list had lost this instance: the
        // others took this instance for dead and its users for offline. Say they are here.
        let reaped = matches!(replies.first(), Some(redis::Value::Nil))
            || matches!(replies.get(2), Some(redis::Value::Int(1)));
        if reaped && !reconnected {
            warn!("the other instances took this one for gone; announcing its users again");
            self.mesh.post_to_peers(|| Message::Reannounce);
            self.announce_local_users();
        }
        let smembers = |key: String| async move {
            let packed = redis::cmd("SMEMBERS").arg(&key).get_packed_command();
            broker.command(&key, packed).await
        };
        let Ok(redis::Value::Array(others)) = smembers(instances.clone()).await else {
            return false;
        };
        for other in others {
            let redis::Value::BulkString(id) = other else {
                continue;
            };
            let id = String::from_utf8_lossy(&id).into_owned();
            if id == *self.instance {
                continue;
            }
            let key = self.instance_key(&id);
            match broker
                .command(&key, redis::cmd("EXISTS").arg(&key).get_packed_command())
                .await
            {
                Ok(redis::Value::Int(0)) => {
                    info!(instance = %id, "instance gone (its liveness key expired)");
                    let forget = [
                        redis::cmd("SREM").arg(&instances).arg(&id).clone(),
                        redis::cmd("DEL").arg(format!("{key}:users")).clone(),
                    ];
                    let _ = broker.transaction(&key, &forget).await;
                    self.users.members_everywhere(id.into(), Arc::from([]));
                }
                Ok(_) if reconnected => {
                    let Ok(redis::Value::Array(members)) = smembers(format!("{key}:users")).await
                    else {
                        return false;
                    };
                    let users: Arc<[UserKey]> = members
                        .iter()
                        .filter_map(|m| match m {
                            redis::Value::BulkString(b) => {
                                let text = String::from_utf8_lossy(b);
                                let (t, u) = text.split_once(' ').filter(|(t, u)| is_user(t, u))?;
                                Some((Arc::from(t), Arc::from(u)))
                            }
                            _ => None,
                        })
                        .collect();
                    self.users.members_everywhere(id.into(), users);
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// On core 0, when stopping: this instance's users leave the cluster at once.
    pub async fn leave(&self) {
        let broker = &self.broker;
        let me = self.instance_key(&self.instance);
        let leave = [
            redis::cmd("DEL")
                .arg(&me)
                .arg(format!("{me}:users"))
                .clone(),
            redis::cmd("SREM")
                .arg(self.key("instances"))
                .arg(&*self.instance)
                .clone(),
            broker.publish(
                PRESENCE_CHANNEL,
                format!("gone {}", self.instance).as_bytes(),
            ),
        ];
        if let Err(e) = broker.transaction(&me, &leave).await {
            warn!(error = %e, "could not remove this instance's presence from redis");
        }
    }
}

/// A tenant and user from Redis that match the ID patterns: Redis is not trusted to hold only
/// what instances wrote.
fn is_user(tenant: &str, user: &str) -> bool {
    crate::protocol::is_tenant_id(tenant) && crate::protocol::is_entity_id(user)
}
