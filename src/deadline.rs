//! The one way to bound a wait: [`within`]. Runs on whatever core awaits it; the timer is
//! dropped with the future, so a wait that ends early leaves nothing behind. Long waits that
//! need not be exact are put [`on_grid`], so that the ones falling due near each other wake
//! their core once.

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

/// How long until the first multiple of `grid` on the process's monotonic clock that is at
/// least `wait` away. Timers rounded up this way fall due together: an idle core holding
/// thousands of them wakes once a grid step, not once a timer.
pub fn on_grid(wait: Duration, grid: Duration) -> Duration {
    let now = crate::handle::clock();
    let step = grid.as_nanos().max(1);
    let at = (now + wait).as_nanos().div_ceil(step) * step;
    Duration::from_nanos(at as u64) - now
}
