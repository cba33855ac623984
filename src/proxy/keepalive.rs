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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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

/// How long a closing client connection lingers, reading and dropping what the client still
/// sends; also how long a keep-alive connection must have been quiet before shutdown closes it.
pub const LINGER: Duration = Duration::from_secs(1);

/// The longest a closing connection lingers in all, however much the client keeps sending.
const LINGER_MAX: Duration = Duration::from_secs(30);

/// A client socket that is closed gently, as nginx's `lingering_close` does. Dropped, it shuts
/// down its write side and reads (and drops) whatever the client still sends, until the client
/// closes, or is quiet for [`LINGER`], or `stop` (the end of the shutdown grace period). Closing a
/// socket with unread bytes makes the kernel send an RST, which discards what is still queued for
/// the client and what it has received but not yet read — the end of a download, the last
/// response before `Connection: close`.
pub struct Lingering<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    inner: Option<T>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl<T> Lingering<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Wraps `inner`; its lingering close runs on `tasks` (so shutdown waits for it) and ends at
    /// `stop` at the latest.
    pub fn new(inner: T, tasks: TaskTracker, stop: CancellationToken) -> Self {
        Self {
            inner: Some(inner),
            tasks,
            stop,
        }
    }

    fn io(&mut self) -> io::Result<&mut T> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<T> Drop for Lingering<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        let Some(mut io) = self.inner.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            let linger = async {
                let _ = io.shutdown().await;
                let mut sink = [0u8; 4096];
                // Until the client closes, or is quiet for LINGER.
                while let Ok(Ok(n)) = tokio::time::timeout(LINGER, io.read(&mut sink)).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::timeout(LINGER_MAX, linger) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

impl<T> AsyncRead for Lingering<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<T> AsyncWrite for Lingering<T>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.io() {
            Ok(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|io| io.is_write_vectored())
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

#[cfg(test)]
mod tests {
    //! The deadlines on tokio's paused clock. hyper computes a head's deadline from the real
    //! clock (`Timer::now`, `std::time::Instant`), which stands still relative to the paused one
    //! only up to the few microseconds the test itself takes, so every deadline is computed
    //! before time is advanced and every check keeps a margin of [`M`].
    use super::*;
    use std::task::Waker;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `header_read_timeout_seconds`.
    const HEADER: Duration = Duration::from_secs(10);
    /// `idle_timeout_seconds`.
    const IDLE: Duration = Duration::from_secs(60);
    /// Margin around each deadline.
    const M: Duration = Duration::from_secs(1);

    /// Whether the sleep has fired (one poll, as hyper polls it).
    fn fired(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        sleep.as_mut().poll(&mut cx).is_ready()
    }

    /// The paused clock, from the start of a test.
    struct Clock(tokio::time::Instant);

    impl Clock {
        fn start() -> Self {
            Self(tokio::time::Instant::now())
        }

        /// Advances the paused clock to `at` after the start.
        async fn at(&self, at: Duration) {
            let now = tokio::time::Instant::now();
            let target = self.0 + at;
            assert!(target >= now, "the clock only moves forward");
            tokio::time::advance(target - now).await;
        }
    }

    /// A timer for a connection whose client side is `client`: what is written there is read
    /// through a [`CountingIo`] by [`byte_arrives`].
    fn connection() -> (
        ConnTimer,
        tokio::io::DuplexStream,
        CountingIo<tokio::io::DuplexStream>,
    ) {
        let counter = Arc::new(IoCounter::default());
        let (client, server) = tokio::io::duplex(1024);
        let io = CountingIo::new(server, counter.clone());
        (ConnTimer::new(counter, IDLE), client, io)
    }

    /// The client sends one byte and the connection reads it (as hyper does before polling the
    /// head's deadline again).
    async fn byte_arrives(
        client: &mut tokio::io::DuplexStream,
        io: &mut CountingIo<tokio::io::DuplexStream>,
    ) {
        let before = io.counter.read();
        client.write_all(b"G").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        assert_eq!(io.counter.read(), before + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_gets_the_header_deadline() {
        let clock = Clock::start();
        // A client that connects and sends nothing …
        let (silent, _client, _io) = connection();
        let mut silent = silent.sleep_until(Instant::now() + HEADER);
        // … and one that starts its head late: the deadline counts from the connection.
        let (timer, mut client, mut io) = connection();
        let mut late = timer.sleep_until(Instant::now() + HEADER);
        assert!(!fired(&mut silent));
        assert!(!fired(&mut late));
        clock.at(HEADER / 2).await;
        byte_arrives(&mut client, &mut io).await;
        assert!(!fired(&mut late));
        clock.at(HEADER - M).await;
        assert!(!fired(&mut silent), "fired before the header deadline");
        assert!(!fired(&mut late), "fired before the header deadline");
        clock.at(HEADER + M).await;
        assert!(
            fired(&mut silent),
            "a silent first connection is cut at the header deadline"
        );
        assert!(
            fired(&mut late),
            "a late first byte does not restart the header deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_waits_for_the_idle_deadline_while_no_byte_arrives() {
        let clock = Clock::start();
        let (timer, _client, _io) = connection();
        drop(timer.sleep_until(Instant::now() + HEADER));
        // The next request on the kept-alive connection.
        let mut head = timer.sleep_until(Instant::now() + HEADER);
        clock.at(HEADER + M).await;
        assert!(
            !fired(&mut head),
            "an idle keep-alive connection got the header deadline"
        );
        clock.at(IDLE - M).await;
        assert!(!fired(&mut head), "fired before the idle deadline");
        clock.at(IDLE + M).await;
        assert!(fired(&mut head), "the idle deadline passed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_switches_a_later_head_to_the_header_deadline_from_then() {
        let clock = Clock::start();
        let (timer, mut client, mut io) = connection();
        drop(timer.sleep_until(Instant::now() + HEADER));
        let mut head = timer.sleep_until(Instant::now() + HEADER);
        let arrival = Duration::from_secs(20);
        clock.at(arrival).await;
        assert!(!fired(&mut head), "still idle, past the header deadline");
        byte_arrives(&mut client, &mut io).await;
        assert!(!fired(&mut head), "the header deadline starts at the byte");
        clock.at(arrival + HEADER - M).await;
        assert!(
            !fired(&mut head),
            "fired before the header deadline from the byte"
        );
        clock.at(arrival + HEADER + M).await;
        assert!(
            fired(&mut head),
            "the head was not complete a header deadline after its first byte"
        );
        assert!(arrival + HEADER + M < IDLE, "well before the idle deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn more_bytes_do_not_extend_the_header_deadline() {
        let clock = Clock::start();
        let (timer, mut client, mut io) = connection();
        drop(timer.sleep_until(Instant::now() + HEADER));
        let mut head = timer.sleep_until(Instant::now() + HEADER);
        byte_arrives(&mut client, &mut io).await;
        assert!(!fired(&mut head));
        // A slowloris dribbling bytes: the deadline stays where the first byte put it.
        for second in 1..10 {
            clock.at(Duration::from_secs(second)).await;
            byte_arrives(&mut client, &mut io).await;
            assert!(!fired(&mut head));
        }
        clock.at(HEADER + M).await;
        assert!(
            fired(&mut head),
            "the header deadline is from the first byte"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_never_gets_less_than_the_header_deadline() {
        let clock = Clock::start();
        let counter = Arc::new(IoCounter::default());
        let short_idle = HEADER / 2;
        let timer = ConnTimer::new(counter, short_idle);
        drop(timer.sleep_until(Instant::now() + HEADER));
        let mut head = timer.sleep_until(Instant::now() + HEADER);
        clock.at(short_idle + M).await;
        assert!(
            !fired(&mut head),
            "an idle timeout shorter than the header deadline"
        );
        clock.at(HEADER + M).await;
        assert!(fired(&mut head));
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_the_deadline() {
        let clock = Clock::start();
        let start = Instant::now();
        let later = Duration::from_secs(30);
        let sooner = Duration::from_secs(5);

        // A first head, pushed later.
        let (timer, _client, _io) = connection();
        let mut first = timer.sleep_until(start + HEADER);
        timer.reset(&mut first, start + later);

        // A later head (idle phase), pulled in: a reset deadline is a header deadline.
        let (timer, mut client, mut io) = connection();
        drop(timer.sleep_until(start + HEADER));
        let mut idle = timer.sleep_until(start + HEADER);
        timer.reset(&mut idle, start + sooner);

        clock.at(sooner - M).await;
        assert!(!fired(&mut first));
        assert!(!fired(&mut idle));
        // A byte now no longer restarts anything.
        byte_arrives(&mut client, &mut io).await;
        clock.at(sooner + M).await;
        assert!(fired(&mut idle), "reset to 5 s");
        assert!(!fired(&mut first));
        clock.at(HEADER + M).await;
        assert!(
            !fired(&mut first),
            "still at the old deadline after a reset"
        );
        clock.at(later - M).await;
        assert!(!fired(&mut first));
        clock.at(later + M).await;
        assert!(fired(&mut first), "reset to 30 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_plain_sleep_fires_after_its_duration() {
        let clock = Clock::start();
        let (timer, _client, _io) = connection();
        let mut sleep = timer.sleep(HEADER);
        clock.at(HEADER - M).await;
        assert!(!fired(&mut sleep));
        clock.at(HEADER + M).await;
        assert!(fired(&mut sleep));
    }

    #[tokio::test]
    async fn counting_io_counts_both_ways() {
        let counter = Arc::new(IoCounter::default());
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = CountingIo::new(server, counter.clone());
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.unwrap(), 5);
        io.write_all(b"hi").await.unwrap();
        assert_eq!((counter.read(), counter.written()), (5, 2));
    }
}
