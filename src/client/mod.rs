//! The client as the rules see it, whatever carries its frames: identity and outbound queue
//! (its [`ConnHandle`]), subscriptions, and the per-client event rate limit; and one handler
//! per client event, one file each. A WebSocket connection (`conn`) is one transport over it;
//! an HTTP fallback session (`session`) is the other, with every rule unchanged.
//!
//! Invariants: lives on the core that accepted the client. A handler never fails: a refused
//! event is answered with `error{..}` on the client's queue, and a close the rules require is
//! requested on the queue (`ConnHandle::close`). The state kept per client is [`State`];
//! [`Client`] is a view that borrows it for the handling of one event, so that a transport
//! keeps the state where it likes (an idle connection's future stays small).

mod activity;
mod auth;
mod presence;
mod subscribe;

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use crate::handle::ConnHandle;
use crate::history::Position;
use crate::limit::TokenBucket;
use crate::protocol::{parse_client_event, server_event, ClientEvent, CloseCode, ErrorCode};
use crate::route::RoomKey;
use crate::shard::Shard;
use crate::ws;

/// A client still dropping events this long after its first drop is closed with 4008.
const RATE_LIMIT_GRACE: Duration = Duration::from_secs(5);
/// Drops further apart than this start a new episode.
const RATE_EPISODE_GAP: Duration = Duration::from_secs(1);

/// A client id as clients see it (hex), for logs.
pub struct ClientId(pub u64);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// What the rules keep per client between events.
pub struct State {
    /// In subscription order: the last is the default conversation of `presence.activity`.
    subscriptions: Vec<RoomKey>,
    /// The users this client watches (`presence.mode = "watch"`), sorted, without repeats;
    /// replaced whole by each `presence.watch` (a boxed slice: 8 bytes less than a `Vec` in
    /// every connection's state).
    watching: Box<[Arc<str>]>,
    bucket: TokenBucket,
    /// Set once the client goes over its event rate; boxed, as most never do.
    over_rate: Option<Box<OverRate>>,
}

struct OverRate {
    /// First and last dropped event of the current episode.
    first_drop: Instant,
    last_drop: Instant,
    last_error: Option<Instant>,
}

impl State {
    pub fn new(shard: &Shard, now: Instant) -> State {
        State {
            subscriptions: Vec::new(),
            watching: Box::default(),
            bucket: TokenBucket::full(shard.config.limits.msg_burst, now),
            over_rate: None,
        }
    }
}

/// One client, for the handling of one event or its arrival and departure.
pub struct Client<'a> {
    pub shard: &'a Rc<Shard>,
    pub out: &'a Rc<ConnHandle>,
    pub state: &'a mut State,
}

impl Client<'_> {
    /// Registers the client on its core (and for its user's presence).
    pub async fn join(&self) {
        self.shard.register(self.out.clone()).await;
    }

    /// Leaves every subscription and watch list, and unregisters: the client is gone.
    pub async fn leave(&mut self) {
        for room in std::mem::take(&mut self.state.subscriptions) {
            self.shard.unsubscribe(&room, self.out.id).await;
        }
        for user in std::mem::take(&mut self.state.watching).iter() {
            self.shard.conns.unwatch(self.out, user);
        }
        self.shard.unregister(self.out).await;
    }

    /// Takes a token from the client's event rate limit. Over it, the event is to be dropped:
    /// answered with at most one `rate_limited` a second, and a close with 4008 once dropping
    /// has lasted 5 s.
    pub fn within_rate(&mut self) -> bool {
        let (limits, now) = (&self.shard.config.limits, Instant::now());
        if self
            .state
            .bucket
            .take(limits.msg_rate, limits.msg_burst, now)
            .is_ok()
        {
            return true;
        }
        let over = self.state.over_rate.get_or_insert_with(|| {
            Box::new(OverRate {
                first_drop: now,
                last_drop: now,
                last_error: None,
            })
        });
        if now.duration_since(over.last_drop) >= RATE_EPISODE_GAP {
            over.first_drop = now;
        }
        over.last_drop = now;
        if now.duration_since(over.first_drop) >= RATE_LIMIT_GRACE {
            self.shard.stats().rate_limit_closes_total.inc();
            self.out.close(CloseCode::RateLimited);
        } else if over
            .last_error
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            over.last_error = Some(now);
            let message = format!(
                "over {} events per second; events are being dropped",
                limits.msg_rate
            );
            self.error(ErrorCode::RateLimited, &message, None);
        }
        false
    }

    /// One client event: JSON text, parsed in place.
    pub async fn on_event(&mut self, text: &mut [u8]) {
        let request = match parse_client_event(text) {
            Ok(r) => r,
            Err(invalid) => {
                self.error(ErrorCode::InvalidMessage, &invalid.message, invalid.id);
                return;
            }
        };
        let id = request.id;
        match request.event {
            ClientEvent::Ping => self.push(&server_event::pong(id)),
            ClientEvent::Subscribe {
                conversation_id,
                since,
                token,
            } => subscribe::subscribe(self, conversation_id, since, token, id).await,
            ClientEvent::Unsubscribe { conversation_id } => {
                subscribe::unsubscribe(self, conversation_id, id).await
            }
            ClientEvent::Activity {
                activity,
                conversation_id,
            } => activity::activity(self, activity, conversation_id, id).await,
            ClientEvent::PresenceQuery => presence::query(self, id),
            ClientEvent::Watch { user_ids } => presence::watch(self, &user_ids, id),
            ClientEvent::Auth { token } => auth::refresh(self, token, id),
        }
    }

    fn push(&self, event: &str) {
        self.out.push(ws::text(event.as_bytes()));
    }

    fn ack(&self, id: Option<&str>) {
        if let Some(id) = id {
            self.push(&server_event::ack(id));
        }
    }

    /// Acks a subscribe with the stream's position (with history) and whether what was
    /// missed was replayed (when `since` was given).
    fn subscribed(&self, id: Option<&str>, at: Option<Position>, recovered: Option<bool>) {
        if let Some(id) = id {
            self.push(&server_event::subscribed(id, at, recovered));
        }
    }

    /// Answers an event with `error{code}`.
    pub fn error(&self, code: ErrorCode, message: &str, id: Option<&str>) {
        self.shard.stats().client_errors_total.inc();
        // Debug level: a misbehaving client must not be able to flood the log.
        debug!(conn = %ClientId(self.out.id), code = code.as_str(), message, "client event refused");
        self.push(&server_event::error(code, message, id));
    }
}
