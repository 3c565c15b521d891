//! Heartbeats and token expiry: a ping every `heartbeat.interval_ms`, a `4009` close after
//! `heartbeat.timeout_ms` of silence, `token_expired` and a `4001` close once the token's `exp`
//! passes (for an HTTP fallback session too, whose close then ends its task; its keepalives
//! are its stream's), each within one housekeeping tick of falling due, at a cost that follows
//! the work due rather than the clients held.
//!
//! A timing wheel: one slot per tick, spanning a heartbeat interval. Every client has one live
//! reminder, in the slot of the tick it is next due in (or, when that is further off than the
//! span, the span's last tick, where it is looked at again). Each tick runs the slots whose
//! time has come: what is due is done, and each client looked at gets its next reminder. A
//! client that arrives, or whose token changes, is scheduled at once. So the work follows
//! the deadlines: a client costs a look when it is due (at least once an interval, for its
//! ping), spread over the ticks as the deadlines are, and no tick looks at every client.
//!
//! Invariants: lives on one core. A client not closing has exactly one live reminder: the
//! one whose tick is the client's `sweep_due`, at most a span ahead. Any other reminder of it
//! is stale (it was rescheduled since) and is dropped when its slot runs. Reminders are weak:
//! they never keep a closed client's state alive, only its allocation until its slot runs (at
//! most a span). Deadlines are on the monotonic clock, handled within a tick of falling due; a
//! jump of the wall clock moves token expiries by at most a span.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;

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
    tick_ms: u64,
    /// Slot `t % len` holds the reminders of tick `t` (ticks of [`clock_ms`]); one slot more
    /// than the span, so that the slot being run is never one a reminder is added to.
    slots: RefCell<Vec<Vec<Weak<ConnHandle>>>>,
    /// The last tick whose slot ran.
    ran: Cell<u64>,
    ping: Bytes,
}

/// Both clocks, read once for a whole tick.
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
        let tick_ms = tick.as_millis() as u64;
        let span = interval_ms.div_ceil(tick_ms).max(1) as usize;
        Sweep {
            interval_ms,
            timeout_ms,
            tick,
            tick_ms,
            slots: RefCell::new((0..=span).map(|_| Vec::new()).collect()),
            ran: Cell::new(clock_ms() / tick_ms),
            ping: crate::ws::frame(crate::ws::OP_PING, b""),
        }
    }

    /// How often [`Sweep::run`] should run: what is due is handled at most this late.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Schedules a client that is new, or whose token changed.
    pub fn schedule(&self, conn: &Rc<ConnHandle>, stats: &CoreStats) {
        let now = Now::read();
        self.check_and_remind(conn, now, now.clock / self.tick_ms, stats);
    }

    /// One tick: runs the slots of the ticks that have come since the last run (one, unless the
    /// core was late).
    pub fn run(&self, stats: &CoreStats) {
        let now = Now::read();
        let tick = now.clock / self.tick_ms;
        let len = self.slots.borrow().len() as u64;
        // After a stall longer than the wheel, each slot runs once.
        let first = (self.ran.get() + 1).max((tick + 1).saturating_sub(len));
        for t in first..=tick {
            let slot = (t % len) as usize;
            let mut reminders = std::mem::take(&mut self.slots.borrow_mut()[slot]);
            for conn in reminders.iter().filter_map(Weak::upgrade) {
                if conn.sweep_due.get() == t as u32 {
                    self.check_and_remind(&conn, now, tick, stats);
                }
            }
            // Its capacity is kept for the slot's next turn, unless a reminder landed in it
            // meanwhile (only after a stall).
            reminders.clear();
            let mut slots = self.slots.borrow_mut();
            if slots[slot].is_empty() {
                slots[slot] = reminders;
            }
        }
        self.ran.set(tick);
    }

    /// Does what `conn` is due for now and, unless it is closing, puts its reminder in the slot
    /// of the tick it is next due in (at most a span after `tick`, the current one).
    fn check_and_remind(&self, conn: &Rc<ConnHandle>, now: Now, tick: u64, stats: &CoreStats) {
        let Some(at) = self.check(conn, now, stats) else {
            return;
        };
        let mut slots = self.slots.borrow_mut();
        let len = slots.len() as u64;
        let due = at.div_ceil(self.tick_ms).clamp(tick + 1, tick + len - 1);
        conn.sweep_due.set(due as u32);
        slots[(due % len) as usize].push(Rc::downgrade(conn));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn reminders(sweep: &Sweep) -> usize {
        sweep.slots.borrow().iter().map(Vec::len).sum()
    }

    /// Runs the sweep once a tick (as the housekeeping does, on the real clock) until `done`,
    /// for at most two seconds.
    fn run_until(sweep: &Sweep, stats: &CoreStats, what: &str, done: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(2);
        while !done() {
            assert!(
                Instant::now() < end,
                "{what}: {} reminders",
                reminders(sweep)
            );
            std::thread::sleep(sweep.tick());
            sweep.run(stats);
        }
    }

    #[test]
    fn a_client_scheduled_again_and_again_keeps_one_reminder_and_none_once_gone() {
        // A timeout no starved test thread reaches: the client is never closed for silence.
        let sweep = Sweep::new(&Heartbeat {
            interval_ms: 200,
            timeout_ms: 60_000,
        });
        let stats = CoreStats::default();
        let conn = Rc::new(ConnHandle::new(
            1,
            "t".into(),
            "u".into(),
            1 << 20,
            u64::MAX,
        ));
        for _ in 0..5 {
            sweep.schedule(&conn, &stats);
        }
        assert_eq!(reminders(&sweep), 5);
        let created = conn.last_ping.get();
        // All five fall due in the slot of its first ping: four are dropped, one renewed.
        run_until(&sweep, &stats, "the stale reminders dropped", || {
            reminders(&sweep) == 1
        });
        assert_ne!(conn.last_ping.get(), created, "pinged when due");
        drop(conn);
        run_until(&sweep, &stats, "the gone client's reminder dropped", || {
            reminders(&sweep) == 0
        });
    }
}
