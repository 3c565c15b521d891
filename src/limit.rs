//! Token buckets, for connection attempts per IP and client events per connection.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn full(burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = now;
    }

    /// Takes one token, or tells how many milliseconds until one is there.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        self.check(rate, burst, now)?;
        self.tokens -= 1.0;
        Ok(())
    }

    /// Whether a token is there (without taking it), or how many milliseconds until one is.
    pub fn check(&mut self, rate: f64, burst: f64, now: Instant) -> Result<(), u64> {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err((((1.0 - self.tokens) / rate) * 1000.0).ceil() as u64)
        }
    }

    /// True when the bucket has refilled completely and can be forgotten.
    pub fn is_full(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        self.tokens >= burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0, t0);
        for _ in 0..3 {
            assert!(b.take(2.0, 3.0, t0).is_ok());
        }
        assert_eq!(b.take(2.0, 3.0, t0), Err(500));
        assert!(b.take(2.0, 3.0, t0 + Duration::from_millis(500)).is_ok());
        assert!(b.take(2.0, 3.0, t0 + Duration::from_millis(500)).is_err());
        assert!(!b.is_full(2.0, 3.0, t0 + Duration::from_millis(600)));
        assert!(b.is_full(2.0, 3.0, t0 + Duration::from_secs(5)));
    }
}
