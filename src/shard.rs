//! One core's share of the server, and the glue between its parts: its connections by tenant,
//! its rooms ([`Rooms`]), the users whose presence it owns (`users`), the connection-attempt
//! and bad-key buckets of the IPs it owns, and its end of the mesh ([`Mesh`]), through which it
//! is the one router of cross-core messages ([`Shard::route`], with the local fast path).
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

mod cluster;
mod from_redis;
mod users;

use std::cell::{Cell, RefCell};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::handle::{ConnHandle, Kind};
use crate::limit::TokenBucket;
use crate::mesh::{Fanned, Latch, Mesh, Message, Verdict};
use crate::metrics::{CoreStats, Registry};
use crate::presence;
use crate::protocol::server_event;
use crate::publish::Routed;
use crate::rooms::{Joined, Rooms};
use crate::route::{held_key, ip_key, shard_for, Map, RoomKey, Set};
use tracing::warn;

/// Connections by id: a set of handles looked up by their `id` (8 bytes an entry, where a map
/// from id to handle takes 16).
type Conns = Set<ById>;

/// A handle that hashes and compares as its id.
struct ById(Rc<ConnHandle>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl std::hash::Hash for ById {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.id.hash(state)
    }
}

impl std::borrow::Borrow<u64> for ById {
    fn borrow(&self) -> &u64 {
        &self.0.id
    }
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
    /// This instance's id among the instances sharing a Redis.
    pub instance: Arc<str>,
    rooms: RefCell<Rooms>,
    /// On core 0 with Redis: the presence channel's subscription is confirmed.
    presence_live: Cell<bool>,
    /// With Redis: set while this core's broker is ready (see `set_broker_ready`).
    broker_ready: RefCell<Rc<Latch>>,
    /// This core's connections, by tenant (for presence delivery) and id.
    tenants: RefCell<Map<Arc<str>, Conns>>,
    /// Users this core owns.
    users: RefCell<presence::Owned>,
    /// Every tenant's online users, as the owners broadcast them.
    online: RefCell<presence::Replica>,
    /// Typing events forwarded, for rooms this core owns.
    typing: RefCell<presence::Throttle>,
    pending: RefCell<Map<u64, Rc<Latch>>>,
    next_id: Cell<u64>,
    buckets: RefCell<Map<IpAddr, TokenBucket>>,
    /// API requests with a bad key, per client IP, on this core.
    bad_keys: RefCell<Map<IpAddr, TokenBucket>>,
    /// Set when the server is stopping.
    pub stopping: Latch,
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
        Shard {
            id: mesh.id(),
            count: mesh.cores(),
            config,
            verifier,
            registry,
            mesh,
            broker,
            instance,
            rooms: RefCell::default(),
            presence_live: Cell::new(false),
            broker_ready: RefCell::default(),
            tenants: RefCell::default(),
            users: RefCell::default(),
            online: RefCell::default(),
            typing: RefCell::default(),
            pending: RefCell::default(),
            next_id: Cell::new(0),
            buckets: RefCell::default(),
            bad_keys: RefCell::default(),
            stopping: Latch::default(),
            scratch: RefCell::new(vec![0; 64 * 1024].into_boxed_slice()),
        }
    }

    pub fn stats(&self) -> &CoreStats {
        &self.registry[self.id]
    }

    /// A server-unique id: the core in the top bits, a counter below.
    pub fn next_id(&self) -> u64 {
        let n = self.next_id.get() + 1;
        self.next_id.set(n);
        (self.id as u64) << 48 | n
    }

    // ---- connections -------------------------------------------------------------------

    /// `tenant`, or the equal key this core already holds for it (its connections share one).
    pub fn tenant_key(&self, tenant: Box<str>) -> Arc<str> {
        held_key(&self.tenants.borrow(), &tenant).unwrap_or_else(|| tenant.into())
    }

    /// Adds a connection to this core's indexes and counts it for its user's presence.
    pub async fn register(self: &Rc<Self>, conn: Rc<ConnHandle>) {
        self.stats().connections_open.inc();
        let user = (conn.tenant.clone(), conn.user.clone());
        self.tenants
            .borrow_mut()
            .entry(conn.tenant.clone())
            .or_default()
            .insert(ById(conn));
        self.route_connection(user, true).await;
    }

    /// Removes a connection from this core's indexes; its user may go offline after the grace.
    pub async fn unregister(self: &Rc<Self>, conn: &ConnHandle) {
        {
            let mut tenants = self.tenants.borrow_mut();
            let Some(conns) = tenants.get_mut(&conn.tenant) else {
                return;
            };
            if !conns.remove(&conn.id) {
                return;
            }
            if conns.is_empty() {
                tenants.remove(&conn.tenant);
            }
        }
        self.stats().connections_open.dec();
        self.route_connection((conn.tenant.clone(), conn.user.clone()), false)
            .await;
    }

    pub fn connection_count(&self) -> usize {
        self.stats().connections_open.get() as usize
    }

    /// Calls `f` on every connection of this core.
    pub fn for_each_connection(&self, mut f: impl FnMut(&ConnHandle)) {
        for c in self
            .tenants
            .borrow()
            .values()
            .flat_map(|conns| conns.iter())
        {
            f(&c.0);
        }
    }

    // ---- subscriptions (connection side) ---------------------------------------------

    /// `room`, or the equal key this core already holds for it (subscribers share one).
    pub fn room_key_of(&self, room: RoomKey) -> RoomKey {
        self.rooms.borrow().shared_key(room)
    }

    /// Adds `conn` to `room` and resolves once an event published from now on reaches it, or
    /// with `Unavailable` after `broker.subscribe_timeout_ms`. With Redis, waits first for the
    /// broker, so that joining a room that was live before an outage is not acked while Redis
    /// is away.
    ///
    /// Cancellation: dropped at any await, it leaves `conn` in the room at most, which the
    /// caller's `unsubscribe` undoes (the last one out withdraws the request and the interest).
    pub async fn subscribe(self: &Rc<Self>, room: &RoomKey, conn: &Rc<ConnHandle>) -> Verdict {
        let ready = self
            .broker
            .as_ref()
            .map(|_| self.broker_ready.borrow().clone());
        let timeout = Duration::from_millis(self.config.broker.subscribe_timeout_ms);
        if let Some(ready) = ready.filter(|r| r.get().is_none()) {
            if ready.wait_at_most(timeout).await == Verdict::Unavailable {
                return Verdict::Unavailable;
            }
        }
        let owner = self.owner_of(room);
        self.mesh.room(owner).await;
        let req = self.next_id();
        let joined = self.rooms.borrow_mut().join(room, conn, req);
        let live = match joined {
            Joined::Member(live) => live,
            Joined::First(live) => {
                self.pending.borrow_mut().insert(req, live.clone());
                let (room, from) = (room.clone(), self.id);
                self.route(owner, Message::Subscribe { room, from, req });
                live
            }
        };
        live.wait_at_most(timeout).await
    }

    /// Removes `conn` from `room`; the last one out tells the owner.
    pub async fn unsubscribe(self: &Rc<Self>, room: &RoomKey, conn_id: u64) {
        let owner = self.owner_of(room);
        self.mesh.room(owner).await;
        let Some(req) = self.rooms.borrow_mut().leave(room, conn_id) else {
            return;
        };
        // A reply still on its way finds nothing to wake.
        self.pending.borrow_mut().remove(&req);
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
    /// instance). With Redis all of them are published atomically, or none.
    pub async fn publish(self: &Rc<Self>, events: Vec<Routed>) -> Result<(), BrokerError> {
        if let Some(broker) = &self.broker {
            let publishes: Vec<redis::Cmd> = events
                .iter()
                .map(|e| {
                    redis::cmd("PUBLISH")
                        .arg(broker.channel(&e.room))
                        .arg(crate::ws::payload_of(&e.frame))
                        .clone()
                })
                .collect();
            return broker.transaction(&publishes).await.map(drop);
        }
        let mut owners = 0u64;
        for Routed { room, frame } in events {
            let owner = self.owner_of(&room);
            owners |= 1 << owner;
            self.mesh.room(owner).await;
            self.route(owner, Message::Publish { room, frame });
        }
        // Answered only once every owner has fanned the events out: a publish that is
        // answered before the next one is sent is delivered before it, whatever core each
        // request reached.
        owners &= !(1 << self.id);
        while owners != 0 {
            let owner = owners.trailing_zeros() as usize;
            owners &= owners - 1;
            let from = self.id;
            if self.request(owner, |req| Message::Sync { from, req }).await != Verdict::Granted {
                warn!(core = owner, "a core did not confirm a publish in time");
            }
        }
        Ok(())
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
            let publish = redis::cmd("PUBLISH")
                .arg(broker.channel(room))
                .arg(&payload)
                .get_packed_command();
            let broker = broker.clone();
            glommio::spawn_local(async move { broker.command(publish).await }).detach();
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
                self.rooms.borrow().deliver(room, &out, self.stats());
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
    /// `server.request_timeout_ms`. Dropped or timed out, it takes its `pending` entry back.
    async fn request(self: &Rc<Self>, core: usize, msg: impl FnOnce(u64) -> Message) -> Verdict {
        self.mesh.room(core).await;
        let (answer, req) = (Rc::new(Latch::default()), self.next_id());
        self.pending.borrow_mut().insert(req, answer.clone());
        let _forget = Forget(self, req);
        self.route(core, msg(req));
        let limit = Duration::from_millis(self.config.server.request_timeout_ms);
        answer.wait_at_most(limit).await
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
                    me.route(from, Message::Reply { req, verdict })
                });
            }
            Message::Unsubscribe { room, from } => self.remove_interest(&room, from),
            Message::Publish { room, frame } => self.fan_out(&room, Fanned::event(frame)),
            Message::Deliver { room, out } => {
                self.rooms.borrow().deliver(&room, &out, self.stats())
            }
            Message::Gap { room } => self.rooms.borrow().gap(&room),
            Message::Typing { room, user } => self.typing_at_owner(&room, user),
            Message::Connection { user, up } => self.connection_at_owner(user, up),
            Message::Presence {
                user,
                online,
                frame,
            } => self.presence_here(user, online, frame),
            Message::Remote { user, instance, up } => self.remote_at_owner(user, instance, up),
            Message::Members { instance, users } => self.members_here(&instance, &users),
            Message::Reannounce => self.announce_local_users(),
            Message::Sync { from, req } => self.route(
                from,
                Message::Reply {
                    req,
                    verdict: Verdict::Granted,
                },
            ),
            Message::Admit { ip, from, req } => {
                let verdict = self.take_token(ip);
                self.route(from, Message::Reply { req, verdict });
            }
            Message::Reply { req, verdict } => {
                if let Some(latch) = self.pending.borrow_mut().remove(&req) {
                    latch.set(verdict);
                }
            }
        }
    }
}

/// Removes a request's `pending` entry when its wait ends, answered or not.
struct Forget<'a>(&'a Shard, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.pending.borrow_mut().remove(&self.1);
    }
}
