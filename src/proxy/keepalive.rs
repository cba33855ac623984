//! Client-connection deadlines, the way nginx separates `client_header_timeout` from
//! `keepalive_timeout`: a request head must arrive within `header_read_timeout_seconds` of its
//! first byte (or of the connection opening, for the first request), while a keep-alive
//! connection may sit idle between requests for `idle_timeout_seconds`.
//!
//! hyper has one timer for both (its header-read timeout also runs while a keep-alive connection
//! waits for the next request). [`ConnTimer`] gives hyper that timer per connection and watches
//! the bytes the client sends ([`CountingIo`]): while nothing has arrived since the previous
//! request, the deadline is the idle one; once a byte arrives, the header deadline applies.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from and written to a client connection so far.
#[derive(Debug, Default)]
pub struct IoCounter {
    read: AtomicU64,
    written: AtomicU64,
}

impl IoCounter {
    /// Bytes read.
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Wraps a client socket and counts what goes through it.
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    counter: Arc<IoCounter>,
}

impl<T> CountingIo<T> {
    /// Wraps `inner`; traffic is added to `counter`.
    pub fn new(inner: T, counter: Arc<IoCounter>) -> Self {
        Self { inner, counter }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        if read > 0 {
            self.counter.read.fetch_add(read as u64, Ordering::Relaxed);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.counter.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.counter.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The per-connection timer handed to hyper's HTTP/1 server.
#[derive(Debug, Clone)]
pub struct ConnTimer {
    counter: Arc<IoCounter>,
    idle: Duration,
    heads: Arc<AtomicUsize>,
}

impl ConnTimer {
    /// A timer for one connection whose reads go to `counter`.
    pub fn new(counter: Arc<IoCounter>, idle: Duration) -> Self {
        Self {
            counter,
            idle,
            heads: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Timer for ConnTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        Box::pin(HeadDeadline::plain(Instant::now() + duration))
    }

    /// hyper asks for one deadline per request head. The first head of a connection gets the
    /// strict header deadline (a client that connects and sends nothing is cut off); later
    /// heads start in the idle phase.
    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let now = Instant::now();
        let header = deadline.saturating_duration_since(now);
        let first = self.heads.fetch_add(1, Ordering::Relaxed) == 0;
        let phase = if first {
            Phase::Header
        } else {
            Phase::Idle {
                seen: self.counter.read(),
            }
        };
        let until = match phase {
            Phase::Idle { .. } => now + self.idle.max(header),
            _ => deadline,
        };
        Box::pin(HeadDeadline {
            sleep: Box::pin(tokio::time::sleep_until(until.into())),
            counter: Some(self.counter.clone()),
            header,
            phase,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        if let Some(s) = sleep.as_mut().downcast_mut_pin::<HeadDeadline>() {
            s.reset_to(new_deadline);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for the first byte of a keep-alive request; `seen` = bytes read before it.
    Idle { seen: u64 },
    /// Bytes have arrived: the head must be complete by the deadline.
    Header,
}

/// A deadline that stays in the idle phase until the client sends a byte.
struct HeadDeadline {
    sleep: Pin<Box<tokio::time::Sleep>>,
    counter: Option<Arc<IoCounter>>,
    header: Duration,
    phase: Phase,
}

impl HeadDeadline {
    fn plain(deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(deadline.into())),
            counter: None,
            header: Duration::ZERO,
            phase: Phase::Header,
        }
    }

    fn reset_to(mut self: Pin<&mut Self>, deadline: Instant) {
        self.phase = Phase::Header;
        self.sleep.as_mut().reset(deadline.into());
    }
}

impl Future for HeadDeadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let (Phase::Idle { seen }, Some(counter)) = (self.phase, &self.counter) {
            if counter.read() != seen {
                // hyper polls us right after a read: the first byte of the next request is
                // here, so the head now has the header deadline from this moment.
                self.phase = Phase::Header;
                let deadline = tokio::time::Instant::now() + self.header;
                self.sleep.as_mut().reset(deadline);
            }
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl Sleep for HeadDeadline {}

// hyper needs the sleep to be `Send + Sync`; all fields are.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<HeadDeadline>();
};
