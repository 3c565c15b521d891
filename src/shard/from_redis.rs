//! The Redis glue of a core: what the subscriber connection hands over (events of the rooms
//! this core owns, presence news, confirmations, the link going down), which channels the core
//! wants after a (re)connect, and the core's readiness.
//!
//! Invariants: runs on one core, never awaits. An event from Redis is checked like a publish
//! body before it is framed (`publish::check_pushed`); a bad one is dropped, logged and
//! counted. A room is live only once Redis confirmed its SUBSCRIBE.

use std::rc::Rc;

use tracing::warn;

use super::{cluster, Shard};
use crate::broker::Push;
use crate::handle::Kind;
use crate::mesh::{Fanned, Latch, Verdict};
use crate::publish::{check_pushed, FromRedis};

impl Shard {
    /// Records whether this core's broker is ready (up, and reloaded after a reconnect): for
    /// `/readyz` and for subscribes waiting on it.
    pub fn set_broker_ready(&self, ready: bool) {
        self.stats().broker_up.set(u64::from(ready));
        let mut latch = self.broker_ready.borrow_mut();
        match (ready, latch.get().is_some()) {
            (true, false) => latch.set(Verdict::Granted),
            (false, true) => *latch = Rc::new(Latch::default()),
            _ => {}
        }
    }

    /// Both Redis connections are up and, on core 0, the presence channel is subscribed: from
    /// then on no presence news is missed, and a reload of the others' state is complete.
    pub fn broker_ready(&self) -> bool {
        self.broker.as_ref().is_some_and(|b| b.is_up())
            && (self.id != 0 || self.presence_live.get())
    }

    /// Every channel this core wants from Redis (prefix stripped), for a (re)connect.
    pub fn wanted_channels(&self) -> Vec<String> {
        let mut channels: Vec<String> =
            self.rooms.borrow().owned().map(|r| r.to_string()).collect();
        if self.id == 0 {
            channels.push(cluster::PRESENCE_CHANNEL.to_string());
        }
        channels
    }

    /// What the subscriber connection hands over.
    pub fn on_push(self: &Rc<Self>, push: Push<'_>) {
        match push {
            Push::Message { channel, payload } if channel == cluster::PRESENCE_CHANNEL => {
                self.on_presence_message(payload)
            }
            Push::Message { channel, payload } => {
                // The room's own key: no allocation per event. A room not owned (any more) has
                // no subscribers here.
                let Some(room) = self.rooms.borrow().owned_key(channel) else {
                    return;
                };
                let conversation = room.split_once(":c:").map_or("", |(_, c)| c);
                let out = match check_pushed(payload, conversation) {
                    Ok(FromRedis::Event) => Fanned::event(crate::ws::text(payload)),
                    Ok(FromRedis::Typing(user)) => Fanned {
                        frame: crate::ws::text(payload),
                        kind: Kind::Ephemeral,
                        except: Some(user),
                    },
                    Err(error) => {
                        self.stats().redis_invalid_total.inc();
                        warn!(%channel, %error, "dropped an invalid message from redis");
                        return;
                    }
                };
                self.fan_out(&room, out);
            }
            Push::Subscribed { channel } if channel == cluster::PRESENCE_CHANNEL => {
                self.presence_live.set(true)
            }
            Push::Subscribed { channel } => self.rooms.borrow().confirmed(channel),
            Push::Link(true) => {}
            Push::Link(false) => {
                self.set_broker_ready(false);
                self.presence_live.set(false);
                self.rooms.borrow_mut().link_lost();
            }
        }
    }
}
