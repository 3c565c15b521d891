//! The publish API body: `{"tenantId":..,"event":{..}}` or `{"tenantId":..,"events":[..]}`.
//!
//! Invariant: each event's JSON bytes are kept exactly as the publisher sent them (serde_json
//! `RawValue`) and framed once; only the fields needed to route and validate are read.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::{is_entity_id, is_tenant_id};
use crate::route::{room_key, RoomKey};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body<'a> {
    #[serde(rename = "tenantId", borrow)]
    tenant_id: Cow<'a, str>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
    #[serde(borrow)]
    events: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct EventHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "conversationId", borrow)]
    conversation_id: Option<Cow<'a, str>>,
    #[serde(rename = "messageId", borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(rename = "userId", borrow)]
    user_id: Option<Cow<'a, str>>,
    /// Reserved for the server (missed-event recovery), whatever their value, `null` too.
    #[serde(default)]
    offset: Present,
    #[serde(default)]
    epoch: Present,
}

/// Whether a field was there at all.
#[derive(Default)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Present(true))
    }
}

/// One event ready to route: its room and the publisher's bytes, framed once by the room's
/// owner (with its offset, when history is on).
pub struct Routed {
    pub room: RoomKey,
    pub payload: Bytes,
}

/// Why a publish body was refused: the sentence of the `400` answer.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("bad body: {0}")]
    Json(serde_json::Error),
    #[error("tenantId does not match [A-Za-z0-9._-]{{1,64}}")]
    TenantId,
    #[error("events is empty")]
    NoEvents,
    #[error("give exactly one of event or events")]
    EventOrEvents,
    #[error("event {index}: {error}")]
    Event { index: usize, error: EventError },
}

/// Why one event was refused, from the publish API or from Redis.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("not UTF-8")]
    Utf8,
    #[error("not an event object with a string type: {0}")]
    NotAnEvent(serde_json::Error),
    #[error("{0} does not match [A-Za-z0-9._~@:-]{{1,128}}")]
    BadId(&'static str),
    #[error("{kind} needs {field}")]
    Missing { kind: String, field: &'static str },
    #[error(
        "type `{0}` cannot be published (conversation.updated, message.received, draft.locked)"
    )]
    Type(String),
    #[error("conversationId `{0}` is not the channel's conversation")]
    OtherConversation(String),
    #[error("`{0}` is reserved for the server (missed-event recovery)")]
    Reserved(&'static str),
}

/// Validates a publish body.
pub fn parse(body: &[u8]) -> Result<Vec<Routed>, BodyError> {
    let body: Body<'_> = serde_json::from_slice(body).map_err(BodyError::Json)?;
    if !is_tenant_id(&body.tenant_id) {
        return Err(BodyError::TenantId);
    }
    let events = match (body.event, body.events) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() => many,
        (None, Some(_)) => return Err(BodyError::NoEvents),
        _ => return Err(BodyError::EventOrEvents),
    };
    events
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            let head = head(raw.get()).map_err(|error| BodyError::Event { index, error })?;
            let conversation =
                published(&head, false).map_err(|error| BodyError::Event { index, error })?;
            Ok(Routed {
                room: room_key(&body.tenant_id, conversation),
                payload: Bytes::copy_from_slice(raw.get().as_bytes()),
            })
        })
        .collect()
}

/// What a message on a conversation's Redis channel is, once checked.
#[derive(Debug, PartialEq, Eq)]
pub enum FromRedis {
    /// A published event.
    Event,
    /// A `presence.typing` of this user, forwarded by an instance.
    Typing(Arc<str>),
}

/// Checks a payload that arrived on the Redis channel of `conversation` as strictly as the
/// publish API checks an event: anyone who can reach Redis can `PUBLISH` there, and what is
/// let through reaches every subscriber's browser. `positioned`: the payload ends with the
/// place in its stream that the history script appended (`offset`, `epoch` are then allowed).
pub fn check_pushed(
    payload: &[u8],
    conversation: &str,
    positioned: bool,
) -> Result<FromRedis, EventError> {
    let text = std::str::from_utf8(payload).map_err(|_| EventError::Utf8)?;
    let head = head(text)?;
    let pushed = match &*head.kind {
        "presence.typing" => {
            FromRedis::Typing(required("userId", &head.kind, &head.user_id)?.into())
        }
        _ => {
            published(&head, positioned)?;
            FromRedis::Event
        }
    };
    let own = required("conversationId", &head.kind, &head.conversation_id)?;
    if own != conversation {
        return Err(EventError::OtherConversation(own.into()));
    }
    Ok(pushed)
}

fn head(event: &str) -> Result<EventHead<'_>, EventError> {
    serde_json::from_str(event).map_err(EventError::NotAnEvent)
}

/// Checks a published event's type and fields (the server's `offset` and `epoch` only where
/// it `positioned` the event); returns its conversation.
fn published<'a>(head: &'a EventHead<'_>, positioned: bool) -> Result<&'a str, EventError> {
    let kind = &head.kind;
    match &**kind {
        "conversation.updated" => {}
        "message.received" => {
            required("messageId", kind, &head.message_id)?;
        }
        "draft.locked" => {
            required("userId", kind, &head.user_id)?;
        }
        other => return Err(EventError::Type(other.into())),
    }
    for (field, present) in [("offset", &head.offset), ("epoch", &head.epoch)] {
        if present.0 && !positioned {
            return Err(EventError::Reserved(field));
        }
    }
    required("conversationId", kind, &head.conversation_id)
}

/// The ID field `field` of an event of type `kind`: present and matching the ID pattern.
fn required<'a>(
    field: &'static str,
    kind: &str,
    value: &'a Option<Cow<'_, str>>,
) -> Result<&'a str, EventError> {
    match value {
        Some(v) if is_entity_id(v) => Ok(v),
        Some(_) => Err(EventError::BadId(field)),
        None => Err(EventError::Missing {
            kind: kind.into(),
            field,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_publishers_bytes() {
        let body = br#"{"tenantId":"t1","event":{ "type" : "message.received","conversationId":"c1","messageId":"m1","x":[1, 2]}}"#;
        let routed = parse(body).unwrap();
        assert_eq!(routed.len(), 1);
        assert_eq!(&*routed[0].room, "t1:c:c1");
        assert_eq!(
            &routed[0].payload[..],
            br#"{ "type" : "message.received","conversationId":"c1","messageId":"m1","x":[1, 2]}"#
        );
    }

    #[test]
    fn accepts_batches_in_order() {
        let body = br#"{"tenantId":"t1","events":[{"type":"conversation.updated","conversationId":"a"},{"type":"draft.locked","conversationId":"b","userId":"u"}]}"#;
        let rooms: Vec<String> = parse(body)
            .unwrap()
            .iter()
            .map(|r| r.room.to_string())
            .collect();
        assert_eq!(rooms, ["t1:c:a", "t1:c:b"]);
    }

    #[test]
    fn rejects_bad_bodies_with_a_reason() {
        let bad = [
            (r#"{"tenantId":"t1","events":[]}"#, "empty"),
            (
                r#"{"tenantId":"t 1","event":{"type":"conversation.updated","conversationId":"a"}}"#,
                "tenantId",
            ),
            (r#"{"tenantId":"t1"}"#, "exactly one"),
            (
                r#"{"tenantId":"t1","event":{"type":"presence.online","conversationId":"a"}}"#,
                "cannot be published",
            ),
            (
                r#"{"tenantId":"t1","event":{"type":"message.received","conversationId":"a"}}"#,
                "messageId",
            ),
            (
                r#"{"tenantId":"t1","event":{"type":"draft.locked","conversationId":"a"}}"#,
                "userId",
            ),
            (
                r#"{"tenantId":"t1","event":{"type":"conversation.updated"}}"#,
                "conversationId",
            ),
            (
                r#"{"tenantId":"t1","event":{"type":"conversation.updated","conversationId":"a","offset":3}}"#,
                "`offset` is reserved",
            ),
            (
                r#"{"tenantId":"t1","event":{"type":"message.received","conversationId":"a","messageId":"m","epoch":null}}"#,
                "`epoch` is reserved",
            ),
            (
                r#"{"tenantId":"t1","event":{"type":"conversation.updated","conversationId":"a b"}}"#,
                "conversationId",
            ),
            (r#"{"tenantId":"t1","event":[1]}"#, "event 0"),
            (r#"{"tenantId":"t1","event":{},"extra":1}"#, "unknown field"),
            ("not json", "bad body"),
        ];
        for (body, reason) in bad {
            let e = parse(body.as_bytes())
                .err()
                .unwrap_or_else(|| panic!("{body} was accepted"));
            assert!(e.to_string().contains(reason), "{body}: {e}");
        }
    }

    #[test]
    fn checks_what_redis_hands_over_like_a_publish() {
        let typing = crate::protocol::server_event::typing("u1", "c1");
        assert_eq!(
            check_pushed(typing.as_bytes(), "c1", false).unwrap(),
            FromRedis::Typing("u1".into())
        );
        let event = br#"{"type":"message.received","conversationId":"c1","messageId":"m1"}"#;
        assert_eq!(check_pushed(event, "c1", false).unwrap(), FromRedis::Event);
        let bad: [(&[u8], &str); 7] = [
            (
                b"{\"type\":\"conversation.updated\",\"conversationId\":\"c1\",\"x\":\"\xff\"}",
                "UTF-8",
            ),
            (b"not json", "not an event"),
            (
                br#"{"type":"conversation.updated","conversationId":"c1"} trailing"#,
                "not an event",
            ),
            (
                br#"{"type":"presence.online","conversationId":"c1","userId":"u"}"#,
                "cannot be published",
            ),
            (
                br#"{"type":"conversation.updated","conversationId":"c2"}"#,
                "channel's conversation",
            ),
            (
                br#"{"type":"presence.typing","conversationId":"c1","userId":"a b"}"#,
                "userId",
            ),
            (
                br#"{"type":"conversation.updated","conversationId":"c1","offset":1}"#,
                "reserved",
            ),
        ];
        for (payload, reason) in bad {
            let e = check_pushed(payload, "c1", false).expect_err(reason);
            assert!(e.to_string().contains(reason), "{e}");
        }
    }
}
