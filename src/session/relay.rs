//! Sessions of other instances, through Redis: no sticky sessions. A request that reaches an
//! instance other than its session's home is forwarded to the home core and answered there
//! by the same code as a local one; the answer (and a stream's frames) come back the same way.
//!
//! Channels: every core of every instance subscribes to `<prefix>:sessions:<instance>:<core>`,
//! for requests to its sessions and answers to what it forwarded. Messages are one header line
//! and a body:
//! - `req <reply channel> <n>` + a JSON [`Call`]: a request to serve (the home's side);
//! - `answer <n> <status> <retry-after or ->` + the JSON body: its answer;
//! - `frames <n>` + SSE bytes: a forwarded stream's frames; `end <n>...`: the end of one or
//!   more streams;
//! - `alive <reply> <n>...` every half heartbeat interval: the forwarded streams of one home
//!   core whose clients are still there, all of a forwarding core's in one message (up to
//!   [`ALIVE_BATCH`] numbers); `detach <reply> <n>` when a stream ended. A home that hears no
//!   `alive` of a stream for `heartbeat.timeout_ms` stops it (and says `end`); an `alive` of
//!   streams the home no longer serves is answered `end`; an `alive` nobody hears (the home is
//!   gone) ends the streams it named; a forwarding core whose subscriber connection drops ends
//!   its forwarded streams. A stream never goes silent: it ends, and its client resumes from
//!   its `Last-Event-ID`, which the home still retains.
//!
//! Cost per session: a poll, a post or a `DELETE` is two PUBLISHes (request, answer); a
//! forwarded stream is one PUBLISH per batch of frames (each wake of the home's reader, at
//! most 64 KiB). Its liveness costs nothing per stream: two `alive` per heartbeat interval
//! from each forwarding core to each home core it forwards to, whatever the number of streams.
//!
//! Failure: `PUBLISH` says how many subscribers got the request. None: the home's liveness key
//! decides, gone → `404` (its sessions died with it), still there → `503` with `Retry-After`.
//! A request not answered within `server.request_timeout_ms` (a poll: plus
//! `fallback.poll_timeout_ms`) is a `503` too.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::sse::{self, Frames, Source};
use super::{events, poll, Session, Transport};
use crate::broker::Broker;
use crate::deadline::{on_grid, within};
use crate::handle::clock_ms;
use crate::http::Response;
use crate::route::Map;
use crate::shard::Shard;

/// The channel of `core` of `instance` (prefix stripped).
pub fn channel(instance: &str, core: usize) -> String {
    format!("sessions:{instance}:{core}")
}

/// A forwarded request.
#[derive(Serialize, Deserialize)]
pub struct Call {
    pub op: Op,
    pub session: String,
    pub token: String,
    /// A poll's `cursor`, a stream's `Last-Event-ID`.
    #[serde(default)]
    pub arg: Option<String>,
    /// Posted events.
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Poll,
    Events,
    Delete,
    Sse,
}

/// What comes back for a forwarded request.
enum Reply {
    Answer(Response),
    Frames(Vec<u8>),
    End,
}

/// A forwarded request waiting for what comes back.
#[derive(Default)]
struct Waiting {
    replies: RefCell<VecDeque<Reply>>,
    bytes: Cell<usize>,
    waker: RefCell<Option<Waker>>,
}

/// A stream served here for another instance.
struct Remote {
    session: Rc<Session>,
    /// The reader's attach number (to release it: on `detach`, or when not heard of).
    number: Cell<u64>,
    last_alive: Cell<u64>,
}

/// The most stream numbers one `alive` names (about 20 B each).
const ALIVE_BATCH: usize = 1000;

/// This core's forwarded requests, both ways.
#[derive(Default)]
pub struct Relay {
    /// Requests this core forwarded, by number.
    waiting: RefCell<Map<u64, Rc<Waiting>>>,
    /// The streams among them, by number: the channel of the home core that serves each.
    streams: RefCell<Map<u64, String>>,
    /// Streams this core serves for other instances, by their reply channel and number.
    remote: RefCell<Map<(String, u64), Rc<Remote>>>,
    /// Whether [`liveness`] runs (while there are streams either way).
    live: Cell<bool>,
}

impl Relay {
    /// Makes sure [`liveness`] runs: a stream was just added, one way or the other.
    fn watch(&self, shard: &Rc<Shard>, broker: &Rc<Broker>) {
        if !self.live.replace(true) {
            glommio::spawn_local(liveness(shard.clone(), broker.clone())).detach();
        }
    }
}

// ---- the forwarding side ---------------------------------------------------------------

/// Forwards `call` to `core` of `instance` and waits for its answer (a poll: up to its
/// timeout as well).
pub async fn call(shard: &Rc<Shard>, instance: &str, core: usize, call: Call) -> Response {
    let poll = call.op == Op::Poll;
    let sent = match send(shard, instance, core, &call).await {
        Ok(sent) => sent,
        Err(refused) => return refused,
    };
    let config = &shard.config;
    let mut limit = Duration::from_millis(config.server.request_timeout_ms);
    if poll {
        limit += Duration::from_millis(config.fallback.poll_timeout_ms);
    }
    match within(limit, sent.next()).await {
        Some(Reply::Answer(answer)) => answer,
        _ => unavailable("the session's instance did not answer in time"),
    }
}

/// Forwards a stream request and serves the stream it opens on `stream`.
pub async fn stream(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    instance: &str,
    core: usize,
    call: Call,
    cors: &[(&'static str, String)],
) -> Option<Response> {
    let sent = match send(shard, instance, core, &call).await {
        Ok(sent) => sent,
        Err(refused) => return Some(refused),
    };
    let limit = Duration::from_millis(shard.config.server.request_timeout_ms);
    match within(limit, sent.next()).await {
        Some(Reply::Answer(answer)) if answer.status == 200 => {}
        Some(Reply::Answer(answer)) => return Some(answer),
        _ => return Some(unavailable("the session's instance did not answer in time")),
    }
    let home = channel(instance, core);
    let relay = &shard.sessions.relay;
    relay.streams.borrow_mut().insert(sent.n, home.clone());
    relay.watch(shard, sent.broker);
    let source = Relayed {
        shard,
        sent: &sent,
        wrote: Instant::now(),
    };
    // However it ended (the client left, it fell behind, the home ended it), the home stops.
    sse::pump(shard, stream, cors, source).await;
    let detach = format!("detach {} {}", sent.reply, sent.n);
    sent.publish(&home, detach.into_bytes()).await;
    None
}

/// A request sent, until dropped.
struct Sent<'a> {
    shard: &'a Shard,
    broker: &'a Rc<Broker>,
    n: u64,
    reply: String,
    waiting: Rc<Waiting>,
}

impl Sent<'_> {
    async fn next(&self) -> Reply {
        poll_fn(|cx| match self.waiting.replies.borrow_mut().pop_front() {
            Some(reply) => {
                if let Reply::Frames(bytes) = &reply {
                    self.waiting
                        .bytes
                        .set(self.waiting.bytes.get() - bytes.len());
                }
                Poll::Ready(reply)
            }
            None => {
                *self.waiting.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Publishes to `channel`: false when nobody heard it (or Redis is away).
    async fn publish(&self, channel: &str, payload: Vec<u8>) -> bool {
        publish(self.broker, channel, payload).await
    }
}

impl Drop for Sent<'_> {
    fn drop(&mut self) {
        let relay = &self.shard.sessions.relay;
        relay.waiting.borrow_mut().remove(&self.n);
        relay.streams.borrow_mut().remove(&self.n);
    }
}

/// Every half heartbeat interval, while this core forwards or serves a stream: ends the
/// streams it serves whose forwarding instance stopped saying their clients are there, and
/// tells each home core which of its streams this core still forwards. A home ends a stream it
/// hears nothing of for `heartbeat.timeout_ms` (two intervals): told every half interval, it
/// still hears in time when a message is late by more than an interval. The waits end on the
/// housekeeping's grid.
async fn liveness(shard: Rc<Shard>, broker: Rc<Broker>) {
    let hb = &shard.config.heartbeat;
    let every = Duration::from_millis(hb.interval_ms) / 2;
    let relay = &shard.sessions.relay;
    let reply = channel(&shard.instance, shard.id);
    loop {
        glommio::timer::sleep(on_grid(every, shard.sweep.tick())).await;
        let now = clock_ms();
        let unheard: Vec<Rc<Remote>> = relay
            .remote
            .borrow()
            .values()
            .filter(|r| now.saturating_sub(r.last_alive.get()) > hb.timeout_ms)
            .cloned()
            .collect();
        // Their streams end and say `end`: if that instance still serves one, it ends it, and
        // the client resumes.
        for remote in unheard {
            remote.session.release(remote.number.get());
        }
        let mut homes: Map<String, Vec<u64>> = Map::default();
        for (&n, home) in relay.streams.borrow().iter() {
            homes.entry(home.clone()).or_default().push(n);
        }
        if homes.is_empty() && relay.remote.borrow().is_empty() {
            relay.live.set(false);
            return;
        }
        for (home, numbers) in homes {
            for batch in numbers.chunks(ALIVE_BATCH) {
                let alive = format!("alive {reply} {}", line(batch));
                if !publish(&broker, &home, alive.into_bytes()).await {
                    // Nobody heard it: the home is gone. Its streams end; each client's next
                    // request learns more.
                    for &n in batch {
                        deliver(relay, n, Reply::End);
                    }
                }
            }
        }
    }
}

/// `numbers` as one line's words.
fn line(numbers: &[u64]) -> String {
    let words: Vec<String> = numbers.iter().map(u64::to_string).collect();
    words.join(" ")
}

/// A forwarded stream's frames, as they come back.
struct Relayed<'a> {
    shard: &'a Shard,
    sent: &'a Sent<'a>,
    /// When the client was last sent something (frames or a keepalive).
    wrote: Instant,
}

impl Source for Relayed<'_> {
    async fn next(&mut self) -> Option<Vec<u8>> {
        let quiet = Duration::from_millis(self.shard.config.heartbeat.interval_ms);
        let limit = self.shard.config.limits.outbound_queue_bytes as usize;
        if self.sent.waiting.bytes.get() > limit {
            // The client reads slower than the frames come: it resumes from what it has.
            debug!("a forwarded stream fell behind; ending it");
            return None;
        }
        // The client gets a keepalive each quiet interval. The wait ends on the housekeeping's
        // grid, as a stream's own keepalives do (`sse`).
        let wait = on_grid(
            quiet.saturating_sub(self.wrote.elapsed()),
            self.shard.sweep.tick(),
        );
        let next = within(wait, self.sent.next()).await;
        self.wrote = Instant::now();
        match next {
            Some(Reply::Frames(bytes)) => Some(bytes),
            Some(Reply::End | Reply::Answer(_)) => None,
            None => Some(sse::KEEPALIVE.to_vec()),
        }
    }
}

/// Sends `call`; `Err` is the answer when nobody is there to serve it.
async fn send<'a>(
    shard: &'a Rc<Shard>,
    instance: &str,
    core: usize,
    call: &Call,
) -> Result<Sent<'a>, Response> {
    let not_found = || Response::error(404, "not_found", "no such session (it may have ended)");
    let Some(broker) = &shard.broker else {
        return Err(not_found());
    };
    let n = shard.next_id();
    let waiting = Rc::new(Waiting::default());
    shard
        .sessions
        .relay
        .waiting
        .borrow_mut()
        .insert(n, waiting.clone());
    let sent = Sent {
        shard,
        broker,
        n,
        reply: channel(&shard.instance, shard.id),
        waiting,
    };
    let mut payload = format!("req {} {n}\n", sent.reply).into_bytes();
    // Serializing a struct of strings cannot fail.
    payload.extend_from_slice(&serde_json::to_vec(call).unwrap_or_default());
    let home = channel(instance, core);
    if sent.publish(&home, payload).await {
        return Ok(sent);
    }
    let key = match &shard.cluster {
        Some(cluster) => cluster.instance_key(instance),
        None => return Err(not_found()),
    };
    let alive = redis::cmd("EXISTS").arg(&key).get_packed_command();
    match broker.command(&key, alive).await {
        Ok(redis::Value::Int(0)) => Err(not_found()),
        _ => Err(unavailable("the session's instance does not answer")),
    }
}

fn unavailable(reason: &str) -> Response {
    Response::error(503, "unavailable", reason).with_header("Retry-After", "1")
}

/// True when a subscriber heard it (with a cluster, sharded: the one node that serves the
/// channel counts every subscriber there is).
async fn publish(broker: &Broker, channel: &str, payload: Vec<u8>) -> bool {
    let publish = broker.publish(channel, &payload).get_packed_command();
    let answer = broker.command(&broker.channel(channel), publish).await;
    matches!(answer, Ok(redis::Value::Int(n)) if n > 0)
}

// ---- what arrives ----------------------------------------------------------------------

/// A message on this core's sessions channel.
pub fn on_message(shard: &Rc<Shard>, payload: &[u8]) {
    let (head, body) = match payload.iter().position(|&b| b == b'\n') {
        Some(at) => (&payload[..at], &payload[at + 1..]),
        None => (payload, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let words: Vec<&str> = head.split(' ').collect();
    let relay = &shard.sessions.relay;
    let n = |w: &str| w.parse::<u64>().ok();
    let numbers = |ws: &[&str]| ws.iter().map(|w| n(w)).collect::<Option<Vec<u64>>>();
    match words.as_slice() {
        ["req", reply, number] if n(number).is_some() => {
            match serde_json::from_slice::<Call>(body) {
                Ok(call) => {
                    let (shard, reply) = (shard.clone(), reply.to_string());
                    glommio::spawn_local(serve(shard, reply, n(number).unwrap_or(0), call))
                        .detach();
                }
                Err(e) => invalid(shard, &head, &e.to_string()),
            }
        }
        ["answer", number, status, retry] => {
            let (Some(number), Ok(status)) = (n(number), status.parse::<u16>()) else {
                return invalid(shard, &head, "bad answer");
            };
            let mut answer = Response::json(status, String::from_utf8_lossy(body).into_owned());
            if *retry != "-" {
                answer = answer.with_header("Retry-After", retry.to_string());
            }
            deliver(relay, number, Reply::Answer(answer));
        }
        ["frames", number] if n(number).is_some() => {
            deliver(relay, n(number).unwrap_or(0), Reply::Frames(body.to_vec()))
        }
        ["end", ws @ ..] if !ws.is_empty() => match numbers(ws) {
            Some(ended) => ended
                .into_iter()
                .for_each(|n| deliver(relay, n, Reply::End)),
            None => invalid(shard, &head, "bad end"),
        },
        ["alive", reply, ws @ ..] if !ws.is_empty() => {
            let Some(alive) = numbers(ws) else {
                return invalid(shard, &head, "bad alive");
            };
            let now = clock_ms();
            let mut key = (reply.to_string(), 0);
            let mut gone = Vec::new();
            for n in alive {
                key.1 = n;
                match relay.remote.borrow().get(&key) {
                    Some(remote) => remote.last_alive.set(now),
                    None => gone.push(n),
                }
            }
            // Streams this core no longer serves: the forwarding side ends them (their clients
            // resume) instead of waiting for frames that will not come.
            if let (false, Some(broker)) = (gone.is_empty(), shard.broker.clone()) {
                let end = format!("end {}", line(&gone)).into_bytes();
                glommio::spawn_local(async move { publish(&broker, &key.0, end).await }).detach();
            }
        }
        ["detach", reply, number] if n(number).is_some() => {
            let key = (reply.to_string(), n(number).unwrap_or(0));
            let remote = relay.remote.borrow().get(&key).cloned();
            if let Some(remote) = remote {
                remote.session.release(remote.number.get());
            }
        }
        _ => invalid(shard, &head, "unknown message"),
    }
}

fn invalid(shard: &Shard, head: &str, error: &str) {
    shard.stats().redis_invalid_total.inc();
    warn!(message = %head, error, "dropped an invalid message on a sessions channel");
}

impl Relay {
    /// This core's subscriber connection dropped: what was on its way may be lost, so every
    /// forwarded request ends (a stream's client resumes from what it has; a request that
    /// waited is answered `503`).
    pub fn link_lost(&self) {
        let numbers: Vec<u64> = self.waiting.borrow().keys().copied().collect();
        for n in numbers {
            deliver(self, n, Reply::End);
        }
    }
}

fn deliver(relay: &Relay, n: u64, reply: Reply) {
    // A request given up on (timed out, its client gone) finds nothing: dropped.
    let Some(waiting) = relay.waiting.borrow().get(&n).cloned() else {
        return;
    };
    if let Reply::Frames(bytes) = &reply {
        waiting.bytes.set(waiting.bytes.get() + bytes.len());
    }
    waiting.replies.borrow_mut().push_back(reply);
    let waker = waiting.waker.borrow_mut().take();
    if let Some(w) = waker {
        w.wake();
    }
}

// ---- the home's side -------------------------------------------------------------------

/// Serves a forwarded request to a session of this core, and sends back what it gives.
async fn serve(shard: Rc<Shard>, reply: String, n: u64, call: Call) {
    let Some(broker) = shard.broker.clone() else {
        return;
    };
    let answer = |response: Response| {
        let retry = response
            .headers
            .iter()
            .find(|(name, _)| *name == "Retry-After")
            .map_or("-".to_string(), |(_, v)| v.clone());
        let mut payload = format!("answer {n} {} {retry}\n", response.status).into_bytes();
        payload.extend_from_slice(response.body.as_bytes());
        payload
    };
    let session = match super::find_here(&shard, &call.session, &call.token) {
        Ok(session) => session,
        Err(refused) => {
            publish(&broker, &reply, answer(refused)).await;
            return;
        }
    };
    let response = match call.op {
        // The forwarding instance holds the client's connection: it gives up on its own.
        Op::Poll => {
            poll::poll(
                &shard,
                &session,
                call.arg.as_deref(),
                std::future::pending(),
            )
            .await
        }
        Op::Events => {
            let body = call.body.unwrap_or_default();
            let limit = shard.config.limits.max_publish_bytes;
            if body.len() > limit {
                Response::too_large(limit)
            } else {
                events::post(&shard, &session, body.as_bytes())
            }
        }
        Op::Delete => super::delete(&shard, &session),
        Op::Sse => match sse::open(&shard, &session, call.arg.as_deref()) {
            Ok(cursor) => {
                let ready = answer(Response::json(200, String::new()));
                let key = (reply, n);
                return stream_to(&shard, &broker, &session, cursor, key, ready).await;
            }
            Err(refused) => refused,
        },
    };
    publish(&broker, &reply, answer(response)).await;
}

/// Streams a session's frames to the instance that forwarded its stream (`key`: its reply
/// channel and number), until the session ends, another reader takes over, or that instance
/// stops saying its client is there ([`liveness`] then releases the reader). The stream is
/// known here before `ready` (its `200`) is sent: the first `alive` may follow at once.
async fn stream_to(
    shard: &Rc<Shard>,
    broker: &Rc<Broker>,
    session: &Rc<Session>,
    cursor: u64,
    key: (String, u64),
    ready: Vec<u8>,
) {
    let reader = session.attach(Transport::Sse);
    let remote = Rc::new(Remote {
        session: session.clone(),
        number: Cell::new(reader.number),
        last_alive: Cell::new(clock_ms()),
    });
    let relay = &shard.sessions.relay;
    relay.remote.borrow_mut().insert(key.clone(), remote);
    relay.watch(shard, broker);
    let (reply, n) = (&key.0, key.1);
    publish(broker, reply, ready).await;
    let mut frames = Frames {
        shard,
        session,
        reader,
        cursor,
    };
    loop {
        let Some(bytes) = frames.chunk().await else {
            publish(broker, reply, format!("end {n}").into_bytes()).await;
            break;
        };
        let mut payload = format!("frames {n}\n").into_bytes();
        payload.extend_from_slice(&bytes);
        if !publish(broker, reply, payload).await {
            break;
        }
    }
    relay.remote.borrow_mut().remove(&key);
}
