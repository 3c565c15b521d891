//! The mesh between cores: the messages, one ordered outbox per peer core, and the waits for a
//! peer's answer.
//!
//! Invariants: a [`Mesh`] lives on one core. Everything this core sends to a peer leaves in the
//! order it was posted: a message goes straight into the SPSC ring only when nothing of that
//! peer waits in its outbox, else behind what waits there, and one task per peer drains the
//! outbox in FIFO order. No task is spawned per message. Posting never awaits, so a handler of
//! incoming messages never waits on a ring and two cores can never wait on each other.
//!
//! Bounds: a peer's outbox holds at most `server.mesh_queue_len` messages before senders that
//! can wait are held back ([`Mesh::room`]). A delivery (an event frame for a peer's
//! subscribers) that finds the outbox full is dropped and counted; the peer is then sent a
//! [`Message::Gap`] ahead of the room's next delivery, or as soon as there is room, so that its
//! subscribers learn of the loss (`error{code:"overloaded"}`).
//!
//! Wiring: the rings between every pair of cores are made on the main thread before the
//! executors start ([`Wiring`]); each executor takes its own ends once and connects them
//! ([`Mesh::connect`]). glommio's `MeshBuilder` is not used: it keeps its peer list behind an
//! `Rc` that every executor thread clones and drops, and those racing non-atomic counts
//! corrupted the heap (the crash at exit that `_exit` used to hide).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use glommio::{GlommioError, ResourceType};

use crate::handle::Kind;
use crate::history::{Position, Read};
use crate::metrics::Registry;
use crate::presence::UserKey;
use crate::publish::Routed;
use crate::route::{Map, RoomKey, Set};

/// Messages between cores.
pub enum Message {
    /// Core `from` now has subscribers for `room`; answer with `Live { req }` once its events
    /// flow.
    Subscribe {
        room: RoomKey,
        from: usize,
        req: u64,
    },
    /// The events of `room` flow to core `from` (or not, `verdict`), from the room's owner;
    /// with history, the stream's position when they began to.
    Live {
        room: RoomKey,
        req: u64,
        verdict: Verdict,
        at: Option<Position>,
    },
    /// Core `from` has no subscribers for `room` any more.
    Unsubscribe {
        room: RoomKey,
        from: usize,
    },
    /// A subscriber of core `from` recovers `room` from `since`: answer with `Recovered { req }`
    /// once the room's events flow there, in order with its deliveries.
    Recover {
        room: RoomKey,
        since: Position,
        from: usize,
        req: u64,
    },
    /// What the subscriber of request `req` missed, from the room's owner.
    Recovered {
        room: RoomKey,
        req: u64,
        read: Box<Read>,
    },
    /// The history of `room` after `since`, for the history API; answer `HistoryRead { req }`.
    ReadHistory {
        room: RoomKey,
        since: Position,
        from: usize,
        req: u64,
    },
    HistoryRead {
        req: u64,
        read: Box<Read>,
    },
    /// Published events of rooms the receiving core owns, in publish order; answer with
    /// `Published { req }` (their offsets) once they are fanned out.
    Publish {
        events: Vec<Routed>,
        from: usize,
        req: u64,
    },
    Published {
        req: u64,
        offsets: Vec<u64>,
    },
    /// A frame for `room`, from its owner to a core with subscribers.
    Deliver {
        room: RoomKey,
        out: Fanned,
    },
    /// Deliveries for `room` were dropped on their way here: its subscribers missed events.
    Gap {
        room: RoomKey,
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
    /// The other instances had taken this one for gone: announce this core's users again.
    Reannounce,
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
    /// An HTTP request for a session of the receiving core, with its socket: served there.
    Handover(Box<crate::server::HandedOver>),
}

/// A frame on its way to a room's subscribers.
#[derive(Clone)]
pub struct Fanned {
    pub frame: Bytes,
    pub kind: Kind,
    /// Whose own connections skip it (the typist's).
    pub except: Option<Arc<str>>,
    /// A published event's place in its stream, with history.
    pub at: Option<Position>,
}

impl Fanned {
    /// A published event: for everyone, never shed.
    pub fn event(frame: Bytes, at: Option<Position>) -> Fanned {
        Fanned {
            frame,
            kind: Kind::Event,
            except: None,
            at,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Granted,
    RetryAfterMs(u64),
    /// No answer in time (the broker could not confirm, or a core did not answer).
    Unavailable,
}

/// A one-shot value that any number of local tasks can wait for.
///
/// A waiter that gives up (its future dropped, e.g. by a timeout or `or`) takes its waker
/// back: a long-lived latch such as `Shard::stopping` must not collect one per request.
pub struct Latch<T = Verdict> {
    value: RefCell<Option<T>>,
    waiters: RefCell<Map<u64, Waker>>,
    next_waiter: Cell<u64>,
}

impl<T> Default for Latch<T> {
    fn default() -> Self {
        Latch {
            value: RefCell::new(None),
            waiters: RefCell::default(),
            next_waiter: Cell::new(0),
        }
    }
}

impl<T: Clone> Latch<T> {
    pub fn set(&self, v: T) {
        *self.value.borrow_mut() = Some(v);
        for (_, w) in self.waiters.take() {
            w.wake();
        }
    }

    pub fn get(&self) -> Option<T> {
        self.value.borrow().clone()
    }

    pub fn wait(&self) -> LatchWait<'_, T> {
        LatchWait {
            latch: self,
            key: None,
        }
    }

    /// The value, or `None` if it is not set within `limit`.
    pub async fn within(&self, limit: Duration) -> Option<T> {
        crate::deadline::within(limit, self.wait()).await
    }
}

impl Latch {
    /// The value, or `Unavailable` if it is not set within `limit`.
    pub async fn wait_at_most(&self, limit: Duration) -> Verdict {
        self.within(limit).await.unwrap_or(Verdict::Unavailable)
    }
}

/// The future of [`Latch::wait`].
pub struct LatchWait<'a, T> {
    latch: &'a Latch<T>,
    key: Option<u64>,
}

impl<T: Clone> Future for LatchWait<'_, T> {
    type Output = T;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<T> {
        if let Some(v) = self.latch.get() {
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

impl<T> Drop for LatchWait<'_, T> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.latch.waiters.borrow_mut().remove(&key);
        }
    }
}

/// Requests of this core waiting for another core's answer, by request id.
pub struct Pending<T = Verdict> {
    waiting: RefCell<Map<u64, Rc<Latch<T>>>>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            waiting: RefCell::default(),
        }
    }
}

impl<T: Clone> Pending<T> {
    /// Waits for the answer to `req` under `latch` (which others may wait for too).
    pub fn insert(&self, req: u64, latch: Rc<Latch<T>>) {
        self.waiting.borrow_mut().insert(req, latch);
    }

    /// The answer to `req`; an answer nobody waits for any more is dropped.
    pub fn answer(&self, req: u64, v: T) {
        if let Some(latch) = self.waiting.borrow_mut().remove(&req) {
            latch.set(v);
        }
    }

    pub fn forget(&self, req: u64) {
        self.waiting.borrow_mut().remove(&req);
    }

    /// Sends a request with `post(req)` and waits for its answer, at most `limit`; dropped
    /// or timed out, it takes its entry back.
    pub async fn request(&self, req: u64, limit: Duration, post: impl FnOnce(u64)) -> Option<T> {
        let answer = Rc::new(Latch::default());
        self.insert(req, answer.clone());
        let _forget = Forget(self, req);
        post(req);
        answer.within(limit).await
    }
}

/// Removes a request's entry when its wait ends, answered or not.
struct Forget<'a, T>(&'a Pending<T>, u64);

impl<T> Drop for Forget<'_, T> {
    fn drop(&mut self) {
        self.0.waiting.borrow_mut().remove(&self.1);
    }
}

/// What waits to go to one peer core.
#[derive(Default)]
struct Outbox {
    queue: RefCell<VecDeque<Message>>,
    /// The drain task holds the message from the queue's front, waiting for ring space.
    sending: Cell<bool>,
    /// Rooms whose deliveries were dropped since their last [`Message::Gap`].
    gaps: RefCell<Set<RoomKey>>,
    drainer: RefCell<Option<Waker>>,
    /// Senders waiting for room ([`Mesh::room`]); woken together when the queue shrinks.
    waiting: RefCell<Vec<Waker>>,
}

/// The rings of every pair of cores, before any executor took its ends.
pub struct Wiring {
    ends: Mutex<Vec<Ends>>,
}

/// One core's unconnected ends: a ring to and a ring from every other core.
pub struct Ends {
    core: usize,
    to: Vec<Option<SharedSender<Message>>>,
    from: Vec<Option<SharedReceiver<Message>>>,
}

/// A ring from one peer core, connected.
pub type Inbound = ConnectedReceiver<Message>;

impl Wiring {
    /// Rings of `ring_len` messages between every pair of `cores` cores.
    pub fn new(cores: usize, ring_len: usize) -> Wiring {
        let mut ends: Vec<Ends> = (0..cores)
            .map(|core| Ends {
                core,
                to: (0..cores).map(|_| None).collect(),
                from: (0..cores).map(|_| None).collect(),
            })
            .collect();
        for a in 0..cores {
            for b in (0..cores).filter(|&b| b != a) {
                let (tx, rx) = shared_channel::new_bounded(ring_len);
                ends[a].to[b] = Some(tx);
                ends[b].from[a] = Some(rx);
            }
        }
        Wiring {
            ends: Mutex::new(ends),
        }
    }

    /// The ends of a core no executor took yet; `None` once every core's are taken.
    pub fn take(&self) -> Option<Ends> {
        self.ends.lock().ok()?.pop()
    }
}

impl Ends {
    /// The core these ends are for.
    pub fn core(&self) -> usize {
        self.core
    }
}

/// This core's end of the mesh.
pub struct Mesh {
    core: usize,
    /// Indexed by peer core; `None` at this core's own index.
    senders: Box<[Option<ConnectedSender<Message>>]>,
    outboxes: Box<[Outbox]>,
    bound: usize,
}

impl Mesh {
    /// Connects this core's ends to every peer's; resolves once every peer has connected its
    /// own. `bound`: the most messages an outbox holds before deliveries are dropped. Returns
    /// this core's mesh and the rings from its peers.
    pub async fn connect(ends: Ends, bound: usize) -> (Rc<Mesh>, Vec<Inbound>) {
        // A glommio executor whose tasks all sleep may miss the peer's wake-up while
        // connecting (FIELD-NOTES: DataDog/glommio #261, #555); a short periodic timer
        // prevents it. Both sides of every ring connect at once: each waits for the other.
        let ticker = glommio::spawn_local(async {
            loop {
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        });
        let to: Vec<_> = ends
            .to
            .into_iter()
            .map(|tx| tx.map(|tx| glommio::spawn_local(tx.connect())))
            .collect();
        let from: Vec<_> = ends
            .from
            .into_iter()
            .flatten()
            .map(|rx| glommio::spawn_local(rx.connect()))
            .collect();
        let mut senders = Vec::with_capacity(to.len());
        for tx in to {
            senders.push(match tx {
                Some(tx) => Some(tx.await),
                None => None,
            });
        }
        let mut inbound = Vec::with_capacity(from.len());
        for rx in from {
            inbound.push(rx.await);
        }
        ticker.cancel().await;
        let outboxes = senders.iter().map(|_| Outbox::default()).collect();
        let mesh = Rc::new(Mesh {
            core: ends.core,
            senders: senders.into(),
            outboxes,
            bound: bound.max(1),
        });
        (mesh, inbound)
    }

    pub fn id(&self) -> usize {
        self.core
    }

    pub fn cores(&self) -> usize {
        self.senders.len()
    }

    /// Starts one drain task per peer. They end when the peer's ring closes (shutdown).
    pub fn start(self: &Rc<Self>, registry: &Registry) {
        for peer in (0..self.cores()).filter(|&p| p != self.id()) {
            glommio::spawn_local(self.clone().drain(peer, registry.clone())).detach();
        }
    }

    /// Queues `msg` for `peer`, behind everything queued for it before. Never waits.
    pub fn post(&self, peer: usize, msg: Message) {
        let outbox = &self.outboxes[peer];
        let msg = if outbox.queue.borrow().is_empty() && !outbox.sending.get() {
            let Some(tx) = &self.senders[peer] else {
                return;
            };
            match tx.try_send(msg) {
                Ok(()) => return,
                Err(GlommioError::WouldBlock(ResourceType::Channel(msg))) => msg,
                // Closed: the peer is stopping, nothing will read it.
                Err(_) => return,
            }
        } else {
            msg
        };
        outbox.queue.borrow_mut().push_back(msg);
        if let Some(w) = outbox.drainer.borrow_mut().take() {
            w.wake();
        }
    }

    /// Queues `msg()` for every other core.
    pub fn post_to_peers(&self, msg: impl Fn() -> Message) {
        for peer in (0..self.cores()).filter(|&p| p != self.id()) {
            self.post(peer, msg());
        }
    }

    /// Queues a delivery for `peer`'s subscribers of `room`; drops it when the outbox is full
    /// (the peer hears of the gap before the room's next delivery). False when dropped.
    pub fn deliver(&self, peer: usize, room: &RoomKey, out: &Fanned) -> bool {
        let outbox = &self.outboxes[peer];
        if outbox.queue.borrow().len() >= self.bound {
            if out.kind == Kind::Event {
                outbox.gaps.borrow_mut().insert(room.clone());
            }
            return false;
        }
        // Nearly always empty: no hashing per delivery then.
        let gap = {
            let mut gaps = outbox.gaps.borrow_mut();
            !gaps.is_empty() && gaps.remove(room)
        };
        if gap {
            self.post(peer, Message::Gap { room: room.clone() });
        }
        let msg = Message::Deliver {
            room: room.clone(),
            out: out.clone(),
        };
        self.post(peer, msg);
        true
    }

    /// Resolves once `peer`'s outbox is below its bound (at once for this core): senders that
    /// can wait call it before they change state and post, so the outbox stays bounded.
    pub fn room(&self, peer: usize) -> impl Future<Output = ()> + '_ {
        poll_fn(move |cx| {
            let Some(outbox) = self.outboxes.get(peer).filter(|_| peer != self.id()) else {
                return Poll::Ready(());
            };
            if outbox.queue.borrow().len() < self.bound {
                return Poll::Ready(());
            }
            outbox.waiting.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
    }

    async fn drain(self: Rc<Self>, peer: usize, registry: Registry) {
        let outbox = &self.outboxes[peer];
        let stats = &registry[self.id()];
        loop {
            let msg = poll_fn(|cx| {
                let mut queue = outbox.queue.borrow_mut();
                if queue.len() < self.bound {
                    for room in outbox.gaps.borrow_mut().drain() {
                        queue.push_back(Message::Gap { room });
                    }
                }
                match queue.pop_front() {
                    Some(msg) => Poll::Ready(msg),
                    None => {
                        *outbox.drainer.borrow_mut() = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            outbox.sending.set(true);
            stats.mesh_queued_total.inc();
            let Some(tx) = &self.senders[peer] else {
                return;
            };
            let sent = tx.send(msg).await;
            outbox.sending.set(false);
            if sent.is_err() {
                return;
            }
            if outbox.queue.borrow().len() < self.bound {
                for w in outbox.waiting.take() {
                    w.wake();
                }
            }
        }
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
