//! A client as the rest of its core sees it: who it is, how alive it is, and its bounded queue
//! of frames to write. A WebSocket connection's queue forgets a frame once it is taken to be
//! written; an HTTP fallback session's ([`ConnHandle::retaining`]) numbers every frame and keeps
//! it until the client acknowledges it or the bound pushes it out, so that a stream can resume.
//! With `server.write_delay_ms`, a core's [`Flush`] paces the wake-ups of busy writers.
//!
//! Invariants: lives on one core (`Rc`, `RefCell`, never crosses threads); the queue never holds
//! more than `limit` bytes. Over the limit, queued ephemeral frames (`presence.typing`) are shed
//! first; if that is not enough, a connection's queue is dropped and a `1013` close requested,
//! while a session drops its oldest frames and remembers the last one lost, so that a reader
//! behind it learns that it missed events. Pushing is O(1) amortized and never copies a frame
//! (`Bytes` is a refcount bump).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::protocol::CloseCode;

/// Every idle connection holds one, so its layout is kept to 144 bytes (with the `Rc` counts,
/// mimalloc's 160-byte class): timestamps compared over short spans in 32 bits, a session's
/// numbers boxed, the close code beside the limit.
pub struct ConnHandle {
    pub id: u64,
    pub tenant: Arc<str>,
    pub user: Arc<str>,
    limit: u32,
    /// The close requested, once one is; written after what is queued.
    close: Cell<Option<CloseCode>>,
    /// When frames were last taken to be written: the low 16 bits of [`clock_ms`], compared
    /// only over spans up to `server.write_delay_ms` (at most a second), so that a wrap costs
    /// at most one needless wait for a flush.
    taken_ms: Cell<u16>,
    state: RefCell<State>,
    /// Last time anything arrived from the peer (heartbeat), in [`clock_ms32`].
    pub last_seen: Cell<u32>,
    /// Last time the server queued a ping, in [`clock_ms32`].
    pub last_ping: Cell<u32>,
    /// The tick of the shard's sweep that holds this client's live reminder (its low 32 bits).
    pub sweep_due: Cell<u32>,
    /// When the connection's token expires (ms since the Unix epoch, leeway included).
    pub expires_at_ms: Cell<u64>,
    /// When the connection was last told that it missed events (`overloaded`), in
    /// [`clock_ms32`]: once a second at most.
    pub overload_told: Cell<u32>,
}

/// Whether a frame may be shed under backpressure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Must be delivered or the connection closed.
    Event,
    /// May be dropped when the connection falls behind (`presence.typing`).
    Ephemeral,
}

/// A queued frame with its sequence number (a session's; 0 for a connection's), its kind in
/// the number's top bit: 40 bytes an entry instead of 48, paid by a session for every frame it
/// retains (a bound's worth is ~9,500 frames of 100 bytes).
struct Queued {
    frame: Bytes,
    tag: u64,
}

const EPHEMERAL: u64 = 1 << 63;

/// How long a connection told that it missed events is not told again.
pub const OVERLOAD_QUIET_MS: u32 = 1000;

impl Queued {
    fn new(frame: Bytes, kind: Kind, seq: u64) -> Queued {
        let flag = if kind == Kind::Ephemeral {
            EPHEMERAL
        } else {
            0
        };
        Queued {
            frame,
            tag: seq | flag,
        }
    }

    fn seq(&self) -> u64 {
        self.tag & !EPHEMERAL
    }

    fn kind(&self) -> Kind {
        if self.tag & EPHEMERAL == 0 {
            Kind::Event
        } else {
            Kind::Ephemeral
        }
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    waker: Option<Waker>,
    /// A session's queue numbers its frames and keeps them after they are read; a
    /// connection's has none.
    numbers: Option<Box<Numbers>>,
}

/// A session's last sequence number given out, and the highest one of an event that left the
/// queue unread or was acknowledged: a reader from before it missed something. And the
/// session's task, woken when the close is requested (it then leaves the rules) or an event
/// is posted to it.
#[derive(Default)]
struct Numbers {
    last_seq: u64,
    gone_through: u64,
    task: Option<Waker>,
}

impl State {
    /// A session's last number given out; a connection's is 0.
    fn last_seq(&self) -> u64 {
        self.numbers.as_deref().map_or(0, |n| n.last_seq)
    }

    /// A session's highest number that is gone; a connection's is 0.
    fn gone(&self) -> u64 {
        self.numbers.as_deref().map_or(0, |n| n.gone_through)
    }

    /// Records that frames through `seq` are gone (a session's only).
    fn gone_through(&mut self, seq: u64) {
        if let Some(n) = self.numbers.as_deref_mut() {
            n.gone_through = n.gone_through.max(seq);
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Ephemeral frames were shed to make room: an event was queued after this many queued
    /// ones were dropped, or an ephemeral frame that did not fit was dropped itself (1).
    Shed(usize),
    /// The connection is closing: dropped.
    Dropped,
    /// The queue was over its limit: it was dropped and a `1013` close requested.
    Overflowed,
}

/// What the writer should do next (32 bytes: it is held by every connection's writer).
pub enum Next {
    /// Write these bytes: one frame (the shared bytes, no copy), or several coalesced into one
    /// buffer for one `send`.
    Frames(Bytes),
    /// Everything queued is written: send the close frame with this code.
    Close(CloseCode),
}

/// What a session's reader gets ([`ConnHandle::poll_after`]).
pub enum Read {
    /// Frames after the reader's cursor, with their sequence numbers, and the cursor after
    /// them. `missed`: events after the reader's cursor are gone (it is told `overloaded`).
    Frames {
        missed: bool,
        frames: Vec<(u64, Bytes)>,
        cursor: u64,
    },
    /// Everything is read and the session is closing with this code.
    Closed(CloseCode),
}

impl ConnHandle {
    pub fn new(id: u64, tenant: Arc<str>, user: Arc<str>, limit: u32, expires_at_ms: u64) -> Self {
        let now = clock_ms32();
        ConnHandle {
            id,
            tenant,
            user,
            limit,
            close: Cell::new(None),
            taken_ms: Cell::new(clock_ms() as u16),
            state: RefCell::default(),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
            sweep_due: Cell::new(0),
            expires_at_ms: Cell::new(expires_at_ms),
            overload_told: Cell::new(now.wrapping_sub(OVERLOAD_QUIET_MS)),
        }
    }

    /// This handle as a session's: its queue retains what it hands out, numbered.
    pub fn retaining(self) -> Self {
        self.state.borrow_mut().numbers = Some(Box::default());
        self
    }

    /// True for an HTTP fallback session's handle.
    pub fn is_session(&self) -> bool {
        self.state.borrow().numbers.is_some()
    }

    pub fn push(&self, frame: Bytes) -> Pushed {
        self.push_kind(frame, Kind::Event, None)
    }

    /// Queues `frame`. With `flush`, a writer that took frames less than the flush's delay ago
    /// is woken at the core's next flush instead of now.
    pub fn push_kind(&self, frame: Bytes, kind: Kind, flush: Option<&Flush>) -> Pushed {
        let mut s = self.state.borrow_mut();
        if self.close.get().is_some() {
            return Pushed::Dropped;
        }
        let limit = self.limit as usize;
        let mut shed = 0;
        if s.queued_bytes + frame.len() > limit {
            if kind == Kind::Ephemeral {
                return Pushed::Shed(1);
            }
            let before = s.queue.len();
            s.queue.retain(|q| q.kind() == Kind::Event);
            shed = before - s.queue.len();
            if shed > 0 {
                s.queued_bytes = s.queue.iter().map(|q| q.frame.len()).sum();
            }
            if s.queued_bytes + frame.len() > limit && s.numbers.is_none() {
                s.queue = VecDeque::new();
                s.queued_bytes = 0;
                self.close.set(Some(CloseCode::SlowConsumer));
                wake(&mut s);
                return Pushed::Overflowed;
            }
            // A session makes room from its oldest frames.
            while s.queued_bytes + frame.len() > limit {
                let Some(old) = s.queue.pop_front() else {
                    break;
                };
                s.queued_bytes -= old.frame.len();
                s.gone_through(old.seq());
                shed += 1;
            }
        }
        let seq = match s.numbers.as_deref_mut() {
            Some(n) => {
                n.last_seq += 1;
                n.last_seq
            }
            None => 0,
        };
        if frame.len() > limit {
            // Larger than a whole session queue: lost, and known to be.
            s.gone_through(seq);
            wake(&mut s);
            return Pushed::Shed(shed + 1);
        }
        s.queued_bytes += frame.len();
        s.queue.push_back(Queued::new(frame, kind, seq));
        match (flush, s.waker.take()) {
            (Some(flush), Some(waker)) if self.taken_within(flush.delay_ms) => flush.defer(waker),
            (_, Some(waker)) => waker.wake(),
            (_, None) => {}
        }
        if shed > 0 {
            Pushed::Shed(shed)
        } else {
            Pushed::Queued
        }
    }

    fn taken_within(&self, ms: u16) -> bool {
        (clock_ms() as u16).wrapping_sub(self.taken_ms.get()) < ms
    }

    /// Records that frames were taken to be written, now.
    fn taken(&self) {
        self.taken_ms.set(clock_ms() as u16);
    }

    /// Asks for a close after what is queued now; the first request's code wins.
    pub fn close(&self, code: CloseCode) {
        if self.close.get().is_none() {
            self.close.set(Some(code));
            wake(&mut self.state.borrow_mut());
            self.wake_task();
        }
    }

    pub fn close_code(&self) -> Option<CloseCode> {
        self.close.get()
    }

    /// Waits for work: up to `max_bytes` of queued frames (at least one), or the close.
    pub fn poll_next(&self, cx: &mut Context<'_>, max_bytes: usize) -> Poll<Next> {
        let mut s = self.state.borrow_mut();
        if s.queue.is_empty() {
            return match self.close.get() {
                Some(code) => Poll::Ready(Next::Close(code)),
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
        // How many frames fit in one batch (at least one).
        let (mut count, mut taken) = (0, 0);
        for q in &s.queue {
            if count > 0 && taken + q.frame.len() > max_bytes {
                break;
            }
            count += 1;
            taken += q.frame.len();
        }
        s.queued_bytes -= taken;
        let next = if count == 1 {
            Next::Frames(s.queue.pop_front().map(|q| q.frame).unwrap_or_default())
        } else {
            let mut batch = Vec::with_capacity(taken);
            for q in s.queue.drain(..count) {
                batch.extend_from_slice(&q.frame);
            }
            // Exactly the capacity asked for: the conversion does not reallocate.
            Next::Frames(Bytes::from(batch))
        };
        if s.queue.is_empty() {
            // Drained: give the memory back, so that an idle connection holds no queue.
            s.queue = VecDeque::new();
        }
        self.taken();
        Poll::Ready(next)
    }

    /// A session's reader: waits for frames after `cursor` (up to `max_bytes`, at least one),
    /// or for the close once everything is read. Frames stay queued until acknowledged.
    pub fn poll_after(&self, cx: &mut Context<'_>, cursor: u64, max_bytes: usize) -> Poll<Read> {
        let mut s = self.state.borrow_mut();
        let missed = cursor < s.gone();
        let (mut frames, mut taken) = (Vec::new(), 0);
        // Numbers grow along the queue: the frames after the cursor are at its end, and a
        // reader that keeps up has one or two of them. Counted from the end, touching only
        // those (just pushed, still in cache), not a bisection over every retained frame.
        let after = s
            .queue
            .iter()
            .rev()
            .take_while(|q| q.seq() > cursor)
            .count();
        let first = s.queue.len() - after;
        for q in s.queue.range(first..) {
            if !frames.is_empty() && taken + q.frame.len() > max_bytes {
                break;
            }
            taken += q.frame.len();
            frames.push((q.seq(), q.frame.clone()));
        }
        if frames.is_empty() && !missed {
            return match self.close.get() {
                Some(code) => Poll::Ready(Read::Closed(code)),
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
        self.taken();
        let cursor = frames.last().map_or(s.gone(), |(seq, _)| *seq);
        Poll::Ready(Read::Frames {
            missed,
            frames,
            cursor,
        })
    }

    /// A session's client has every frame through `cursor`: they leave the queue, and a reader
    /// from before `cursor` has missed them.
    pub fn acknowledge(&self, cursor: u64) {
        let mut s = self.state.borrow_mut();
        while let Some(q) = s.queue.front().filter(|q| q.seq() <= cursor) {
            s.queued_bytes -= q.frame.len();
            s.queue.pop_front();
        }
        s.gone_through(cursor);
        if s.queue.is_empty() {
            s.queue = VecDeque::new();
        }
    }

    /// A session's last sequence number given out: a cursor past it is not one it gave.
    pub fn last_seq(&self) -> u64 {
        self.state.borrow().last_seq()
    }

    /// A session's task: ready with the close code once a close is requested (by anyone:
    /// `DELETE`, token expiry, shutdown), else woken when one is or by [`Self::wake_task`].
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<CloseCode> {
        if let Some(code) = self.close.get() {
            return Poll::Ready(code);
        }
        if let Some(n) = self.state.borrow_mut().numbers.as_deref_mut() {
            n.task = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Wakes a session's task waiting in [`Self::poll_closed`] (an event was posted to it).
    pub fn wake_task(&self) {
        let task = self
            .state
            .borrow_mut()
            .numbers
            .as_deref_mut()
            .and_then(|n| n.task.take());
        if let Some(task) = task {
            task.wake();
        }
    }

    /// Wakes the reader waiting on this handle (a session's, when another one takes over).
    pub fn wake_reader(&self) {
        wake(&mut self.state.borrow_mut());
    }
}

/// Milliseconds on a monotonic clock, counted from its first reading in this process: the
/// connection's timestamps in 8 bytes each instead of an `Instant`'s 16.
pub fn clock_ms() -> u64 {
    clock().as_millis() as u64
}

/// The monotonic clock of [`clock_ms`], at full precision.
pub fn clock() -> Duration {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// [`clock_ms`] in 32 bits, for timestamps that are only compared over spans far shorter than
/// its wrap (49 days): the span from one to now is `clock_ms32().wrapping_sub(then)`.
pub fn clock_ms32() -> u32 {
    clock_ms() as u32
}

fn wake(s: &mut State) {
    if let Some(w) = s.waker.take() {
        w.wake();
    }
}

/// A core's writers paced by `server.write_delay_ms` (when it is not 0): an event or presence
/// frame for a connection whose frames were taken to be written less than the delay ago waits
/// for the core's next flush, at most the delay after the first such frame; whatever is queued
/// by then goes out in one `send`. On a connection that receives an event every few
/// milliseconds that is a fraction of one `send` per event (ARCHITECTURE.md: on loopback, 16
/// frames per `send` cost about a tenth of 16 sends); one that receives fewer than one per
/// delay is written at once, as without it.
///
/// Invariant: a waker taken from a handle is either woken at once or kept here until the next
/// flush, never lost; the flush wakes every waker it holds.
pub struct Flush {
    delay_ms: u16,
    due: RefCell<Vec<Waker>>,
    /// The flushing task, while it waits for a first waker.
    flusher: Cell<Option<Waker>>,
}

impl Flush {
    /// `delay_ms` is at most a second (`config::MAX_WRITE_DELAY_MS`).
    pub fn new(delay_ms: u16) -> Flush {
        Flush {
            delay_ms,
            due: RefCell::default(),
            flusher: Cell::new(None),
        }
    }

    fn defer(&self, waker: Waker) {
        self.due.borrow_mut().push(waker);
        if let Some(flusher) = self.flusher.take() {
            flusher.wake();
        }
    }

    /// The core's flushing task: from the first deferred wake-up, waits the delay and wakes
    /// every writer deferred meanwhile; then again from the next one.
    pub async fn run(&self) {
        let mut woken = Vec::new();
        loop {
            std::future::poll_fn(|cx| {
                if self.due.borrow().is_empty() {
                    self.flusher.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            glommio::timer::sleep(std::time::Duration::from_millis(self.delay_ms.into())).await;
            // Swapped with a buffer of the same size: no allocation per flush.
            std::mem::swap(&mut woken, &mut *self.due.borrow_mut());
            for waker in woken.drain(..) {
                waker.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn handle(limit: u32) -> ConnHandle {
        ConnHandle::new(1, "t".into(), "u".into(), limit, u64::MAX)
    }

    fn next(o: &ConnHandle, max: usize) -> Option<Next> {
        match o.poll_next(&mut Context::from_waker(Waker::noop()), max) {
            Poll::Ready(n) => Some(n),
            Poll::Pending => None,
        }
    }

    #[test]
    fn coalesces_up_to_the_batch_size_in_order() {
        let o = handle(100);
        for i in 0..5u8 {
            assert_eq!(o.push(Bytes::from(vec![i; 10])), Pushed::Queued);
        }
        let Some(Next::Frames(batch)) = next(&o, 25) else {
            panic!("expected a batch")
        };
        assert_eq!(batch, [vec![0; 10], vec![1; 10]].concat());
        let Some(Next::Frames(batch)) = next(&o, 1000) else {
            panic!("expected a batch")
        };
        assert_eq!(batch.len(), 30);
        o.push(Bytes::from(vec![9; 50]));
        o.push(Bytes::from(vec![8; 10]));
        assert!(
            matches!(next(&o, 40), Some(Next::Frames(f)) if f[..] == [9; 50]),
            "a frame over the batch size goes alone"
        );
        assert!(matches!(next(&o, 40), Some(Next::Frames(f)) if f[..] == [8; 10]));
        assert!(next(&o, 1000).is_none());
    }

    /// A waker that counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn a_flush_wakes_a_writer_that_wrote_within_its_delay_once() {
        let o = handle(100);
        let counter = Arc::new(Counter(Default::default()));
        let waker = Waker::from(counter.clone());
        let woken = || counter.0.load(std::sync::atomic::Ordering::Relaxed);
        let mut cx = Context::from_waker(&waker);
        let flush = Flush::new(1000);
        // Its frames were last taken now (at creation): frames wait for the flush.
        assert!(o.poll_next(&mut cx, 100).is_pending());
        for i in 0..3u8 {
            o.push_kind(Bytes::from(vec![i; 10]), Kind::Event, Some(&flush));
        }
        assert_eq!(woken(), 0, "woken before the flush");
        let due = std::mem::take(&mut *flush.due.borrow_mut());
        assert_eq!(due.len(), 1, "one wake-up per writer, however many frames");
        due.into_iter().for_each(Waker::wake);
        assert_eq!(woken(), 1);
        assert!(matches!(next(&o, 100), Some(Next::Frames(f)) if f.len() == 30));
        // Last taken longer ago than the delay: woken at once.
        assert!(o.poll_next(&mut cx, 100).is_pending());
        o.taken_ms.set(o.taken_ms.get().wrapping_sub(2000));
        o.push_kind(Bytes::from(vec![4; 10]), Kind::Event, Some(&flush));
        assert_eq!(woken(), 2);
        assert!(flush.due.borrow().is_empty());
    }

    #[test]
    fn a_handle_stays_in_its_allocation_class() {
        // With its `Rc` counts, 160 bytes: mimalloc's 160-byte class (see `ConnHandle`).
        assert!(std::mem::size_of::<ConnHandle>() <= 144);
        // A session retains one entry per frame until it is acknowledged.
        assert_eq!(std::mem::size_of::<Queued>(), 40);
    }

    #[test]
    fn overflow_drops_the_queue_and_asks_for_1013() {
        let o = handle(30);
        assert_eq!(o.push(Bytes::from(vec![0; 20])), Pushed::Queued);
        assert_eq!(o.push(Bytes::from(vec![0; 20])), Pushed::Overflowed);
        assert_eq!(o.push(Bytes::from(vec![0; 1])), Pushed::Dropped);
        assert!(matches!(
            next(&o, 1000),
            Some(Next::Close(CloseCode::SlowConsumer))
        ));
    }

    #[test]
    fn ephemeral_frames_are_shed_first() {
        let o = handle(30);
        assert_eq!(
            o.push_kind(Bytes::from(vec![1; 10]), Kind::Ephemeral, None),
            Pushed::Queued
        );
        assert_eq!(o.push(Bytes::from(vec![2; 10])), Pushed::Queued);
        // An ephemeral frame that does not fit is just dropped.
        assert_eq!(
            o.push_kind(Bytes::from(vec![3; 15]), Kind::Ephemeral, None),
            Pushed::Shed(1)
        );
        // An event that does not fit sheds the queued ephemeral frame instead of closing.
        assert_eq!(o.push(Bytes::from(vec![4; 15])), Pushed::Shed(1));
        let Some(Next::Frames(batch)) = next(&o, 1000) else {
            panic!("expected a batch")
        };
        assert_eq!(batch, [vec![2; 10], vec![4; 15]].concat());
        assert!(o.close_code().is_none());
    }

    #[test]
    fn close_comes_after_queued_frames() {
        let o = handle(100);
        o.push(Bytes::from_static(b"a"));
        o.close(CloseCode::GoingAway);
        o.close(CloseCode::Normal);
        assert!(matches!(next(&o, 1000), Some(Next::Frames(f)) if f[..] == *b"a"));
        assert!(matches!(
            next(&o, 1000),
            Some(Next::Close(CloseCode::GoingAway))
        ));
    }

    fn read(o: &ConnHandle, cursor: u64, max: usize) -> Option<(bool, Vec<u64>, u64)> {
        match o.poll_after(&mut Context::from_waker(Waker::noop()), cursor, max) {
            Poll::Ready(Read::Frames {
                missed,
                frames,
                cursor,
            }) => Some((missed, frames.iter().map(|(s, _)| *s).collect(), cursor)),
            Poll::Ready(Read::Closed(code)) => panic!("closed with {code:?}"),
            Poll::Pending => None,
        }
    }

    #[test]
    fn a_session_numbers_frames_and_keeps_them_until_acknowledged() {
        let o = handle(100).retaining();
        for i in 0..3u8 {
            assert_eq!(o.push(Bytes::from(vec![i; 10])), Pushed::Queued);
        }
        assert_eq!(
            read(&o, 0, 15),
            Some((false, vec![1], 1)),
            "one batch's worth"
        );
        assert_eq!(
            read(&o, 0, 1000),
            Some((false, vec![1, 2, 3], 3)),
            "read again"
        );
        assert_eq!(read(&o, 2, 1000), Some((false, vec![3], 3)));
        assert_eq!(read(&o, 3, 1000), None, "nothing after the last");
        o.acknowledge(2);
        assert_eq!(read(&o, 2, 1000), Some((false, vec![3], 3)));
        assert_eq!(
            read(&o, 1, 1000),
            Some((true, vec![3], 3)),
            "from before the acknowledgement: missed"
        );
        o.close(CloseCode::GoingAway);
        assert!(matches!(
            o.poll_after(&mut Context::from_waker(Waker::noop()), 3, 1000),
            Poll::Ready(Read::Closed(CloseCode::GoingAway))
        ));
    }

    #[test]
    fn a_session_numbers_typing_frames_like_events() {
        let o = handle(100).retaining();
        o.push(Bytes::from(vec![1; 10]));
        o.push_kind(Bytes::from(vec![2; 10]), Kind::Ephemeral, None);
        o.push(Bytes::from(vec![3; 10]));
        assert_eq!(read(&o, 0, 1000), Some((false, vec![1, 2, 3], 3)));
        o.acknowledge(2);
        assert_eq!(read(&o, 2, 1000), Some((false, vec![3], 3)));
    }

    #[test]
    fn a_full_session_sheds_typing_then_its_oldest_frames() {
        let o = handle(30).retaining();
        o.push(Bytes::from(vec![1; 10]));
        o.push_kind(Bytes::from(vec![2; 10]), Kind::Ephemeral, None);
        o.push(Bytes::from(vec![3; 10]));
        assert_eq!(o.push(Bytes::from(vec![4; 10])), Pushed::Shed(1));
        assert_eq!(read(&o, 0, 1000), Some((false, vec![1, 3, 4], 4)));
        assert_eq!(o.push(Bytes::from(vec![5; 20])), Pushed::Shed(2));
        assert_eq!(read(&o, 0, 1000), Some((true, vec![4, 5], 5)));
        assert_eq!(read(&o, 3, 1000), Some((false, vec![4, 5], 5)));
        assert_eq!(o.push(Bytes::from(vec![6; 31])), Pushed::Shed(3));
        assert_eq!(
            read(&o, 5, 1000),
            Some((true, vec![], 6)),
            "a frame larger than the queue is lost, and known to be"
        );
        assert!(o.close_code().is_none(), "a session is never closed for it");
    }
}
