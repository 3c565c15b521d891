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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::clock;

    #[test]
    fn a_wait_on_the_grid_is_at_least_the_wait_and_ends_on_a_step() {
        let grid = Duration::from_millis(250);
        for ms in [0, 1, 249, 250, 251, 30_000] {
            let wait = Duration::from_millis(ms);
            let before = clock();
            let rounded = on_grid(wait, grid);
            let after = clock();
            assert!(
                rounded >= wait && rounded < wait + grid,
                "{wait:?} -> {rounded:?}"
            );
            // It was computed between `before` and `after`: its end is a step in that span.
            let step = grid.as_nanos();
            let last_step = (after + rounded).as_nanos() / step * step;
            assert!(
                last_step >= (before + rounded).as_nanos(),
                "{wait:?} -> {rounded:?} does not end on a step"
            );
        }
    }
}
