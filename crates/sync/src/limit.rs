//! A rule's bandwidth cap: the node's token bucket ([`pier_peer::rate::RateLimit`], the one
//! behind `[cluster] max_upload_rate` too), shared by every stream of the rule, with a count of
//! the bytes that pass.

use bytes::Bytes;
use futures::{Stream, StreamExt};
pub use pier_peer::rate::RateLimit;

/// `stream` passed through `cap` (when there is one), calling `counted` with the size of each
/// chunk as it goes.
pub fn throttled<S, E>(
    stream: S,
    cap: Option<std::sync::Arc<RateLimit>>,
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
                    cap.pass(bytes.len()).await;
                }
                counted(bytes.len());
            }
            chunk
        }
    })
}
