//! `presence.query` and `presence.watch`: the users a client sees online, answered from this
//! core's replica as `presence.snapshot` (a query's carries the request's id; no separate ack).
//! In `tenant` mode that is the tenant's online users, cluster-wide; in `watch` mode the
//! online ones of the client's watch list, which `presence.watch` replaces (acked, then its
//! snapshot) and which alone decides the presence changes it is sent.

use std::sync::Arc;

use super::Client;
use crate::config::PresenceMode;
use crate::protocol::{server_event, ErrorCode};

pub(super) fn query(client: &Client<'_>, id: Option<&str>) {
    let tenant = &client.out.tenant;
    let users = match client.shard.config.presence.mode {
        PresenceMode::Tenant => client.shard.users.online_users(tenant),
        PresenceMode::Watch => watched_online(client),
    };
    client.push(&server_event::snapshot(users.iter().map(|u| &**u), id));
}

pub(super) fn watch(client: &mut Client<'_>, users: &[&str], id: Option<&str>) {
    let presence = &client.shard.config.presence;
    if presence.mode != PresenceMode::Watch {
        let message = "presence.watch needs presence.mode = \"watch\"";
        return client.error(ErrorCode::InvalidMessage, message, id);
    }
    let mut wanted: Vec<Arc<str>> = users.iter().map(|u| Arc::from(*u)).collect();
    wanted.sort_unstable();
    wanted.dedup();
    if wanted.len() > presence.max_watch {
        let message = format!("at most {} users in a watch list", presence.max_watch);
        return client.error(ErrorCode::InvalidMessage, &message, id);
    }
    let conns = &client.shard.conns;
    let held = std::mem::take(&mut client.state.watching);
    for user in held.iter().filter(|u| wanted.binary_search(u).is_err()) {
        conns.unwatch(client.out, user);
    }
    for user in wanted.iter().filter(|u| held.binary_search(u).is_err()) {
        conns.watch(client.out, user);
    }
    client.state.watching = wanted.into_boxed_slice();
    client.ack(id);
    let online = watched_online(client);
    client.push(&server_event::snapshot(online.iter().map(|u| &**u), None));
}

/// The client's watched users that are online now, sorted.
fn watched_online(client: &Client<'_>) -> Vec<Arc<str>> {
    let tenant = &client.out.tenant;
    let users = &client.shard.users;
    client
        .state
        .watching
        .iter()
        .filter(|u| users.is_online(&(tenant.clone(), (*u).clone())))
        .cloned()
        .collect()
}
