//! One core's share of the server: the rooms and users it owns, its local subscriber and
//! tenant indexes, its connections, and its end of the SPSC mesh to every other core.
//!
//! Invariants: a `Shard` lives on one executor and is reached only through `Rc`; other cores
//! talk to it only by [`Message`]s over the mesh wired at start-up. A conversation's owner
//! (`route::shard_for`) keeps the set of cores that have subscribers; an event is framed once
//! and sent once to each such core, which queues the same `Bytes` to each local subscriber.
//! A user's owner counts the user's connections and broadcasts presence changes once per core;
//! each core delivers them to its own connections of the tenant (see `users`).
//!
//! With the Redis broker, an owner SUBSCRIBEs to a room's channel when the first core becomes
//! interested and UNSUBSCRIBEs when the last leaves; subscribes are answered only once Redis
//! confirmed (or `broker.subscribe_timeout_ms` passed: `unavailable`), and events are published
//! through Redis so that every instance, this one included, delivers by the same path.

mod users;

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::channels::channel_mesh::Senders;

use crate::broker::{Broker, BrokerError, Push};
use crate::config::Config;
use crate::handle::{ConnHandle, Kind, Pushed};
use crate::limit::TokenBucket;
use crate::metrics::{CoreStats, Registry};
use crate::presence::{self, UserKey};
use crate::protocol::server_event;
use crate::publish::Routed;
use crate::route::{shard_for, Map, Set};

/// The routing key of a conversation: `<tenantId>:c:<conversationId>` (tenant IDs contain no
/// `:`, so the key is unambiguous). It is also the Redis channel name after the prefix.
pub type RoomKey = Arc<str>;

pub fn room_key(tenant: &str, conversation: &str) -> RoomKey {
    format!("{tenant}:c:{conversation}").into()
}

/// Messages between cores.
pub enum Message {
    /// Core `from` now has subscribers for `room`; answer with `Reply { req }`.
    Subscribe {
        room: RoomKey,
        from: usize,
        req: u64,
    },
    /// Core `from` has no subscribers for `room` any more.
    Unsubscribe {
        room: RoomKey,
        from: usize,
    },
    /// An event for `room`, to its owner.
    Publish {
        room: RoomKey,
        frame: Bytes,
    },
    /// A frame for `room`, from its owner to a core with subscribers.
    Deliver {
        room: RoomKey,
        out: Fanned,
    },
    /// `user` is typing in `room`, to the room's owner (which throttles).
    Typing {
        room: RoomKey,
        user: Arc<str>,
    },
    /// A connection of `user` opened (`up`) or closed, to the user's owner.
    Connection {
        user: UserKey,
        up: bool,
    },
    /// `user` came online or went offline, from its owner to every core.
    Presence {
        user: UserKey,
        online: bool,
        frame: Bytes,
    },
    /// Another instance reports `user` up or down there, to the user's owner.
    Remote {
        user: UserKey,
        instance: Arc<str>,
        up: bool,
    },
    /// `instance` has exactly these users (empty: it is gone), to every core.
    Members {
        instance: Arc<str>,
        users: Arc<[UserKey]>,
    },
    /// A connection attempt from `ip`, to the owner of its rate bucket.
    Admit {
        ip: IpAddr,
        from: usize,
        req: u64,
    },
    Reply {
        req: u64,
        verdict: Verdict,
    },
}

/// A frame on its way to a room's subscribers.
#[derive(Clone)]
pub struct Fanned {
    pub frame: Bytes,
    pub kind: Kind,
    /// Whose own connections skip it (the typist's).
    pub except: Option<Arc<str>>,
}

impl Fanned {
    /// A published event: for everyone, never shed.
    pub fn event(frame: Bytes) -> Fanned {
        Fanned {
            frame,
            kind: Kind::Event,
            except: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    RetryAfterMs(u64),
    /// The broker could not confirm in time.
    Unavailable,
}

/// A one-shot value that any number of local tasks can wait for.
///
/// A waiter that gives up (its future dropped, e.g. by a timeout or `or`) takes its waker
/// back: a long-lived latch such as `Shard::stopping` must not collect one per request.
#[derive(Default)]
pub struct Latch {
    value: Cell<Option<Verdict>>,
    waiters: RefCell<Map<u64, Waker>>,
    next_waiter: Cell<u64>,
}

impl Latch {
    pub fn set(&self, v: Verdict) {
        self.value.set(Some(v));
        for (_, w) in self.waiters.take() {
            w.wake();
        }
    }

    pub fn get(&self) -> Option<Verdict> {
        self.value.get()
    }

    pub fn wait(&self) -> LatchWait<'_> {
        LatchWait {
            latch: self,
            key: None,
        }
    }

    /// The value, or `Unavailable` if it is not set within `timeout`.
    pub async fn wait_at_most(&self, timeout: Duration) -> Verdict {
        let expired = async {
            glommio::timer::sleep(timeout).await;
            Verdict::Unavailable
        };
        futures_lite::future::or(self.wait(), expired).await
    }
}

/// The future of [`Latch::wait`].
pub struct LatchWait<'a> {
    latch: &'a Latch,
    key: Option<u64>,
}

impl Future for LatchWait<'_> {
    type Output = Verdict;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Verdict> {
        if let Some(v) = self.latch.value.get() {
            return Poll::Ready(v);
        }
        let latch = self.latch;
        let key = *self.key.get_or_insert_with(|| {
            let k = latch.next_waiter.get();
            latch.next_waiter.set(k + 1);
            k
        });
        latch.waiters.borrow_mut().insert(key, cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for LatchWait<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.latch.waiters.borrow_mut().remove(&key);
        }
    }
}

/// A room this core owns.
struct OwnedRoom {
    /// Bitmask of the cores with subscribers.
    cores: u64,
    /// Set once the room's events reach this core (Redis confirmed the SUBSCRIBE).
    live: Rc<Latch>,
}

/// This core's subscribers of one room.
struct LocalRoom {
    conns: Vec<Rc<ConnHandle>>,
    /// Set once the owner has registered this core's interest.
    live: Rc<Latch>,
}

/// Connections by id: a set of handles looked up by their `id` (8 bytes an entry, where a map
/// from id to handle takes 16).
type Conns = Set<ById>;

/// The key `map` holds equal to `key`: a shared copy, where building one would allocate.
fn held_key<V>(map: &Map<Arc<str>, V>, key: &str) -> Option<Arc<str>> {
    map.get_key_value(key).map(|(held, _)| held.clone())
}

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
    mesh: Senders<Message>,
    /// The Redis bridge, with `broker.kind = "redis"`.
    pub broker: Option<Rc<Broker>>,
    /// This instance's id among the instances sharing a Redis.
    pub instance: Arc<str>,
    owned: RefCell<Map<RoomKey, OwnedRoom>>,
    /// On core 0 with Redis: the presence channel's subscription is confirmed.
    presence_live: Cell<bool>,
    /// With Redis: set while this core's broker is ready (see `set_broker_ready`).
    broker_ready: RefCell<Rc<Latch>>,
    local: RefCell<Map<RoomKey, LocalRoom>>,
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
    /// Set when the server is stopping.
    pub stopping: Latch,
    /// Every read of this core lands here first; connections keep only incomplete frames.
    pub scratch: RefCell<Box<[u8]>>,
}

impl Shard {
    pub fn new(
        mesh: Senders<Message>,
        config: Arc<Config>,
        verifier: Arc<crate::auth::Verifier>,
        registry: Registry,
        broker: Option<Rc<Broker>>,
        instance: Arc<str>,
    ) -> Shard {
        Shard {
            id: mesh.peer_id(),
            count: mesh.nr_consumers(),
            config,
            verifier,
            registry,
            mesh,
            broker,
            instance,
            owned: RefCell::default(),
            presence_live: Cell::new(false),
            broker_ready: RefCell::default(),
            local: RefCell::default(),
            tenants: RefCell::default(),
            users: RefCell::default(),
            online: RefCell::default(),
            typing: RefCell::default(),
            pending: RefCell::default(),
            next_id: Cell::new(0),
            buckets: RefCell::default(),
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
        held_key(&self.local.borrow(), &room).unwrap_or(room)
    }

    /// Adds `conn` to `room` and resolves once an event published from now on reaches it.
    /// With Redis, waits first for the broker (at most `broker.subscribe_timeout_ms`), so that
    /// joining a room that was live before an outage is not acked while Redis is away.
    pub async fn subscribe(&self, room: &RoomKey, conn: &Rc<ConnHandle>) -> Verdict {
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
        let joined = self.local.borrow_mut().get_mut(room).map(|r| {
            r.conns.push(conn.clone());
            r.live.clone()
        });
        let live = match joined {
            Some(live) => live,
            None => {
                let live = Rc::new(Latch::default());
                let first = LocalRoom {
                    conns: vec![conn.clone()],
                    live: live.clone(),
                };
                self.local.borrow_mut().insert(room.clone(), first);
                self.announce(room, live.clone()).await;
                live
            }
        };
        live.wait().await
    }

    /// Tells the owner that this core has subscribers for `room`.
    async fn announce(&self, room: &RoomKey, live: Rc<Latch>) {
        let owner = self.owner_of(room);
        if owner == self.id {
            let owned = self.add_interest(room, self.id);
            self.when_live(owned, move |v| live.set(v));
            return;
        }
        let req = self.next_id();
        self.pending.borrow_mut().insert(req, live);
        self.send(
            owner,
            Message::Subscribe {
                room: room.clone(),
                from: self.id,
                req,
            },
        )
        .await;
    }

    /// Removes `conn` from `room`; the last one out tells the owner.
    pub async fn unsubscribe(&self, room: &RoomKey, conn_id: u64) {
        {
            let mut local = self.local.borrow_mut();
            let Some(r) = local.get_mut(room) else { return };
            if let Some(at) = r.conns.iter().position(|c| c.id == conn_id) {
                r.conns.swap_remove(at);
            }
            if !r.conns.is_empty() {
                return;
            }
            local.remove(room);
        }
        let owner = self.owner_of(room);
        if owner == self.id {
            self.remove_interest(room, self.id);
        } else {
            self.send(
                owner,
                Message::Unsubscribe {
                    room: room.clone(),
                    from: self.id,
                },
            )
            .await;
        }
    }

    // ---- events ------------------------------------------------------------------------

    /// Routes published events to every subscriber, on every core (and, with Redis, on every
    /// instance). With Redis all of them are published atomically, or none.
    pub async fn publish(&self, events: Vec<Routed>) -> Result<(), BrokerError> {
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
            return broker.transaction(&publishes).await;
        }
        for Routed { room, frame } in events {
            let owner = self.owner_of(&room);
            if owner == self.id {
                self.fan_out(&room, Fanned::event(frame));
            } else {
                self.send(owner, Message::Publish { room, frame }).await;
            }
        }
        Ok(())
    }

    /// Forwards `user`'s typing in `room` to the room's subscribers (but not to the user's
    /// own connections), at most once per `presence.typing_throttle_ms`.
    pub async fn typing(&self, room: RoomKey, user: Arc<str>) {
        let owner = self.owner_of(&room);
        if owner == self.id {
            self.typing_at_owner(&room, user);
        } else {
            self.send(owner, Message::Typing { room, user }).await;
        }
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
        let Some(mask) = self.owned.borrow().get(room).map(|r| r.cores) else {
            return;
        };
        let mut cores = mask;
        while cores != 0 {
            let core = cores.trailing_zeros() as usize;
            cores &= cores - 1;
            if core == self.id {
                self.deliver(room, &out);
            } else if self
                .mesh
                .try_send_to(
                    core,
                    Message::Deliver {
                        room: room.clone(),
                        out: out.clone(),
                    },
                )
                .is_err()
            {
                self.stats().mesh_overflow_total.inc();
            }
        }
    }

    /// Queues a frame to this core's subscribers of `room`.
    fn deliver(&self, room: &RoomKey, out: &Fanned) {
        let local = self.local.borrow();
        let Some(r) = local.get(room) else { return };
        self.push_all(r.conns.iter().map(|c| &**c), out);
    }

    /// Queues `out` to each of `conns` but the excepted user's; counts what happened.
    fn push_all<'a>(&self, conns: impl Iterator<Item = &'a ConnHandle>, out: &Fanned) {
        let mut delivered = 0;
        for conn in conns {
            if out.except.as_ref().is_some_and(|u| *u == conn.user) {
                continue;
            }
            match conn.push_kind(out.frame.clone(), out.kind) {
                Pushed::Queued => delivered += 1,
                Pushed::Overflowed => self.stats().slow_consumer_closes_total.inc(),
                Pushed::Dropped => {}
            }
        }
        self.stats().frames_delivered_total.add(delivered);
    }

    // ---- connection-attempt rate limit ------------------------------------------------

    /// Takes a token from `ip`'s bucket, on the core that owns it.
    pub async fn admit(&self, ip: IpAddr) -> Verdict {
        let owner = shard_for(&ip_bytes(&ip), self.count);
        if owner == self.id {
            return self.take_token(ip);
        }
        let req = self.next_id();
        let answer = Rc::new(Latch::default());
        self.pending.borrow_mut().insert(req, answer.clone());
        self.send(
            owner,
            Message::Admit {
                ip,
                from: self.id,
                req,
            },
        )
        .await;
        answer.wait().await
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

    /// Forgets buckets that have refilled: memory stays bounded by recent clients.
    pub fn prune_buckets(&self) {
        let l = &self.config.limits;
        let now = Instant::now();
        self.buckets
            .borrow_mut()
            .retain(|_, b| !b.is_full(l.connect_rate_per_ip, l.connect_burst_per_ip, now));
    }

    // ---- the mesh ----------------------------------------------------------------------

    fn owner_of(&self, room: &RoomKey) -> usize {
        shard_for(room.as_bytes(), self.count)
    }

    /// Records that `core` has subscribers for `room`; the latch says when events flow.
    fn add_interest(&self, room: &RoomKey, core: usize) -> Rc<Latch> {
        let mut owned = self.owned.borrow_mut();
        let entry = owned.entry(room.clone()).or_insert_with(|| {
            let live = Rc::new(Latch::default());
            match &self.broker {
                Some(broker) => broker.subscribe(&[room]),
                None => live.set(Verdict::Granted),
            }
            OwnedRoom { cores: 0, live }
        });
        entry.cores |= 1 << core;
        entry.live.clone()
    }

    fn remove_interest(&self, room: &RoomKey, core: usize) {
        let mut owned = self.owned.borrow_mut();
        if let Some(entry) = owned.get_mut(room) {
            entry.cores &= !(1 << core);
            if entry.cores == 0 {
                owned.remove(room);
                if let Some(broker) = &self.broker {
                    broker.unsubscribe(&[room]);
                }
            }
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

    // ---- Redis ---------------------------------------------------------------------------

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
        let mut channels: Vec<String> = self.owned.borrow().keys().map(|r| r.to_string()).collect();
        if self.id == 0 {
            channels.push(users::PRESENCE_CHANNEL.to_string());
        }
        channels
    }

    /// What the subscriber connection hands over.
    pub fn on_push(self: &Rc<Self>, push: Push<'_>) {
        match push {
            Push::Message { channel, payload } if channel == users::PRESENCE_CHANNEL => {
                self.on_presence_message(payload)
            }
            Push::Message { channel, payload } => {
                // The room's own key: no allocation per event. A room not owned (any more) has
                // no subscribers here.
                let Some(room) = held_key(&self.owned.borrow(), channel) else {
                    return;
                };
                let frame = crate::ws::text(payload);
                let out = match users::typing_payload_user(payload) {
                    Some(user) => Fanned {
                        frame,
                        kind: Kind::Ephemeral,
                        except: Some(user),
                    },
                    None => Fanned::event(frame),
                };
                self.fan_out(&room, out);
            }
            Push::Subscribed { channel } if channel == users::PRESENCE_CHANNEL => {
                self.presence_live.set(true)
            }
            Push::Subscribed { channel } => {
                if let Some(room) = self.owned.borrow().get(channel) {
                    if room.live.get().is_none() {
                        room.live.set(Verdict::Granted);
                    }
                }
            }
            Push::Link(true) => {}
            Push::Link(false) => {
                self.set_broker_ready(false);
                self.presence_live.set(false);
                // New subscribers wait for the resubscription; the ones acked stay.
                for room in self.owned.borrow_mut().values_mut() {
                    room.live = Rc::new(Latch::default());
                }
            }
        }
    }

    /// Sends with backpressure. A closed peer means the server is stopping: nothing to do.
    async fn send(&self, to: usize, msg: Message) {
        let _ = self.mesh.send_to(to, msg).await;
    }

    /// Handles one message from another core. Never awaits: replies go out on their own task,
    /// so two cores' receivers can never wait on each other's full rings.
    pub fn handle(self: &Rc<Self>, msg: Message) {
        match msg {
            Message::Subscribe { room, from, req } => {
                let live = self.add_interest(&room, from);
                let me = self.clone();
                self.when_live(live, move |v| me.reply(from, req, v));
            }
            Message::Unsubscribe { room, from } => self.remove_interest(&room, from),
            Message::Publish { room, frame } => self.fan_out(&room, Fanned::event(frame)),
            Message::Deliver { room, out } => self.deliver(&room, &out),
            Message::Typing { room, user } => self.typing_at_owner(&room, user),
            Message::Connection { user, up } => self.connection_at_owner(user, up),
            Message::Presence {
                user,
                online,
                frame,
            } => self.presence_here(user, online, frame),
            Message::Remote { user, instance, up } => self.remote_at_owner(user, instance, up),
            Message::Members { instance, users } => self.members_here(&instance, &users),
            Message::Admit { ip, from, req } => {
                let verdict = self.take_token(ip);
                self.reply(from, req, verdict);
            }
            Message::Reply { req, verdict } => {
                if let Some(latch) = self.pending.borrow_mut().remove(&req) {
                    latch.set(verdict);
                }
            }
        }
    }

    fn reply(self: &Rc<Self>, to: usize, req: u64, verdict: Verdict) {
        self.send_later(to, Message::Reply { req, verdict });
    }

    /// Sends from a context that must not wait: on a task of its own, in spawn order.
    fn send_later(self: &Rc<Self>, to: usize, msg: Message) {
        let me = self.clone();
        glommio::spawn_local(async move { me.send(to, msg).await }).detach();
    }
}

fn ip_bytes(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    #[test]
    fn a_latch_forgets_waiters_that_gave_up() {
        let latch = Latch::default();
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..100 {
            let mut wait = std::pin::pin!(latch.wait());
            assert!(wait.as_mut().poll(&mut cx).is_pending());
            assert!(
                wait.as_mut().poll(&mut cx).is_pending(),
                "polled twice, registered once"
            );
        }
        assert!(
            latch.waiters.borrow().is_empty(),
            "dropped waits left their wakers behind"
        );
        let mut kept = std::pin::pin!(latch.wait());
        assert!(kept.as_mut().poll(&mut cx).is_pending());
        latch.set(Verdict::Granted);
        assert_eq!(kept.as_mut().poll(&mut cx), Poll::Ready(Verdict::Granted));
    }
}
