//! The Redis glue of a core: what the subscriber connection hands over (events of the rooms
//! this core owns, presence news, confirmations, the link going down) goes to the part it is
//! for, and which channels the core wants after a (re)connect.
//!
//! Invariants: runs on one core, never awaits. An event from Redis is checked like a publish
//! body before it is framed (`publish::check_pushed`); a bad one is dropped, logged and
//! counted. A room is live only once Redis confirmed its SUBSCRIBE.

use std::collections::VecDeque;
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
        if !self.history_enabled() {
            return self.rooms.borrow().confirmed(channel);
        }
        self.read_ordered(Ordered::Position(room));
    }

    /// A node stopped serving `channel` (its slot moved): what was published meanwhile is
    /// not here, so the room waits for a new confirmation (and with history a new position)
    /// before it is live again, and is subscribed where it is served now.
    fn dropped_at_redis(&self, channel: &str, cluster: &super::Cluster) {
        if channel == PRESENCE_CHANNEL {
            // Presence news may have been missed: ready again once reloaded.
            cluster.link_lost();
        } else if channel == self.sessions_channel {
            self.sessions.relay.link_lost();
        } else if self.rooms.borrow_mut().dropped(channel) {
            warn!(%channel, "redis moved a conversation's channel; subscribing where it is now");
        } else {
            return;
        }
        if let Some(broker) = &self.broker {
            broker.subscribe(&[channel]);
        }
    }

    /// The reply to the oldest command sent on subscriber connection `link`: it was run after
    /// every event delivered there so far and before every one to come.
    fn on_reply(self: &Rc<Self>, link: usize, reply: &redis::Value) {
        let ordered = self
            .ordered
            .borrow_mut()
            .get_mut(&link)
            .and_then(VecDeque::pop_front);
        let Some(ordered) = ordered else {
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
            Push::Dropped { channel } => self.dropped_at_redis(channel, cluster),
            Push::Reply { link, value } => self.on_reply(link, &value),
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
