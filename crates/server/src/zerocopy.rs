//! Blob bytes handed from the file to the socket by the kernel (`sendfile`), never copied
//! through pier's memory, on plain-TCP HTTP/1.1 connections.
//!
//! hyper writes every response, and it only knows how to write bytes it holds. So a file body
//! yields *stand-in* frames: slices of one static region that nobody ever reads, each paired,
//! in a queue the connection shares with its socket, with the file range it stands for. hyper
//! queues body frames without copying them when the connection writes vectored (the builder
//! forces that), so the socket sees the stand-in's own addresses in its write calls: a slice
//! inside the region is sent with `sendfile` from the paired file at the matching offset; any
//! other slice (the response head) is written as usual. Frames come out of hyper in the order
//! they went in, one response after another, so the queue's front is always the frame being
//! written; the offset inside the region tells how far into it hyper has got, and a mismatch
//! fails the connection rather than sending one wrong byte.
//!
//! TLS and HTTP/2 need the bytes in user space; those connections carry no [`ZeroCopy`] and
//! their blobs are read and copied as before.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// The largest frame a file body yields: one stand-in region's worth.
const FRAME: usize = 4 << 20;

/// The stand-in region. Zero-initialised, so it costs address space and no memory; hyper only
/// ever passes pointers into it back to the socket.
static STAND_IN: [u8; FRAME] = [0; FRAME];

fn stand_in_offset(ptr: *const u8) -> Option<usize> {
    let start = STAND_IN.as_ptr() as usize;
    let p = ptr as usize;
    (p >= start && p < start + FRAME).then(|| p - start)
}

/// One frame's file range, waiting to be sent.
struct Pending {
    file: Arc<File>,
    offset: u64,
    len: usize,
    /// Bytes of it already sent.
    sent: usize,
}

/// The queue a connection shares between the bodies of its responses and its socket. Present
/// as a request extension only where the socket can send from files.
#[derive(Clone, Default)]
pub struct ZeroCopy(Arc<Mutex<VecDeque<Pending>>>);

impl ZeroCopy {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A response body of bytes `start..end` of `file`, sent by the kernel.
pub struct FileBody {
    file: Arc<File>,
    next: u64,
    end: u64,
    queue: ZeroCopy,
    counters: Vec<Counter>,
    /// Whatever must live as long as the response (the blob's read guard).
    _hold: Box<dyn Send + Sync>,
}

impl FileBody {
    pub fn new(
        file: File,
        start: u64,
        end: u64,
        queue: ZeroCopy,
        counters: Vec<Counter>,
        hold: Box<dyn Send + Sync>,
    ) -> FileBody {
        FileBody {
            file: Arc::new(file),
            next: start,
            end,
            queue,
            counters,
            _hold: hold,
        }
    }
}

impl HttpBody for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.next >= this.end {
            return Poll::Ready(None);
        }
        let len = (this.end - this.next).min(FRAME as u64) as usize;
        this.queue.queue().push_back(Pending {
            file: this.file.clone(),
            offset: this.next,
            len,
            sent: 0,
        });
        this.next += len as u64;
        for c in &this.counters {
            c.inc_by(len as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&STAND_IN[..len])))))
    }

    fn is_end_stream(&self) -> bool {
        self.next >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end.saturating_sub(self.next))
    }
}

/// A plain TCP socket that sends stand-in slices from their files.
pub struct FileSocket {
    stream: TcpStream,
    queue: ZeroCopy,
    /// Whether TCP_CORK is on: while a file range is being sent, only full segments leave, as
    /// nginx's `tcp_nopush` does; off again once no frame is waiting, so the tail goes out.
    corked: bool,
}

impl FileSocket {
    pub fn new(stream: TcpStream, queue: ZeroCopy) -> FileSocket {
        FileSocket {
            stream,
            queue,
            corked: false,
        }
    }

    fn cork(&mut self, on: bool) {
        if self.corked != on {
            // A socket that refuses the option still sends correctly, only in smaller pieces.
            let _ = rustix::net::sockopt::set_tcp_cork(&self.stream, on);
            self.corked = on;
        }
    }

    /// Send from the front frame's file, `at` bytes into the frame, at most `max` bytes.
    fn poll_send_file(
        &mut self,
        cx: &mut Context<'_>,
        at: usize,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        let (file, offset, count) = {
            let q = self.queue.queue();
            let Some(front) = q.front() else {
                return Poll::Ready(Err(io::Error::other(
                    "zero-copy: a stand-in frame with no file behind it",
                )));
            };
            if front.sent != at || max > front.len - front.sent {
                return Poll::Ready(Err(io::Error::other(format!(
                    "zero-copy: the socket is at byte {at} of a frame whose next byte is {} of {}",
                    front.sent, front.len
                ))));
            }
            (front.file.clone(), front.offset + at as u64, max)
        };
        self.cork(true);
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                let mut off = offset;
                rustix::fs::sendfile(&self.stream, &*file, Some(&mut off), count)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(0) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "zero-copy: the blob file ended early",
                    )))
                }
                Ok(n) => {
                    let drained = {
                        let mut q = self.queue.queue();
                        if let Some(front) = q.front_mut() {
                            front.sent += n;
                            if front.sent == front.len {
                                q.pop_front();
                            }
                        }
                        q.is_empty()
                    };
                    if drained {
                        self.cork(false);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Write `buf` with MSG_MORE: a response head whose body follows from a file goes out in
    /// the same segment as the body's first bytes.
    fn poll_send_more(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_io(Interest::WRITABLE, || {
                rustix::net::send(&self.stream, buf, rustix::net::SendFlags::MORE)
                    .map_err(io::Error::from)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncRead for FileSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for FileSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match stand_in_offset(buf.as_ptr()) {
            Some(at) if !buf.is_empty() => self.poll_send_file(cx, at, buf.len()),
            _ => Pin::new(&mut self.stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs: Vec<&IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).collect();
        let first_file = bufs
            .iter()
            .position(|b| stand_in_offset(b.as_ptr()).is_some());
        match first_file {
            Some(0) => {
                let at = stand_in_offset(bufs[0].as_ptr()).unwrap_or(0);
                self.poll_send_file(cx, at, bufs[0].len())
            }
            Some(1) => self.poll_send_more(cx, bufs[0]),
            Some(n) => {
                let head: Vec<IoSlice<'_>> = bufs[..n].iter().map(|b| IoSlice::new(b)).collect();
                Pin::new(&mut self.stream).poll_write_vectored(cx, &head)
            }
            None => {
                let all: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
                Pin::new(&mut self.stream).poll_write_vectored(cx, &all)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_stand_in_region_is_recognised() {
        assert_eq!(stand_in_offset(STAND_IN.as_ptr()), Some(0));
        assert_eq!(stand_in_offset(STAND_IN[10..].as_ptr()), Some(10));
        let other = [0u8; 16];
        assert_eq!(stand_in_offset(other.as_ptr()), None);
        let past = STAND_IN.as_ptr() as usize + FRAME;
        assert_eq!(stand_in_offset(past as *const u8), None);
    }
}
