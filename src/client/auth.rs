//! `auth`: a fresh token for the same user and tenant moves the client's expiry; a token for
//! anyone else is `forbidden`, a bad one `unauthorized` (the old expiry stands).

use super::Client;
use crate::auth::now_ms;
use crate::protocol::ErrorCode;

pub(super) fn refresh(client: &Client<'_>, token: &str, id: Option<&str>) {
    match client.shard.verifier.verify(token, now_ms()) {
        Ok(fresh) if *fresh.tenant == *client.out.tenant && *fresh.user == *client.out.user => {
            client.out.expires_at_ms.set(fresh.expires_at_ms);
            client
                .shard
                .sweep
                .schedule(client.out, client.shard.stats());
            client.ack(id);
        }
        Ok(_) => client.error(
            ErrorCode::Forbidden,
            "the token is for another user or tenant",
            id,
        ),
        Err(e) => client.error(ErrorCode::Unauthorized, &e.to_string(), id),
    }
}
