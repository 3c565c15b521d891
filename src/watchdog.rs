//! The core watchdog: wakes a core that went to sleep and missed its wake-up.
//!
//! A glommio core sleeps in `io_uring_enter` on its main ring, which polls the latency ring
//! where its timers and cross-core wake-ups complete. On these machines that wake-up is now and
//! then lost (seen in about one start in 3,000 on a loaded 2-core machine, always within the
//! first tens of milliseconds of a process): the core sleeps for ever with its timers due and
//! messages waiting, and every request that needs it times out. Nothing inside the core can
//! notice, so a plain thread watches: every core ticks about every [`TICK`] (its housekeeping
//! sleeps to the next step of a grid that fine, at most 1.5 ticks); a core whose tick has not
//! moved for [`STALE`] while its thread sleeps gets a signal, which makes `io_uring_enter`
//! return `EINTR` (glommio treats it as a wake-up) and the core runs again. The core itself
//! logs and counts the stall at its next tick (`fanfare_core_stalls_total`).
//!
//! Invariants: the watchdog thread never touches a core's state but its seat's `nudged` flag
//! and the signal; a core that is running (not asleep) is never signalled, however late its
//! tick, so a starved core is left to the scheduler.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// The longest a core goes between ticks. Every wake-up of an idle core costs ~0.1 ms of CPU
/// on a VM, so ticks are rare: four a second.
pub const TICK: Duration = Duration::from_millis(250);
/// A tick this old on a sleeping core means a lost wake-up: four ticks missed.
const STALE: Duration = Duration::from_secs(1);
/// How often the watchdog looks.
const WATCH: Duration = TICK;

/// One core, as the watchdog sees it.
#[derive(Default)]
struct Seat {
    /// Its kernel thread id; 0 while the core is not running.
    tid: AtomicI32,
    /// Its `pthread_t`, to signal it.
    thread: AtomicU64,
    ticks: AtomicU64,
    nudged: AtomicBool,
}

pub struct Watchdog {
    seats: Box<[Seat]>,
    /// Raised by [`Watchdog::stop`]; the condition variable ends the watchdog's wait at once.
    stop: (Mutex<bool>, Condvar),
    /// Held while a thread is signalled and while a seat is released: a thread that left
    /// its seat is never signalled.
    signalling: Mutex<()>,
}

impl Watchdog {
    pub fn new(cores: usize) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            seats: (0..cores).map(|_| Seat::default()).collect(),
            stop: (Mutex::new(false), Condvar::new()),
            signalling: Mutex::new(()),
        })
    }

    /// On `core`'s thread, once it runs: from now on it is watched, until the guard drops.
    pub fn sit(self: &Arc<Self>, core: usize) -> Seated {
        let seat = &self.seats[core];
        // SAFETY: both calls only read the calling thread's identity.
        let (tid, thread) = unsafe { (libc::gettid(), libc::pthread_self()) };
        seat.thread.store(thread, Ordering::Relaxed);
        seat.ticks.fetch_add(1, Ordering::Relaxed);
        seat.tid.store(tid, Ordering::Release);
        Seated(self.clone(), core)
    }

    /// On `core`, about every [`TICK`]: true once after the watchdog had to wake it.
    pub fn tick(&self, core: usize) -> bool {
        let seat = &self.seats[core];
        seat.ticks.fetch_add(1, Ordering::Relaxed);
        seat.nudged.swap(false, Ordering::Relaxed)
    }

    /// Watches on a thread of its own until [`Watchdog::stop`].
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        install_handler();
        let me = self.clone();
        std::thread::Builder::new()
            .name("fanfare-watchdog".into())
            .spawn(move || me.watch())
    }

    pub fn stop(&self) {
        let (stopped, wake) = &self.stop;
        if let Ok(mut stopped) = stopped.lock() {
            *stopped = true;
        }
        wake.notify_all();
    }

    /// Waits for [`WATCH`]; false once stopped.
    fn wait(&self) -> bool {
        let (stopped, wake) = &self.stop;
        let Ok(guard) = stopped.lock() else {
            return false;
        };
        match wake.wait_timeout_while(guard, WATCH, |stopped| !*stopped) {
            Ok((stopped, _)) => !*stopped,
            Err(_) => false,
        }
    }

    fn watch(&self) {
        let now = Instant::now();
        let mut seen: Vec<(u64, Instant)> = self.seats.iter().map(|_| (0, now)).collect();
        while self.wait() {
            for (seat, (ticks, since)) in self.seats.iter().zip(seen.iter_mut()) {
                let now = Instant::now();
                let current = seat.ticks.load(Ordering::Relaxed);
                let tid = seat.tid.load(Ordering::Acquire);
                if current != *ticks || tid == 0 {
                    (*ticks, *since) = (current, now);
                    continue;
                }
                if now.duration_since(*since) < STALE || !asleep(tid) {
                    continue;
                }
                let Ok(_signalling) = self.signalling.lock() else {
                    return;
                };
                if seat.tid.load(Ordering::Acquire) == tid {
                    seat.nudged.store(true, Ordering::Relaxed);
                    let thread = seat.thread.load(Ordering::Relaxed);
                    // SAFETY: the thread still holds its seat, so it has not ended (it
                    // releases the seat under this lock first); the handler does nothing.
                    unsafe { libc::pthread_kill(thread, wake_signal()) };
                }
                *since = now;
            }
        }
    }
}

/// A core being watched; dropped when the core stops.
pub struct Seated(Arc<Watchdog>, usize);

impl Drop for Seated {
    fn drop(&mut self) {
        let _signalling = self.0.signalling.lock();
        self.0.seats[self.1].tid.store(0, Ordering::Release);
    }
}

/// The thread sleeps in the kernel (state `S`), rather than running or waiting to run.
fn asleep(tid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // The state follows the command name, which may hold spaces and ends with the last ')'.
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        == Some("S")
}

fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_wake_signal(_: libc::c_int) {}

/// Without `SA_RESTART`: the interrupted `io_uring_enter` must return, not resume.
fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed `sigaction` with an empty mask is valid; the handler is
        // async-signal-safe (it does nothing).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_wake_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(wake_signal(), &action, std::ptr::null_mut());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_thread_asleep_past_its_tick_is_woken_and_told() {
        let watchdog = Watchdog::new(1);
        let watching = watchdog.spawn().expect("watchdog thread");
        let sleeper = {
            let watchdog = watchdog.clone();
            std::thread::spawn(move || {
                let _seated = watchdog.sit(0);
                let start = Instant::now();
                // Sleeps in the kernel until a signal arrives, as a core that missed its
                // wake-up sleeps in io_uring_enter; and does not tick meanwhile.
                // SAFETY: pause has no memory effects.
                unsafe { libc::pause() };
                (start.elapsed(), watchdog.tick(0), watchdog.tick(0))
            })
        };
        let (slept, told, told_again) = sleeper.join().expect("sleeper");
        watchdog.stop();
        watching.join().expect("watchdog");
        // Stale is judged from the watchdog's looks, every WATCH.
        assert!(
            slept >= STALE - WATCH,
            "woken after {slept:?}, before its tick was stale"
        );
        assert!(told, "the woken thread is told it was woken");
        assert!(!told_again, "and told once");
    }

    #[test]
    fn a_running_thread_is_not_asleep_and_a_blocked_one_is() {
        // SAFETY: gettid only reads the calling thread's id.
        assert!(!asleep(unsafe { libc::gettid() }), "this thread is running");
        let (tx, rx) = std::sync::mpsc::channel::<i32>();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let blocked = std::thread::spawn(move || {
            // SAFETY: as above.
            tx.send(unsafe { libc::gettid() }).expect("send tid");
            done_rx.recv().ok();
        });
        let tid = rx.recv().expect("tid");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !asleep(tid) {
            assert!(Instant::now() < deadline, "the blocked thread never slept");
            std::thread::yield_now();
        }
        done_tx.send(()).expect("wake");
        blocked.join().expect("blocked thread");
    }
}
