//! A connection's outbound side as the rest of its core sees it: a bounded queue of frames and
//! a close request.
//!
//! Invariants: lives on one core (`Rc`, `RefCell`, never crosses threads); the queue never holds
//! more than `limit` bytes — a push that would pass it drops the queue and asks for a `1013`
//! close instead; pushing is O(1) and never copies a frame (`Bytes` is a refcount bump).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use crate::protocol::CloseCode;

pub struct Outbound {
    pub id: u64,
    limit: usize,
    state: RefCell<State>,
    /// Last time anything arrived from the peer (heartbeat).
    pub last_seen: Cell<Instant>,
    /// Last time the server queued a ping.
    pub last_ping: Cell<Instant>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    queued_bytes: usize,
    close: Option<CloseCode>,
    waker: Option<Waker>,
}

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The connection is closing; the frame was dropped.
    Closing,
    /// The queue was over its limit: it was dropped and a `1013` close requested.
    Overflowed,
}

/// What the writer should do next.
pub enum Next {
    /// Write these frames, in order.
    Frames(Vec<Bytes>),
    /// Everything queued is written: send the close frame with this code.
    Close(CloseCode),
}

impl Outbound {
    pub fn new(id: u64, limit: usize, now: Instant) -> Self {
        Outbound {
            id,
            limit,
            state: RefCell::default(),
            last_seen: Cell::new(now),
            last_ping: Cell::new(now),
        }
    }

    pub fn push(&self, frame: Bytes) -> Pushed {
        let mut s = self.state.borrow_mut();
        if s.close.is_some() {
            return Pushed::Closing;
        }
        if s.queued_bytes + frame.len() > self.limit {
            s.queue = VecDeque::new();
            s.queued_bytes = 0;
            s.close = Some(CloseCode::SlowConsumer);
            wake(&mut s);
            return Pushed::Overflowed;
        }
        s.queued_bytes += frame.len();
        s.queue.push_back(frame);
        wake(&mut s);
        Pushed::Queued
    }

    /// Asks for a close after what is queued now; the first request's code wins.
    pub fn close(&self, code: CloseCode) {
        let mut s = self.state.borrow_mut();
        if s.close.is_none() {
            s.close = Some(code);
            wake(&mut s);
        }
    }

    pub fn close_code(&self) -> Option<CloseCode> {
        self.state.borrow().close
    }

    /// Waits for work: up to `max_bytes` of queued frames (at least one), or the close.
    pub fn poll_next(&self, cx: &mut Context<'_>, max_bytes: usize) -> Poll<Next> {
        let mut s = self.state.borrow_mut();
        if s.queue.is_empty() {
            return match s.close {
                Some(code) => Poll::Ready(Next::Close(code)),
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
        let mut frames = Vec::new();
        let mut taken = 0;
        while let Some(f) = s.queue.front() {
            if !frames.is_empty() && taken + f.len() > max_bytes {
                break;
            }
            taken += f.len();
            frames.extend(s.queue.pop_front());
        }
        s.queued_bytes -= taken;
        if s.queue.capacity() > 64 && s.queue.is_empty() {
            // A burst is over: give its memory back (idle connections stay small).
            s.queue = VecDeque::new();
        }
        Poll::Ready(Next::Frames(frames))
    }
}

fn wake(s: &mut State) {
    if let Some(w) = s.waker.take() {
        w.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn next(o: &Outbound, max: usize) -> Option<Next> {
        match o.poll_next(&mut Context::from_waker(Waker::noop()), max) {
            Poll::Ready(n) => Some(n),
            Poll::Pending => None,
        }
    }

    #[test]
    fn coalesces_up_to_the_batch_size_in_order() {
        let o = Outbound::new(1, 100, Instant::now());
        for i in 0..5u8 {
            assert_eq!(o.push(Bytes::from(vec![i; 10])), Pushed::Queued);
        }
        let Some(Next::Frames(batch)) = next(&o, 25) else {
            panic!("expected frames")
        };
        assert_eq!(batch.iter().map(|f| f[0]).collect::<Vec<_>>(), vec![0, 1]);
        let Some(Next::Frames(batch)) = next(&o, 1000) else {
            panic!("expected frames")
        };
        assert_eq!(batch.len(), 3);
        assert!(next(&o, 1000).is_none());
    }

    #[test]
    fn overflow_drops_the_queue_and_asks_for_1013() {
        let o = Outbound::new(1, 30, Instant::now());
        assert_eq!(o.push(Bytes::from(vec![0; 20])), Pushed::Queued);
        assert_eq!(o.push(Bytes::from(vec![0; 20])), Pushed::Overflowed);
        assert_eq!(o.push(Bytes::from(vec![0; 1])), Pushed::Closing);
        assert!(matches!(
            next(&o, 1000),
            Some(Next::Close(CloseCode::SlowConsumer))
        ));
    }

    #[test]
    fn close_comes_after_queued_frames() {
        let o = Outbound::new(1, 100, Instant::now());
        o.push(Bytes::from_static(b"a"));
        o.close(CloseCode::GoingAway);
        o.close(CloseCode::Normal);
        assert!(matches!(next(&o, 1000), Some(Next::Frames(_))));
        assert!(matches!(
            next(&o, 1000),
            Some(Next::Close(CloseCode::GoingAway))
        ));
    }
}
