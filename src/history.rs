//! Missed-event recovery on a conversation's owner core: its epoch, its offset sequence and the
//! ring of its last `history.size` delivered frames, from which a reconnecting client is
//! replayed what it missed.
//!
//! Invariants: pure bookkeeping on one core (`Shard` drives it): no mesh, no await. A
//! conversation's offsets are 1, 2, 3, … in the order its owner appended them; the ring holds
//! the frames of the latest offsets, exactly as they were delivered (the same `Bytes`), so that
//! a replay costs a refcount bump per event. A stream is created with a new epoch, keeps its
//! events `history.ttl_ms` after the last one, and its epoch and offset as long as the
//! conversation has subscribers or that long, whichever is later. An epoch is the creation
//! time in microseconds (strictly increasing on a core), so a conversation never sees one twice.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::route::{Map, RoomKey};

/// A place in a conversation's stream: the offset of its latest event (0: none) in an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// An epoch as clients see it: lowercase hex, at most 16 characters.
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

impl Epoch {
    /// The epoch a client sent back; `None` for anything the server never wrote. (No epoch is
    /// 0, so 0 stands for those: never the current epoch of a conversation.)
    pub fn parse(s: &str) -> Option<u64> {
        let v = u64::from_str_radix(s, 16).ok()?;
        (Epoch(v).to_string() == s).then_some(v)
    }
}

/// Why the events after a point cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The point is of another epoch: the history it belongs to may have been lost.
    Epoch,
    /// The point is beyond the latest offset (a history lost and rebuilt, or a made-up point).
    Ahead,
    /// Some events after the point are no longer kept.
    Trimmed,
}

impl Miss {
    pub fn as_str(self) -> &'static str {
        match self {
            Miss::Epoch => "epoch",
            Miss::Ahead => "ahead",
            Miss::Trimmed => "trimmed",
        }
    }
}

/// The answer to "what came after `since`": the current position, and every frame after
/// `since` in order, or why not.
#[derive(Debug, Clone)]
pub struct Read {
    pub at: Position,
    pub events: Result<Vec<Bytes>, Miss>,
}

struct Stream {
    at: Position,
    /// The frames of offsets `at.offset - len + 1 ..= at.offset`.
    events: VecDeque<Bytes>,
    /// The last event's time, or the creation's.
    touched: Instant,
}

/// What came after `since` in a stream at `at` that keeps the frames `kept` (the last one at
/// `at.offset`).
pub fn read_kept<'a>(
    at: Position,
    kept: impl ExactSizeIterator<Item = &'a Bytes>,
    since: Position,
) -> Read {
    let kept_from = at.offset + 1 - kept.len() as u64;
    let events = if since.epoch != at.epoch {
        Err(Miss::Epoch)
    } else if since.offset > at.offset {
        Err(Miss::Ahead)
    } else if since.offset + 1 < kept_from {
        Err(Miss::Trimmed)
    } else {
        let skip = (since.offset + 1 - kept_from) as usize;
        Ok(kept.skip(skip).cloned().collect())
    };
    Read { at, events }
}

impl Stream {
    fn read(&self, since: Position) -> Read {
        read_kept(self.at, self.events.iter(), since)
    }

    fn keep(&mut self, frame: Bytes, size: usize) {
        if self.events.len() == size {
            self.events.pop_front();
        }
        self.events.push_back(frame);
    }
}

/// The streams of the conversations this core owns: their source with the memory broker, a hot
/// cache of what Redis delivered with the Redis broker (where the history lives).
pub struct History {
    size: usize,
    ttl: Duration,
    /// Whether this is the source (memory broker): streams are made here, never missing.
    source: bool,
    streams: Map<RoomKey, Stream>,
    last_epoch: u64,
}

impl History {
    pub fn new(size: usize, ttl: Duration, source: bool) -> History {
        History {
            size,
            ttl,
            source,
            streams: Map::default(),
            last_epoch: 0,
        }
    }

    /// Whether history is on (`history.size` > 0).
    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// `room`'s stream; made with a new epoch where this is the source.
    fn stream(&mut self, room: &RoomKey, now: Instant) -> Option<&mut Stream> {
        let ttl = self.ttl;
        let expired = |s: &Stream| now.duration_since(s.touched) >= ttl;
        if self.source && self.streams.get(room).is_some_and(expired) {
            // Expired, not swept yet: gone all the same, and a new epoch says so.
            self.streams.remove(room);
        }
        if self.source && !self.streams.contains_key(room) {
            let micros = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            self.last_epoch = micros.max(self.last_epoch + 1);
            let stream = Stream {
                at: Position {
                    epoch: self.last_epoch,
                    offset: 0,
                },
                events: VecDeque::new(),
                touched: now,
            };
            self.streams.insert(room.clone(), stream);
        }
        let stream = self.streams.get_mut(room)?;
        if expired(stream) && !stream.events.is_empty() {
            stream.events = VecDeque::new();
        }
        Some(stream)
    }

    /// The source's: gives the next offset to `payload` (a published event's JSON) and keeps
    /// its frame, the payload with `"offset":N` appended before its closing brace (and
    /// `"epoch":"E"` after it on an epoch's first event).
    pub fn append(&mut self, room: &RoomKey, payload: &[u8], now: Instant) -> (Bytes, Position) {
        let size = self.size;
        let Some(stream) = self.stream(room, now) else {
            unreachable!("the source makes every stream");
        };
        stream.at.offset += 1;
        stream.touched = now;
        let frame = offset_frame(payload, stream.at);
        stream.keep(frame.clone(), size);
        (frame, stream.at)
    }

    /// Where `room`'s stream is now: a new epoch at offset 0 where this is the source and it
    /// has none; `None` in a cache that has not been told ([`History::start`]).
    pub fn position(&mut self, room: &RoomKey, now: Instant) -> Option<Position> {
        self.stream(room, now).map(|s| s.at)
    }

    /// The frames after `since`, when `since` is of the current epoch, not beyond the latest
    /// offset and every event after it is still kept. A cache answers `None` where the
    /// history may hold what it does not: it was not told where the stream is, or it keeps
    /// fewer events than the history does.
    pub fn read(&mut self, room: &RoomKey, since: Position, now: Instant) -> Option<Read> {
        let (size, source) = (self.size, self.source);
        let stream = self.stream(room, now)?;
        let read = stream.read(since);
        let partial = stream.events.len() < size.min(stream.at.offset as usize);
        match read.events {
            Err(Miss::Trimmed) if !source && partial => None,
            _ => Some(read),
        }
    }

    /// The cache's: where `room`'s stream is, with its last `frames`, as read from the history
    /// at a point in the order of its deliveries. What the cache holds up to the same point is
    /// kept when it is more (a room that was left and joined again, with nothing published).
    pub fn start(&mut self, room: &RoomKey, at: Position, frames: Vec<Bytes>, now: Instant) {
        if let Some(held) = self.streams.get_mut(room) {
            if held.at == at && held.events.len() >= frames.len() {
                return;
            }
        }
        let stream = Stream {
            at,
            events: frames.into(),
            touched: now,
        };
        self.streams.insert(room.clone(), stream);
    }

    /// The cache's: `frame`, delivered with `offset` (and `epoch`, on an epoch's first event);
    /// its place in the stream, if the cache knows the epoch. A frame that does not follow the
    /// last one (frames were lost on the way) leaves the cache with it alone.
    pub fn observe(
        &mut self,
        room: &RoomKey,
        frame: &Bytes,
        offset: u64,
        epoch: Option<u64>,
        now: Instant,
    ) -> Option<Position> {
        let size = self.size;
        if let Some(epoch) = epoch {
            let at = Position { epoch, offset };
            self.start(room, at, vec![frame.clone()], now);
            return Some(at);
        }
        let stream = self.stream(room, now)?;
        if offset != stream.at.offset + 1 {
            stream.events.clear();
        }
        stream.at.offset = offset;
        stream.touched = now;
        stream.keep(frame.clone(), size);
        Some(stream.at)
    }

    /// The cache's: forgets everything (deliveries may have been lost).
    pub fn clear(&mut self) {
        self.streams = Map::default();
    }

    /// Releases the streams idle for `history.ttl_ms`. A cache keeps the position of those
    /// whose conversation has subscribers (`owned`), as Redis may still keep it.
    pub fn sweep(&mut self, now: Instant, owned: impl Fn(&RoomKey) -> bool) {
        let (ttl, source) = (self.ttl, self.source);
        self.streams.retain(|room, stream| {
            if now.duration_since(stream.touched) < ttl {
                return true;
            }
            stream.events = VecDeque::new();
            !source && owned(room)
        });
    }
}

/// The place in its stream that the server appended to a delivered event: `(offset, epoch)`
/// from its last `,"offset":N}` or `,"offset":1,"epoch":"E"}`.
pub fn position_of(payload: &[u8]) -> Option<(u64, Option<u64>)> {
    // Only the tail is read (the field is at most ~50 bytes): no pass over the event's bytes.
    let marker = b",\"offset\":";
    let from = payload.len().saturating_sub(96);
    let at = from
        + payload[from..]
            .windows(marker.len())
            .rposition(|w| w == marker)?;
    let text = std::str::from_utf8(&payload[at + marker.len()..])
        .ok()?
        .trim_end();
    let rest = text.strip_suffix('}')?;
    let (offset, epoch) = match rest.split_once(",\"epoch\":\"") {
        Some((offset, epoch)) => (offset, Some(Epoch::parse(epoch.strip_suffix('"')?)?)),
        None => (rest, None),
    };
    let offset: u64 = offset.parse().ok()?;
    (offset > 0 && (offset == 1) == epoch.is_some()).then_some((offset, epoch))
}

/// A published event's frame with its place in the stream appended before the closing brace.
fn offset_frame(payload: &[u8], at: Position) -> Bytes {
    // A published event is a JSON object: it has a closing brace, after which only spaces.
    let brace = payload
        .iter()
        .rposition(|&b| b == b'}')
        .unwrap_or(payload.len());
    let field = match at.offset {
        1 => format!(",\"offset\":1,\"epoch\":\"{}\"", Epoch(at.epoch)),
        n => format!(",\"offset\":{n}"),
    };
    crate::ws::frame_of(
        crate::ws::OP_TEXT,
        &[&payload[..brace], field.as_bytes(), &payload[brace..]],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::payload_of;

    fn room() -> RoomKey {
        "t1:c:c1".into()
    }

    fn texts(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| String::from_utf8(payload_of(f).to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn offsets_are_appended_and_the_first_names_the_epoch() {
        let mut h = History::new(3, Duration::from_secs(60), true);
        let now = Instant::now();
        let (first, at) = h.append(
            &room(),
            br#"{"type":"conversation.updated","x":{"a":1}} "#,
            now,
        );
        let epoch = Epoch(at.epoch).to_string();
        assert_eq!(
            texts(&[first]),
            [format!(
                r#"{{"type":"conversation.updated","x":{{"a":1}},"offset":1,"epoch":"{epoch}"}} "#
            )]
        );
        let (second, at) = h.append(&room(), br#"{"type":"conversation.updated"}"#, now);
        assert_eq!(at.offset, 2);
        assert_eq!(
            texts(&[second]),
            [r#"{"type":"conversation.updated","offset":2}"#]
        );
        assert_eq!(Epoch::parse(&epoch), Some(at.epoch));
        assert_eq!(Epoch::parse(&format!("0{epoch}")), None, "not as written");
        assert_eq!(Epoch::parse("zz"), None);
    }

    #[test]
    fn reads_what_is_kept_and_says_why_not_otherwise() {
        let mut h = History::new(3, Duration::from_secs(60), true);
        let now = Instant::now();
        let epoch = h.position(&room(), now).unwrap().epoch;
        for i in 1..=5 {
            h.append(&room(), format!(r#"{{"i":{i}}}"#).as_bytes(), now);
        }
        let since = |offset| Position { epoch, offset };
        let read = h.read(&room(), since(2), now).unwrap();
        assert_eq!(read.at, since(5));
        assert_eq!(
            texts(&read.events.unwrap()),
            [
                r#"{"i":3,"offset":3}"#,
                r#"{"i":4,"offset":4}"#,
                r#"{"i":5,"offset":5}"#
            ],
            "exactly size missed events are still there"
        );
        assert_eq!(
            h.read(&room(), since(5), now)
                .unwrap()
                .events
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            h.read(&room(), since(1), now).unwrap().events.unwrap_err(),
            Miss::Trimmed
        );
        assert_eq!(
            h.read(&room(), since(6), now).unwrap().events.unwrap_err(),
            Miss::Ahead
        );
        let other = Position {
            epoch: epoch + 1,
            offset: 5,
        };
        assert_eq!(
            h.read(&room(), other, now).unwrap().events.unwrap_err(),
            Miss::Epoch
        );
    }

    #[test]
    fn idle_streams_are_released_with_their_epoch() {
        let ttl = Duration::from_millis(100);
        let mut h = History::new(10, ttl, true);
        let now = Instant::now();
        let (_, at) = h.append(&room(), b"{}", now);
        h.sweep(now + ttl / 2, |_| true);
        let kept = h.read(&room(), Position { offset: 0, ..at }, now + ttl / 2);
        assert_eq!(kept.unwrap().events.unwrap().len(), 1);
        // Expired: a new epoch, swept or not.
        let late = h.position(&room(), now + ttl).unwrap();
        assert!(late.epoch > at.epoch && late.offset == 0, "{late:?}");
        h.sweep(now + ttl * 3, |_| true);
        assert!(
            h.streams.is_empty(),
            "subscribers keep nothing of the source's"
        );
    }

    #[test]
    fn a_cache_follows_deliveries_and_defers_to_the_history_it_lacks() {
        let mut h = History::new(3, Duration::from_secs(60), false);
        let now = Instant::now();
        let frame = |i: u64| Bytes::from(format!("{i}"));
        let at = |offset| Position { epoch: 7, offset };
        assert!(
            h.position(&room(), now).is_none(),
            "a cache makes no stream"
        );
        assert!(h.observe(&room(), &frame(4), 4, None, now).is_none());
        h.start(&room(), at(4), vec![frame(4)], now);
        assert_eq!(h.observe(&room(), &frame(5), 5, None, now), Some(at(5)));
        let read = h.read(&room(), at(3), now).unwrap();
        assert_eq!(read.events.unwrap(), [frame(4), frame(5)]);
        assert!(
            h.read(&room(), at(2), now).is_none(),
            "the history keeps 3, the cache 2"
        );
        assert_eq!(
            h.read(&room(), at(6), now).unwrap().events.unwrap_err(),
            Miss::Ahead
        );
        // A gap: the cache keeps what follows it only.
        h.observe(&room(), &frame(8), 8, None, now);
        assert!(h.read(&room(), at(5), now).is_none());
        // A new epoch, in band.
        let first = h.observe(&room(), &frame(1), 1, Some(9), now);
        assert_eq!(
            first,
            Some(Position {
                epoch: 9,
                offset: 1
            })
        );
        h.observe(&room(), &frame(2), 2, None, now);
        h.observe(&room(), &frame(3), 3, None, now);
        h.observe(&room(), &frame(4), 4, None, now);
        let full = h
            .read(
                &room(),
                Position {
                    epoch: 9,
                    offset: 0,
                },
                now,
            )
            .unwrap();
        assert_eq!(
            full.events.unwrap_err(),
            Miss::Trimmed,
            "the cache is full: so is the history"
        );
    }

    #[test]
    fn reads_the_position_the_server_appended() {
        let mut h = History::new(3, Duration::from_secs(60), true);
        let now = Instant::now();
        let (first, at) = h.append(&room(), br#"{"a":",\"offset\":9"}"#, now);
        assert_eq!(position_of(payload_of(&first)), Some((1, Some(at.epoch))));
        let (second, _) = h.append(&room(), br#"{"a":1} "#, now);
        assert_eq!(position_of(payload_of(&second)), Some((2, None)));
        for bare in [
            &br#"{"type":"conversation.updated"}"#[..],
            br#"{"offset":2,"epoch":"a"}"#,
            br#"{"x":1,"offset":1}"#,
            b"\xff",
        ] {
            assert_eq!(position_of(bare), None, "{bare:?}");
        }
    }
}
