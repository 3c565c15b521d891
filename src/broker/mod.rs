//! The Redis bridge of one core. With `broker.kind = "redis"` one Redis serves everything;
//! with `"redis-cluster"` each master serves its slots, and the core has a [`node`] (a command
//! connection and a subscriber connection) per master, read from `CLUSTER SLOTS`
//! ([`topology`]). Commands go to the node that serves their key's slot, and conversation
//! channels are subscribed with sharded pub/sub on the node that serves theirs. Callers name
//! the key (or channel) a command is for, and nothing outside this module knows which kind
//! of Redis is behind it.
//!
//! Invariants: lives on one core. The core's subscriptions are one link for its shard: when
//! any node's subscriber connection is lost, every node's is renewed (all of them subscribe
//! again to what they serve) and the shard is told once ([`Push::Link`]`(false)`), so that
//! what it knows about its rooms is never half stale. A channel whose slot moved (the node
//! said `sunsubscribe`, refused a subscribe with `MOVED`, or the topology shows it) is handed
//! back to the shard as [`Push::Dropped`] once the topology was read again, and the shard
//! subscribes again where it lives now. A probe on each node that does not come back within
//! `PROBE_TIMEOUT` renews a subscription that went silent. A connection counts as up only once
//! Redis answered on it, and TCP keepalive runs on all of them. A subscription is confirmed
//! when Redis has confirmed every SUBSCRIBE sent for it.

mod node;
mod resp;
mod topology;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use redis::Value;
use tracing::{info, warn};

use crate::history::{Epoch, Position};
use crate::mesh::{Latch, Verdict};
use crate::route::Map;
use node::Node;
use resp::Backoff;
pub use resp::{Target, TargetError};
use topology::{complete, read_slots, slot, Master, SLOTS};

/// How often each node's subscriber checks that its subscription still delivers.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe not back by then means the subscriber connection went silent.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A cluster's topology is read again this often while all is well; while anything is down,
/// every `TOPOLOGY_MIN` for the first `TOPOLOGY_FAST` (a failover promotes a replica within
/// seconds, and each read sooner shortens what is lost), then every `TOPOLOGY_DOWN`; never
/// more often than `TOPOLOGY_MIN`.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(5);
const TOPOLOGY_DOWN: Duration = Duration::from_secs(1);
const TOPOLOGY_FAST: Duration = Duration::from_secs(10);
const TOPOLOGY_MIN: Duration = Duration::from_millis(100);

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
    /// Redis Cluster's `MOVED` or (`ask`) `ASK`: the key's slot is served at `to` (host:port).
    #[error("redis cluster: the slot is served at {to}")]
    Moved { ask: bool, to: String },
    /// `NOSCRIPT`: Redis does not have a script sent by its hash (it restarted, or its scripts
    /// were flushed): nothing ran; send it with its text.
    #[error("redis does not have the script")]
    NoScript,
    /// The memory broker's: a core of this instance did not confirm in time.
    #[error("a core of this server did not confirm in time")]
    Stalled,
}

/// Publishes events with history (KEYS: each event's history hash and list; ARGV: size,
/// ttl_ms, the publish command, then each event's channel and payload), atomically: per event, a new epoch where
/// the conversation's history is missing, the next offset, the payload with
/// `,"offset":N` (and `,"epoch":"E"` on an epoch's first event) before its closing brace
/// appended to the list trimmed to `size`, both keys' expiry renewed, and the offset payload
/// published. Returns the offsets.
const PUBLISH_SCRIPT: &str = r#"
local size, ttl = tonumber(ARGV[1]), ARGV[2]
local offsets = {}
for i = 1, #KEYS / 2 do
  local meta, list = KEYS[2 * i - 1], KEYS[2 * i]
  local channel, payload = ARGV[2 * i + 2], ARGV[2 * i + 3]
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
  redis.call(ARGV[3], channel, out)
  offsets[i] = offset
end
return offsets
"#;

/// [`PUBLISH_SCRIPT`]'s SHA-1, to run it with `EVALSHA`: Redis then neither reads its text
/// (1 KB) nor hashes it per publish, about half of Redis's CPU for the call (BENCHMARKS.md).
static PUBLISH_SCRIPT_SHA: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| redis::Script::new(PUBLISH_SCRIPT).get_hash().to_string());

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

/// What the subscriber connections hand to their core.
/// Borrowed from the value just read: handing an event over allocates nothing.
pub enum Push<'a> {
    /// A message on `channel` (prefix stripped).
    Message { channel: &'a str, payload: &'a [u8] },
    /// Redis confirmed a SUBSCRIBE of `channel` (prefix stripped).
    Subscribed { channel: &'a str },
    /// `channel` (prefix stripped) is no longer subscribed: its slot moved to another node,
    /// and what was published there since is not here. Subscribed again only when asked.
    Dropped { channel: &'a str },
    /// The reply to the oldest command sent with [`Broker::ordered`] on `link` and not
    /// answered yet.
    Reply { link: usize, value: Value },
    /// A node's subscriber connection came up (`true`), or the subscriptions went down and
    /// are being renewed on every node (the replies of ordered commands that did not come will
    /// not come).
    Link(bool),
}

type Wanted = Box<dyn Fn() -> Vec<String>>;
type OnPush = Box<dyn Fn(Push<'_>)>;

pub struct Broker {
    /// Where the Redis is; with a cluster, where its topology is read when no node answers.
    seeds: Vec<Target>,
    cluster: bool,
    timeout: Duration,
    /// `<channel_prefix>:`.
    prefix: String,
    /// The probe channels of this core start with this (a hash tag per node follows).
    probe: String,
    /// The masters, each with its node, in address order.
    nodes: RefCell<Vec<(Master, Rc<Node>)>>,
    /// Whether those masters serve every slot (computed when they change).
    covered: Cell<bool>,
    /// Each node's connection tasks, by node id: dropping them stops the node.
    tasks: RefCell<Map<usize, [glommio::Task<()>; 2]>>,
    next_node: Cell<usize>,
    /// Set once this round of subscriber connections is being renewed.
    renew: RefCell<Rc<Latch>>,
    /// Set to have the topology read now.
    refresh: RefCell<Rc<Latch>>,
    /// Channels to hand back as [`Push::Dropped`] after the next topology read.
    dropped: RefCell<Vec<String>>,
    wanted: RefCell<Option<Wanted>>,
    on_push: RefCell<Option<OnPush>>,
    changes: Rc<Changes>,
}

/// Tells whoever waits that the broker's state may have changed: a node's connection came up
/// or went down, or the masters came to serve every slot or stopped to.
#[derive(Default)]
pub struct Changes(RefCell<Rc<Latch>>);

impl Changes {
    /// Set at the next change: taken before the state is read, it misses none.
    pub fn next(&self) -> Rc<Latch> {
        self.0.borrow().clone()
    }

    pub fn note(&self) {
        std::mem::take(&mut *self.0.borrow_mut()).set(Verdict::Granted);
    }
}

impl Broker {
    /// `seeds`: the Redis, or a cluster's seed nodes (`cluster`). `timeout` bounds every wait
    /// for Redis (`broker.subscribe_timeout_ms`).
    pub fn new(
        seeds: Vec<Target>,
        cluster: bool,
        channel_prefix: &str,
        instance: &str,
        core: usize,
        timeout: Duration,
    ) -> Rc<Broker> {
        Rc::new(Broker {
            seeds,
            cluster,
            timeout,
            prefix: format!("{channel_prefix}:"),
            probe: format!("{channel_prefix}:probe:{instance}:{core}"),
            nodes: RefCell::default(),
            covered: Cell::new(false),
            tasks: RefCell::default(),
            next_node: Cell::new(0),
            renew: RefCell::default(),
            refresh: RefCell::default(),
            dropped: RefCell::default(),
            wanted: RefCell::default(),
            on_push: RefCell::default(),
            changes: Rc::default(),
        })
    }

    /// Starts the connections, for ever. `wanted` lists every channel (prefix stripped) the
    /// core wants, for each (re)subscription; `on_push` gets what arrives.
    pub fn start(
        self: &Rc<Self>,
        wanted: impl Fn() -> Vec<String> + 'static,
        on_push: impl Fn(Push<'_>) + 'static,
    ) {
        *self.wanted.borrow_mut() = Some(Box::new(wanted));
        *self.on_push.borrow_mut() = Some(Box::new(on_push));
        if self.cluster {
            glommio::spawn_local(self.clone().run_topology()).detach();
        } else {
            let redis = &self.seeds[0];
            self.set_masters(vec![Master {
                host: redis.host.clone(),
                port: redis.port,
                ranges: vec![(0, SLOTS - 1)],
            }]);
        }
    }

    /// What [`Broker::is_up`] waits on to change.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// True while every node's connections are up and (with a cluster) every slot is served.
    pub fn is_up(&self) -> bool {
        let nodes = self.nodes.borrow();
        self.covered.get() && nodes.iter().all(|(_, n)| n.is_up())
    }

    pub fn channel(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The command that publishes `payload` on channel `name` (sharded with a cluster).
    pub fn publish(&self, name: &str, payload: &[u8]) -> redis::Cmd {
        let mut publish = redis::cmd(self.publish_verb());
        publish.arg(self.channel(name)).arg(payload);
        publish
    }

    fn publish_verb(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Events of channels with the same group can be published in one command or
    /// transaction: with a cluster, the channel's slot; with one Redis, all of them.
    pub fn group(&self, name: &str) -> u16 {
        match self.cluster {
            true => slot(self.channel(name).as_bytes()),
            false => 0,
        }
    }

    /// The history keys of `room`: a hash (epoch, offset) and a list of offset payloads, in
    /// the slot of its channel (the channel's name is their hash tag).
    fn history_keys(&self, room: &str) -> [String; 2] {
        let channel = self.channel(room);
        [format!("{{{channel}}}:h"), format!("{{{channel}}}:l")]
    }

    /// The command that publishes `(room, payload)`s with history ([`PUBLISH_SCRIPT`]); with a
    /// cluster, all of one [`Broker::group`]. `by_hash`: `EVALSHA`, which Redis may answer
    /// with [`BrokerError::NoScript`]; else `EVAL` with the script's text.
    pub fn publish_with_history<'a>(
        &self,
        events: impl ExactSizeIterator<Item = (&'a str, &'a [u8])>,
        size: usize,
        ttl_ms: u64,
        by_hash: bool,
    ) -> Vec<u8> {
        let (verb, script) = match by_hash {
            true => ("EVALSHA", PUBLISH_SCRIPT_SHA.as_str()),
            false => ("EVAL", PUBLISH_SCRIPT),
        };
        let mut cmd = redis::cmd(verb);
        cmd.arg(script).arg(2 * events.len());
        let mut args: Vec<(String, &[u8])> = Vec::with_capacity(events.len());
        for (room, payload) in events {
            cmd.arg(&self.history_keys(room));
            args.push((self.channel(room), payload));
        }
        cmd.arg(size).arg(ttl_ms).arg(self.publish_verb());
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

    // ---- commands ----------------------------------------------------------------------

    /// The node serving `key` (a key or a channel, prefix included).
    fn node_for(&self, key: &str) -> Option<Rc<Node>> {
        let nodes = self.nodes.borrow();
        let slot = slot(key.as_bytes());
        let found = nodes.iter().find(|(m, _)| !self.cluster || m.serves(slot));
        found.map(|(_, node)| node.clone())
    }

    /// The node at `addr` (`host:port`), if it is one of the masters.
    fn node_at(&self, addr: &str) -> Option<Rc<Node>> {
        let nodes = self.nodes.borrow();
        let found = nodes.iter().find(|(_, n)| n.target.addr() == addr);
        found.map(|(_, node)| node.clone())
    }

    /// Sends one packed command for `key` and waits for its reply. A slot that moved is
    /// followed once (`MOVED`, or `ASK` during a migration), and the topology read again.
    pub async fn command(&self, key: &str, packed: Vec<u8>) -> Result<Value, BrokerError> {
        let node = self.node_for(key).ok_or(BrokerError::Down)?;
        let again = self.cluster.then(|| packed.clone());
        match (node.command(packed).await, again) {
            (Err(BrokerError::Moved { ask, to }), Some(packed)) => {
                self.request_refresh();
                let node = self.node_at(&to).ok_or(BrokerError::Down)?;
                if ask {
                    node.enqueue(redis::cmd("ASKING").get_packed_command())?;
                }
                node.command(packed).await
            }
            (result, _) => result,
        }
    }

    /// Runs `commands`, all for keys of `key`'s slot, atomically (MULTI … EXEC): all of them
    /// or none. Returns their replies.
    pub async fn transaction(
        &self,
        key: &str,
        commands: &[redis::Cmd],
    ) -> Result<Vec<Value>, BrokerError> {
        let node = self.node_for(key).ok_or(BrokerError::Down)?;
        let result = node.transaction(commands).await;
        if self.cluster && matches!(result, Err(BrokerError::Server(_))) {
            // EXECABORT: perhaps a slot that moved.
            self.request_refresh();
        }
        result
    }

    /// Sends a command for `key` on the subscriber connection of its node: its reply comes
    /// back as [`Push::Reply`] on the link returned, after every message Redis published
    /// before running it and before every one after. `None` (nothing sent) while that
    /// subscriber is down.
    pub fn ordered(&self, key: &str, packed: &[u8]) -> Option<usize> {
        let node = self.node_for(key)?;
        node.ordered(packed).then_some(node.id)
    }

    // ---- subscriptions -----------------------------------------------------------------

    /// Queues a SUBSCRIBE of `channels` (prefix stripped) on the nodes serving them; each
    /// confirmation comes back as [`Push::Subscribed`]. While a subscriber is down nothing is
    /// queued: it subscribes to everything again on reconnect.
    pub fn subscribe(&self, channels: &[&str]) {
        self.queue_sub(true, channels);
    }

    pub fn unsubscribe(&self, channels: &[&str]) {
        self.queue_sub(false, channels);
    }

    fn queue_sub(&self, subscribe: bool, channels: &[&str]) {
        let nodes = self.nodes.borrow();
        let mut by_node = vec![Vec::new(); nodes.len()];
        for name in channels {
            let channel = self.channel(name);
            let slot = slot(channel.as_bytes());
            match nodes
                .iter()
                .position(|(m, _)| !self.cluster || m.serves(slot))
            {
                Some(at) => by_node[at].push(channel),
                // No node serves it now: after the next topology read the shard is asked.
                None if subscribe => self.dropped.borrow_mut().push(channel),
                None => {}
            }
        }
        for ((_, node), channels) in nodes.iter().zip(by_node) {
            node.queue_sub(subscribe, channels);
        }
        drop(nodes);
        if subscribe && !self.dropped.borrow().is_empty() {
            self.request_refresh();
        }
    }

    /// Keeps `node`'s subscriber connection up, for ever (until the node is dropped).
    async fn run_subscriber(self: Rc<Self>, node: Rc<Node>) {
        let mut backoff = Backoff::default();
        loop {
            let round = self.renew.borrow().clone();
            let probe = self.probe_on(&node);
            let (was_up, result) = node.subscriber_session(&self, probe, &round).await;
            if was_up {
                self.renew_links(&round);
            }
            match result {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    warn!(node = %node.target, error = %e, "redis subscriber connection lost");
                    if self.cluster {
                        self.request_refresh();
                    }
                    glommio::timer::sleep(backoff.next()).await;
                }
            }
        }
    }

    /// Ends this round of subscriber connections (each node subscribes again to what it
    /// serves) and tells the shard, once per round.
    fn renew_links(&self, round: &Rc<Latch>) {
        if round.get().is_some() {
            return;
        }
        round.set(Verdict::Granted);
        *self.renew.borrow_mut() = Rc::default();
        self.dropped.borrow_mut().clear();
        self.push(Push::Link(false));
    }

    /// `node`'s probe channel: this core's, tagged into a slot that the node serves.
    fn probe_on(&self, node: &Node) -> String {
        let nodes = self.nodes.borrow();
        let master = nodes.iter().find(|(_, n)| n.id == node.id);
        let tag = master.map(|(m, _)| m.tag()).unwrap_or_default();
        format!("{}:{{{tag}}}", self.probe)
    }

    // ---- for the nodes -----------------------------------------------------------------

    fn push(&self, push: Push<'_>) {
        if let Some(on_push) = &*self.on_push.borrow() {
            on_push(push);
        }
    }

    /// `channel` without `<channel_prefix>:`, or `None` when it is not one of ours.
    fn strip<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.prefix)
    }

    /// Every channel (prefix included) that the core wants and `node` serves.
    fn wanted_on(&self, node: &Node) -> Vec<String> {
        let wanted = self
            .wanted
            .borrow()
            .as_ref()
            .map(|w| w())
            .unwrap_or_default();
        let nodes = self.nodes.borrow();
        let Some((master, _)) = nodes.iter().find(|(_, n)| n.id == node.id) else {
            return Vec::new();
        };
        wanted
            .iter()
            .map(|name| self.channel(name))
            .filter(|c| !self.cluster || master.serves(slot(c.as_bytes())))
            .collect()
    }

    /// A node stopped serving `channel` (prefix stripped) without being asked: the shard is
    /// told at once (a subscribe sent where the slot was is redirected by its `MOVED`).
    fn dropped(&self, channel: &str) {
        self.request_refresh();
        self.push(Push::Dropped { channel });
    }

    /// A node refused to (un)subscribe `channels` with `reply`: where a slot moved, they are
    /// handed back after the next topology read; anything else is logged, and the rooms'
    /// subscribers get `unavailable` when their wait ends.
    fn refused(&self, subscribe: bool, channels: &[String], reply: &Value) {
        let moved = match reply {
            Value::ServerError(e) => {
                ["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"].contains(&e.code())
            }
            _ => false,
        };
        if self.cluster && moved {
            self.request_refresh();
            if !subscribe {
                return;
            }
            // Followed at once to the node named, when it is one of ours; else after the
            // topology is read again.
            let to = match reply {
                Value::ServerError(e) => e.details().and_then(|d| d.rsplit(' ').next()),
                _ => None,
            };
            match to.and_then(|addr| self.node_at(addr)) {
                Some(node) => node.queue_sub(true, channels.to_vec()),
                None => self.dropped.borrow_mut().extend(channels.iter().cloned()),
            }
            return;
        }
        warn!(
            ?reply,
            channels = channels.len(),
            first = channels.first().map_or("", String::as_str),
            "redis refused to {}",
            if subscribe {
                "subscribe"
            } else {
                "unsubscribe"
            }
        );
    }

    // ---- the topology ------------------------------------------------------------------

    fn request_refresh(&self) {
        self.refresh.borrow().set(Verdict::Granted);
    }

    /// With a cluster: reads the topology at start, when asked, and on the timings above,
    /// for ever.
    async fn run_topology(self: Rc<Self>) {
        let mut last: Option<Instant> = None;
        let mut failing = false;
        let mut down_since: Option<Instant> = None;
        loop {
            if let Some(at) = last {
                let asked = self.refresh.borrow().clone();
                let every = match (self.is_up(), down_since) {
                    (true, _) => {
                        down_since = None;
                        TOPOLOGY_EVERY
                    }
                    (false, Some(since)) if since.elapsed() > TOPOLOGY_FAST => TOPOLOGY_DOWN,
                    (false, _) => {
                        down_since.get_or_insert_with(Instant::now);
                        TOPOLOGY_MIN
                    }
                };
                asked.wait_at_most(every).await;
                glommio::timer::sleep(TOPOLOGY_MIN.saturating_sub(at.elapsed())).await;
            }
            *self.refresh.borrow_mut() = Rc::default();
            last = Some(Instant::now());
            match self.read_topology().await {
                Some(masters) => {
                    failing = false;
                    self.set_masters(masters);
                }
                None if !failing => {
                    failing = true;
                    warn!("no redis cluster node answered CLUSTER SLOTS; trying again");
                }
                None => {}
            }
        }
    }

    /// `CLUSTER SLOTS` from the first node that answers (connected ones first, then the
    /// others, then the seeds), preferring an answer in which every slot is served.
    async fn read_topology(&self) -> Option<Vec<Master>> {
        let mut nodes: Vec<Rc<Node>> = self.nodes.borrow().iter().map(|(_, n)| n.clone()).collect();
        nodes.sort_by_key(|n| !n.is_up());
        let mut targets: Vec<Target> = nodes.iter().map(|n| n.target.clone()).collect();
        targets.extend(self.seeds.iter().cloned());
        let ask = redis::cmd("CLUSTER").arg("SLOTS").get_packed_command();
        let mut partial = None;
        for target in targets {
            let Ok(reply) = resp::query(&target, &ask).await else {
                continue;
            };
            match read_slots(&reply, &target.host) {
                Some(masters) if complete(&masters) => return Some(masters),
                Some(masters) => partial = partial.or(Some(masters)),
                None => warn!(node = %target, "CLUSTER SLOTS answered something else"),
            }
        }
        partial
    }

    /// Takes a topology: a node for each new master; a master gone stops its node; a wanted
    /// channel whose slot moved to a node that was already there is handed back to the shard,
    /// to subscribe there.
    fn set_masters(self: &Rc<Self>, masters: Vec<Master>) {
        let old = self.nodes.borrow().clone();
        if old.iter().map(|(m, _)| m).eq(masters.iter()) {
            return self.hand_back_dropped();
        }
        let mut nodes = Vec::with_capacity(masters.len());
        let mut new = Vec::new();
        for master in masters {
            let node = match old
                .iter()
                .find(|(m, _)| m.host == master.host && m.port == master.port)
            {
                Some((_, node)) => node.clone(),
                None => {
                    let node = self.new_node(&master);
                    new.push(node.clone());
                    node
                }
            };
            nodes.push((master, node));
        }
        let gone: Vec<Rc<Node>> = old
            .iter()
            .filter(|(_, o)| !nodes.iter().any(|(_, n)| n.id == o.id))
            .map(|(_, n)| n.clone())
            .collect();
        if self.cluster {
            info!(
                masters = nodes.len(),
                gone = gone.len(),
                "redis cluster topology changed"
            );
        }
        let owner = |list: &[(Master, Rc<Node>)], slot| {
            list.iter().find(|(m, _)| m.serves(slot)).map(|(_, n)| n.id)
        };
        let moved: Vec<String> = self
            .wanted
            .borrow()
            .as_ref()
            .map(|w| w())
            .unwrap_or_default()
            .iter()
            .map(|name| self.channel(name))
            .filter(|channel| {
                let slot = slot(channel.as_bytes());
                let now = owner(&nodes, slot);
                // A new node subscribes to everything it serves when it comes up.
                now != owner(&old, slot) && old.iter().any(|(_, n)| Some(n.id) == now)
            })
            .collect();
        self.covered.set(complete(nodes.iter().map(|(m, _)| m)));
        self.changes.note();
        *self.nodes.borrow_mut() = nodes;
        for node in new {
            let tasks = [
                glommio::spawn_local(node.clone().run_commands()),
                glommio::spawn_local(self.clone().run_subscriber(node.clone())),
            ];
            self.tasks.borrow_mut().insert(node.id, tasks);
        }
        self.dropped.borrow_mut().extend(moved);
        // A master gone lost its slots first (each channel of them is handed back, or served
        // by a new node that subscribes to it), or died (its link was renewed then).
        for node in gone {
            self.tasks.borrow_mut().remove(&node.id);
        }
        self.hand_back_dropped();
    }

    fn new_node(&self, master: &Master) -> Rc<Node> {
        let id = self.next_node.get();
        self.next_node.set(id + 1);
        let target = Target {
            host: master.host.clone(),
            port: master.port,
            ..self.seeds[0].clone()
        };
        Rc::new(Node::new(
            id,
            target,
            self.timeout,
            self.cluster,
            self.changes.clone(),
        ))
    }

    /// Hands the dropped channels back to the shard, each once, and gives each node whose
    /// probe moved a new one.
    fn hand_back_dropped(&self) {
        let nodes: Vec<Rc<Node>> = self.nodes.borrow().iter().map(|(_, n)| n.clone()).collect();
        for node in nodes {
            node.repick_probe(self.probe_on(&node));
        }
        let mut dropped = std::mem::take(&mut *self.dropped.borrow_mut());
        dropped.sort_unstable();
        dropped.dedup();
        for channel in &dropped {
            if let Some(name) = self.strip(channel) {
                self.push(Push::Dropped { channel: name });
            }
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
