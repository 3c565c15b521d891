//! One Redis server as a core sees it: a command connection (commands queued in order, their
//! replies matched in order) and a subscriber connection (RESP3, so that a command sent on it
//! with [`Node::ordered`] is answered in the order of its messages). With Redis Cluster the
//! subscriber uses sharded pub/sub (`SSUBSCRIBE`, one command per slot, `smessage`).
//!
//! Invariants: lives on one core. The command connection reconnects by itself with capped
//! exponential backoff and jitter; while it is down every command fails at once. A command
//! unanswered past the timeout ends the command connection (a half-open link heals at once),
//! and at most `MAX_COMMANDS` wait per core. What the subscriber connection is sent is kept in
//! order ([`Sent`]), so that every reply and confirmation is matched to what asked for it: a
//! refused SUBSCRIBE is never taken for the answer of another command, and an unsubscribe
//! that nobody asked for (a slot that moved) is told apart from one that was asked for.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use redis::{PushKind, Value};
use tracing::{info, warn};

use super::resp::{connect, pump, Backoff, Target};
use super::topology::slot;
use super::{Broker, BrokerError, Changes, Push, PROBE_EVERY, PROBE_TIMEOUT};
use crate::deadline::{on_grid, within};
use crate::mesh::Latch;
use crate::route::Map;

/// Most channels named in one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 512;
/// Most commands queued or waiting for replies on one core; more are refused at once.
const MAX_COMMANDS: usize = 16 * 1024;

/// A command waiting for its reply.
pub(super) struct Slot {
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

/// What was sent on the subscriber connection and has not been answered in full.
enum Sent {
    /// A command sent with [`Node::ordered`]: one reply.
    Ordered,
    /// A SUBSCRIBE or UNSUBSCRIBE (sharded or not) of these channels: one push per channel, in
    /// order, or a single error.
    Channels {
        subscribe: bool,
        channels: Vec<String>,
        done: usize,
    },
}

pub(super) struct Node {
    /// Unique among the nodes a broker ever had: names the link of [`Push::Reply`].
    pub id: usize,
    pub target: Target,
    timeout: Duration,
    sharded: bool,
    /// Commands not yet written, and those written and waiting for replies, in order.
    unsent: RefCell<VecDeque<(Vec<u8>, Rc<Slot>)>>,
    /// With the time each was written: the oldest unanswered for longer than `timeout` means
    /// the connection is dead, whatever TCP says.
    inflight: RefCell<VecDeque<(Instant, Rc<Slot>)>>,
    command_waker: RefCell<Option<Waker>>,
    command_up: Cell<bool>,
    /// What waits to be written on the subscriber connection.
    sub_out: RefCell<Vec<u8>>,
    sub_waker: RefCell<Option<Waker>>,
    sub_up: Cell<bool>,
    sent: RefCell<VecDeque<Sent>>,
    /// SUBSCRIBEs sent per channel and not yet confirmed. Redis confirms in
    /// order, so after SUBSCRIBE, UNSUBSCRIBE, SUBSCRIBE of one channel the first confirmation
    /// must not count for the second: a channel is confirmed when its count is back at zero.
    unconfirmed: RefCell<Map<String, u32>>,
    /// This session's probe channel, in a slot the node serves; `probe_moved` once the node
    /// stopped serving it (a new one is picked after the next topology read).
    probe: RefCell<String>,
    probe_moved: Cell<bool>,
    last_probe_seen: Cell<Instant>,
    /// The broker's: told when either connection comes up or goes down.
    changes: Rc<Changes>,
}

impl Node {
    pub fn new(
        id: usize,
        target: Target,
        timeout: Duration,
        sharded: bool,
        changes: Rc<Changes>,
    ) -> Node {
        Node {
            id,
            target,
            timeout,
            sharded,
            unsent: RefCell::default(),
            inflight: RefCell::default(),
            command_waker: RefCell::default(),
            command_up: Cell::new(false),
            sub_out: RefCell::default(),
            sub_waker: RefCell::default(),
            sub_up: Cell::new(false),
            sent: RefCell::default(),
            unconfirmed: RefCell::default(),
            probe: RefCell::default(),
            probe_moved: Cell::new(false),
            last_probe_seen: Cell::new(Instant::now()),
            changes,
        }
    }

    /// True while both connections are up.
    pub fn is_up(&self) -> bool {
        self.command_up.get() && self.sub_up.get()
    }

    pub fn publish_verb(&self) -> &'static str {
        if self.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    // ---- the command connection --------------------------------------------------------

    /// Sends one packed command and waits for its reply.
    pub async fn command(&self, packed: Vec<u8>) -> Result<Value, BrokerError> {
        let slot = self.enqueue(packed)?;
        self.reply(slot).await
    }

    /// Queues a command at once (so that commands queued together stay together).
    pub fn enqueue(&self, packed: Vec<u8>) -> Result<Rc<Slot>, BrokerError> {
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
    pub async fn reply(&self, slot: Rc<Slot>) -> Result<Value, BrokerError> {
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
                Value::ServerError(e) => Err(match (e.code(), e.details()) {
                    (code @ ("MOVED" | "ASK"), Some(details)) => BrokerError::Moved {
                        ask: code == "ASK",
                        to: details.rsplit(' ').next().unwrap_or_default().to_string(),
                    },
                    ("NOSCRIPT", _) => BrokerError::NoScript,
                    _ => BrokerError::Server(e.to_string()),
                }),
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

    /// Keeps the command connection up, for ever.
    pub async fn run_commands(self: Rc<Self>) {
        let mut backoff = Backoff::default();
        loop {
            match self.command_session().await {
                Ok(()) => backoff.reset(),
                Err(e) => warn!(node = %self.target, error = %e, "redis command connection lost"),
            }
            self.command_up.set(false);
            self.changes.note();
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
        self.changes.note();
        info!(node = %self.target, "redis command connection up");
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
                // On the housekeeping's grid, as the subscriber's probe: in its wake-up.
                glommio::timer::sleep(on_grid(self.timeout / 4, crate::watchdog::TICK)).await;
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

    // ---- the subscriber connection -----------------------------------------------------

    /// Sends a command on the subscriber connection: its reply comes back as
    /// [`Push::Reply`], after every message Redis published before running it and before every
    /// one after. False (nothing sent) while the subscriber is down.
    pub fn ordered(&self, packed: &[u8]) -> bool {
        if !self.sub_up.get() {
            return false;
        }
        self.sent.borrow_mut().push_back(Sent::Ordered);
        self.write_sub(packed);
        true
    }

    fn write_sub(&self, packed: &[u8]) {
        self.sub_out.borrow_mut().extend_from_slice(packed);
        if let Some(w) = self.sub_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Queues a (sharded) SUBSCRIBE or UNSUBSCRIBE of `channels`. Nothing while the subscriber
    /// is down: it subscribes to everything again on reconnect.
    pub fn queue_sub(&self, subscribe: bool, channels: Vec<String>) {
        if self.sub_up.get() {
            self.send_sub(subscribe, channels);
        }
    }

    /// Sharded, one command per slot (Redis refuses channels of several slots in one).
    fn send_sub(&self, subscribe: bool, channels: Vec<String>) {
        if channels.is_empty() {
            return;
        }
        if subscribe {
            let mut unconfirmed = self.unconfirmed.borrow_mut();
            for ch in &channels {
                *unconfirmed.entry(ch.clone()).or_default() += 1;
            }
        }
        let batches: Vec<Vec<String>> = if self.sharded {
            let mut by_slot: Map<u16, Vec<String>> = Map::default();
            for ch in channels {
                by_slot.entry(slot(ch.as_bytes())).or_default().push(ch);
            }
            by_slot.into_values().collect()
        } else {
            let mut channels = channels;
            let mut batches = Vec::new();
            while !channels.is_empty() {
                let rest = channels.split_off(channels.len().min(SUBSCRIBE_BATCH));
                batches.push(std::mem::replace(&mut channels, rest));
            }
            batches
        };
        let verb = match (self.sharded, subscribe) {
            (false, true) => "SUBSCRIBE",
            (false, false) => "UNSUBSCRIBE",
            (true, true) => "SSUBSCRIBE",
            (true, false) => "SUNSUBSCRIBE",
        };
        for channels in batches {
            let packed = redis::cmd(verb).arg(&channels).get_packed_command();
            self.sent.borrow_mut().push_back(Sent::Channels {
                subscribe,
                channels,
                done: 0,
            });
            self.write_sub(&packed);
        }
    }

    /// Runs one subscriber connection until it fails or `renew` is set, handing what arrives
    /// to `broker` while `renew` is not set. Up once Redis confirms the `probe` channel.
    /// Returns whether it came up, and how it ended.
    pub async fn subscriber_session(
        &self,
        broker: &Broker,
        probe: String,
        renew: &Latch,
    ) -> (bool, io::Result<()>) {
        *self.probe.borrow_mut() = probe;
        self.probe_moved.set(false);
        let result = self.subscribe_until(broker, renew).await;
        self.sub_out.borrow_mut().clear();
        self.sent.borrow_mut().clear();
        self.unconfirmed.borrow_mut().clear();
        let was_up = self.sub_up.replace(false);
        self.changes.note();
        (was_up, result)
    }

    /// The probe's slot moved: `probe` replaces it (the last one is given up on).
    pub fn repick_probe(&self, probe: String) {
        if self.probe_moved.replace(false) && self.sub_up.get() {
            *self.probe.borrow_mut() = probe.clone();
            self.last_probe_seen.set(Instant::now());
            self.send_sub(true, vec![probe]);
        }
    }

    fn probe_lost(&self, broker: &Broker) {
        self.probe_moved.set(true);
        broker.request_refresh();
    }

    async fn subscribe_until(&self, broker: &Broker, renew: &Latch) -> io::Result<()> {
        let stream = RefCell::new(connect(&self.target, true).await?);
        self.send_sub(true, vec![self.probe.borrow().clone()]);
        self.last_probe_seen.set(Instant::now());
        let queued = |cx: &mut Context<'_>| {
            let mut out = self.sub_out.borrow_mut();
            if out.is_empty() {
                *self.sub_waker.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(std::mem::take(&mut *out))
        };
        let pushed = |value: Value| match renew.get() {
            // Renewed: nothing more from this connection counts.
            Some(_) => Ok(()),
            None => self.on_subscriber_value(value, broker),
        };
        let watchdog = async {
            loop {
                // On the housekeeping's grid (with the default heartbeat): in its wake-up.
                glommio::timer::sleep(on_grid(PROBE_EVERY, crate::watchdog::TICK)).await;
                if self.last_probe_seen.get().elapsed() > PROBE_TIMEOUT {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "subscription went silent (probe lost)",
                    ));
                }
                // Not awaited: the answer that matters arrives on the subscriber, and a Redis
                // that holds commands back must not stop this check.
                let _ = self.enqueue(
                    redis::cmd(self.publish_verb())
                        .arg(&*self.probe.borrow())
                        .arg("probe")
                        .get_packed_command(),
                );
            }
        };
        let renewed = async {
            renew.wait().await;
            Ok(())
        };
        let session = futures_lite::future::or(pump(&stream, queued, pushed), watchdog);
        futures_lite::future::or(session, renewed).await
    }

    fn on_subscriber_value(&self, value: Value, broker: &Broker) -> io::Result<()> {
        let (kind, items) = match value {
            Value::Push { kind, data } => (kind, data),
            reply => return self.on_reply(reply, broker),
        };
        let [Value::BulkString(channel), rest @ ..] = items.as_slice() else {
            return Ok(());
        };
        let Ok(channel) = std::str::from_utf8(channel) else {
            return Ok(());
        };
        let is_probe = *channel == *self.probe.borrow();
        match kind {
            PushKind::Message | PushKind::SMessage if is_probe => {
                self.last_probe_seen.set(Instant::now())
            }
            PushKind::Message | PushKind::SMessage => {
                if let (Some(name), [Value::BulkString(payload)]) = (broker.strip(channel), rest) {
                    broker.push(Push::Message {
                        channel: name,
                        payload,
                    });
                }
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                self.answered(true, channel)?;
                let confirmed = {
                    let mut unconfirmed = self.unconfirmed.borrow_mut();
                    let left = unconfirmed.get_mut(channel).map(|n| {
                        *n -= 1;
                        *n
                    });
                    left == Some(0) && unconfirmed.remove(channel).is_some()
                };
                if is_probe {
                    self.last_probe_seen.set(Instant::now());
                    if !self.sub_up.replace(true) {
                        self.changes.note();
                        let channels = broker.wanted_on(self);
                        info!(node = %self.target, channels = channels.len(), "redis subscriber connection up");
                        self.send_sub(true, channels);
                        broker.push(Push::Link(true));
                    }
                } else if let Some(name) = broker.strip(channel).filter(|_| confirmed) {
                    broker.push(Push::Subscribed { channel: name });
                }
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                if self.answered(false, channel).is_ok() {
                    return Ok(());
                }
                // Not asked for: the node no longer serves the channel's slot.
                if is_probe {
                    self.probe_lost(broker);
                } else if let Some(name) = broker.strip(channel) {
                    broker.dropped(name);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A push confirming `channel` for the oldest (un)subscribe sent: matched, or an error
    /// when it is not the one expected.
    fn answered(&self, subscribe: bool, channel: &str) -> io::Result<()> {
        let mut sent = self.sent.borrow_mut();
        let Some(Sent::Channels {
            subscribe: s,
            channels,
            done,
        }) = sent.front_mut()
        else {
            return Err(unexpected(channel));
        };
        if *s != subscribe || channels.get(*done).map(String::as_str) != Some(channel) {
            return Err(unexpected(channel));
        }
        *done += 1;
        if *done == channels.len() {
            sent.pop_front();
        }
        Ok(())
    }

    /// A reply on the subscriber connection: the answer of an ordered command, or the error of
    /// an (un)subscribe that Redis refused.
    fn on_reply(&self, reply: Value, broker: &Broker) -> io::Result<()> {
        let front = self.sent.borrow_mut().pop_front();
        match front {
            Some(Sent::Ordered) => broker.push(Push::Reply {
                link: self.id,
                value: reply,
            }),
            Some(Sent::Channels {
                subscribe,
                channels,
                done: 0,
            }) => {
                if channels.contains(&*self.probe.borrow()) {
                    self.probe_lost(broker);
                }
                if subscribe {
                    let mut unconfirmed = self.unconfirmed.borrow_mut();
                    for ch in &channels {
                        let left = unconfirmed.get_mut(ch).map(|n| {
                            *n -= 1;
                            *n
                        });
                        if left == Some(0) {
                            unconfirmed.remove(ch);
                        }
                    }
                }
                broker.refused(subscribe, &channels, &reply);
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a reply on the subscriber connection that nothing asked for",
                ))
            }
        }
        Ok(())
    }
}

fn unexpected(channel: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("an unexpected confirmation for {channel}"),
    )
}
