//! `POST /v1/sessions/<id>/events`: one client event, or a non-empty JSON array of them, for
//! the session's task to handle in order (`202`); their answers arrive on the stream. A body
//! that is not JSON, or an empty array: `400` (its size was checked before it was read: `413`).
//! An item that is not a valid client event is answered `invalid_message` on the stream, like
//! a bad WebSocket message.

use serde_json::value::RawValue;

use super::Session;
use crate::http::Response;
use crate::shard::Shard;

pub fn post(shard: &Shard, session: &Session, body: &[u8]) -> Response {
    let events: Vec<Vec<u8>> = match serde_json::from_slice::<&RawValue>(body) {
        Err(e) => return Response::error(400, "bad_request", &format!("body is not JSON: {e}")),
        Ok(raw) if raw.get().starts_with('[') => {
            match serde_json::from_str::<Vec<&RawValue>>(raw.get()) {
                Ok(items) if items.is_empty() => {
                    return Response::error(400, "bad_request", "an empty array of events")
                }
                Ok(items) => items.iter().map(|i| i.get().as_bytes().to_vec()).collect(),
                Err(e) => return Response::error(400, "bad_request", &e.to_string()),
            }
        }
        Ok(raw) => vec![raw.get().as_bytes().to_vec()],
    };
    if session.out.close_code().is_some() {
        return Response::error(404, "not_found", "the session has ended");
    }
    let accepted = events.len();
    if !session.post(events, shard.config.limits.max_publish_bytes) {
        return Response::error(
            429,
            "rate_limited",
            "earlier events of this session are still being handled",
        )
        .with_header("Retry-After", "1");
    }
    Response::json(202, format!("{{\"accepted\":{accepted}}}"))
}
