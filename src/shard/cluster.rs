//! This instance among the others sharing a Redis: liveness, membership, and the presence news
//! that crosses instances.
//!
//! Model: each instance keeps `<prefix>:instance:<id>` alive with a TTL
//! (`broker.instance_ttl_ms`) and lists its users in the set `<prefix>:instance:<id>:users`;
//! it announces a user's first and last local connection on the channel `<prefix>:presence`
//! (`up|down <instance> <tenant> <user>`, and `gone <instance>` when it stops). A user is online
//! while any instance has a connection of theirs; an instance whose key expired is gone, and
//! its users leave (after the grace) on the others. After a Redis outage every instance
//! re-announces its users and reloads the others' sets, and an instance the others took for
//! gone announces its users again, so missed messages heal.
//!
//! Invariants: everything here that waits on Redis runs on the cluster task (`run_cluster`)
//! or on a task of its own; nothing on a heartbeat, close or shutdown path waits on it.
//! What Redis holds is not trusted: IDs are checked against their patterns.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::Shard;
use crate::mesh::Message;
use crate::presence::UserKey;

/// How often the cluster task looks at the broker's state.
const CLUSTER_POLL: Duration = Duration::from_millis(10);

/// The presence channel, prefix stripped.
pub const PRESENCE_CHANNEL: &str = "presence";

impl Shard {
    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.config.broker.channel_prefix)
    }

    fn instance_key(&self, instance: &str) -> String {
        self.key(&format!("instance:{instance}"))
    }

    /// Tells the other instances about a user's first or last connection here. Best effort:
    /// while Redis is down it is skipped, and the re-announce after the reconnect covers it.
    pub(super) fn announce_user(self: &Rc<Self>, (tenant, user): &UserKey, up: bool) {
        let Some(broker) = self.broker.clone() else {
            return;
        };
        let me = self.instance_key(&self.instance);
        let set = format!("{me}:users");
        let member = format!("{tenant} {user}");
        let note = format!(
            "{} {} {tenant} {user}",
            if up { "up" } else { "down" },
            self.instance
        );
        let ttl = self.config.broker.instance_ttl_ms;
        let instances = self.key("instances");
        let instance = self.instance.clone();
        let channel = broker.channel(PRESENCE_CHANNEL);
        glommio::spawn_local(async move {
            let change = if up { "SADD" } else { "SREM" };
            // The liveness key and the instance list are written with the news, so that an
            // instance that crashes right after it is still found and cleaned up.
            let commands = [
                redis::cmd("SET").arg(&me).arg(1).arg("PX").arg(ttl).clone(),
                redis::cmd("SADD").arg(&instances).arg(&*instance).clone(),
                redis::cmd(change).arg(&set).arg(&member).clone(),
                redis::cmd("PEXPIRE").arg(&set).arg(ttl).clone(),
                redis::cmd("PUBLISH").arg(&channel).arg(&note).clone(),
            ];
            let _ = broker.transaction(&commands).await;
        })
        .detach();
    }

    /// On core 0: a message of the presence channel.
    pub(super) fn on_presence_message(self: &Rc<Self>, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let words: Vec<&str> = text.split(' ').collect();
        match words.as_slice() {
            [verb @ ("up" | "down"), instance, tenant, user]
                if *instance != &*self.instance && is_user(tenant, user) =>
            {
                let user: UserKey = ((*tenant).into(), (*user).into());
                let msg = Message::Remote {
                    user: user.clone(),
                    instance: (*instance).into(),
                    up: *verb == "up",
                };
                self.route(self.user_owner(&user), msg);
            }
            ["gone", instance] if *instance != &*self.instance => {
                self.instance_members((*instance).into(), Arc::from([]))
            }
            [_, instance, ..] if *instance == &*self.instance => {}
            _ => {
                self.stats().redis_invalid_total.inc();
                warn!(message = %text, "unrecognized presence message")
            }
        }
    }

    /// Every core learns `instance`'s full membership.
    fn instance_members(self: &Rc<Self>, instance: Arc<str>, users: Arc<[UserKey]>) {
        for core in (0..self.count).filter(|&c| c != self.id) {
            self.mesh.post(
                core,
                Message::Members {
                    instance: instance.clone(),
                    users: users.clone(),
                },
            );
        }
        self.members_here(&instance, &users);
    }

    /// With Redis, on every core until the server stops: the cluster work, on a task of its
    /// own so that heartbeats, closes and shutdown never wait on Redis. Runs `cluster_tick`
    /// after each (re)connect and every `broker.instance_ttl_ms / 3`, and keeps the core's
    /// readiness (ready only once the reload after a (re)connect is done).
    pub async fn run_cluster(self: Rc<Self>) {
        // Well inside the TTL, so that one missed refresh does not expire this instance.
        let every = Duration::from_millis(self.config.broker.instance_ttl_ms / 3);
        let mut last = Instant::now() - every;
        let mut was_ready = false;
        while self.stopping.get().is_none() {
            glommio::timer::sleep(CLUSTER_POLL).await;
            let ready = self.broker_ready();
            let reconnected = ready && !was_ready;
            was_ready = ready;
            if reconnected || last.elapsed() >= every {
                last = Instant::now();
                // A reload that Redis cut short is tried again at the next poll.
                if !self.cluster_tick(reconnected).await && reconnected {
                    was_ready = false;
                }
            }
            self.set_broker_ready(was_ready && self.broker_ready());
        }
    }

    /// After the broker (re)connects, re-announce this core's users; on core 0 also keep this
    /// instance alive (re-announcing every core's users if the others had reaped it), notice
    /// instances that died, and after a (re)connect reload the others' memberships. False
    /// when Redis cut it short.
    async fn cluster_tick(self: &Rc<Self>, reconnected: bool) -> bool {
        let Some(broker) = self.broker.clone() else {
            return true;
        };
        if !broker.is_up() {
            return false;
        }
        if reconnected {
            self.announce_local_users();
        }
        if self.id != 0 {
            return true;
        }
        let ttl = self.config.broker.instance_ttl_ms;
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
        let Ok(replies) = broker.transaction(&alive).await else {
            return false;
        };
        // The liveness key had expired, or the instance list had lost this instance: the
        // others took this instance for dead and its users for offline. Say they are here.
        let reaped = matches!(replies.first(), Some(redis::Value::Nil))
            || matches!(replies.get(2), Some(redis::Value::Int(1)));
        if reaped && !reconnected {
            warn!("the other instances took this one for gone; announcing its users again");
            for core in 0..self.count {
                self.route(core, Message::Reannounce);
            }
        }
        let smembers =
            |key: &str| broker.command(redis::cmd("SMEMBERS").arg(key).get_packed_command());
        let Ok(redis::Value::Array(others)) = smembers(&instances).await else {
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
                .command(redis::cmd("EXISTS").arg(&key).get_packed_command())
                .await
            {
                Ok(redis::Value::Int(0)) => {
                    info!(instance = %id, "instance gone (its liveness key expired)");
                    let forget = [
                        redis::cmd("SREM").arg(&instances).arg(&id).clone(),
                        redis::cmd("DEL").arg(format!("{key}:users")).clone(),
                    ];
                    let _ = broker.transaction(&forget).await;
                    self.instance_members(id.into(), Arc::from([]));
                }
                Ok(_) if reconnected => {
                    let Ok(redis::Value::Array(members)) = smembers(&format!("{key}:users")).await
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
                    self.instance_members(id.into(), users);
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Tells the other instances again about every user with a connection on this core.
    pub(super) fn announce_local_users(self: &Rc<Self>) {
        for user in self.users.borrow().local_users() {
            self.announce_user(&user, true);
        }
    }

    /// On core 0, when stopping: this instance's users leave the cluster at once.
    pub async fn leave_cluster(&self) {
        let Some(broker) = &self.broker else { return };
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
            redis::cmd("PUBLISH")
                .arg(broker.channel(PRESENCE_CHANNEL))
                .arg(format!("gone {}", self.instance))
                .clone(),
        ];
        if let Err(e) = broker.transaction(&leave).await {
            warn!(error = %e, "could not remove this instance's presence from redis");
        }
    }
}

/// A tenant and user from Redis that match the ID patterns: Redis is not trusted to hold only
/// what instances wrote.
fn is_user(tenant: &str, user: &str) -> bool {
    crate::protocol::is_tenant_id(tenant) && crate::protocol::is_entity_id(user)
}
