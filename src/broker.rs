//! The Redis bridge of one core: a command connection (PUBLISH, the history script, presence
//! keys) and a subscriber connection (the channels of the conversations this core owns, the
//! presence channel on core 0, and a probe channel), both speaking RESP over glommio sockets
//! with the `redis` crate's packed commands and `Parser`. The subscriber speaks RESP3, so that
//! a command sent on it ([`Broker::ordered`]) is answered in the order of its messages.
//!
//! Invariants: lives on one core. Both connections reconnect by themselves with capped
//! exponential backoff and jitter; while the command connection is down every command fails at
//! once (callers answer 503 or fall back to local delivery); after the subscriber reconnects it
//! subscribes again to everything the core wants, and a probe that does not come back within
//! `PROBE_TIMEOUT` renews a subscription that went silent. A connection counts as up only once
//! Redis answered on it; a command unanswered past the timeout ends the command connection (a
//! half-open link heals at once), at most `MAX_COMMANDS` wait per core, and TCP keepalive runs
//! on both. A subscription is confirmed when Redis has confirmed every SUBSCRIBE sent for it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures_lite::AsyncRead;
use glommio::net::TcpStream;
use redis::{PushKind, Value};
use tracing::{info, warn};

use crate::conn::write_all;
use crate::deadline::within;
use crate::history::{Epoch, Position};
use crate::route::Map;

/// How often each core's subscriber checks that its subscription still delivers.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe not back by then means the subscriber connection went silent.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Most channels named in one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 512;
/// Connecting, authenticating and the first PING must be done by then.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most commands queued or waiting for replies on one core; more are refused at once.
const MAX_COMMANDS: usize = 16 * 1024;
/// TCP keepalive on both connections: an idle peer that vanished is noticed in about 8 s, and
/// unacknowledged writes are given up after `TCP_USER_TIMEOUT`.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("redis is not connected")]
    Down,
    #[error("redis did not answer in time")]
    Timeout,
    #[error("too many redis commands waiting")]
    Overloaded,
    #[error("redis answered an error: {0}")]
    Server(String),
    /// The memory broker's: a core of this instance did not confirm in time.
    #[error("a core of this server did not confirm in time")]
    Stalled,
}

/// Where Redis is: `redis://[[user]:password@]host[:port][/db]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub db: i64,
    pub user: Option<String>,
    pub password: Option<String>,
}

/// Why a Redis URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("must start with redis://")]
    Scheme,
    #[error("bad database `{0}`")]
    Database(String),
    #[error("bad port `{0}`")]
    Port(String),
    #[error("no host")]
    NoHost,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let rest = url.strip_prefix("redis://").ok_or(TargetError::Scheme)?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((hp, "")) => (hp, 0),
            Some((hp, db)) => (
                hp,
                db.parse().map_err(|_| TargetError::Database(db.into()))?,
            ),
            None => (rest, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| TargetError::Port(p.into()))?),
            None => (hostport, 6379),
        };
        if host.is_empty() {
            return Err(TargetError::NoHost);
        }
        let (user, password) = match auth.map(|a| a.split_once(':').unwrap_or(("", a))) {
            Some((u, p)) => (
                (!u.is_empty()).then(|| u.to_string()),
                (!p.is_empty()).then(|| p.to_string()),
            ),
            None => (None, None),
        };
        Ok(Target {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            db,
            user,
            password,
        })
    }

    /// The addresses to try, in order. A host name is resolved on glommio's blocking thread: a
    /// slow DNS server must not stall the core (an IP address needs no lookup).
    async fn addrs(&self) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let (host, port) = (self.host.clone(), self.port);
        glommio::executor()
            .spawn_blocking(move || Ok((host.as_str(), port).to_socket_addrs()?.collect()))
            .await
    }

    /// Commands that open every connection: AUTH and SELECT as configured, `HELLO 3` for the
    /// subscriber (RESP3, so that it can run commands between its pushes), then a PING, so that
    /// a connection counts as up only once Redis has answered on it.
    fn hello(&self, resp3: bool) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Some(password) = &self.password {
            let mut auth = redis::cmd("AUTH");
            if let Some(user) = &self.user {
                auth.arg(user);
            }
            out.push(auth.arg(password).get_packed_command());
        }
        if self.db != 0 {
            out.push(redis::cmd("SELECT").arg(self.db).get_packed_command());
        }
        if resp3 {
            out.push(redis::cmd("HELLO").arg(3).get_packed_command());
        }
        out.push(redis::cmd("PING").get_packed_command());
        out
    }
}

/// Publishes events with history (KEYS: each event's history hash and list; ARGV: size,
/// ttl_ms, then each event's channel and payload), atomically: per event, a new epoch where
/// the conversation's history is missing, the next offset, the payload with
/// `,"offset":N` (and `,"epoch":"E"` on an epoch's first event) before its closing brace
/// appended to the list trimmed to `size`, both keys' expiry renewed, and the offset payload
/// published. Returns the offsets.
const PUBLISH_SCRIPT: &str = r#"
local size, ttl = tonumber(ARGV[1]), ARGV[2]
local offsets = {}
for i = 1, #KEYS / 2 do
  local meta, list = KEYS[2 * i - 1], KEYS[2 * i]
  local channel, payload = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = string.format('%x', t[1] * 1000000 + t[2])
    redis.call('DEL', list)
    redis.call('HSET', meta, 'epoch', epoch, 'offset', 0)
  end
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  local field = ',"offset":' .. offset
  if offset == 1 then field = field .. ',"epoch":"' .. epoch .. '"' end
  local brace = #payload
  while brace > 1 and string.byte(payload, brace) ~= 125 do brace = brace - 1 end
  local out = string.sub(payload, 1, brace - 1) .. field .. string.sub(payload, brace)
  redis.call('RPUSH', list, out)
  redis.call('LTRIM', list, -size, -1)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', list, ttl)
  redis.call('PUBLISH', channel, out)
  offsets[i] = offset
end
return offsets
"#;

/// Reads a conversation's history (KEYS: its hash and list; ARGV: ttl_ms, and "1" for the
/// events too): `[epoch, offset, events...]`, a new epoch made where it is missing.
const READ_SCRIPT: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = string.format('%x', t[1] * 1000000 + t[2])
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
local out = {epoch, tonumber(redis.call('HGET', KEYS[1], 'offset'))}
if ARGV[2] == '1' then
  for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do out[#out + 1] = e end
end
return out
"#;

/// A command waiting for its reply.
struct Slot {
    value: RefCell<Option<Result<Value, BrokerError>>>,
    waker: RefCell<Option<Waker>>,
}

impl Slot {
    fn fill(&self, v: Result<Value, BrokerError>) {
        *self.value.borrow_mut() = Some(v);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

/// What the subscriber connection hands to its core.
/// Borrowed from the value just read: handing an event over allocates nothing.
pub enum Push<'a> {
    /// A message on `channel` (prefix stripped).
    Message { channel: &'a str, payload: &'a [u8] },
    /// Redis confirmed a SUBSCRIBE of `channel` (prefix stripped).
    Subscribed { channel: &'a str },
    /// The reply to the oldest command sent with [`Broker::ordered`] and not answered yet.
    Reply(Value),
    /// The subscriber connection came up (`true`) or went down (the replies of commands sent
    /// with [`Broker::ordered`] that did not come will not come).
    Link(bool),
}

pub struct Broker {
    target: Target,
    timeout: Duration,
    /// `<channel_prefix>:`.
    prefix: String,
    /// The probe channel of this core, prefix included.
    probe: String,
    /// Commands not yet written, and those written and waiting for replies, in order.
    unsent: RefCell<VecDeque<(Vec<u8>, Rc<Slot>)>>,
    /// With the time each was written: the oldest unanswered for longer than `timeout` means
    /// the connection is dead, whatever TCP says.
    inflight: RefCell<VecDeque<(Instant, Rc<Slot>)>>,
    command_waker: RefCell<Option<Waker>>,
    command_up: Cell<bool>,
    /// SUBSCRIBE/UNSUBSCRIBE bytes waiting for the subscriber connection.
    sub_out: RefCell<Vec<u8>>,
    sub_waker: RefCell<Option<Waker>>,
    sub_up: Cell<bool>,
    /// SUBSCRIBEs sent per channel (prefix stripped) and not yet confirmed. Redis confirms in
    /// order, so after SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE of one channel the first confirmation
    /// must not count for the second: a channel is confirmed when its count is back at zero.
    unconfirmed: RefCell<Map<String, u32>>,
    last_probe_seen: Cell<Instant>,
}

impl Broker {
    /// `timeout` bounds every wait for Redis (`broker.subscribe_timeout_ms`).
    pub fn new(
        target: Target,
        channel_prefix: &str,
        instance: &str,
        core: usize,
        timeout: Duration,
    ) -> Broker {
        Broker {
            target,
            timeout,
            prefix: format!("{channel_prefix}:"),
            probe: format!("{channel_prefix}:probe:{instance}:{core}"),
            unsent: RefCell::default(),
            inflight: RefCell::default(),
            command_waker: RefCell::default(),
            command_up: Cell::new(false),
            sub_out: RefCell::default(),
            sub_waker: RefCell::default(),
            sub_up: Cell::new(false),
            unconfirmed: RefCell::default(),
            last_probe_seen: Cell::new(Instant::now()),
        }
    }

    /// True while both connections are up.
    pub fn is_up(&self) -> bool {
        self.command_up.get() && self.sub_up.get()
    }

    pub fn channel(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The history keys of `room`: a hash (epoch, offset) and a list of offset payloads, in
    /// the slot of its channel (the channel's name is their hash tag).
    fn history_keys(&self, room: &str) -> [String; 2] {
        let channel = self.channel(room);
        [format!("{{{channel}}}:h"), format!("{{{channel}}}:l")]
    }

    /// The command that publishes `(room, payload)`s with history ([`PUBLISH_SCRIPT`]).
    pub fn publish_with_history<'a>(
        &self,
        events: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
        size: usize,
        ttl_ms: u64,
    ) -> Vec<u8> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUBLISH_SCRIPT).arg(2 * events.len());
        let mut args: Vec<(String, &[u8])> = Vec::with_capacity(events.len());
        for (room, payload) in events {
            cmd.arg(&self.history_keys(room));
            args.push((self.channel(room), payload));
        }
        cmd.arg(size).arg(ttl_ms);
        for (channel, payload) in args {
            cmd.arg(channel).arg(payload);
        }
        cmd.get_packed_command()
    }

    /// The command that reads `room`'s position, and its kept events when `events`
    /// ([`READ_SCRIPT`]); its reply is read by [`read_reply`].
    pub fn read_history(&self, room: &str, events: bool, ttl_ms: u64) -> Vec<u8> {
        redis::cmd("EVAL")
            .arg(READ_SCRIPT)
            .arg(2)
            .arg(&self.history_keys(room))
            .arg(ttl_ms)
            .arg(if events { "1" } else { "0" })
            .get_packed_command()
    }

    /// Sends one packed command and waits for its reply.
    pub async fn command(&self, packed: Vec<u8>) -> Result<Value, BrokerError> {
        let slot = self.enqueue(packed)?;
        self.reply(slot).await
    }

    /// Queues a command at once (so that commands queued together stay together).
    fn enqueue(&self, packed: Vec<u8>) -> Result<Rc<Slot>, BrokerError> {
        if !self.command_up.get() {
            return Err(BrokerError::Down);
        }
        if self.waiting_commands() >= MAX_COMMANDS {
            return Err(BrokerError::Overloaded);
        }
        let slot = Rc::new(Slot {
            value: RefCell::new(None),
            waker: RefCell::new(None),
        });
        self.unsent.borrow_mut().push_back((packed, slot.clone()));
        if let Some(w) = self.command_waker.borrow_mut().take() {
            w.wake();
        }
        Ok(slot)
    }

    fn waiting_commands(&self) -> usize {
        self.unsent.borrow().len() + self.inflight.borrow().len()
    }

    /// Waits for a reply, at most `timeout`: a Redis that stopped answering is as good as down.
    async fn reply(&self, slot: Rc<Slot>) -> Result<Value, BrokerError> {
        let answered = poll_fn(|cx| match slot.value.borrow_mut().take() {
            Some(v) => Poll::Ready(v),
            None => {
                *slot.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        });
        within(self.timeout, answered)
            .await
            .unwrap_or(Err(BrokerError::Timeout))
            .and_then(|v| match v {
                Value::ServerError(e) => Err(BrokerError::Server(e.to_string())),
                v => Ok(v),
            })
    }

    /// Runs `commands` atomically (MULTI … EXEC): all of them or none. Returns their replies.
    pub async fn transaction(&self, commands: &[redis::Cmd]) -> Result<Vec<Value>, BrokerError> {
        if self.waiting_commands() + commands.len() + 2 > MAX_COMMANDS {
            return Err(BrokerError::Overloaded);
        }
        // Queued without a pause, so that no other command lands inside the transaction.
        let mut packed = vec![redis::cmd("MULTI").get_packed_command()];
        packed.extend(commands.iter().map(redis::Cmd::get_packed_command));
        packed.push(redis::cmd("EXEC").get_packed_command());
        let mut slots = packed
            .into_iter()
            .map(|p| self.enqueue(p))
            .collect::<Result<Vec<_>, _>>()?;
        // Replies come in order, so EXEC's is the last to arrive and speaks for the whole
        // transaction (a bad command inside makes it EXECABORT). Waiting for one reply keeps
        // the wait at one timeout, whatever the number of commands.
        let exec = slots.pop().ok_or(BrokerError::Down)?;
        match self.reply(exec).await? {
            Value::Array(replies) => Ok(replies),
            other => Err(BrokerError::Server(format!("EXEC answered {other:?}"))),
        }
    }

    /// Sends a command on the subscriber connection: its reply comes back as [`Push::Reply`],
    /// after every message Redis published before running it and before every one after.
    /// False (nothing sent) while the subscriber is down.
    pub fn ordered(&self, packed: &[u8]) -> bool {
        if !self.sub_up.get() {
            return false;
        }
        self.sub_out.borrow_mut().extend_from_slice(packed);
        if let Some(w) = self.sub_waker.borrow_mut().take() {
            w.wake();
        }
        true
    }

    /// Queues a SUBSCRIBE; the confirmation comes back as [`Push::Subscribed`]. While the
    /// subscriber is down nothing is queued: it subscribes to everything again on reconnect.
    pub fn subscribe(&self, channels: &[&str]) {
        self.queue_sub("SUBSCRIBE", channels);
    }

    pub fn unsubscribe(&self, channels: &[&str]) {
        self.queue_sub("UNSUBSCRIBE", channels);
    }

    fn queue_sub(&self, verb: &str, channels: &[&str]) {
        if !self.sub_up.get() || channels.is_empty() {
            return;
        }
        if verb == "SUBSCRIBE" {
            let mut unconfirmed = self.unconfirmed.borrow_mut();
            for ch in channels {
                *unconfirmed.entry(ch.to_string()).or_default() += 1;
            }
        }
        let mut out = self.sub_out.borrow_mut();
        for batch in channels.chunks(SUBSCRIBE_BATCH) {
            let mut c = redis::cmd(verb);
            for ch in batch {
                c.arg(self.channel(ch));
            }
            out.extend_from_slice(&c.get_packed_command());
        }
        if let Some(w) = self.sub_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Keeps the command connection up, for ever.
    pub async fn run_commands(self: Rc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            match self.command_session().await {
                Ok(()) => backoff.reset(),
                Err(e) => warn!(error = %e, "redis command connection lost"),
            }
            self.command_up.set(false);
            for (_, slot) in self.inflight.borrow_mut().drain(..) {
                slot.fill(Err(BrokerError::Down));
            }
            for (_, slot) in self.unsent.borrow_mut().drain(..) {
                slot.fill(Err(BrokerError::Down));
            }
            glommio::timer::sleep(backoff.next()).await;
        }
    }

    async fn command_session(&self) -> io::Result<()> {
        let stream = RefCell::new(connect(&self.target, false).await?);
        self.command_up.set(true);
        info!(target = %format_args!("{}:{}", self.target.host, self.target.port), "redis command connection up");
        let queued = |cx: &mut Context<'_>| {
            let mut unsent = self.unsent.borrow_mut();
            if unsent.is_empty() {
                *self.command_waker.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let mut bytes = Vec::new();
            let mut inflight = self.inflight.borrow_mut();
            let now = Instant::now();
            for (packed, slot) in unsent.drain(..) {
                bytes.extend_from_slice(&packed);
                inflight.push_back((now, slot));
            }
            Poll::Ready(bytes)
        };
        let reply = |value: Value| match self.inflight.borrow_mut().pop_front() {
            Some((_, slot)) => {
                slot.fill(Ok(value));
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "reply without a command",
            )),
        };
        // A half-open connection answers nothing and TCP may not notice for minutes: a command
        // unanswered past the timeout ends this connection, and the next one starts afresh.
        let watchdog = async {
            loop {
                glommio::timer::sleep(self.timeout / 4).await;
                let oldest = self.inflight.borrow().front().map(|(at, _)| at.elapsed());
                if oldest.is_some_and(|age| age > self.timeout) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "a command went unanswered past broker.subscribe_timeout_ms",
                    ));
                }
            }
        };
        futures_lite::future::or(pump(&stream, queued, reply), watchdog).await
    }

    /// Keeps the subscriber connection up, for ever, handing what arrives to `on_push`.
    /// `wanted` lists every channel (prefix stripped) the core wants at (re)connect time.
    pub async fn run_subscriber(
        self: Rc<Self>,
        wanted: impl Fn() -> Vec<String>,
        on_push: impl Fn(Push<'_>),
    ) {
        let mut backoff = Backoff::default();
        loop {
            match self.subscriber_session(&wanted, &on_push).await {
                Ok(()) => backoff.reset(),
                Err(e) => warn!(error = %e, "redis subscriber connection lost"),
            }
            if self.sub_up.replace(false) {
                on_push(Push::Link(false));
            }
            self.sub_out.borrow_mut().clear();
            self.unconfirmed.borrow_mut().clear();
            glommio::timer::sleep(backoff.next()).await;
        }
    }

    async fn subscriber_session(
        &self,
        wanted: &impl Fn() -> Vec<String>,
        on_push: &impl Fn(Push<'_>),
    ) -> io::Result<()> {
        let stream = RefCell::new(connect(&self.target, true).await?);
        // Up once Redis confirms the probe channel (see `on_subscriber_value`).
        let mut first = redis::cmd("SUBSCRIBE");
        first.arg(&self.probe);
        write_all(&stream, &first.get_packed_command(), TCP_USER_TIMEOUT).await?;
        self.last_probe_seen.set(Instant::now());
        let queued = |cx: &mut Context<'_>| {
            let mut out = self.sub_out.borrow_mut();
            if out.is_empty() {
                *self.sub_waker.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(std::mem::take(&mut *out))
        };
        let pushed = |value: Value| {
            self.on_subscriber_value(value, wanted, on_push);
            Ok(())
        };
        let watchdog = async {
            loop {
                glommio::timer::sleep(PROBE_EVERY).await;
                if self.last_probe_seen.get().elapsed() > PROBE_TIMEOUT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "subscription went silent (probe lost)",
                    ));
                }
                // Not awaited: the answer that matters arrives on the subscriber, and a Redis
                // that holds commands back must not stop this check.
                let _ = self.enqueue(
                    redis::cmd("PUBLISH")
                        .arg(&self.probe)
                        .arg("probe")
                        .get_packed_command(),
                );
            }
        };
        futures_lite::future::or(pump(&stream, queued, pushed), watchdog).await
    }

    fn on_subscriber_value(
        &self,
        value: Value,
        wanted: &impl Fn() -> Vec<String>,
        on_push: &impl Fn(Push<'_>),
    ) {
        let (kind, items) = match value {
            Value::Push { kind, data } => (kind, data),
            reply => return on_push(Push::Reply(reply)),
        };
        let [Value::BulkString(channel), rest @ ..] = items.as_slice() else {
            return;
        };
        if channel.as_slice() == self.probe.as_bytes() {
            self.last_probe_seen.set(Instant::now());
            if kind == PushKind::Subscribe && !self.sub_up.replace(true) {
                let channels = wanted();
                self.subscribe(&channels.iter().map(String::as_str).collect::<Vec<_>>());
                info!(channels = channels.len(), "redis subscriber connection up");
                on_push(Push::Link(true));
            }
            return;
        }
        let name = channel
            .strip_prefix(self.prefix.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok());
        let Some(channel) = name else { return };
        match (kind, rest) {
            (PushKind::Message, [Value::BulkString(payload)]) => {
                on_push(Push::Message { channel, payload })
            }
            (PushKind::Subscribe, _) => {
                let mut unconfirmed = self.unconfirmed.borrow_mut();
                let left = unconfirmed.get_mut(channel).map(|n| {
                    *n -= 1;
                    *n
                });
                if left == Some(0) {
                    unconfirmed.remove(channel);
                    drop(unconfirmed);
                    on_push(Push::Subscribed { channel });
                }
            }
            _ => {}
        }
    }
}

/// The reply of [`Broker::read_history`]: the position, and the kept events as frames (oldest
/// first, the last one at the position's offset).
pub fn read_reply(value: &Value) -> Option<(Position, Vec<bytes::Bytes>)> {
    let Value::Array(items) = value else {
        return None;
    };
    let [Value::BulkString(epoch), Value::Int(offset), events @ ..] = items.as_slice() else {
        return None;
    };
    let epoch = Epoch::parse(std::str::from_utf8(epoch).ok()?)?;
    let offset = u64::try_from(*offset).ok()?;
    let frames = events
        .iter()
        .map(|e| match e {
            Value::BulkString(payload) => Some(crate::ws::text(payload)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    (frames.len() as u64 <= offset).then_some((Position { epoch, offset }, frames))
}

/// Runs one connection until it fails: writes whatever `queued` hands over, and gives every
/// value read to `on_value`.
async fn pump(
    stream: &RefCell<TcpStream>,
    mut queued: impl FnMut(&mut Context<'_>) -> Poll<Vec<u8>>,
    mut on_value: impl FnMut(Value) -> io::Result<()>,
) -> io::Result<()> {
    let reader = async {
        let mut rbuf = BytesMut::new();
        let mut parser = redis::Parser::new();
        loop {
            read_into(stream, &mut rbuf).await?;
            while let Some(value) = next_value(&mut parser, &mut rbuf)? {
                on_value(value)?;
            }
        }
    };
    let writer = async {
        loop {
            let bytes = poll_fn(&mut queued).await;
            write_all(stream, &bytes, TCP_USER_TIMEOUT).await?;
        }
    };
    futures_lite::future::or(reader, writer).await
}

/// Pulls the next complete value out of `rbuf`, `None` when more bytes are needed.
fn next_value(parser: &mut redis::Parser, rbuf: &mut BytesMut) -> io::Result<Option<Value>> {
    // Asked even when `rbuf` is empty: the parser buffers what it read, and may hold more
    // complete values than it returned so far.
    match parser.parse_value(Feed(rbuf)) {
        Ok(v) => Ok(Some(v)),
        // The parser keeps its partial state: it asks again once more bytes arrived.
        Err(e) if e.is_timeout() || e.is_io_error() && rbuf.is_empty() => Ok(None),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
    }
}

/// A reader over the bytes received so far that says `WouldBlock` when they run out.
struct Feed<'a>(&'a mut BytesMut);

impl Read for Feed<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = out.len().min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0.advance(n);
        Ok(n)
    }
}

/// Connects, sets keepalive, and runs the `hello` commands, all within `CONNECT_TIMEOUT`.
async fn connect(target: &Target, resp3: bool) -> io::Result<TcpStream> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    within(CONNECT_TIMEOUT, open(target, resp3))
        .await
        .unwrap_or_else(|| Err(timed_out()))
}

async fn open(target: &Target, resp3: bool) -> io::Result<TcpStream> {
    let mut failed = io::Error::new(io::ErrorKind::NotFound, "redis host resolves to nothing");
    let mut stream = None;
    for addr in target.addrs().await? {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => failed = e.into(),
        }
    }
    let stream = stream.ok_or(failed)?;
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    // SAFETY: `stream` owns the fd and outlives this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let socket = socket2::SockRef::from(&fd);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    let stream = RefCell::new(stream);
    let mut rbuf = BytesMut::new();
    let mut parser = redis::Parser::new();
    for hello in target.hello(resp3) {
        write_all(&stream, &hello, TCP_USER_TIMEOUT).await?;
        let reply = loop {
            if let Some(v) = next_value(&mut parser, &mut rbuf)? {
                break v;
            }
            read_into(&stream, &mut rbuf).await?;
        };
        if let Value::ServerError(e) = reply {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                e.to_string(),
            ));
        }
    }
    Ok(stream.into_inner())
}

async fn read_into(stream: &RefCell<TcpStream>, rbuf: &mut BytesMut) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = poll_fn(|cx| Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut chunk)).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    rbuf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Capped exponential backoff with full jitter.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let cap = BACKOFF_MIN
            .saturating_mul(1 << self.attempt.min(10))
            .min(BACKOFF_MAX);
        self.attempt += 1;
        // Jitter from the clock's low bits: good enough to spread reconnects of many cores.
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let nanos = clock.subsec_nanos() ^ std::process::id().rotate_left(self.attempt);
        let jitter = (nanos % 1000) as f64 / 1000.0;
        BACKOFF_MIN.max(cap.mul_f64(0.5 + jitter / 2.0))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_urls() {
        let t = Target::parse("redis://127.0.0.1:6390/2").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.db, t.password),
            ("127.0.0.1", 6390, 2, None)
        );
        let t = Target::parse("redis://:s3cret@localhost").unwrap();
        assert_eq!(
            (t.port, t.user, t.password.as_deref()),
            (6379, None, Some("s3cret"))
        );
        let t = Target::parse("redis://bob:pw@h:1/").unwrap();
        assert_eq!(
            (t.user.as_deref(), t.password.as_deref(), t.db),
            (Some("bob"), Some("pw"), 0)
        );
        assert!(Target::parse("http://x").is_err());
        assert!(Target::parse("redis://h:port").is_err());
        assert!(Target::parse("redis://h/db").is_err());
    }

    #[test]
    fn the_parser_resumes_across_split_reads() {
        let mut parser = redis::Parser::new();
        let whole = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n:7\r\n";
        let mut rbuf = BytesMut::new();
        let mut values = Vec::new();
        for byte in whole {
            rbuf.extend_from_slice(&[*byte]);
            while let Some(v) = next_value(&mut parser, &mut rbuf).unwrap() {
                values.push(v);
            }
        }
        assert_eq!(values.len(), 2, "{values:?}");
        // Two values in one read come out one after the other.
        rbuf.extend_from_slice(b":1\r\n:2\r\n");
        assert_eq!(
            next_value(&mut parser, &mut rbuf).unwrap(),
            Some(Value::Int(1))
        );
        assert_eq!(
            next_value(&mut parser, &mut rbuf).unwrap(),
            Some(Value::Int(2))
        );
        assert_eq!(next_value(&mut parser, &mut rbuf).unwrap(), None);
        assert_eq!(values[1], Value::Int(7));
        let Value::Array(items) = &values[0] else {
            panic!("{values:?}")
        };
        assert_eq!(items[2], Value::BulkString(b"hello".to_vec()));
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first >= BACKOFF_MIN && first <= BACKOFF_MIN * 2);
        let later: Vec<Duration> = (0..20).map(|_| b.next()).collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(later.last().unwrap() >= &(BACKOFF_MAX / 2));
    }
}
