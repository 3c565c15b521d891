//! One core's share of the server, and the glue between its parts: its connections by tenant
//! ([`Connections`]), its rooms ([`Rooms`]), presence on the core ([`Users`]), with Redis this
//! instance among the others ([`Cluster`]), the connection-attempt and bad-key buckets of the
//! IPs it owns, and its end of the mesh ([`Mesh`]), through which it is the one router of
//! cross-core messages ([`Shard::route`], with the local fast path).
//!
//! Invariants: a `Shard` lives on one executor and is reached only through `Rc`; other cores
//! talk to it only by [`Message`]s. A conversation's owner (`route::shard_for`) keeps the set of
//! cores that have subscribers; an event is framed once and sent once to each such core, which
//! queues the same `Bytes` to each local subscriber. Handling a message never awaits; every
//! wait for another core has a deadline and takes its `pending` entry back when dropped.
//!
//! With the Redis broker, an owner SUBSCRIBEs to a room's channel when the first core becomes
//! interested and UNSUBSCRIBEs when the last leaves; subscribes are answered only once Redis
//! confirmed (or `broker.subscribe_timeout_ms` passed: `unavailable`), and events are published
//! through Redis so that every instance, this one included, delivers by the same path. What
//! arrives from Redis is checked like a publish body before it is framed.
//!
//! With history, the owner frames each event with its offset ([`History`]; with Redis the
//! history script did, and the owner's `History` is a cache of what it delivered). A
//! subscriber that recovers skips its room's deliveries until the owner's answer, which the
//! owner sends in order with them, from where its stream is at that moment (with Redis, from a
//! read on the subscriber connection when its cache lacks events): every event once, in order.

mod cluster;
mod conns;
mod from_redis;
mod sweep;
mod users;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::handle::{ConnHandle, Flush, Kind};
use crate::history::{History, Miss, Position, Read};
use crate::limit::TokenBucket;
use crate::mesh::{Fanned, Latch, Mesh, Message, Pending, Verdict};
use crate::metrics::{CoreStats, Registry};
use crate::presence;
use crate::protocol::server_event;
use crate::publish::Routed;
use crate::rooms::{Joined, Rooms};
use crate::route::{ip_key, shard_for, Map, RoomKey};
use tracing::warn;

pub use cluster::Cluster;
pub use conns::Connections;
pub use sweep::Sweep;
pub use users::Users;

/// Where the core sits in an id given out by [`Shard::next_id`].
const CORE_SHIFT: u32 = 48;

/// The core that gave out `id` (a connection's or a session's).
pub fn core_of(id: u64) -> usize {
    (id >> CORE_SHIFT) as usize
}

pub struct Shard {
    pub id: usize,
    pub count: usize,
    pub config: Arc<Config>,
    pub verifier: Arc<crate::auth::Verifier>,
    pub registry: Registry,
    mesh: Rc<Mesh>,
    /// The Redis bridge, with `broker.kind = "redis"`.
    pub broker: Option<Rc<Broker>>,
    rooms: RefCell<Rooms>,
    /// With `server.write_delay_ms`: the pacing of this core's writers (run by `run_shard`).
    pub flush: Option<Rc<Flush>>,
    pub conns: Rc<Connections>,
    /// Heartbeats and token expiry of this core's connections.
    pub sweep: Sweep,
    pub users: Rc<Users>,
    /// With Redis.
    pub cluster: Option<Rc<Cluster>>,
    /// This core's HTTP fallback sessions.
    pub sessions: crate::session::Sessions,
    /// This instance's id (in session ids, and with Redis among the instances).
    pub instance: Arc<str>,
    /// With Redis: this core's channel for requests to its sessions from other instances and
    /// answers to what it forwarded to them (`session::relay`).
    sessions_channel: String,
    /// Typing events forwarded, for rooms this core owns.
    typing: RefCell<presence::Throttle>,
    /// The streams of the rooms this core owns (missed-event recovery); with Redis, a cache.
    history: RefCell<History>,
    /// With Redis: what each command sent on a subscriber connection (`Broker::ordered`) and
    /// not answered yet was for, in order, by link.
    ordered: RefCell<Map<usize, VecDeque<Ordered>>>,
    /// With Redis: recoveries waiting for a read of their room's history, by room (one read
    /// for all that come while it runs).
    recovering: RefCell<Map<RoomKey, Vec<Recovery>>>,
    /// This core's requests waiting for another core: verdicts, publish offsets, history reads.
    pending: Pending,
    offsets: Pending<Vec<u64>>,
    reads: Pending<Read>,
    next_id: Cell<u64>,
    buckets: RefCell<Map<IpAddr, TokenBucket>>,
    /// API requests with a bad key, per client IP, on this core.
    bad_keys: RefCell<Map<IpAddr, TokenBucket>>,
    /// Set when the server is stopping.
    pub stopping: Rc<Latch>,
    /// Every read of this core lands here first; connections keep only incomplete frames.
    pub scratch: RefCell<Box<[u8]>>,
}

impl Shard {
    pub fn new(
        mesh: Rc<Mesh>,
        config: Arc<Config>,
        verifier: Arc<crate::auth::Verifier>,
        registry: Registry,
        broker: Option<Rc<Broker>>,
        instance: Arc<str>,
    ) -> Shard {
        let delay = config.server.write_delay_ms;
        let flush = (delay > 0).then(|| Rc::new(Flush::new(delay)));
        let conns = Rc::new(Connections::new(flush.clone()));
        let grace = Duration::from_millis(config.presence.offline_grace_ms);
        let watch = config.presence.mode == crate::config::PresenceMode::Watch;
        let users = Users::new(mesh.clone(), conns.clone(), registry.clone(), grace, watch);
        let stopping = Rc::new(Latch::default());
        let cluster = broker.as_ref().map(|broker| {
            Cluster::new(
                broker.clone(),
                mesh.clone(),
                users.clone(),
                registry.clone(),
                instance.clone(),
                &config,
                stopping.clone(),
            )
        });
        let id = mesh.id();
        let sweep = Sweep::new(&config.heartbeat);
        let history = RefCell::new(History::new(
            config.history.size,
            Duration::from_millis(config.history.ttl_ms),
            broker.is_none(),
        ));
        Shard {
            id,
            count: mesh.cores(),
            config,
            verifier,
            registry,
            mesh,
            broker,
            rooms: RefCell::new(Rooms::new(flush.clone())),
            flush,
            conns,
            sweep,
            users,
            cluster,
            sessions: Default::default(),
            sessions_channel: crate::session::relay::channel(&instance, id),
            instance,
            typing: RefCell::default(),
            history,
            ordered: RefCell::default(),
            recovering: RefCell::default(),
            pending: Pending::default(),
            offsets: Pending::default(),
            reads: Pending::default(),
            next_id: Cell::new(0),
            buckets: RefCell::default(),
            bad_keys: RefCell::default(),
            stopping,
            scratch: RefCell::new(vec![0; 64 * 1024].into_boxed_slice()),
        }
    }

    pub fn stats(&self) -> &CoreStats {
        &self.registry[self.id]
    }

    /// A server-unique id: the core in the top bits ([`core_of`]), a counter below.
    pub fn next_id(&self) -> u64 {
        let n = self.next_id.get() + 1;
        self.next_id.set(n);
        (self.id as u64) << CORE_SHIFT | n
    }

    // ---- connections -------------------------------------------------------------------

    /// Adds a client (connection or session) to this core's indexes and counts it for its
    /// user's presence.
    pub async fn register(self: &Rc<Self>, conn: Rc<ConnHandle>) {
        let user = (conn.tenant.clone(), conn.user.clone());
        self.sweep.schedule(&conn, self.stats());
        self.conns.insert(conn);
        self.route_connection(user, true).await;
    }

    /// Removes a client from this core's indexes; its user may go offline after the grace.
    pub async fn unregister(self: &Rc<Self>, conn: &ConnHandle) {
        if !self.conns.remove(conn) {
            return;
        }
        self.route_connection((conn.tenant.clone(), conn.user.clone()), false)
            .await;
    }

    /// Tells `user`'s owner that one of its connections opened or closed.
    async fn route_connection(self: &Rc<Self>, user: presence::UserKey, up: bool) {
        let owner = self.users.owner(&user);
        self.mesh.room(owner).await;
        self.route(owner, Message::Connection { user, up });
    }

    // ---- subscriptions (connection side) ---------------------------------------------

    /// `room`, or the equal key this core already holds for it (subscribers share one).
    pub fn room_key_of(&self, room: RoomKey) -> RoomKey {
        self.rooms.borrow().shared_key(room)
    }

    /// Adds `conn` to `room` and resolves once an event published from now on reaches it, or
    /// with `None` after `broker.subscribe_timeout_ms`. With Redis, waits first for the broker,
    /// so that joining a room that was live before an outage is not acked while Redis is away.
    /// With history and `since`, `conn` is first queued what it missed after `since` when all
    /// of it is kept (then `recovered`), nothing otherwise.
    ///
    /// Cancellation: dropped at any await, it leaves `conn` in the room at most, which the
    /// caller's `unsubscribe` undoes (the last one out withdraws the request and the interest).
    pub async fn subscribe(
        self: &Rc<Self>,
        room: &RoomKey,
        conn: &Rc<ConnHandle>,
        since: Option<Position>,
    ) -> Option<Subscription> {
        let ready = self.cluster.as_ref().map(|c| c.ready());
        let timeout = Duration::from_millis(self.config.broker.subscribe_timeout_ms);
        if let Some(ready) = ready.filter(|r| r.get().is_none()) {
            if ready.wait_at_most(timeout).await == Verdict::Unavailable {
                return None;
            }
        }
        let owner = self.owner_of(room);
        self.mesh.room(owner).await;
        let req = self.next_id();
        let since = since.filter(|_| self.history.borrow().enabled());
        let recovery = since.map(|_| self.next_id());
        let joined = self.rooms.borrow_mut().join(room, conn, req, recovery);
        let live = match joined {
            Joined::Member(live) => live,
            Joined::First(live) => {
                self.pending.insert(req, live.clone());
                let (room, from) = (room.clone(), self.id);
                self.route(owner, Message::Subscribe { room, from, req });
                live
            }
        };
        let recovered = match (since, recovery) {
            (Some(since), Some(req)) => {
                let (room, from) = (room.clone(), self.id);
                let post = |req| {
                    self.route(
                        owner,
                        Message::Recover {
                            room,
                            since,
                            from,
                            req,
                        },
                    )
                };
                let read = self.reads.request(req, timeout, post).await?;
                read.events.is_ok()
            }
            _ => {
                if live.wait_at_most(timeout).await != Verdict::Granted {
                    return None;
                }
                false
            }
        };
        Some(Subscription {
            at: self.rooms.borrow().position(room),
            recovered,
        })
    }

    pub fn history_enabled(&self) -> bool {
        self.history.borrow().enabled()
    }

    /// With history: `room`'s stream position as this core's subscribers have seen it.
    pub fn position_here(&self, room: &RoomKey) -> Option<Position> {
        self.rooms.borrow().position(room)
    }

    /// Removes `conn` from `room`; the last one out tells the owner.
    pub async fn unsubscribe(self: &Rc<Self>, room: &RoomKey, conn_id: u64) {
        let owner = self.owner_of(room);
        self.mesh.room(owner).await;
        let Some(req) = self.rooms.borrow_mut().leave(room, conn_id) else {
            return;
        };
        // A reply still on its way finds nothing to wake.
        self.pending.forget(req);
        let from = self.id;
        self.route(
            owner,
            Message::Unsubscribe {
                room: room.clone(),
                from,
            },
        );
    }

    // ---- events ------------------------------------------------------------------------

    /// Routes published events to every subscriber, on every core (and, with Redis, on every
    /// instance); with history, their offsets in request order. With Redis all of them are
    /// published atomically, or none.
    pub async fn publish(self: &Rc<Self>, events: Vec<Routed>) -> Result<Vec<u64>, BrokerError> {
        let history = self.history.borrow().enabled();
        if let Some(broker) = &self.broker {
            return self.publish_at_redis(broker, events, history).await;
        }
        // One message per owner, in the order of their first event (order is per room).
        let mut owners: Vec<(usize, Vec<Routed>, Vec<usize>)> = Vec::new();
        for (index, event) in events.into_iter().enumerate() {
            let owner = self.owner_of(&event.room);
            match owners.iter_mut().find(|(o, ..)| *o == owner) {
                Some((_, events, indexes)) => {
                    events.push(event);
                    indexes.push(index);
                }
                None => owners.push((owner, vec![event], vec![index])),
            }
        }
        let mut offsets = vec![0; owners.iter().map(|(_, _, i)| i.len()).sum()];
        let limit = Duration::from_millis(self.config.server.request_timeout_ms);
        // Answered only once every owner has fanned its events out: a publish that is
        // answered before the next one is sent is delivered before it, whatever core each
        // request reached.
        for (owner, events, indexes) in owners {
            self.mesh.room(owner).await;
            let from = self.id;
            let post = |req| self.route(owner, Message::Publish { events, from, req });
            let Some(given) = self.offsets.request(self.next_id(), limit, post).await else {
                warn!(core = owner, "a core did not confirm a publish in time");
                return Err(BrokerError::Stalled);
            };
            if history {
                for (index, offset) in indexes.into_iter().zip(given) {
                    offsets[index] = offset;
                }
            }
        }
        if !history {
            offsets.clear();
        }
        Ok(offsets)
    }

    /// Publishes through Redis: with history through the script that gives offsets, else
    /// with PUBLISH; one command or transaction per [`Broker::group`] (with one Redis, one for
    /// all: all or nothing; with a cluster, one per slot, in order per conversation).
    async fn publish_at_redis(
        &self,
        broker: &Broker,
        events: Vec<Routed>,
        history: bool,
    ) -> Result<Vec<u64>, BrokerError> {
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for (index, event) in events.iter().enumerate() {
            let group = broker.group(&event.room);
            match groups.iter_mut().find(|(g, _)| *g == group) {
                Some((_, indexes)) => indexes.push(index),
                None => groups.push((group, vec![index])),
            }
        }
        let mut offsets = vec![0; if history { events.len() } else { 0 }];
        let sent = groups.iter().map(|(_, indexes)| {
            let key = broker.channel(&events[indexes[0]].room);
            let batch = indexes
                .iter()
                .map(|&i| (&*events[i].room, &events[i].payload[..]));
            async move {
                if !history {
                    let publishes: Vec<redis::Cmd> = batch
                        .map(|(room, payload)| broker.publish(room, payload))
                        .collect();
                    // One alone needs no transaction, and follows a slot that moved.
                    if let [publish] = publishes.as_slice() {
                        let packed = publish.get_packed_command();
                        return broker.command(&key, packed).await.map(|_| Vec::new());
                    }
                    return broker
                        .transaction(&key, &publishes)
                        .await
                        .map(|_| Vec::new());
                }
                let h = &self.config.history;
                let packed =
                    |by_hash| broker.publish_with_history(batch.clone(), h.size, h.ttl_ms, by_hash);
                let reply = match broker.command(&key, packed(true)).await {
                    // Nothing ran: once with the text, which Redis then keeps for the hash.
                    Err(BrokerError::NoScript) => broker.command(&key, packed(false)).await,
                    reply => reply,
                };
                match reply? {
                    redis::Value::Array(given) => given
                        .iter()
                        .map(|o| match o {
                            redis::Value::Int(n) => u64::try_from(*n).ok(),
                            _ => None,
                        })
                        .collect::<Option<Vec<u64>>>(),
                    _ => None,
                }
                .ok_or_else(|| BrokerError::Server("the publish script's answer".into()))
            }
        });
        for ((_, indexes), given) in groups.iter().zip(join_all(sent).await) {
            for (&index, offset) in indexes.iter().zip(given?) {
                offsets[index] = offset;
            }
        }
        Ok(offsets)
    }

    /// On the owner: frames each event once (with its offset, when history is on) and fans it
    /// out; the offsets given.
    fn publish_owned(&self, events: Vec<Routed>) -> Vec<u64> {
        let now = Instant::now();
        let mut offsets = Vec::new();
        for Routed { room, payload } in events {
            let out = if self.history.borrow().enabled() {
                let (frame, at) = self.history.borrow_mut().append(&room, &payload, now);
                offsets.push(at.offset);
                Fanned::event(frame, Some(at))
            } else {
                Fanned::event(crate::ws::text(&payload), None)
            };
            self.fan_out(&room, out);
        }
        offsets
    }

    /// The history of `room` after `since`, from its owner or with Redis from there; `None`
    /// when history is off, or its owner or Redis did not answer in time.
    pub async fn read_history(self: &Rc<Self>, room: RoomKey, since: Position) -> Option<Read> {
        if !self.history.borrow().enabled() {
            return None;
        }
        if let Some(broker) = &self.broker {
            let packed = broker.read_history(&room, true, self.config.history.ttl_ms);
            let reply = broker.command(&broker.channel(&room), packed).await.ok()?;
            let (at, frames) = crate::broker::read_reply(&reply)?;
            return Some(crate::history::read_kept(at, frames.iter(), since));
        }
        let owner = self.owner_of(&room);
        self.mesh.room(owner).await;
        let limit = Duration::from_millis(self.config.server.request_timeout_ms);
        let from = self.id;
        let post = |req| {
            self.route(
                owner,
                Message::ReadHistory {
                    room,
                    since,
                    from,
                    req,
                },
            )
        };
        self.reads.request(self.next_id(), limit, post).await
    }

    /// On the owner, with history: where `room`'s stream is now.
    fn position(&self, room: &RoomKey) -> Option<Position> {
        let mut history = self.history.borrow_mut();
        match history.enabled() {
            true => history.position(room, Instant::now()),
            false => None,
        }
    }

    /// On the owner, once `room` is live: answers a recovery from this core's stream, or with
    /// Redis from a read of the history behind it when the cache lacks what it needs.
    fn recover(self: &Rc<Self>, room: RoomKey, recovery: Recovery) {
        let read = self
            .history
            .borrow_mut()
            .read(&room, recovery.since, Instant::now());
        if let Some(read) = read {
            return self.recovered(&room, recovery, read);
        }
        let mut recovering = self.recovering.borrow_mut();
        let waiting = recovering.entry(room.clone()).or_default();
        waiting.push(recovery);
        if waiting.len() > 1 {
            return;
        }
        drop(recovering);
        if self.read_ordered(Ordered::Recovery(room.clone())) {
            self.stats().history_reads_total.inc();
        } else {
            // The link is down: the subscribers' waits end in `unavailable`.
            self.recovering.borrow_mut().remove(&room);
        }
    }

    /// Reads a room's history (with its events for a recovery) on the subscriber connection
    /// that delivers its events, in order with them. False when that link is down.
    fn read_ordered(&self, what: Ordered) -> bool {
        let Some(broker) = &self.broker else {
            return false;
        };
        let (Ordered::Position(room) | Ordered::Recovery(room)) = &what;
        let events = matches!(what, Ordered::Recovery(_));
        let packed = broker.read_history(room, events, self.config.history.ttl_ms);
        let Some(link) = broker.ordered(&broker.channel(room), &packed) else {
            return false;
        };
        let mut ordered = self.ordered.borrow_mut();
        ordered.entry(link).or_default().push_back(what);
        true
    }

    /// Sends a recovery's answer to its core, counted.
    fn recovered(self: &Rc<Self>, room: &RoomKey, recovery: Recovery, read: Read) {
        let stats = self.stats();
        match &read.events {
            Ok(events) => {
                stats.recoveries_total_recovered.inc();
                stats.events_replayed_total.add(events.len() as u64);
            }
            Err(Miss::Epoch) => stats.recoveries_total_epoch.inc(),
            Err(Miss::Ahead) => stats.recoveries_total_ahead.inc(),
            Err(Miss::Trimmed) => stats.recoveries_total_trimmed.inc(),
        }
        let (room, req, read) = (room.clone(), recovery.req, Box::new(read));
        self.route(recovery.from, Message::Recovered { room, req, read });
    }

    /// Releases the history of conversations idle for `history.ttl_ms`.
    pub fn prune_history(&self) {
        let rooms = self.rooms.borrow();
        self.history
            .borrow_mut()
            .sweep(Instant::now(), |room| rooms.interested_cores(room) != 0);
    }

    /// Forwards `user`'s typing in `room` to the room's subscribers (but not to the user's
    /// own connections), at most once per `presence.typing_throttle_ms`.
    pub async fn typing(self: &Rc<Self>, room: RoomKey, user: Arc<str>) {
        let owner = self.owner_of(&room);
        self.mesh.room(owner).await;
        self.route(owner, Message::Typing { room, user });
    }

    fn typing_at_owner(&self, room: &RoomKey, user: Arc<str>) {
        let period = Duration::from_millis(self.config.presence.typing_throttle_ms);
        if !self
            .typing
            .borrow_mut()
            .allow(room, &user, Instant::now(), period)
        {
            return;
        }
        let conversation = room.split_once(":c:").map_or("", |(_, c)| c);
        let payload = server_event::typing(&user, conversation);
        if let Some(broker) = self.broker.as_ref().filter(|b| b.is_up()) {
            let publish = broker
                .publish(room, payload.as_bytes())
                .get_packed_command();
            let (broker, key) = (broker.clone(), broker.channel(room));
            glommio::spawn_local(async move { broker.command(&key, publish).await }).detach();
            return;
        }
        // Without Redis (or while it is down) typing still reaches this instance's connections.
        let frame = crate::ws::text(payload.as_bytes());
        self.fan_out(
            room,
            Fanned {
                frame,
                kind: Kind::Ephemeral,
                except: Some(user),
                at: None,
            },
        );
    }

    pub fn prune_typing(&self) {
        let period = Duration::from_millis(self.config.presence.typing_throttle_ms);
        self.typing.borrow_mut().prune(Instant::now(), period);
    }

    /// On the owner: one message per interested core, never one per connection.
    fn fan_out(&self, room: &RoomKey, out: Fanned) {
        let mut cores = self.rooms.borrow().interested_cores(room);
        while cores != 0 {
            let core = cores.trailing_zeros() as usize;
            cores &= cores - 1;
            if core == self.id {
                self.rooms.borrow_mut().deliver(room, &out, self.stats());
            } else if !self.mesh.deliver(core, room, &out) {
                self.stats().mesh_overflow_total.inc();
            }
        }
    }

    // ---- connection-attempt rate limit ------------------------------------------------

    /// Takes a token from `ip`'s bucket, on the core that owns it. `Unavailable` when that
    /// core does not answer within `server.request_timeout_ms`.
    pub async fn admit(self: &Rc<Self>, ip: IpAddr) -> Verdict {
        let owner = shard_for(&ip_key(&ip), self.count);
        let from = self.id;
        self.request(owner, |req| Message::Admit { ip, from, req })
            .await
    }

    /// Sends `msg(req)` to `core` and waits for its `Reply { req }`, at most
    /// `server.request_timeout_ms`.
    async fn request(self: &Rc<Self>, core: usize, msg: impl FnOnce(u64) -> Message) -> Verdict {
        self.mesh.room(core).await;
        let limit = Duration::from_millis(self.config.server.request_timeout_ms);
        let post = |req| self.route(core, msg(req));
        let answer = self.pending.request(self.next_id(), limit, post).await;
        answer.unwrap_or(Verdict::Unavailable)
    }

    fn take_token(&self, ip: IpAddr) -> Verdict {
        let l = &self.config.limits;
        let now = Instant::now();
        let mut buckets = self.buckets.borrow_mut();
        let bucket = buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(l.connect_burst_per_ip, now));
        match bucket.take(l.connect_rate_per_ip, l.connect_burst_per_ip, now) {
            Ok(()) => Verdict::Granted,
            Err(ms) => Verdict::RetryAfterMs(ms),
        }
    }

    /// An API request from `ip` with a good (`valid`) or bad key: `Err(retry ms)` while `ip`
    /// is over its limit of bad keys (`limits.connect_rate_per_ip`, per core), whatever key
    /// it sends, so that keys cannot be guessed at line rate. A bad key takes a token.
    pub fn api_key_attempt(&self, ip: IpAddr, valid: bool) -> Result<(), u64> {
        let l = &self.config.limits;
        let (rate, burst, now) = (
            l.connect_rate_per_ip,
            l.connect_burst_per_ip,
            Instant::now(),
        );
        let mut bad_keys = self.bad_keys.borrow_mut();
        match (valid, bad_keys.get_mut(&ip)) {
            (true, None) => Ok(()),
            (true, Some(bucket)) => bucket.check(rate, burst, now),
            (false, _) => bad_keys
                .entry(ip)
                .or_insert_with(|| TokenBucket::full(burst, now))
                .take(rate, burst, now),
        }
    }

    /// Forgets buckets that have refilled: memory stays bounded by recent clients.
    pub fn prune_buckets(&self) {
        let l = &self.config.limits;
        let now = Instant::now();
        for buckets in [&self.buckets, &self.bad_keys] {
            buckets
                .borrow_mut()
                .retain(|_, b| !b.is_full(l.connect_rate_per_ip, l.connect_burst_per_ip, now));
        }
    }

    // ---- the mesh ----------------------------------------------------------------------

    fn owner_of(&self, room: &RoomKey) -> usize {
        shard_for(room.as_bytes(), self.count)
    }

    /// Records that `core` has subscribers for `room`; the latch says when events flow (with
    /// Redis, once the SUBSCRIBE of a new room is confirmed).
    fn add_interest(&self, room: &RoomKey, core: usize) -> Rc<Latch> {
        let (live, new) = self.rooms.borrow_mut().add_interest(room, core);
        if new {
            match &self.broker {
                Some(broker) => broker.subscribe(&[room]),
                None => live.set(Verdict::Granted),
            }
        }
        live
    }

    fn remove_interest(&self, room: &RoomKey, core: usize) {
        let gone = self.rooms.borrow_mut().remove_interest(room, core);
        if let Some(broker) = self.broker.as_ref().filter(|_| gone) {
            broker.unsubscribe(&[room]);
        }
    }

    /// Calls `answer` once `live` is set, or with `Unavailable` after
    /// `broker.subscribe_timeout_ms`.
    fn when_live(&self, live: Rc<Latch>, answer: impl FnOnce(Verdict) + 'static) {
        if let Some(v) = live.get() {
            return answer(v);
        }
        let timeout = Duration::from_millis(self.config.broker.subscribe_timeout_ms);
        glommio::spawn_local(async move { answer(live.wait_at_most(timeout).await) }).detach();
    }

    /// Hands `msg` to `core`: handled now when that is this core, else posted behind
    /// everything posted to it before. The one router of every message.
    pub(crate) fn route(self: &Rc<Self>, core: usize, msg: Message) {
        if core == self.id {
            self.handle(msg);
        } else {
            self.mesh.post(core, msg);
        }
    }

    /// Handles one message from another core (or this one, through `route`). Never awaits.
    pub fn handle(self: &Rc<Self>, msg: Message) {
        match msg {
            Message::Subscribe { room, from, req } => {
                let live = self.add_interest(&room, from);
                let me = self.clone();
                self.when_live(live, move |verdict| {
                    let at = me.position(&room);
                    me.route(
                        from,
                        Message::Live {
                            room,
                            req,
                            verdict,
                            at,
                        },
                    );
                });
            }
            Message::Live {
                room,
                req,
                verdict,
                at,
            } => {
                self.rooms.borrow_mut().live_from(&room, req, at);
                self.pending.answer(req, verdict);
            }
            Message::Unsubscribe { room, from } => self.remove_interest(&room, from),
            Message::Recover {
                room,
                since,
                from,
                req,
            } => {
                // Always owned: the interest was announced before, in order. Not live in time:
                // the subscriber's own wait has ended already.
                let Some(live) = self.rooms.borrow().owned_live(&room) else {
                    return;
                };
                let me = self.clone();
                self.when_live(live, move |verdict| {
                    if verdict == Verdict::Granted {
                        me.recover(room, Recovery { since, from, req });
                    }
                });
            }
            Message::Recovered { room, req, read } => {
                if self
                    .rooms
                    .borrow_mut()
                    .recovered(&room, req, &read, self.stats())
                {
                    self.reads.answer(req, *read);
                }
            }
            Message::ReadHistory {
                room,
                since,
                from,
                req,
            } => {
                let read = self.history.borrow_mut().read(&room, since, Instant::now());
                if let Some(read) = read.map(Box::new) {
                    self.route(from, Message::HistoryRead { req, read });
                }
            }
            Message::HistoryRead { req, read } => self.reads.answer(req, *read),
            Message::Publish { events, from, req } => {
                let offsets = self.publish_owned(events);
                self.route(from, Message::Published { req, offsets });
            }
            Message::Published { req, offsets } => self.offsets.answer(req, offsets),
            Message::Deliver { room, out } => {
                self.rooms.borrow_mut().deliver(&room, &out, self.stats())
            }
            Message::Gap { room } => self.rooms.borrow().gap(&room),
            Message::Typing { room, user } => self.typing_at_owner(&room, user),
            Message::Connection { user, up } => {
                if self.users.connection(user.clone(), up) {
                    if let Some(cluster) = &self.cluster {
                        cluster.announce(&user, up);
                    }
                }
            }
            Message::Presence {
                user,
                online,
                frame,
            } => self.users.presence(user, online, frame),
            Message::Remote { user, instance, up } => self.users.remote(user, &instance, up),
            Message::Members { instance, users } => self.users.members(&instance, &users),
            Message::Reannounce => {
                if let Some(cluster) = &self.cluster {
                    cluster.announce_local_users();
                }
            }
            Message::Admit { ip, from, req } => {
                let verdict = self.take_token(ip);
                self.route(from, Message::Reply { req, verdict });
            }
            Message::Reply { req, verdict } => self.pending.answer(req, verdict),
            Message::Handover(request) => {
                glommio::spawn_local(crate::server::serve_handed_over(self.clone(), *request))
                    .detach();
            }
        }
    }
}

/// A subscriber's recovery from `since`, on the room's owner: request `req` of core `from`.
pub(crate) struct Recovery {
    since: Position,
    from: usize,
    req: u64,
}

/// What a command on the subscriber connection was for.
pub(crate) enum Ordered {
    /// The position of a room whose SUBSCRIBE Redis just confirmed: it is live from there.
    Position(RoomKey),
    /// The history of a room, for the recoveries waiting for it.
    Recovery(RoomKey),
}

/// What a subscribe got: with history, the stream's position its ack gives, and whether what
/// the client missed was replayed.
pub struct Subscription {
    pub at: Option<Position>,
    pub recovered: bool,
}

/// Runs `futures` together (each queues its command at its first poll, so that they all go
/// out at once); their outputs, in order.
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}
