//! Secrets do not come back (spec §3): an upstream that echoes an injected secret — nginx
//! reflecting `Authorization`, a debug endpoint, a `Set-Cookie` — must not hand it to the
//! pipeline that was never meant to hold it. In responses to requests that carried an injected
//! credential, every occurrence of the secret (raw, and a Basic pair's base64 form) is replaced
//! by as many `*` as it has bytes, in headers and trailers and in the body, streaming, also when
//! it straddles two reads. Lengths hold, so `Content-Length` stays true.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};

/// The automaton every search for secrets uses (echo masking here, the audit scrubber):
/// leftmost-longest, so a secret that contains another is replaced whole; and a contiguous NFA,
/// never the DFA the builder picks for a few patterns. A DFA's build grows with length ×
/// alphabet — 1.3 ms for a 1 KB token, seconds for a 60 KB one, 3.5 MB for a GitHub App key —
/// and these are built at run time (per minted, verified or refused token) and per
/// configuration snapshot. The NFA builds in linear time and, with its prefilter, scans as fast.
pub fn secret_matcher<I, P>(patterns: I) -> Result<AhoCorasick, aho_corasick::BuildError>
where
    I: IntoIterator<Item = P>,
    P: AsRef<[u8]>,
{
    AhoCorasick::builder()
        .kind(Some(AhoCorasickKind::ContiguousNFA))
        .match_kind(MatchKind::LeftmostLongest)
        .build(patterns)
}

/// The byte strings of one credential that must not come back, compiled once per configuration.
#[derive(Debug)]
pub struct Echoes {
    automaton: AhoCorasick,
    /// Bytes that may hold the start of an occurrence not yet complete: the longest pattern
    /// less one.
    carry: usize,
}

impl Echoes {
    /// Echoes of `patterns` (empty ones ignored); `None` if there is nothing to look for or the
    /// automaton cannot be built.
    pub fn new(patterns: &[&[u8]]) -> Option<Self> {
        // Each secret also in the forms a JSON body or a query string would carry it.
        let encoded: Vec<Vec<u8>> = patterns
            .iter()
            .filter_map(|p| std::str::from_utf8(p).ok())
            .flat_map(encoded_forms)
            .map(String::into_bytes)
            .collect();
        let patterns: Vec<&[u8]> = patterns
            .iter()
            .copied()
            .chain(encoded.iter().map(Vec::as_slice))
            .filter(|p| !p.is_empty())
            .collect();
        let longest = patterns.iter().map(|p| p.len()).max()?;
        let automaton = secret_matcher(&patterns).ok()?;
        Some(Self {
            automaton,
            carry: longest - 1,
        })
    }

    /// Replaces every occurrence in `bytes` by `*`s (each secret raw, JSON-escaped and
    /// percent-encoded); whether anything was replaced.
    pub fn mask(&self, bytes: &mut [u8]) -> bool {
        let found: Vec<(usize, usize)> = self
            .automaton
            .find_iter(&*bytes)
            .map(|m| (m.start(), m.end()))
            .collect();
        for (start, end) in &found {
            bytes[*start..*end].fill(b'*');
        }
        !found.is_empty()
    }

    /// `text` with every occurrence replaced by `with`, or `None` when there is none.
    pub fn replace_all(&self, text: &str, with: &str) -> Option<String> {
        if !self.automaton.is_match(text) {
            return None;
        }
        let replacements = vec![with; self.automaton.patterns_len()];
        Some(self.automaton.replace_all(text, &replacements))
    }

    /// Masks every header value that holds an occurrence.
    pub fn mask_headers(&self, headers: &mut HeaderMap) {
        for value in headers.values_mut() {
            if !self.automaton.is_match(value.as_bytes()) {
                continue;
            }
            let mut bytes = value.as_bytes().to_vec();
            self.mask(&mut bytes);
            // `*` is a valid header byte, so this cannot fail; if it did, drop the value.
            *value =
                HeaderValue::from_bytes(&bytes).unwrap_or_else(|_| HeaderValue::from_static(""));
        }
    }
}

/// A response body with every echo masked. It holds back the last `carry` bytes of what it has
/// seen until more arrive (or the body ends), so an occurrence split across reads is still found.
pub struct Masked<B> {
    inner: B,
    echoes: Arc<Echoes>,
    held: BytesMut,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl<B> Masked<B> {
    /// Masks `inner`'s data and trailers.
    pub fn new(inner: B, echoes: Arc<Echoes>) -> Self {
        Self {
            inner,
            echoes,
            held: BytesMut::new(),
            trailers: None,
            done: false,
        }
    }

    fn flush(&mut self) -> Option<Frame<Bytes>> {
        (!self.held.is_empty()).then(|| Frame::data(self.held.split().freeze()))
    }
}

impl<B> Body for Masked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if this.done {
                if let Some(data) = this.flush() {
                    return Poll::Ready(Some(Ok(data)));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    continue;
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    this.held.extend_from_slice(&data);
                    this.echoes.mask(&mut this.held);
                    // Everything but the last `carry` bytes is final: an occurrence starting
                    // earlier would have ended within what is held, and is masked already.
                    if this.held.len() > this.echoes.carry {
                        let ready = this.held.len() - this.echoes.carry;
                        return Poll::Ready(Some(Ok(Frame::data(
                            this.held.split_to(ready).freeze(),
                        ))));
                    }
                }
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        this.echoes.mask_headers(&mut trailers);
                        this.trailers = Some(trailers);
                    }
                    this.done = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.held.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Lengths hold: what is left is what the inner body has left plus what is held.
        let inner = self.inner.size_hint();
        let held = self.held.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint.set_lower(inner.lower().saturating_add(held));
        hint
    }
}

/// The other forms a secret takes where it may be echoed or logged: JSON-escaped (a `"`, `\\` or
/// control character in a JSON string) and percent-encoded (in a query string or a form), each
/// only when it differs from the secret itself. Maskers search for these too.
pub fn encoded_forms(secret: &str) -> Vec<String> {
    let mut forms = Vec::new();
    if let Ok(json) = serde_json::to_string(secret) {
        let inner = &json[1..json.len() - 1];
        if inner != secret {
            forms.push(inner.to_owned());
        }
    }
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let percent = percent_encoding::utf8_percent_encode(secret, UNRESERVED).to_string();
    if percent != secret {
        forms.push(percent);
    }
    forms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_secret_builds_a_linear_automaton_that_still_masks_it() {
        // A refused bearer token can be as long as the client's header limit allows: the
        // automaton must stay proportional to it (a DFA for 64 KB took 7.7 MB and seconds).
        let secret: String = (0..65_536)
            .map(|i| char::from(b'a' + u8::try_from(i * 7 % 26).unwrap()))
            .collect();
        let echoes = Echoes::new(&[secret.as_bytes()]).unwrap();
        assert!(
            echoes.automaton.memory_usage() < 2 << 20,
            "{} bytes",
            echoes.automaton.memory_usage()
        );
        let mut text = format!("before {secret} after").into_bytes();
        assert!(echoes.mask(&mut text));
        assert_eq!(
            text,
            format!("before {} after", "*".repeat(secret.len())).as_bytes()
        );
    }

    #[test]
    fn encoded_forms_of_a_secret() {
        assert!(encoded_forms("plainSecret-1.2_3~").is_empty());
        assert_eq!(
            encoded_forms("a\"b/c+d"),
            vec!["a\\\"b/c+d".to_owned(), "a%22b%2Fc%2Bd".to_owned()]
        );
        let echoes = Echoes::new(&[b"p\"w/d"]).unwrap();
        let mut body = br#"{"echo":"p\"w/d","q":"p%22w%2Fd"}"#.to_vec();
        assert!(echoes.mask(&mut body));
        assert_eq!(body, br#"{"echo":"******","q":"*********"}"#.to_vec());
    }

    use http_body_util::{BodyExt, StreamBody};

    fn echoes() -> Arc<Echoes> {
        Arc::new(Echoes::new(&[b"s3cr3t-token", b"c3ZjOnB3"]).unwrap())
    }

    async fn masked(chunks: &[&'static [u8]]) -> Vec<u8> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let out = Masked::new(body, echoes()).collect().await.unwrap();
        out.to_bytes().to_vec()
    }

    #[tokio::test]
    async fn echoes_are_masked_across_reads_with_lengths_kept() {
        let out = masked(&[b"a s3cr3t-to", b"ken b", b"c3Zj", b"OnB3 c"]).await;
        assert_eq!(out, b"a ************ b******** c");
        let out = masked(&[b"s", b"3", b"cr3t-token"]).await;
        assert_eq!(out, b"************");
        let plain = masked(&[b"nothing ", b"to see"]).await;
        assert_eq!(plain, b"nothing to see");
        assert_eq!(masked(&[]).await, b"");
    }

    #[test]
    fn headers_are_masked() {
        let e = echoes();
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("Bearer s3cr3t-token"));
        h.insert(
            "set-cookie",
            HeaderValue::from_static("auth=c3ZjOnB3; Path=/"),
        );
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        e.mask_headers(&mut h);
        assert_eq!(h["x-echo"], "Bearer ************");
        assert_eq!(h["set-cookie"], "auth=********; Path=/");
        assert_eq!(h["content-type"], "text/plain");
    }
}
