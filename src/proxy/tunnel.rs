//! Raw tunnels: bytes relayed both ways between the client and the upstream socket the CONNECT
//! dialled, until both sides close, an error, or the idle timeout.
//!
//! The client's first bytes are inspected: a TLS ClientHello whose SNI names another host than
//! the CONNECT target closes the tunnel (`sni_mismatch`), so an allowed name cannot be used as a
//! front for another destination.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::policy::{normalize_host, Host};

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Both sides closed.
    Closed,
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// The ClientHello named another host.
    SniMismatch,
    /// The first bytes looked like TLS but were not a valid ClientHello, or never completed.
    BadClientHello,
    /// A side reset the connection (or it was gone when written to) before the other side was
    /// done.
    Reset,
    /// Another socket error.
    Error,
    /// Cut when the shutdown grace period ended.
    Shutdown,
}

impl TunnelEnd {
    /// Name for logs and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle_timeout",
            Self::SniMismatch => "sni_mismatch",
            Self::BadClientHello => "bad_client_hello",
            Self::Reset => "connection reset",
            Self::Error => "socket error",
            Self::Shutdown => "cut at shutdown",
        }
    }
}

/// A relay buffer starts at this size (interactive traffic: small reads) …
const RELAY_BUFFER_BYTES: usize = 16 * 1024;
/// … and doubles up to this one while reads keep filling it (bulk transfers: fewer syscalls).
const RELAY_BUFFER_MAX_BYTES: usize = 256 * 1024;
const MAX_CLIENT_HELLO_BYTES: usize = 64 * 1024;
/// The first read from the client: enough for most ClientHellos, on the task's own state, so an
/// idle tunnel holds no heap buffer.
const FIRST_READ_BYTES: usize = 2048;

/// Relays bytes both ways until both sides close (a side's EOF is passed on as a write shutdown),
/// an error, or `idle` passes with no byte in either direction. (The caller counts the bytes, on
/// the client side, so that the counts survive the relay being cut.)
/// The client's first bytes are inspected for a ClientHello naming another host than `host`;
/// once they start, the whole ClientHello must arrive within `hello_timeout`.
///
/// Relay buffers are allocated on first traffic, so an idle tunnel costs little memory.
pub async fn relay<C>(
    client: C,
    upstream: TcpStream,
    host: &Host,
    idle: Duration,
    hello_timeout: Duration,
) -> TunnelEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    // Set when a side has sent its EOF: a write to it failing afterwards is that side having
    // left after it was done (a client that closes instead of half-closing), not a failure.
    let client_done = AtomicBool::new(false);
    let upstream_done = AtomicBool::new(false);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();

    let up = async {
        let first = inspect_first_bytes(&mut client_read, host, hello_timeout).await?;
        if first.is_empty() {
            client_done.store(true, Ordering::Relaxed);
            let _ = upstream_write.shutdown().await;
            return Ok(());
        }
        upstream_write
            .write_all(&first)
            .await
            .map_err(|e| ended(&e))?;
        drop(first);
        touch(&last_activity, start);
        let ends = Ends {
            reader: &client_done,
            writer: &upstream_done,
        };
        pump(
            &mut client_read,
            &mut upstream_write,
            &last_activity,
            start,
            ends,
        )
        .await
    };
    let down = async {
        // Wait for the upstream to have something before allocating a buffer.
        upstream_read.readable().await.map_err(|e| ended(&e))?;
        let ends = Ends {
            reader: &upstream_done,
            writer: &client_done,
        };
        pump(
            &mut upstream_read,
            &mut client_write,
            &last_activity,
            start,
            ends,
        )
        .await
    };
    let idle_watch = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    // Pinned here and polled by reference: moved into `try_join!` (and the block around it),
    // each would be stored again in this future, which is the idle tunnel's memory.
    tokio::pin!(up, down);
    tokio::select! {
        result = async { tokio::try_join!(&mut up, &mut down) } => match result {
            Ok(_) => TunnelEnd::Closed,
            Err(end) => end,
        },
        () = idle_watch => TunnelEnd::Idle,
    }
}

fn touch(last: &AtomicU64, start: Instant) {
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    last.store(ms, Ordering::Relaxed);
}

/// How an I/O error ends a tunnel.
fn ended(e: &std::io::Error) -> TunnelEnd {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => TunnelEnd::Reset,
        _ => TunnelEnd::Error,
    }
}

/// The EOF flags of one direction: its reader's side (set here at EOF) and its writer's side.
struct Ends<'a> {
    reader: &'a AtomicBool,
    writer: &'a AtomicBool,
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    last: &AtomicU64,
    start: Instant,
    ends: Ends<'_>,
) -> Result<(), TunnelEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER_BYTES];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(n) => n,
            // The other side had finished (its EOF passed on), and this one reset instead of
            // closing: everything was delivered, a clean end.
            Err(e) if ended(&e) == TunnelEnd::Reset && ends.writer.load(Ordering::Relaxed) => 0,
            Err(e) => return Err(ended(&e)),
        };
        if n == 0 {
            ends.reader.store(true, Ordering::Relaxed);
            // Pass the EOF on; the other direction keeps flowing until its side closes too.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        if let Err(e) = writer.write_all(&buf[..n]).await {
            // The writer's side already said it was done and then went away: a clean end.
            if ends.writer.load(Ordering::Relaxed) {
                return Ok(());
            }
            return Err(ended(&e));
        }
        touch(last, start);
        if n == buf.len() && buf.len() < RELAY_BUFFER_MAX_BYTES {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// Reads the client's first bytes (however long that takes: the idle timeout governs). Not TLS:
/// returned as they are. TLS: the rest of the ClientHello must follow within `hello_timeout`,
/// then its SNI is compared with the CONNECT host. Returns the bytes to forward (empty on EOF).
async fn inspect_first_bytes<R: AsyncRead + Unpin>(
    reader: &mut R,
    host: &Host,
    hello_timeout: Duration,
) -> Result<BytesMut, TunnelEnd> {
    let mut first = [0u8; FIRST_READ_BYTES];
    let n = reader
        .read(&mut first)
        .await
        .map_err(|_| TunnelEnd::Error)?;
    let mut buf = BytesMut::from(&first[..n]);
    if n == 0 || !looks_like_tls(&first[..n]) {
        return Ok(buf);
    }
    // A TLS record that is not a handshake (a ChangeCipherSpec or alert sent first) would slip
    // past the SNI check: a TLS-looking first record must be the ClientHello.
    if first[0] != TLS_HANDSHAKE {
        return Err(TunnelEnd::BadClientHello);
    }
    match tokio::time::timeout(hello_timeout, complete_client_hello(reader, &mut buf, host)).await {
        Ok(Ok(())) => Ok(buf),
        Ok(Err(end)) => Err(end),
        Err(_) => Err(TunnelEnd::BadClientHello),
    }
}

/// The TLS record type of handshake messages (the ClientHello).
pub const TLS_HANDSHAKE: u8 = 0x16;

/// What the first bytes of a connection say about its ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Incomplete,
    /// A whole ClientHello, and its SNI if it has one.
    Complete(Option<String>),
    /// Not a valid ClientHello (or larger than any sane one).
    Invalid,
}

/// Reads a ClientHello from the start of `bytes` (which are left for the TLS server to read
/// again: transparent mode peeks them).
pub fn client_hello(bytes: &[u8]) -> Hello {
    if bytes.first() != Some(&TLS_HANDSHAKE) {
        return Hello::Invalid;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut unread = bytes;
    while !unread.is_empty() {
        match acceptor.read_tls(&mut unread) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Hello::Invalid,
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            Hello::Complete(accepted.client_hello().server_name().map(str::to_owned))
        }
        Ok(None) if bytes.len() < MAX_CLIENT_HELLO_BYTES => Hello::Incomplete,
        _ => Hello::Invalid,
    }
}

/// Whether bytes start like a TLS record: a content type (change_cipher_spec 20, alert 21,
/// handshake 22, application_data 23, heartbeat 24) followed by a 3.x record version.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(0x14..=0x18)) && bytes.get(1).is_none_or(|v| *v == 0x03)
}

async fn complete_client_hello<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    host: &Host,
) -> Result<(), TunnelEnd> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        let mut unread = &buf[fed..];
        while !unread.is_empty() {
            let taken = acceptor
                .read_tls(&mut unread)
                .map_err(|_| TunnelEnd::BadClientHello)?;
            if taken == 0 {
                break;
            }
        }
        fed = buf.len();
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return match sni {
                    Some(name) if !sni_matches(&name, host) => Err(TunnelEnd::SniMismatch),
                    _ => Ok(()),
                };
            }
            Ok(None) => {}
            Err(_) => return Err(TunnelEnd::BadClientHello),
        }
        if buf.len() >= MAX_CLIENT_HELLO_BYTES {
            return Err(TunnelEnd::BadClientHello);
        }
        let n = reader.read_buf(buf).await.map_err(|_| TunnelEnd::Error)?;
        if n == 0 {
            return Err(TunnelEnd::BadClientHello);
        }
    }
}

/// Whether a ClientHello's SNI names the CONNECT host.
pub fn sni_matches(sni: &str, host: &Host) -> bool {
    match (normalize_host(sni), host) {
        (Some(sni), Host::Name(name)) => &sni == name,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_looking_records() {
        assert!(looks_like_tls(&[0x16, 0x03, 0x01]));
        assert!(looks_like_tls(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01]));
        assert!(looks_like_tls(&[0x15, 0x03]));
        assert!(!looks_like_tls(b"SSH-2.0-x"));
        assert!(!looks_like_tls(b"GET / HTTP/1.1"));
        assert!(!looks_like_tls(&[0x16, 0x00]));
    }

    #[tokio::test]
    async fn a_record_before_the_client_hello_closes_the_tunnel() {
        let host = Host::parse("api.example.com").unwrap();
        let mut ccs: &[u8] = &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        let end = inspect_first_bytes(&mut ccs, &host, Duration::from_secs(1)).await;
        assert_eq!(end.unwrap_err(), TunnelEnd::BadClientHello);
        let mut ssh: &[u8] = b"SSH-2.0-OpenSSH\r\n";
        let first = inspect_first_bytes(&mut ssh, &host, Duration::from_secs(1)).await;
        assert_eq!(&first.unwrap()[..], b"SSH-2.0-OpenSSH\r\n");
    }

    #[test]
    fn sni_comparison_normalises() {
        let h = Host::parse("api.example.com").unwrap();
        assert!(sni_matches("API.example.com.", &h));
        assert!(!sni_matches("evil.example.com", &h));
        let ip = Host::parse("192.0.2.1").unwrap();
        assert!(!sni_matches("api.example.com", &ip));
    }
}
