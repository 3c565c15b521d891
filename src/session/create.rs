//! `POST /v1/sessions`: a new session for the token's user, `201 {"sessionId","heartbeatMs"}`.
//! Rate-limited per client IP like `/ws` upgrades (before any token work). The session counts
//! for its user's presence before the answer leaves, and `session.ready` is its first frame.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use tracing::info;

use super::{run, Session};
use crate::client::{self, Client};
use crate::handle::ConnHandle;
use crate::http::{Request, Response};
use crate::protocol::server_event;
use crate::shard::Shard;

pub async fn create(shard: &Rc<Shard>, req: &Request, peer: SocketAddr) -> Response {
    if let Err(refused) = crate::server::admit(shard, peer.ip()).await {
        return refused;
    }
    let identity = match crate::server::identity(shard, req) {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    let config = &shard.config;
    let id = shard.next_id();
    let out = Rc::new(
        ConnHandle::new(
            id,
            shard.conns.tenant_key(identity.tenant),
            identity.user.into(),
            config.limits.outbound_queue_bytes,
            identity.expires_at_ms,
        )
        .retaining(),
    );
    let name = format!("{}-{id:x}", shard.instance);
    let heartbeat_ms = config.heartbeat.interval_ms;
    let ready = server_event::session_ready(&name, &out.user, &out.tenant, heartbeat_ms);
    out.push(crate::ws::text(ready.as_bytes()));
    let mut state = client::State::new(shard, Instant::now());
    Client {
        shard,
        out: &out,
        state: &mut state,
    }
    .join()
    .await;
    info!(session = %name, tenant = %out.tenant, user = %out.user, %peer, core = shard.id, "session created");
    let session = Rc::new(Session::new(name, out, shard.registry.clone()));
    shard.sessions.insert(session.clone(), shard);
    shard.stats().sessions_total.inc();
    let answer = serde_json::json!({ "sessionId": session.name, "heartbeatMs": heartbeat_ms });
    glommio::spawn_local(run(shard.clone(), session, state)).detach();
    Response::json(201, answer.to_string())
}
