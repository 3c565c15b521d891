//! `presence.query`: the tenant's online users, cluster-wide, answered from this core's
//! replica as `presence.snapshot` (carrying the request's id; no separate ack).

use super::Client;
use crate::protocol::server_event;

pub(super) fn query(client: &Client<'_>, id: Option<&str>) {
    let users = client.shard.online_users(&client.out.tenant);
    client.push(&server_event::snapshot(users.iter().map(|u| &**u), id));
}
