//! `subscribe` and `unsubscribe`: the client joins or leaves a conversation of its tenant.
//!
//! A subscribe is acked only once the subscription is live on every path (with Redis: once
//! Redis confirmed), so an event published after the ack is delivered; subscribing twice is
//! idempotent. With history, the ack gives the stream's position, and a subscribe with
//! `since` is first sent what the client missed (then `recovered:true`) or nothing. With
//! `auth.subscribe_policy = "token"`, a subscribe without a good subscription token is
//! `forbidden`. The room is recorded before the wait, so that a client torn down meanwhile
//! still leaves it on clean-up.

use tracing::info;

use super::{Client, ClientId};
use crate::auth::AuthError;
use crate::config::SubscribePolicy;
use crate::history::Position;
use crate::protocol::{ErrorCode, Since};
use crate::route::room_key;

pub(super) async fn subscribe(
    client: &mut Client<'_>,
    conversation: &str,
    since: Option<Since>,
    token: Option<&str>,
    id: Option<&str>,
) {
    let room = room_key(&client.out.tenant, conversation);
    let shard = client.shard;
    if let Err(refused) = allowed(client, conversation, token) {
        let message = format!("no subscription to {conversation}: {refused}");
        return client.error(ErrorCode::Forbidden, &message, id);
    }
    let history = shard.history_enabled();
    let stats = shard.stats();
    let subscriptions = &mut client.state.subscriptions;
    if subscriptions.contains(&room) {
        // Nothing is replayed to a client that is already getting the events.
        if since.is_some() {
            stats.recoveries_total_repeated.inc();
        }
        let at = shard.position_here(&room);
        return client.subscribed(id, at, since.map(|_| false));
    }
    let max = shard.config.limits.max_subscriptions;
    if subscriptions.len() >= max {
        let message = format!("at most {max} subscriptions per connection");
        return client.error(ErrorCode::TooManySubscriptions, &message, id);
    }
    // The room's own key, when this core has one: one copy for all subscribers.
    let room = shard.room_key_of(room);
    if subscriptions.is_empty() {
        // Room for one, not the four a first push makes: many clients never hold more.
        subscriptions.reserve_exact(1);
    }
    subscriptions.push(room.clone());
    if since.is_some() && !history {
        stats.recoveries_total_off.inc();
    }
    let from = since.filter(|_| history).map(|s| Position {
        epoch: s.epoch,
        offset: s.offset,
    });
    let Some(subscription) = shard.subscribe(&room, client.out, from).await else {
        client.state.subscriptions.retain(|r| *r != room);
        shard.unsubscribe(&room, client.out.id).await;
        let message = "the broker did not confirm the subscription in time; retry";
        return client.error(ErrorCode::Unavailable, message, id);
    };
    info!(conn = %ClientId(client.out.id), room = %room, recovered = subscription.recovered, "subscribe");
    let recovered = since.map(|_| subscription.recovered);
    client.subscribed(id, subscription.at, recovered);
}

/// With `auth.subscribe_policy = "token"`: whether `token` is a subscription token for this
/// client and `conversation` (checked on every subscribe, a repeated one too).
fn allowed(client: &Client<'_>, conversation: &str, token: Option<&str>) -> Result<(), AuthError> {
    let shard = client.shard;
    if shard.config.auth.subscribe_policy == SubscribePolicy::Tenant {
        return Ok(());
    }
    let token = token.ok_or(AuthError::Missing)?;
    let out = client.out;
    let now = crate::auth::now_ms();
    shard
        .verifier
        .verify_subscription(token, &out.tenant, &out.user, conversation, now)
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
