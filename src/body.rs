//! The body type every handler returns: a boxed stream of `Bytes`, so upstream bodies stream
//! through untouched while generated responses use the same type.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};

/// Boxed error carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every request and response the proxy handles.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `bytes` in full (generated responses).
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Boxes any streamed body (hyper's `Incoming`, a counting wrapper, …).
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Why [`collect_limited`] stopped before the end of the body.
#[derive(Debug)]
pub enum CollectError<E> {
    /// More than the limit arrived.
    TooLarge,
    /// The body failed (a bad chunk, a reset connection).
    Body(E),
}

/// Reads `body` to its end into one buffer, at most `limit_bytes` of data (trailers are
/// ignored): the one place a body is buffered whole (a request body to hash or sign, a token
/// endpoint's or issuer's answer).
pub async fn collect_limited<B>(
    body: &mut B,
    limit_bytes: usize,
) -> Result<Bytes, CollectError<B::Error>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(CollectError::Body)?.into_data() {
            if whole.len() + data.len() > limit_bytes {
                return Err(CollectError::TooLarge);
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(whole.freeze())
}

/// Most of a refused request's body the proxy reads (and drops) so the connection stays usable.
const DISCARD_LIMIT_BYTES: usize = 1024 * 1024;
/// Longest it waits for that.
const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads and drops the body of a request the proxy refuses, up to 1 MiB within 2 s, so that
/// HTTP/1.1 keep-alive survives and an h2 client is not reset mid-upload. Larger or slower
/// bodies are left unread (hyper then closes the connection or resets the stream).
pub async fn discard<B>(mut body: B)
where
    B: http_body::Body + Unpin,
{
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen += bytes::Buf::remaining(data);
                if seen > DISCARD_LIMIT_BYTES {
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIMEOUT, drain).await;
}
