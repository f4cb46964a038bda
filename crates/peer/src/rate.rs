//! A byte-rate cap shared by every stream of one direction on a node (peer uploads, upstream
//! downloads), so pier never takes all of the node's link from its workloads.
//!
//! A token bucket: tokens accrue at the rate, up to a burst of a quarter second's worth; a
//! stream takes tokens for each chunk it passes on and sleeps while the bucket is in debt.
//! Streams share the bucket, so together they stay within the rate whatever their number.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// A cap of `bytes_per_sec`.
pub struct RateLimit {
    bytes_per_sec: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> Arc<RateLimit> {
        let rate = bytes_per_sec.max(1) as f64;
        Arc::new(RateLimit {
            bytes_per_sec: rate,
            burst: (rate / 4.0).max(64.0 * 1024.0),
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                at: Instant::now(),
            }),
        })
    }

    /// A bucket of `burst` units that refills at `per_sec`, starting full: request limits,
    /// where a client that was quiet may send a burst at once.
    pub fn with_burst(per_sec: f64, burst: f64) -> Arc<RateLimit> {
        let burst = burst.max(1.0);
        Arc::new(RateLimit {
            bytes_per_sec: per_sec.max(f64::MIN_POSITIVE),
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        })
    }

    /// Take `n` units if the bucket holds them; otherwise take nothing and say how long
    /// until it would (a refusal, for callers that answer 429 instead of waiting).
    pub fn try_take(&self, n: f64) -> Result<(), Duration> {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let accrued = now.duration_since(b.at).as_secs_f64() * self.bytes_per_sec;
        b.tokens = (b.tokens + accrued).min(self.burst);
        b.at = now;
        if b.tokens >= n {
            b.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - b.tokens) / self.bytes_per_sec))
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec as u64
    }

    /// Take `n` bytes' worth; the time to wait before passing them on.
    fn take(&self, n: usize) -> Duration {
        let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let accrued = now.duration_since(b.at).as_secs_f64() * self.bytes_per_sec;
        b.tokens = (b.tokens + accrued).min(self.burst) - n as f64;
        b.at = now;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.bytes_per_sec)
        }
    }

    /// Wait until `n` more bytes fit the cap.
    pub async fn pass(&self, n: usize) {
        let wait = self.take(n);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `stream`, held to `limit` (unchanged when `None`).
pub fn limited<S, E>(
    stream: S,
    limit: Option<Arc<RateLimit>>,
) -> Pin<Box<dyn Stream<Item = Result<Bytes, E>> + Send>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    match limit {
        None => Box::pin(stream),
        Some(limit) => Box::pin(stream.then(move |chunk| {
            let limit = limit.clone();
            async move {
                if let Ok(c) = &chunk {
                    limit.pass(c.len()).await;
                }
                chunk
            }
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_bucket_allows_its_burst_then_refuses_until_it_refills() {
        let limit = RateLimit::with_burst(2.0, 3.0);
        for _ in 0..3 {
            assert_eq!(limit.try_take(1.0), Ok(()));
        }
        let wait = limit.try_take(1.0).expect_err("empty");
        assert!((0.49..=0.51).contains(&wait.as_secs_f64()), "{wait:?}");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(limit.try_take(1.0), Ok(()));
        assert!(limit.try_take(1.0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn streams_sharing_a_limit_stay_within_it_together() {
        let limit = RateLimit::new(1_000_000);
        let chunks =
            || futures::stream::iter((0..20).map(|_| Ok::<_, ()>(Bytes::from(vec![0u8; 50_000]))));
        let a = limited(chunks(), Some(limit.clone()));
        let b = limited(chunks(), Some(limit.clone()));
        let started = tokio::time::Instant::now();
        let (x, y) = tokio::join!(a.count(), b.count());
        assert_eq!((x, y), (20, 20));
        // Two million bytes at a million a second (the burst starts empty): two seconds of
        // simulated time, give or take one chunk.
        let took = started.elapsed().as_secs_f64();
        assert!((1.9..=2.1).contains(&took), "took {took} s");
    }
}
