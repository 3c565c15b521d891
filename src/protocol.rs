//! The JSON vocabulary of PROTOCOL.md: identifiers, client events (parsed in place with
//! simd-json), server events, error codes and close codes.
//!
//! Invariant: every identifier that leaves this module has passed its ID pattern, so routing keys
//! and JSON built from them never need escaping.

use serde::Deserialize;

/// `tenantId`: `[A-Za-z0-9._-]{1,64}`.
pub fn is_tenant_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `userId`, `conversationId`, `messageId`: `[A-Za-z0-9._~@:-]{1,128}`.
pub fn is_entity_id(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~@:-".contains(&b))
}

/// Error codes carried by `error` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    TokenExpired,
    Forbidden,
    InvalidMessage,
    RateLimited,
    TooManySubscriptions,
    Overloaded,
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// WebSocket close codes used by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    Normal = 1000,
    GoingAway = 1001,
    ProtocolError = 1002,
    InvalidPayload = 1007,
    TooBig = 1009,
    SlowConsumer = 1013,
    TokenExpired = 4001,
    RateLimited = 4008,
    HeartbeatTimeout = 4009,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The reason text sent in the close frame and logged.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal closure",
            CloseCode::GoingAway => "server shutting down",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidPayload => "invalid utf-8",
            CloseCode::TooBig => "message too big",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::TokenExpired => "token expired",
            CloseCode::RateLimited => "message rate limit exceeded",
            CloseCode::HeartbeatTimeout => "heartbeat timeout",
        }
    }
}

/// A client event, borrowing its strings from the frame it was parsed from.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientEvent<'a> {
    Subscribe {
        conversation_id: &'a str,
        since: Option<Since>,
        /// A subscription token (`auth.subscribe_policy = "token"`).
        token: Option<&'a str>,
    },
    Unsubscribe {
        conversation_id: &'a str,
    },
    Ping,
    /// `conversation_id` is `None` when the client leaves it to the server.
    Activity {
        activity: Activity,
        conversation_id: Option<&'a str>,
    },
    PresenceQuery,
    /// The connection's new watch list (`presence.mode = "watch"`).
    Watch {
        user_ids: Vec<&'a str>,
    },
    Auth {
        token: &'a str,
    },
}

/// A subscribe's `since`: the last offset the client saw, in its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Since {
    pub offset: u64,
    /// 0 for a string the server never wrote as an epoch (no conversation's current one).
    pub epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Typing,
    Viewing,
}

/// A parsed client event with its optional request `id`.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub id: Option<&'a str>,
    pub event: ClientEvent<'a>,
}

/// Why a client event was rejected; the `id` is kept when it could be read so the error can
/// carry it.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid<'a> {
    pub id: Option<&'a str>,
    pub message: String,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
    #[serde(borrow)]
    id: Option<&'a str>,
    #[serde(rename = "conversationId", borrow)]
    conversation_id: Option<&'a str>,
    #[serde(borrow)]
    activity: Option<&'a str>,
    #[serde(borrow)]
    token: Option<&'a str>,
    since: Option<simd_json::OwnedValue>,
    #[serde(rename = "userIds", borrow)]
    user_ids: Option<Vec<&'a str>>,
}

/// `since` as PROTOCOL.md gives it: `{"offset":N,"epoch":"E"}`.
fn since(value: &simd_json::OwnedValue) -> Option<Since> {
    use simd_json::prelude::*;
    let offset = value.get("offset")?.as_u64()?;
    let epoch = crate::history::Epoch::parse(value.get("epoch")?.as_str()?).unwrap_or(0);
    Some(Since { offset, epoch })
}

/// Parses one text frame in place (simd-json rewrites `buf`).
pub fn parse_client_event(buf: &mut [u8]) -> Result<Request<'_>, Invalid<'_>> {
    let wire: Wire<'_> = simd_json::serde::from_slice(buf).map_err(|e| Invalid {
        id: None,
        message: format!("malformed JSON: {e}"),
    })?;
    let id = wire.id;
    let invalid = |message: String| Invalid { id, message };
    let optional_conversation = || match wire.conversation_id {
        Some(c) if !is_entity_id(c) => Err(invalid(
            "conversationId does not match [A-Za-z0-9._~@:-]{1,128}".into(),
        )),
        c => Ok(c),
    };
    let conversation =
        || optional_conversation()?.ok_or_else(|| invalid("conversationId is required".into()));
    let event = match wire.kind {
        Some("subscribe") => ClientEvent::Subscribe {
            conversation_id: conversation()?,
            since: match &wire.since {
                None => None,
                Some(value) => Some(since(value).ok_or_else(|| {
                    invalid(
                        "since must be {\"offset\":N,\"epoch\":\"E\"} (N a non-negative integer)"
                            .into(),
                    )
                })?),
            },
            token: wire.token,
        },
        Some("unsubscribe") => ClientEvent::Unsubscribe {
            conversation_id: conversation()?,
        },
        Some("ping") => ClientEvent::Ping,
        Some("presence.activity") => {
            let activity = match wire.activity {
                Some("typing") => Activity::Typing,
                Some("viewing") => Activity::Viewing,
                Some(other) => {
                    return Err(invalid(format!(
                        "unknown activity `{other}` (typing, viewing)"
                    )))
                }
                None => return Err(invalid("activity is required".into())),
            };
            ClientEvent::Activity {
                activity,
                conversation_id: optional_conversation()?,
            }
        }
        Some("presence.query") => ClientEvent::PresenceQuery,
        Some("presence.watch") => match wire.user_ids {
            Some(ids) if ids.iter().all(|u| is_entity_id(u)) => {
                ClientEvent::Watch { user_ids: ids }
            }
            Some(_) => {
                return Err(invalid(
                    "userIds must match [A-Za-z0-9._~@:-]{1,128}".into(),
                ))
            }
            None => return Err(invalid("userIds is required".into())),
        },
        Some("auth") => match wire.token {
            Some(token) if !token.is_empty() => ClientEvent::Auth { token },
            _ => return Err(invalid("token is required".into())),
        },
        Some(other) => return Err(invalid(format!("unknown type `{other}`"))),
        None => return Err(invalid("type is required".into())),
    };
    Ok(Request { id, event })
}

/// Builders for the server's own events. Client-supplied strings are JSON-escaped; IDs that
/// passed their pattern are written as they are.
pub mod server_event {
    use super::ErrorCode;
    use crate::history::Position;

    fn push_str(out: &mut String, s: &str) {
        // Writing a &str into a String cannot fail.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }

    fn with_id(mut out: String, id: Option<&str>) -> String {
        if let Some(id) = id {
            out.push_str(",\"id\":");
            push_str(&mut out, id);
        }
        out.push('}');
        out
    }

    pub fn ack(id: &str) -> String {
        with_id("{\"type\":\"ack\"".into(), Some(id))
    }

    /// The ack of a subscribe: `{"type":"ack","id":..,"offset":N,"epoch":"E","recovered":b}`,
    /// position and outcome where there are.
    pub fn subscribed(id: &str, at: Option<Position>, recovered: Option<bool>) -> String {
        let mut out = with_id("{\"type\":\"ack\"".into(), Some(id));
        out.pop();
        if let Some(at) = at {
            let epoch = crate::history::Epoch(at.epoch);
            out.push_str(&format!(",\"offset\":{},\"epoch\":\"{epoch}\"", at.offset));
        }
        if let Some(recovered) = recovered {
            out.push_str(&format!(",\"recovered\":{recovered}"));
        }
        out.push('}');
        out
    }

    pub fn pong(id: Option<&str>) -> String {
        with_id("{\"type\":\"pong\"".into(), id)
    }

    pub fn error(code: ErrorCode, message: &str, id: Option<&str>) -> String {
        let mut out = format!(
            "{{\"type\":\"error\",\"code\":\"{}\",\"message\":",
            code.as_str()
        );
        push_str(&mut out, message);
        with_id(out, id)
    }

    /// `error{code:"token_expired"}`, sent before a connection or session ends for it;
    /// `then` tells the client what to do next.
    pub fn token_expired(then: &str) -> String {
        error(
            ErrorCode::TokenExpired,
            &format!("the token expired; {then}"),
            None,
        )
    }

    pub fn presence(kind: &str, user: &str) -> String {
        format!("{{\"type\":\"presence.{kind}\",\"userId\":\"{user}\"}}")
    }

    pub fn typing(user: &str, conversation: &str) -> String {
        format!("{{\"type\":\"presence.typing\",\"userId\":\"{user}\",\"conversationId\":\"{conversation}\"}}")
    }

    /// `presence.snapshot`; it answers a request, so it carries the request's `id` if any.
    pub fn snapshot<'a>(users: impl Iterator<Item = &'a str>, id: Option<&str>) -> String {
        let mut out = String::from("{\"type\":\"presence.snapshot\",\"userIds\":[");
        for (i, user) in users.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(user);
            out.push('"');
        }
        out.push(']');
        with_id(out, id)
    }

    pub fn session_ready(
        connection_id: &str,
        user: &str,
        tenant: &str,
        heartbeat_ms: u64,
    ) -> String {
        format!(
            "{{\"type\":\"session.ready\",\"connectionId\":\"{connection_id}\",\"userId\":\"{user}\",\
             \"tenantId\":\"{tenant}\",\"heartbeatMs\":{heartbeat_ms}}}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<String, String> {
        let mut buf = s.as_bytes().to_vec();
        match parse_client_event(&mut buf) {
            Ok(r) => Ok(format!("{:?}", r)),
            Err(e) => Err(format!("{:?} {}", e.id, e.message)),
        }
    }

    #[test]
    fn ids_follow_their_patterns() {
        assert!(is_tenant_id("acme.io_1-x"));
        assert!(!is_tenant_id("a:b") && !is_tenant_id("") && !is_tenant_id(&"a".repeat(65)));
        assert!(is_entity_id("user@x.io:1~a") && is_entity_id(&"a".repeat(128)));
        assert!(
            !is_entity_id("a b")
                && !is_entity_id("")
                && !is_entity_id(&"a".repeat(129))
                && !is_entity_id("é")
        );
    }

    #[test]
    fn parses_client_events() {
        assert_eq!(
            parse(r#"{"type":"subscribe","conversationId":"c1","id":"r1","extra":[1]}"#).unwrap(),
            r#"Request { id: Some("r1"), event: Subscribe { conversation_id: "c1", since: None, token: None } }"#
        );
        assert!(parse(
            r#"{"type":"subscribe","conversationId":"c1","since":{"offset":7,"epoch":"e1"}}"#
        )
        .unwrap()
        .contains(r#"since: Some(Since { offset: 7, epoch: 225 })"#));
        assert!(
            parse(r#"{"type":"unsubscribe","conversationId":"c\u0031"}"#)
                .unwrap()
                .contains("\"c1\"")
        );
        assert_eq!(
            parse(r#"{"type":"ping"}"#).unwrap(),
            "Request { id: None, event: Ping }"
        );
    }

    #[test]
    fn rejects_bad_events_keeping_the_id() {
        assert!(parse("{not json").unwrap_err().contains("malformed JSON"));
        assert!(parse("[1,2]").unwrap_err().contains("malformed JSON"));
        assert_eq!(
            parse(r#"{"type":"dance","id":"7"}"#).unwrap_err(),
            "Some(\"7\") unknown type `dance`"
        );
        assert!(parse(r#"{"type":"subscribe","id":"8"}"#)
            .unwrap_err()
            .starts_with("Some(\"8\") conversationId is required"));
        assert!(parse(r#"{"type":"subscribe","conversationId":"a b"}"#)
            .unwrap_err()
            .contains("does not match"));
        for since in [
            r#"{"offset":-1,"epoch":"e"}"#,
            r#"{"offset":1}"#,
            r#"{"offset":1,"epoch":2}"#,
            "3",
        ] {
            let event =
                format!(r#"{{"type":"subscribe","conversationId":"c","id":"s","since":{since}}}"#);
            let e = parse(&event).unwrap_err();
            assert!(e.starts_with("Some(\"s\") since must be"), "{since}: {e}");
        }
        assert!(
            parse(r#"{"type":"presence.watch","userIds":["u1","a b"],"id":"w"}"#)
                .unwrap_err()
                .starts_with("Some(\"w\") userIds must match")
        );
        assert!(parse(r#"{"type":"presence.watch"}"#)
            .unwrap_err()
            .contains("userIds is required"));
        assert_eq!(
            parse(r#"{"type":"presence.watch","userIds":["u1","u2"]}"#).unwrap(),
            r#"Request { id: None, event: Watch { user_ids: ["u1", "u2"] } }"#
        );
        assert!(parse(r#"{"id":"9"}"#)
            .unwrap_err()
            .contains("type is required"));
        assert!(parse(r#"{"type":5}"#)
            .unwrap_err()
            .contains("malformed JSON"));
    }

    #[test]
    fn server_events_are_valid_json() {
        let e = server_event::error(ErrorCode::InvalidMessage, "bad \"x\"", Some("q\"1"));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["code"], "invalid_message");
        assert_eq!(v["id"], "q\"1");
        assert_eq!(v["message"], "bad \"x\"");
        let v: serde_json::Value = serde_json::from_str(&server_event::pong(None)).unwrap();
        assert_eq!(v, serde_json::json!({"type":"pong"}));
        let v: serde_json::Value =
            serde_json::from_str(&server_event::session_ready("c-1", "u", "t", 5)).unwrap();
        assert_eq!(v["heartbeatMs"], 5);
        assert_eq!(v["type"], "session.ready");
    }
}
