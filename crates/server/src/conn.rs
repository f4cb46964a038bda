//! The accept loop: how many connections pier holds and for how long.
//!
//! `axum::serve` keeps every connection for as long as the client likes, so idle sockets, a
//! slowloris trickling header bytes, or an upload that stops sending each pin a file descriptor
//! forever. Here every connection is bounded in time: the request head must arrive within
//! `header_timeout`, a connection with no request in flight is closed after `idle_timeout`, a
//! request body that delivers nothing for `body_stall_timeout` fails its request, and a response
//! the client stops reading for `write_stall_timeout` drops the connection. The number of
//! connections is bounded by `max_connections`; beyond it a new connection is answered 503 and
//! closed at once (see ARCHITECTURE.md for why refusing beats queueing).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::metrics::{KindLabels, Metrics};

/// Bounds on connections. `None` durations disable that timeout.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time allowed for a request's head (request line and headers) to arrive.
    pub header_timeout: Option<Duration>,
    /// Time a connection may sit with no request in flight before it is closed.
    pub idle_timeout: Option<Duration>,
    /// Time a request body may deliver no bytes before the request fails.
    pub body_stall_timeout: Option<Duration>,
    /// Time a client may leave a response unread before the connection is dropped.
    pub write_stall_timeout: Option<Duration>,
    /// Connections held at once; more are refused.
    pub max_connections: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
            body_stall_timeout: Some(Duration::from_secs(30)),
            write_stall_timeout: Some(Duration::from_secs(60)),
            max_connections: 4096,
        }
    }
}

/// What a refused connection reads before it is closed. Written without waiting: a client that
/// cannot take these few bytes right away just sees the close.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\ncontent-type: text/plain\r\ncontent-length: 32\r\n\r\npier is at its connection limit\n";

/// Accept connections on `listener` and serve `app` on each until `shutdown` completes; then
/// stop accepting, close idle connections, and return once in-flight requests have finished.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    metrics: Arc<Metrics>,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls(listener, app, metrics, limits, None, shutdown).await
}

/// [`serve`], with every connection first made TLS by `tls` when given (the handshake must
/// finish within the header timeout, or 10 s).
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    metrics: Arc<Metrics>,
    limits: ConnLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Body frames queued as they are, never flattened into hyper's buffer: the zero-copy
        // socket recognises its stand-in frames by their addresses.
        .writev(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Every connection task holds a receiver; `closed()` on the sender resolves once all are gone.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, mostly; spinning on it would only burn the CPU
                    // that closing connections needs.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics.connections_rejected.inc();
            let _ = stream.try_write(REFUSED);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            builder: builder.clone(),
            app: app.clone(),
            metrics: metrics.clone(),
            limits,
            stop: stop_rx.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let (io, zero_copy): (Box<dyn Io>, _) = match tls {
                None => {
                    let zc = crate::zerocopy::ZeroCopy::default();
                    (
                        Box::new(crate::zerocopy::FileSocket::new(stream, zc.clone())),
                        Some(zc),
                    )
                }
                Some(acceptor) => {
                    let limit = limits.header_timeout.unwrap_or(Duration::from_secs(10));
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => (Box::new(s), None),
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            conn.run(io, zero_copy, peer).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

struct Conn {
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: Router,
    metrics: Arc<Metrics>,
    limits: ConnLimits,
    stop: watch::Receiver<bool>,
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` that the connection last had a request in flight.
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long the connection has had nothing in flight, if it has nothing in flight.
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.started.elapsed().saturating_sub(last))
    }
}

/// Held from a request's arrival until its response body is done or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> InFlight {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.touch();
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    async fn run(
        self,
        stream: Box<dyn Io>,
        zero_copy: Option<crate::zerocopy::ZeroCopy>,
        peer: SocketAddr,
    ) {
        let Conn {
            builder,
            app,
            metrics,
            limits,
            mut stop,
        } = self;
        let gauge = metrics.connections.clone();
        gauge.inc();
        let activity = Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        });
        let service = {
            let activity = activity.clone();
            let metrics = metrics.clone();
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let guard = InFlight::new(activity.clone());
                req.extensions_mut().insert(ConnectInfo(peer));
                // HTTP/2 frames its own data, copying it: only HTTP/1 responses send from files.
                if let Some(zc) = &zero_copy {
                    if req.version() <= axum::http::Version::HTTP_11 {
                        req.extensions_mut().insert(zc.clone());
                    }
                }
                let req = req.map(|b| {
                    Body::new(StallBody::new(
                        b,
                        limits.body_stall_timeout,
                        metrics.clone(),
                    ))
                });
                let app = app.clone();
                async move {
                    let resp = app.oneshot(req).await?;
                    Ok::<_, Infallible>(resp.map(|b| {
                        Body::new(Guarded {
                            inner: b,
                            _guard: guard,
                        })
                    }))
                }
            })
        };
        let io = TokioIo::new(StallIo::new(
            stream,
            limits.write_stall_timeout,
            metrics.clone(),
        ));
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut closing = false;
        let result = loop {
            let idle_check = match (closing, limits.idle_timeout) {
                (false, Some(idle)) => {
                    let wait = match activity.idle_for() {
                        Some(for_) => idle.saturating_sub(for_),
                        None => idle,
                    };
                    Some(tokio::time::sleep(wait.max(Duration::from_millis(10))))
                }
                _ => None,
            };
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = stop.wait_for(|s| *s), if !closing => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = async {
                    match idle_check {
                        Some(s) => s.await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let (Some(for_), Some(idle)) = (activity.idle_for(), limits.idle_timeout) {
                        if for_ >= idle {
                            closing = true;
                            metrics.timeouts.get_or_create(&KindLabels { kind: "idle" }).inc();
                            tracing::debug!(%peer, "closing an idle connection");
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        };
        if let Err(e) = result {
            let header_timeout = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_timeout());
            if header_timeout {
                metrics
                    .timeouts
                    .get_or_create(&KindLabels { kind: "header" })
                    .inc();
                tracing::debug!(%peer, "request head not received in time; connection closed");
            } else {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        gauge.dec();
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
struct Guarded {
    inner: Body,
    _guard: InFlight,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a stalled request body ends with; handlers see it as a failed body read.
#[derive(Debug, thiserror::Error)]
#[error("request body stalled: no bytes for {0} s")]
pub struct BodyStalled(u64);

/// A request body that fails once it has delivered nothing for `timeout`.
struct StallBody {
    inner: Incoming,
    timeout: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
}

impl StallBody {
    fn new(inner: Incoming, timeout: Option<Duration>, metrics: Arc<Metrics>) -> StallBody {
        StallBody {
            inner,
            timeout,
            timer: None,
            metrics,
        }
    }
}

impl HttpBody for StallBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                // Progress: the stall clock restarts from the next wait.
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let Some(timeout) = this.timeout else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(timer.as_mut().poll(cx));
                this.timer = None;
                this.timeout = None;
                this.metrics
                    .timeouts
                    .get_or_create(&KindLabels { kind: "body" })
                    .inc();
                Poll::Ready(Some(Err(Box::new(BodyStalled(timeout.as_secs())))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's byte stream: a TCP socket, or TLS over one.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A socket whose writes fail once the client has taken nothing for `timeout`.
struct StallIo {
    inner: Box<dyn Io>,
    timeout: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
    metrics: Arc<Metrics>,
}

impl StallIo {
    fn new(inner: Box<dyn Io>, timeout: Option<Duration>, metrics: Arc<Metrics>) -> StallIo {
        StallIo {
            inner,
            timeout,
            timer: None,
            metrics,
        }
    }

    /// After a write returned pending: fail it if the client has been stuck for too long.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let Some(timeout) = self.timeout else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(timer.as_mut().poll(cx));
        self.timer = None;
        self.metrics
            .timeouts
            .get_or_create(&KindLabels { kind: "write" })
            .inc();
        Poll::Ready(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("client read nothing for {} s", timeout.as_secs()),
        ))
    }
}

impl AsyncRead for StallIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for StallIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
