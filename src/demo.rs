//! The development demo: a small chat page at `/demo` (two tabs show each other's presence,
//! typing and messages, and the transport in use), with a token endpoint and a "say" endpoint
//! that publishes for the page. They exist only while the built-in development secret is in
//! use, which the configuration allows on loopback addresses only; otherwise every `/demo`
//! path is `404` like any unknown one.
//!
//! The page loads the browser client from `clients/js/dist` of the source tree this binary was
//! built from (`npm run build` there): a development aid, not something to deploy.

use std::rc::Rc;

use bytes::BytesMut;
use glommio::net::TcpStream;

use crate::config::{Config, DEV_SECRET};
use crate::http::{Request, Response};
use crate::shard::Shard;

const PAGE: &str = include_str!("../clients/js/demo/index.html");
const CLIENT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/dist");
/// Everyone on the page is a user of this tenant, in this conversation.
const TENANT: &str = "demo";
const CONVERSATION: &str = "lobby";

pub fn is_demo_path(path: &str) -> bool {
    path == "/demo" || path.starts_with("/demo/")
}

pub fn enabled(config: &Config) -> bool {
    config.auth.hs256_secret == DEV_SECRET
}

/// Whether `req` is the one demo request with a body.
pub fn posts(req: &Request) -> bool {
    req.method == "POST" && req.path == "/demo/say"
}

/// Serves a `/demo` request. `None` when the connection must close without (another) answer.
pub async fn serve(
    shard: &Rc<Shard>,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    req: &Request,
) -> Option<Response> {
    let user = || {
        req.query_param("user")
            .filter(|u| crate::protocol::is_entity_id(u))
    };
    let answer = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/demo") => Response {
            content_type: "text/html; charset=utf-8",
            ..Response::json(200, PAGE.into())
        },
        ("GET", path) if path.starts_with("/demo/client/") => client_file(&path[13..]),
        ("GET", "/demo/token") => match user() {
            Some(user) => token(&shard.config, &user),
            None => bad_user(),
        },
        ("POST", "/demo/say") => {
            let body = match crate::server::body(shard, stream, buf, req, None, &[]).await {
                Ok(body) => body,
                Err(answer) => return answer,
            };
            match user() {
                Some(user) => say(shard, &user, &String::from_utf8_lossy(&body)).await,
                None => bad_user(),
            }
        }
        _ => Response::error(404, "not_found", &req.path),
    };
    Some(answer)
}

fn bad_user() -> Response {
    Response::error(
        400,
        "bad_request",
        "user must match [A-Za-z0-9._~@:-]{1,128}",
    )
}

/// One file of the built client: `index.js` and the modules it imports.
fn client_file(name: &str) -> Response {
    let plain = name
        .strip_suffix(".js")
        .is_some_and(|stem| !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_lowercase()));
    match std::fs::read_to_string(format!("{CLIENT_DIR}/{name}")) {
        Ok(text) if plain => Response {
            content_type: "text/javascript; charset=utf-8",
            ..Response::json(200, text)
        },
        _ => Response::error(
            404,
            "not_found",
            "build the client: cd clients/js && npm run build",
        ),
    }
}

/// A one-hour token for `user` of the demo tenant, signed with the development secret.
fn token(config: &Config, user: &str) -> Response {
    let now_s = crate::auth::now_ms() / 1000;
    match crate::auth::mint_hs256(&config.auth, TENANT, user, 3600, now_s) {
        Ok(token) => Response {
            content_type: "text/plain",
            ..Response::json(200, token)
        },
        Err(e) => Response::error(500, "internal", &e.to_string()),
    }
}

/// Publishes `text` as a `message.received` of `user` in the lobby.
async fn say(shard: &Rc<Shard>, user: &str, text: &str) -> Response {
    let event = serde_json::json!({
        "type": "message.received",
        "conversationId": CONVERSATION,
        "messageId": format!("{user}-{}", crate::auth::now_ms()),
        "userId": user,
        "text": text,
    });
    let body = serde_json::json!({ "tenantId": TENANT, "event": event }).to_string();
    let events = match crate::publish::parse(body.as_bytes()) {
        Ok(events) => events,
        Err(e) => return Response::error(400, "bad_request", &e.to_string()),
    };
    match shard.publish(events).await {
        Ok(_) => Response::json(202, "{\"accepted\":1}".into()),
        Err(e) => Response::error(503, "unavailable", &e.to_string()),
    }
}
