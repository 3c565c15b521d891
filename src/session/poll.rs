//! `GET /v1/sessions/<id>/poll?cursor=<n>`: a long-poll. Answers at once when frames after
//! `cursor` are queued, else waits for them up to `fallback.poll_timeout_ms`:
//! `200 {"events":[...],"cursor":<m>}`, where `m` is the cursor of the next poll. `cursor`
//! (0 when absent) acknowledges every frame through it. When events after `cursor` are gone
//! (the queue's bound pushed them out), the events start with `error{code:"overloaded"}`.

use std::future::Future;
use std::time::Duration;

use super::{Session, Transport};
use crate::deadline::within;
use crate::handle::Read;
use crate::http::Response;
use crate::shard::Shard;

/// Most frame bytes one answer carries; the rest waits for the next poll.
const POLL_BATCH_BYTES: usize = 256 * 1024;

/// The poll of `session` from `cursor`. It stops waiting when `gone` resolves (the client
/// closed its connection), so that the session counts as detached from then on.
pub async fn poll(
    shard: &Shard,
    session: &Session,
    cursor: Option<&str>,
    gone: impl Future<Output = ()>,
) -> Response {
    let cursor = match cursor.map(|c| c.parse::<u64>()) {
        None => 0,
        Some(Ok(cursor)) => cursor,
        Some(Err(_)) => {
            return Response::error(400, "bad_request", "cursor must be a non-negative integer")
        }
    };
    match session.acknowledge(cursor) {
        // A poll again from an earlier cursor: its answer was lost.
        Ok(true) => shard.stats().session_resumes_total.inc(),
        Ok(false) => {}
        Err(refused) => return refused,
    }
    let reader = session.attach(Transport::Poll);
    let limit = Duration::from_millis(shard.config.fallback.poll_timeout_ms);
    let read = async { Some(reader.read(cursor, POLL_BATCH_BYTES).await) };
    let left = async {
        gone.await;
        None
    };
    let outcome = within(limit, futures_lite::future::or(read, left)).await;
    let (missed, frames, next) = match outcome.flatten() {
        // Nothing in time, the client left, or another reader took over.
        None | Some(None) => (false, Vec::new(), cursor),
        Some(Some(Read::Frames {
            missed,
            frames,
            cursor,
        })) => (missed, frames, cursor),
        Some(Some(Read::Closed(_))) => {
            shard.sessions.remove(session);
            return Response::error(404, "not_found", "the session has ended");
        }
    };
    reader.handed(next);
    let mut body =
        String::with_capacity(32 + frames.iter().map(|(_, f)| f.len() + 1).sum::<usize>());
    body.push_str("{\"events\":[");
    if missed {
        body.push_str(&super::missed_events());
    }
    for (i, (_, frame)) in frames.iter().enumerate() {
        if i > 0 || missed {
            body.push(',');
        }
        body.push_str(&String::from_utf8_lossy(crate::ws::payload_of(frame)));
    }
    body.push_str("],\"cursor\":");
    body.push_str(&next.to_string());
    body.push('}');
    Response::json(200, body)
}
