//! The one way to bound a wait: [`within`]. Runs on whatever core awaits it; the timer is
//! dropped with the future, so a wait that ends early leaves nothing behind.

use std::future::Future;
use std::time::Duration;

/// `future`'s output, or `None` once `limit` has passed: the one timeout of the server.
pub async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> Option<T> {
    let expired = async {
        glommio::timer::sleep(limit).await;
        None
    };
    futures_lite::future::or(async { Some(future.await) }, expired).await
}
