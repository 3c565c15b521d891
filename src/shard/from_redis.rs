//! The Redis glue of a core: what the subscriber connection hands over (events of the rooms
//! this core owns, presence news, confirmations, the link going down) goes to the part it is
//! for, and which channels the core wants after a (re)connect.
//!
//! Invariants: runs on one core, never awaits. An event from Redis is checked like a publish
//! body before it is framed (`publish::check_pushed`); a bad one is dropped, logged and
//! counted. A room is live only once Redis confirmed its SUBSCRIBE.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::cluster::{News, PRESENCE_CHANNEL};
use super::{Ordered, Shard};
use crate::broker::Push;
use crate::handle::Kind;
use crate::history::position_of;
use crate::mesh::{Fanned, Message};
use crate::publish::{check_pushed, FromRedis};

impl Shard {
    /// Every channel this core wants from Redis (prefix stripped), for a (re)connect.
    pub fn wanted_channels(&self) -> Vec<String> {
        let mut channels: Vec<String> =
            self.rooms.borrow().owned().map(|r| r.to_string()).collect();
        if self.id == 0 {
            channels.push(PRESENCE_CHANNEL.to_string());
        }
        channels.push(self.sessions_channel.clone());
        channels
    }

    /// Redis confirmed the SUBSCRIBE of `channel`: the room is live, with history once its
    /// position is read in the order of its deliveries.
    fn live_at_redis(&self, channel: &str) {
        let Some(room) = self.rooms.borrow().owned_key(channel) else {
            return;
        };
        let Some(broker) = self.broker.as_ref().filter(|_| self.history_enabled()) else {
            return self.rooms.borrow().confirmed(channel);
        };
        if broker.ordered(&broker.read_history(&room, false, self.config.history.ttl_ms)) {
            self.ordered.borrow_mut().push_back(Ordered::Position(room));
        }
    }

    /// The reply to the oldest command sent on the subscriber connection: it was run after
    /// every event delivered so far and before every one to come.
    fn on_reply(self: &Rc<Self>, reply: &redis::Value) {
        let Some(ordered) = self.ordered.borrow_mut().pop_front() else {
            return;
        };
        let (Ordered::Position(room) | Ordered::Recovery(room)) = &ordered;
        let Some((at, frames)) = crate::broker::read_reply(reply) else {
            // The subscribers waiting for it end in `unavailable`.
            warn!(%room, ?reply, "redis answered a history read with something else");
            self.recovering.borrow_mut().remove(room);
            return;
        };
        let now = Instant::now();
        self.history.borrow_mut().start(room, at, frames, now);
        match ordered {
            Ordered::Position(room) => self.rooms.borrow().confirmed(&room),
            Ordered::Recovery(room) => {
                let waiting = self.recovering.borrow_mut().remove(&room);
                for recovery in waiting.into_iter().flatten() {
                    let read = self.history.borrow_mut().read(&room, recovery.since, now);
                    if let Some(read) = read {
                        self.recovered(&room, recovery, read);
                    }
                }
            }
        }
    }

    /// What the subscriber connection hands over.
    pub fn on_push(self: &Rc<Self>, push: Push<'_>) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        match push {
            Push::Message { channel, payload } if channel == PRESENCE_CHANNEL => {
                match cluster.news(payload) {
                    Some(News::Remote { user, instance, up }) => {
                        let owner = self.users.owner(&user);
                        self.route(owner, Message::Remote { user, instance, up });
                    }
                    Some(News::Gone(instance)) => {
                        self.users.members_everywhere(instance, Arc::from([]))
                    }
                    None => {}
                }
            }
            Push::Message { channel, payload } if channel == self.sessions_channel => {
                crate::session::relay::on_message(self, payload)
            }
            Push::Message { channel, payload } => {
                // The room's own key: no allocation per event. A room not owned (any more) has
                // no subscribers here.
                let Some(room) = self.rooms.borrow().owned_key(channel) else {
                    return;
                };
                let conversation = room.split_once(":c:").map_or("", |(_, c)| c);
                // What the history script published carries its place in the stream.
                let position = self
                    .history_enabled()
                    .then(|| position_of(payload))
                    .flatten();
                let out = match check_pushed(payload, conversation, position.is_some()) {
                    Ok(FromRedis::Event) => {
                        let frame = crate::ws::text(payload);
                        let at = position.and_then(|(offset, epoch)| {
                            let now = Instant::now();
                            let mut history = self.history.borrow_mut();
                            history.observe(&room, &frame, offset, epoch, now)
                        });
                        Fanned::event(frame, at)
                    }
                    Ok(FromRedis::Typing(user)) => Fanned {
                        frame: crate::ws::text(payload),
                        kind: Kind::Ephemeral,
                        except: Some(user),
                        at: None,
                    },
                    Err(error) => {
                        self.stats().redis_invalid_total.inc();
                        warn!(%channel, %error, "dropped an invalid message from redis");
                        return;
                    }
                };
                self.fan_out(&room, out);
            }
            Push::Subscribed { channel } if channel == PRESENCE_CHANNEL => {
                cluster.presence_subscribed()
            }
            Push::Subscribed { channel } => self.live_at_redis(channel),
            Push::Reply(reply) => self.on_reply(&reply),
            Push::Link(true) => {}
            Push::Link(false) => {
                cluster.link_lost();
                self.rooms.borrow_mut().link_lost();
                self.sessions.relay.link_lost();
                // What was delivered since may be lost: the cache starts again from a read.
                self.history.borrow_mut().clear();
                self.ordered.borrow_mut().clear();
                self.recovering.borrow_mut().clear();
            }
        }
    }
}
