//! `presence.activity`: `typing` is forwarded to the conversation's other subscribers
//! (throttled by the conversation's owner, and acked even when throttled: throttling is
//! invisible to the typist); `viewing` is recorded in the log only, until watch-mode presence
//! reads it. Without a `conversationId` the latest subscription is meant.

use tracing::debug;

use super::{Client, ClientId};
use crate::protocol::{Activity, ErrorCode};
use crate::route::room_key;

pub(super) async fn activity(
    client: &mut Client<'_>,
    activity: Activity,
    conversation: Option<&str>,
    id: Option<&str>,
) {
    let subscriptions = &client.state.subscriptions;
    let room = match conversation {
        Some(c) => room_key(&client.out.tenant, c),
        None => match subscriptions.last() {
            Some(room) => room.clone(),
            None => {
                let message = "no conversationId and no subscription to default to";
                return client.error(ErrorCode::InvalidMessage, message, id);
            }
        },
    };
    match activity {
        // PROTOCOL.md: typing needs a subscription; viewing does not.
        Activity::Typing if !subscriptions.contains(&room) => {
            let message = "not subscribed to this conversation";
            return client.error(ErrorCode::Forbidden, message, id);
        }
        Activity::Typing => client.shard.typing(room, client.out.user.clone()).await,
        Activity::Viewing => debug!(conn = %ClientId(client.out.id), room = %room, "viewing"),
    }
    client.ack(id);
}
