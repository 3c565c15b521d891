//! Rooms on one core: for each conversation this core owns, which cores have subscribers (the
//! owner's side, with the latch that says when its events flow); for each conversation with
//! subscribers here, those subscribers (the local index), those waiting for a replay of what
//! they missed, and the stream position delivered here; and the fan-out of one frame to them.
//!
//! Invariants: pure bookkeeping on one core: no mesh, no broker, no await (`Shard` drives it
//! and sends the messages). A room is in `local` exactly while it has a subscriber here, and in
//! `owned` exactly while some core has announced interest and not withdrawn it. Fan-out queues
//! the same `Bytes` to every subscriber: a refcount bump and a push each.

use std::rc::Rc;

use crate::handle::{ConnHandle, Flush, Kind, Pushed};
use crate::history::{Position, Read};
use crate::mesh::{Fanned, Latch, Verdict};
use crate::metrics::CoreStats;
use crate::protocol::{server_event, ErrorCode};
use crate::route::{held_key, Map, RoomKey};

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
    /// Subscribers waiting for the owner's replay of what they missed (request, client):
    /// deliveries skip them until it arrives, in order with the deliveries, so that they get
    /// every event once.
    recovering: Vec<(u64, Rc<ConnHandle>)>,
    /// Set once the owner has registered this core's interest.
    live: Rc<Latch>,
    /// The request that announced this core's interest to the owner.
    req: u64,
    /// With history: the stream's position as of the last delivery here (or when the room
    /// became live), so that a subscribe's ack tells what its first event follows.
    at: Option<Position>,
}

/// What joining a room found.
pub enum Joined {
    /// The room had subscribers here: wait for its latch.
    Member(Rc<Latch>),
    /// The first subscriber here: the owner must hear of it (request `req`), then the latch.
    First(Rc<Latch>),
}

pub struct Rooms {
    owned: Map<RoomKey, OwnedRoom>,
    local: Map<RoomKey, LocalRoom>,
    /// With `server.write_delay_ms`: deliveries are paced.
    flush: Option<Rc<Flush>>,
}

impl Rooms {
    pub fn new(flush: Option<Rc<Flush>>) -> Rooms {
        Rooms {
            owned: Map::default(),
            local: Map::default(),
            flush,
        }
    }

    // ---- this core's subscribers --------------------------------------------------------

    /// `room`, or the equal key this core already holds for it (subscribers share one).
    pub fn shared_key(&self, room: RoomKey) -> RoomKey {
        held_key(&self.local, &room).unwrap_or(room)
    }

    /// Adds `conn` to this core's subscribers of `room`; `req` names the announcement to the
    /// owner if it is the first. With `recovery` (its request), `conn` gets no delivery until
    /// [`Rooms::recovered`].
    pub fn join(
        &mut self,
        room: &RoomKey,
        conn: &Rc<ConnHandle>,
        req: u64,
        recovery: Option<u64>,
    ) -> Joined {
        let (joined, r) = match self.local.get_mut(room) {
            Some(r) => (Joined::Member(r.live.clone()), r),
            None => {
                let live = Rc::new(Latch::default());
                let first = LocalRoom {
                    conns: Vec::new(),
                    recovering: Vec::new(),
                    live: live.clone(),
                    req,
                    at: None,
                };
                let r = self.local.entry(room.clone()).or_insert(first);
                (Joined::First(live), r)
            }
        };
        match recovery {
            Some(recovery) => r.recovering.push((recovery, conn.clone())),
            None => r.conns.push(conn.clone()),
        }
        joined
    }

    /// Removes a connection from `room`; the announcement's `req` when it was the last here.
    pub fn leave(&mut self, room: &RoomKey, conn_id: u64) -> Option<u64> {
        let r = self.local.get_mut(room)?;
        if let Some(at) = r.conns.iter().position(|c| c.id == conn_id) {
            r.conns.swap_remove(at);
        }
        r.recovering.retain(|(_, c)| c.id != conn_id);
        if !r.conns.is_empty() || !r.recovering.is_empty() {
            return None;
        }
        self.local.remove(room).map(|r| r.req)
    }

    /// The owner's answer to announcement `req`: the room is live here from position `at`.
    pub fn live_from(&mut self, room: &RoomKey, req: u64, at: Option<Position>) {
        if let Some(r) = self.local.get_mut(room).filter(|r| r.req == req) {
            r.at = at.or(r.at);
        }
    }

    /// The owner's answer to recovery `req`: its subscriber is queued the missed frames (when
    /// they could all be read) and joins the deliveries from here on. False when that
    /// subscriber is gone.
    pub fn recovered(&mut self, room: &RoomKey, req: u64, read: &Read, stats: &CoreStats) -> bool {
        let Some(r) = self.local.get_mut(room) else {
            return false;
        };
        let Some(at) = r.recovering.iter().position(|(q, _)| *q == req) else {
            return false;
        };
        let (_, conn) = r.recovering.swap_remove(at);
        if let Ok(frames) = &read.events {
            for frame in frames {
                let replay = Fanned::event(frame.clone(), None);
                push_all(std::iter::once(&*conn), &replay, stats, None);
            }
        }
        r.conns.push(conn);
        r.at = Some(read.at);
        true
    }

    /// With history: where `room`'s stream is, as far as this core has seen.
    pub fn position(&self, room: &RoomKey) -> Option<Position> {
        self.local.get(room).and_then(|r| r.at)
    }

    /// Queues `out` to this core's subscribers of `room`.
    pub fn deliver(&mut self, room: &RoomKey, out: &Fanned, stats: &CoreStats) {
        if let Some(r) = self.local.get_mut(room) {
            r.at = out.at.or(r.at);
            let flush = self.flush.as_deref();
            push_all(r.conns.iter().map(|c| &**c), out, stats, flush);
        }
    }

    /// Tells this core's subscribers of `room` that events of it were dropped on their way
    /// here: `error{code:"overloaded"}`, at most once a second per connection.
    pub fn gap(&self, room: &RoomKey) {
        let Some(r) = self.local.get(room) else {
            return;
        };
        let now = crate::handle::clock_ms32();
        let conversation = room.split_once(":c:").map_or("", |(_, c)| c);
        let message = format!("events of conversation {conversation} were dropped: reload it");
        let error =
            crate::ws::text(server_event::error(ErrorCode::Overloaded, &message, None).as_bytes());
        for conn in &r.conns {
            if now.wrapping_sub(conn.overload_told.get()) >= crate::handle::OVERLOAD_QUIET_MS {
                conn.overload_told.set(now);
                conn.push(error.clone());
            }
        }
    }

    // ---- rooms this core owns ----------------------------------------------------------

    /// Records that `core` has subscribers for `room`: its latch, and whether the room is new
    /// here (then the caller makes its events flow, and sets the latch once they do).
    pub fn add_interest(&mut self, room: &RoomKey, core: usize) -> (Rc<Latch>, bool) {
        let mut new = false;
        let entry = self.owned.entry(room.clone()).or_insert_with(|| {
            new = true;
            OwnedRoom {
                cores: 0,
                live: Rc::default(),
            }
        });
        entry.cores |= 1 << core;
        (entry.live.clone(), new)
    }

    /// Records that `core` has no subscribers for `room` any more; true when no core has.
    pub fn remove_interest(&mut self, room: &RoomKey, core: usize) -> bool {
        let Some(entry) = self.owned.get_mut(room) else {
            return false;
        };
        entry.cores &= !(1 << core);
        if entry.cores != 0 {
            return false;
        }
        self.owned.remove(room);
        true
    }

    /// The cores with subscribers of `room`, as a bitmask (0 when this core does not own it).
    pub fn interested_cores(&self, room: &RoomKey) -> u64 {
        self.owned.get(room).map_or(0, |r| r.cores)
    }

    /// The owned room named `name`, as the key this core holds (no allocation).
    pub fn owned_key(&self, name: &str) -> Option<RoomKey> {
        held_key(&self.owned, name)
    }

    /// The latch of owned room `room`: set while its events flow.
    pub fn owned_live(&self, room: &RoomKey) -> Option<Rc<Latch>> {
        self.owned.get(room).map(|r| r.live.clone())
    }

    pub fn owned(&self) -> impl Iterator<Item = &RoomKey> {
        self.owned.keys()
    }

    /// The events of owned room `name` flow now (Redis confirmed it).
    pub fn confirmed(&self, name: &str) {
        if let Some(room) = self.owned.get(name).filter(|r| r.live.get().is_none()) {
            room.live.set(Verdict::Granted);
        }
    }

    /// The events of owned room `name` stopped flowing (its channel's slot moved): it waits
    /// for its new subscription like a new room. False when it is not owned here.
    pub fn dropped(&mut self, name: &str) -> bool {
        let Some(room) = self.owned.get_mut(name) else {
            return false;
        };
        if room.live.get().is_some() {
            room.live = Rc::default();
        }
        true
    }

    /// The events of the owned rooms stopped flowing (the Redis subscriber dropped): new
    /// subscribers wait for the resubscription; the ones acked stay. A room not live yet keeps
    /// its latch: its waiters are answered by the resubscription.
    pub fn link_lost(&mut self) {
        for room in self.owned.values_mut() {
            if room.live.get().is_some() {
                room.live = Rc::default();
            }
        }
    }
}

/// Queues `out` to each of `conns` but the excepted user's, their writers woken now or at
/// `flush`; counts what happened. Returns how many were queued a frame.
pub fn push_all<'a>(
    conns: impl Iterator<Item = &'a ConnHandle>,
    out: &Fanned,
    stats: &CoreStats,
    flush: Option<&Flush>,
) -> u64 {
    let mut delivered = 0;
    for conn in conns {
        if out.except.as_ref().is_some_and(|u| *u == conn.user) {
            continue;
        }
        match conn.push_kind(out.frame.clone(), out.kind, flush) {
            Pushed::Queued => delivered += 1,
            Pushed::Shed(n) => {
                stats.frames_shed_total.add(n as u64);
                delivered += u64::from(out.kind == Kind::Event);
            }
            Pushed::Overflowed => stats.slow_consumer_closes_total.inc(),
            Pushed::Dropped => {}
        }
    }
    stats.frames_delivered_total.add(delivered);
    delivered
}
