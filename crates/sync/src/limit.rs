//! A rule's bandwidth cap: a token bucket shared by every stream of the rule. A stream asks
//! for the bytes of each chunk before passing it on and sleeps while the bucket is empty, so
//! the rule's streams together move at most the rate on average, with bursts of at most one
//! second's worth.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

pub struct Bandwidth {
    rate: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    /// Bytes that may pass now; negative when streams borrowed ahead and must wait.
    tokens: f64,
    at: Instant,
}

impl Bandwidth {
    /// A cap of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Bandwidth {
        let rate = bytes_per_sec.max(1) as f64;
        Bandwidth {
            rate,
            state: Mutex::new(Bucket {
                tokens: rate,
                at: Instant::now(),
            }),
        }
    }

    /// Take `n` bytes from the bucket, waiting as long as the rate requires.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(b.at).as_secs_f64() * self.rate;
            b.tokens = (b.tokens + refill).min(self.rate);
            b.at = now;
            b.tokens -= n as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / self.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `stream` passed through `cap` (when there is one), calling `counted` with the size of each
/// chunk as it goes.
pub fn throttled<S, E>(
    stream: S,
    cap: Option<std::sync::Arc<Bandwidth>>,
    counted: impl Fn(usize) + Send + Sync + 'static,
) -> impl Stream<Item = Result<Bytes, E>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    let counted = std::sync::Arc::new(counted);
    stream.then(move |chunk| {
        let cap = cap.clone();
        let counted = counted.clone();
        async move {
            if let Ok(bytes) = &chunk {
                if let Some(cap) = &cap {
                    cap.take(bytes.len()).await;
                }
                counted(bytes.len());
            }
            chunk
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn streams_share_the_rate() {
        let cap = std::sync::Arc::new(Bandwidth::new(1_000_000));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..2 {
            let cap = cap.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    cap.take(100_000).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // 4 MB at 1 MB/s with a first second's worth in the bucket: 3 s of waiting.
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(2_900)..=Duration::from_millis(3_100)).contains(&took),
            "{took:?}"
        );
    }
}
