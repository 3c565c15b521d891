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

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use glommio::channels::channel_mesh::Senders;
use glommio::{GlommioError, ResourceType};

use crate::handle::Kind;
use crate::metrics::Registry;
use crate::presence::UserKey;
use crate::route::{Map, RoomKey, Set};

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
    /// Answer `Reply { req }` to `from` once everything `from` sent before is handled.
    Sync {
        from: usize,
        req: u64,
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
    /// No answer in time (the broker could not confirm, or a core did not answer).
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

    /// The value, or `Unavailable` if it is not set within `limit`.
    pub async fn wait_at_most(&self, limit: Duration) -> Verdict {
        crate::deadline::within(limit, self.wait())
            .await
            .unwrap_or(Verdict::Unavailable)
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

/// This core's end of the mesh.
pub struct Mesh {
    senders: Senders<Message>,
    outboxes: Box<[Outbox]>,
    bound: usize,
}

impl Mesh {
    /// `bound`: the most messages an outbox holds before deliveries are dropped.
    pub fn new(senders: Senders<Message>, bound: usize) -> Rc<Mesh> {
        let outboxes = (0..senders.nr_consumers())
            .map(|_| Outbox::default())
            .collect();
        Rc::new(Mesh {
            senders,
            outboxes,
            bound: bound.max(1),
        })
    }

    pub fn id(&self) -> usize {
        self.senders.peer_id()
    }

    pub fn cores(&self) -> usize {
        self.senders.nr_consumers()
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
            match self.senders.try_send_to(peer, msg) {
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
            let sent = self.senders.send_to(peer, msg).await;
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
