//! Heartbeats and token expiry: a ping every `heartbeat.interval_ms`, a `4009` close after
//! `heartbeat.timeout_ms` of silence, `token_expired` and a `4001` close once the token's `exp`
//! passes (for an HTTP fallback session too, whose close then ends its task; its keepalives
//! are its stream's), each within one housekeeping tick of falling due, at a cost that follows
//! the work due rather than the clients held.
//!
//! Two levels. A visit looks at every connection once per visit period (a quarter of the
//! heartbeat's shortest span, 7.5 s with the defaults) and keeps the ones due before the next
//! visit in a heap by deadline; each tick in between pops only what is due. A connection that
//! arrives, or whose token changes, between two visits is scheduled at once.
//!
//! Invariants: lives on one core. Every client (connection or session) due before `horizon`
//! is in the heap. An entry is a reminder, never trusted: a popped client is checked against
//! its own state (it may have closed, been heard from, or had its token refreshed), and may be
//! in the heap twice. The heap is rebuilt at every visit, so a stale entry lives one visit
//! period at most. Deadlines are on the monotonic clock; a jump of the wall clock moves token
//! expiries by at most a visit period.

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;

use super::Connections;
use crate::auth::now_ms;
use crate::config::Heartbeat;
use crate::handle::{clock_ms, ConnHandle, Pushed};
use crate::metrics::CoreStats;
use crate::protocol::{server_event, CloseCode};

/// The shortest tick (for heartbeats of a fraction of a second).
const TICK_MIN: Duration = Duration::from_millis(50);

pub struct Sweep {
    interval_ms: u64,
    timeout_ms: u64,
    tick: Duration,
    visit_every_ms: u64,
    /// The next visit, in [`clock_ms`]: the heap holds every deadline before it.
    horizon: Cell<u64>,
    due: RefCell<BinaryHeap<Due>>,
    ping: Bytes,
}

/// A connection and when it is next due (a min-heap entry).
struct Due {
    at: u64,
    conn: Rc<ConnHandle>,
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

/// Both clocks, read once for a whole visit.
#[derive(Clone, Copy)]
struct Now {
    clock: u64,
    wall: u64,
}

impl Now {
    fn read() -> Now {
        Now {
            clock: clock_ms(),
            wall: now_ms(),
        }
    }
}

impl Sweep {
    pub fn new(heartbeat: &Heartbeat) -> Sweep {
        let (interval_ms, timeout_ms) = (heartbeat.interval_ms, heartbeat.timeout_ms);
        let quarter = Duration::from_millis(interval_ms.min(timeout_ms - interval_ms) / 4);
        let tick = quarter.clamp(TICK_MIN, crate::watchdog::TICK);
        let visit_every_ms = quarter.max(tick).as_millis() as u64;
        Sweep {
            interval_ms,
            timeout_ms,
            tick,
            visit_every_ms,
            // No connection yet: none is due before the first visit.
            horizon: Cell::new(clock_ms() + visit_every_ms),
            due: RefCell::default(),
            ping: crate::ws::frame(crate::ws::OP_PING, b""),
        }
    }

    /// How often [`Sweep::run`] should run: what is due is handled at most this late.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Schedules a connection that is new, or whose token changed, between two visits.
    pub fn schedule(&self, conn: &Rc<ConnHandle>, stats: &CoreStats) {
        self.check_and_keep(conn, Now::read(), stats);
    }

    /// One tick: a visit of every connection when one is due, else what the heap holds that is
    /// due now.
    pub fn run(&self, conns: &Connections, stats: &CoreStats) {
        let now = Now::read();
        if now.clock >= self.horizon.get() {
            self.horizon.set(now.clock + self.visit_every_ms);
            self.due.borrow_mut().clear();
            conns.for_each(|c| self.check_and_keep(c, now, stats));
            return;
        }
        while let Some(Due { conn, .. }) = self.pop_due(now.clock) {
            self.check_and_keep(&conn, now, stats);
        }
    }

    fn pop_due(&self, clock: u64) -> Option<Due> {
        let mut due = self.due.borrow_mut();
        if due.peek()?.at > clock {
            return None;
        }
        due.pop()
    }

    /// Does what `conn` is due for now, and keeps it in the heap if it is next due before the
    /// next visit.
    fn check_and_keep(&self, conn: &Rc<ConnHandle>, now: Now, stats: &CoreStats) {
        if let Some(at) = self.check(conn, now, stats) {
            if at < self.horizon.get() {
                self.due.borrow_mut().push(Due {
                    at,
                    conn: conn.clone(),
                });
            }
        }
    }

    /// Pings, closes or expires `c` if that is due; when it is next due, unless it is closing.
    fn check(&self, c: &ConnHandle, now: Now, stats: &CoreStats) -> Option<u64> {
        if c.close_code().is_some() {
            return None;
        }
        let expires = c.expires_at_ms.get();
        let session = c.is_session();
        if now.wall >= expires {
            let expired = server_event::token_expired(if session {
                "create a session with a fresh one"
            } else {
                "reconnect with a fresh one"
            });
            c.push(crate::ws::text(expired.as_bytes()));
            c.close(CloseCode::TokenExpired);
            return None;
        }
        if session {
            // Due for its token only: its stream's keepalives are its heartbeat, and a session
            // without a reader ends by its TTL, not by silence.
            return Some(now.clock + (expires - now.wall));
        }
        let clock32 = now.clock as u32;
        let silent = u64::from(clock32.wrapping_sub(c.last_seen.get()));
        if silent > self.timeout_ms {
            stats.heartbeat_closes_total.inc();
            c.close(CloseCode::HeartbeatTimeout);
            return None;
        }
        let mut since_ping = u64::from(clock32.wrapping_sub(c.last_ping.get()));
        if since_ping >= self.interval_ms {
            c.last_ping.set(clock32);
            since_ping = 0;
            if c.push(self.ping.clone()) == Pushed::Overflowed {
                stats.slow_consumer_closes_total.inc();
                return None;
            }
        }
        let wait = (expires - now.wall)
            .min(self.timeout_ms + 1 - silent)
            .min(self.interval_ms - since_ping);
        Some(now.clock + wait)
    }
}
