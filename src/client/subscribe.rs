//! `subscribe` and `unsubscribe`: the client joins or leaves a conversation of its tenant.
//!
//! A subscribe is acked only once the subscription is live on every path (with Redis: once
//! Redis confirmed), so an event published after the ack is delivered; subscribing twice is
//! idempotent. The room is recorded before the wait, so that a client torn down meanwhile
//! still leaves it on clean-up.

use tracing::info;

use super::{Client, ClientId};
use crate::mesh::Verdict;
use crate::protocol::ErrorCode;
use crate::route::room_key;

pub(super) async fn subscribe(client: &mut Client<'_>, conversation: &str, id: Option<&str>) {
    let room = room_key(&client.out.tenant, conversation);
    let subscriptions = &mut client.state.subscriptions;
    if subscriptions.contains(&room) {
        return client.ack(id);
    }
    let max = client.shard.config.limits.max_subscriptions;
    if subscriptions.len() >= max {
        let message = format!("at most {max} subscriptions per connection");
        return client.error(ErrorCode::TooManySubscriptions, &message, id);
    }
    // The room's own key, when this core has one: one copy for all subscribers.
    let room = client.shard.room_key_of(room);
    if subscriptions.is_empty() {
        // Room for one, not the four a first push makes: many clients never hold more.
        subscriptions.reserve_exact(1);
    }
    subscriptions.push(room.clone());
    if client.shard.subscribe(&room, client.out).await == Verdict::Unavailable {
        client.state.subscriptions.retain(|r| *r != room);
        client.shard.unsubscribe(&room, client.out.id).await;
        let message = "the broker did not confirm the subscription in time; retry";
        return client.error(ErrorCode::Unavailable, message, id);
    }
    info!(conn = %ClientId(client.out.id), room = %room, "subscribe");
    client.ack(id);
}

pub(super) async fn unsubscribe(client: &mut Client<'_>, conversation: &str, id: Option<&str>) {
    let room = room_key(&client.out.tenant, conversation);
    let subscriptions = &mut client.state.subscriptions;
    if let Some(at) = subscriptions.iter().position(|r| *r == room) {
        subscriptions.remove(at);
        client.shard.unsubscribe(&room, client.out.id).await;
        info!(conn = %ClientId(client.out.id), room = %room, "unsubscribe");
    }
    client.ack(id);
}
