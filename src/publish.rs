//! The publish API body: `{"tenantId":..,"event":{..}}` or `{"tenantId":..,"events":[..]}`.
//!
//! Invariant: each event's JSON bytes are kept exactly as the publisher sent them (serde_json
//! `RawValue`) and framed once; only the fields needed to route and validate are read.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::{is_entity_id, is_tenant_id};
use crate::route::{room_key, RoomKey};
use crate::ws;

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
}

/// One event ready to route: its room and its frame, built once from the publisher's bytes
/// (`ws::payload_of` gives them back, for Redis).
pub struct Routed {
    pub room: RoomKey,
    pub frame: Bytes,
}

/// Validates a publish body. The error is a sentence for the `400` answer.
pub fn parse(body: &[u8]) -> Result<Vec<Routed>, String> {
    let body: Body<'_> = serde_json::from_slice(body).map_err(|e| format!("bad body: {e}"))?;
    if !is_tenant_id(&body.tenant_id) {
        return Err("tenantId does not match [A-Za-z0-9._-]{1,64}".into());
    }
    let events = match (body.event, body.events) {
        (Some(one), None) => vec![one],
        (None, Some(many)) if !many.is_empty() => many,
        (None, Some(_)) => return Err("events is empty".into()),
        _ => return Err("give exactly one of event or events".into()),
    };
    events
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let conversation = validate(raw).map_err(|e| format!("event {i}: {e}"))?;
            Ok(Routed {
                room: room_key(&body.tenant_id, &conversation),
                frame: ws::text(raw.get().as_bytes()),
            })
        })
        .collect()
}

/// Checks one event and returns its conversation.
fn validate(raw: &RawValue) -> Result<String, String> {
    let head: EventHead<'_> = serde_json::from_str(raw.get())
        .map_err(|e| format!("not an event object with a string type: {e}"))?;
    let required = |name: &str, value: &Option<Cow<'_, str>>| match value {
        Some(v) if is_entity_id(v) => Ok(()),
        Some(_) => Err(format!("{name} does not match [A-Za-z0-9._~@:-]{{1,128}}")),
        None => Err(format!("{} needs {name}", head.kind)),
    };
    match &*head.kind {
        "conversation.updated" => {}
        "message.received" => required("messageId", &head.message_id)?,
        "draft.locked" => required("userId", &head.user_id)?,
        other => {
            return Err(format!(
                "type `{other}` cannot be published (conversation.updated, message.received, draft.locked)"
            ))
        }
    }
    required("conversationId", &head.conversation_id)?;
    Ok(head.conversation_id.unwrap_or_default().into_owned())
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
            ws::payload_of(&routed[0].frame),
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
            assert!(e.contains(reason), "{body}: {e}");
        }
    }
}
