//! The client's request body as the pipeline holds it ([`ClientBody`]): streamed through, or read
//! whole where a step needs all of it (a SigV4 payload hash, a signed `Content-Digest`) — the one
//! place a request body is buffered, always up to a limit.

use bytes::Bytes;
use hyper::body::Incoming;

use crate::body;
use crate::error::ProxyError;

/// The client's request body on its way upstream: streamed through as it comes, or read whole
/// first where a step needs all of it (a SigV4 payload hash). When the upstream is done with a
/// streamed body before it ended (it answered early), the rest is read and dropped in the
/// background (bounded, as for a refused request), so the client's request completes cleanly:
/// an h2 client would otherwise see its stream reset.
pub enum ClientBody {
    /// Streamed from the client (taken when the body is discarded or dropped).
    Streaming(Option<Incoming>),
    /// Read whole (taken when it is sent).
    Whole(Option<Bytes>),
}

impl ClientBody {
    /// Reads the body whole, up to `limit_bytes` (else 413, naming `purpose`), and keeps it to
    /// be sent. A body the client framed badly is a 400.
    pub async fn read_whole(
        &mut self,
        limit_bytes: usize,
        purpose: &'static str,
    ) -> Result<Bytes, ProxyError> {
        let too_large = || ProxyError::BodyTooLarge {
            limit_bytes,
            purpose,
        };
        let incoming = match self {
            Self::Whole(Some(bytes)) => return Ok(bytes.clone()),
            Self::Whole(None) | Self::Streaming(None) => return Ok(Bytes::new()),
            Self::Streaming(Some(incoming)) => incoming,
        };
        // A declared length says it before anything is read.
        if http_body::Body::size_hint(incoming).lower() > limit_bytes as u64 {
            return Err(too_large());
        }
        let whole =
            body::collect_limited(incoming, limit_bytes)
                .await
                .map_err(|err| match err {
                    body::CollectError::TooLarge => too_large(),
                    body::CollectError::Body(err) => {
                        ProxyError::BadRequest(format!("malformed request body: {err}"))
                    }
                })?;
        *self = Self::Whole(Some(whole.clone()));
        Ok(whole)
    }

    /// The request is refused: what is left of a streamed body is read and dropped (bounded).
    pub async fn discard(mut self) {
        if let Self::Streaming(rest) = &mut self {
            if let Some(rest) = rest.take() {
                body::discard(rest).await;
            }
        }
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match &mut *self {
            Self::Streaming(Some(body)) => std::pin::Pin::new(body).poll_frame(cx),
            Self::Whole(whole) => {
                std::task::Poll::Ready(whole.take().map(|b| Ok(http_body::Frame::data(b))))
            }
            Self::Streaming(None) => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Streaming(body) => body.as_ref().is_none_or(http_body::Body::is_end_stream),
            Self::Whole(whole) => whole.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Streaming(Some(body)) => http_body::Body::size_hint(body),
            Self::Whole(Some(bytes)) => http_body::SizeHint::with_exact(bytes.len() as u64),
            Self::Streaming(None) | Self::Whole(None) => http_body::SizeHint::with_exact(0),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let Self::Streaming(rest) = self else { return };
        let Some(rest) = rest.take() else { return };
        if http_body::Body::is_end_stream(&rest) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(body::discard(rest));
        }
    }
}
