//! `GET /v1/sessions/<id>/sse`: the session's frames as a `text/event-stream`, one SSE
//! message per frame (`id: <sequence>`, `data: <event JSON>`), a `: keepalive` comment after
//! every `heartbeat.interval_ms` without one. `Last-Event-ID` resumes after that frame (and
//! acknowledges it and every frame before); without it the stream starts with every frame
//! still retained. When frames after the resume point are gone, the stream starts with
//! `error{code:"overloaded"}` (a message without `id`, so the resume point stays).
//!
//! The stream ends when the session's queued frames are all written after its close (the
//! session is then gone), when another reader attaches, or when the client goes away.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io::Write;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::debug;

use super::{Attached, Session, Transport};
use crate::deadline::{on_grid, within};
use crate::handle::Read;
use crate::http::Response;
use crate::shard::Shard;

/// Most frame bytes written in one `send`.
const SSE_BATCH_BYTES: usize = 64 * 1024;

/// Checks a stream's resume point (its `Last-Event-ID`): the cursor to stream after.
pub fn open(
    shard: &Shard,
    session: &Session,
    last_event_id: Option<&str>,
) -> Result<u64, Response> {
    let cursor = match last_event_id {
        None => 0,
        Some(id) => id.parse::<u64>().map_err(|_| {
            Response::error(
                400,
                "bad_request",
                "Last-Event-ID must be an id this stream sent (a non-negative integer)",
            )
        })?,
    };
    session.acknowledge(cursor)?;
    if last_event_id.is_some() {
        shard.stats().session_resumes_total.inc();
    }
    Ok(cursor)
}

/// A session's frames as SSE messages, for a stream attached as `reader`.
pub(super) struct Frames<'a> {
    pub shard: &'a Shard,
    pub session: &'a Session,
    pub reader: Attached<'a>,
    pub cursor: u64,
}

impl Frames<'_> {
    /// The frames after the cursor as SSE messages, once there are some; `None` once the
    /// stream is over (the session ended, or another reader took over).
    pub async fn chunk(&mut self) -> Option<Vec<u8>> {
        match self.reader.read(self.cursor, SSE_BATCH_BYTES).await {
            None => None,
            Some(Read::Closed(_)) => {
                self.shard.sessions.remove(self.session);
                None
            }
            Some(Read::Frames {
                missed,
                frames,
                cursor,
            }) => {
                let mut out = Vec::new();
                if missed {
                    message(&mut out, None, super::missed_events().as_bytes());
                }
                for (seq, frame) in &frames {
                    message(&mut out, Some(*seq), crate::ws::payload_of(frame));
                }
                self.cursor = cursor;
                self.reader.handed(cursor);
                Some(out)
            }
        }
    }
}

/// Where a stream's bytes come from: `None` ends it.
pub(super) trait Source {
    async fn next(&mut self) -> Option<Vec<u8>>;
}

impl Source for Frames<'_> {
    async fn next(&mut self) -> Option<Vec<u8>> {
        // A tick late at most, on the housekeeping's grid: quiet streams cost their core no
        // wake-ups of their own.
        let interval = Duration::from_millis(self.shard.config.heartbeat.interval_ms);
        let quiet = on_grid(interval, self.shard.sweep.tick());
        within(quiet, self.chunk())
            .await
            .unwrap_or_else(|| Some(KEEPALIVE.to_vec()))
    }
}

pub(super) const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// A stream to open on a connection: the session, the cursor it resumes after, and the
/// CORS headers of its answer.
pub struct Stream {
    pub session: Rc<Session>,
    pub cursor: u64,
    pub cors: Vec<(&'static str, String)>,
}

impl Stream {
    /// Streams the session's frames after the cursor on `stream` until the stream ends. The
    /// connection's own task: it carries none of the HTTP state. (Not an `async fn`, for the
    /// reason given at `conn::serve`.)
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn serve(self, shard: Rc<Shard>, mut stream: TcpStream) -> impl Future<Output = ()> {
        async move {
            let Stream {
                session,
                cursor,
                cors,
            } = self;
            let frames = Frames {
                shard: &shard,
                session: &session,
                reader: session.attach(Transport::Sse),
                cursor,
            };
            if pump(&shard, &mut stream, &cors, frames).await == Ended::Client {
                debug!(session = %session.name, "sse stream closed by the client");
            }
        }
    }
}

/// Why a stream ended.
#[derive(PartialEq, Eq)]
pub(super) enum Ended {
    /// Its source ended (or a write failed).
    Source,
    /// The client went away.
    Client,
}

/// Writes an event stream's head, then what `source` gives, until it ends or the client goes
/// away (the client sends nothing on a stream: a read that ends means it left).
pub(super) async fn pump(
    shard: &Shard,
    stream: &mut TcpStream,
    cors: &[(&'static str, String)],
    mut source: impl Source,
) -> Ended {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
         X-Accel-Buffering: no\r\nConnection: close\r\n",
    );
    for (name, value) in cors {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return Ended::Client;
    }
    let stall = Duration::from_millis(shard.config.heartbeat.timeout_ms);
    let stream = RefCell::new(stream);
    let write = async {
        while let Some(bytes) = source.next().await {
            match crate::conn::write_all(&stream, &bytes, stall).await {
                Ok(written) => {
                    let stats = shard.stats();
                    stats.writes_total.inc();
                    stats.bytes_written_total.add(written as u64);
                }
                Err(_) => return Ended::Client,
            }
        }
        Ended::Source
    };
    let gone = async {
        let mut scratch = [0u8; 64];
        let mut read = |cx: &mut std::task::Context<'_>| {
            Pin::new(&mut *stream.borrow_mut()).poll_read(cx, &mut scratch)
        };
        while let Ok(n) = poll_fn(&mut read).await {
            if n == 0 {
                break;
            }
        }
        Ended::Client
    };
    futures_lite::future::or(write, gone).await
}

/// Appends one SSE message. JSON holds line breaks only between tokens; each line becomes its
/// own `data:` line, which the client joins back with `\n`.
fn message(out: &mut Vec<u8>, id: Option<u64>, data: &[u8]) {
    if let Some(id) = id {
        // Writing into a Vec cannot fail.
        let _ = writeln!(out, "id: {id}");
    }
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        out.push(b'\n');
    }
    out.push(b'\n');
}
