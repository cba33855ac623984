//! The one request pipeline. Every HTTP request the proxy relays — plain (`GET http://host/…` on
//! the proxy listener) or from inside an intercepted tunnel — goes through [`handle`], top to
//! bottom:
//!
//! 1. **one form**: the request is turned into an absolute URI naming its upstream
//!    (`http://host:port/…` as sent, or `https://<CONNECT host>:<port>/…` for a tunnel's inner
//!    request, which must name the CONNECT host: 421 otherwise);
//! 2. **precheck**: TRACE/TRACK and loops are refused;
//! 3. **policy**: host, port, method, path and client against the rules (report mode inside); where
//!    a rule restricts paths, an ambiguous path (`..;`, `\`, encoded `/`) is refused and any other
//!    is judged normalised and sent in exactly that form;
//! 4. **credentials**: the rule's credential overwrites any client-sent header of its name (a
//!    static or minted one) or re-signs the request (`aws_sigv4`) — never over plain http unless
//!    the rule allows it;
//! 5. **upstream**: hop-by-hop headers out, `Via` in, sent on the pooled client for the scheme,
//!    bodies streamed both ways; redirects are passed back, never followed;
//! 6. **echoes**: the response to a request that carried a credential has every echo of its
//!    secret masked (headers and streamed body, lengths kept).
//!
//! The audit record is filled along the way; [`super::outcome::respond`] finishes it. A feature
//! that touches requests (minted credentials, signing, response scrubbing) plugs in here, once,
//! and so applies to plain and intercepted requests alike.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;

use http::header;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;

use super::client_body::ClientBody;
use super::headers::{precheck, prepare_request_headers, prepare_response_headers};
use super::minted::Token;
use super::outcome;
use super::state::{ConnCtx, Snapshot};
use super::upstream;
use crate::body::{self, Body};
use crate::credentials::{inject, sigv4, AwsSigV4, Credential, Echoes, Masked};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::policy::{self, Denial, Host, RequestFacts, Rule};
use crate::telemetry::{Counted, Record};

/// Where a request came from: the only thing the pipeline treats differently.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// The proxy listener: an absolute-form `http://` request.
    Listener,
    /// Inside an intercepted tunnel to this CONNECT target.
    Tunnel(&'a TunnelTarget),
}

/// The CONNECT target an intercepted tunnel serves.
#[derive(Debug, Clone)]
pub struct TunnelTarget {
    /// CONNECT host.
    pub host: Host,
    /// CONNECT port.
    pub port: u16,
    /// `host:port` (IPv6 bracketed), the authority of every inner request's upstream URI.
    authority: Authority,
    /// The tunnel is a redirected connection (transparent mode): so are its inner requests.
    pub transparent: bool,
}

impl TunnelTarget {
    /// The target of `CONNECT host:port`.
    pub fn new(host: Host, port: u16) -> Result<Self, ProxyError> {
        let text = match host {
            Host::Ip(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            ref host => format!("{host}:{port}"),
        };
        let authority = Authority::from_str(&text)
            .map_err(|_| ProxyError::BadRequest("invalid CONNECT authority".into()))?;
        Ok(Self {
            host,
            port,
            authority,
            transparent: false,
        })
    }

    /// The inner request must name the CONNECT host: by its URI authority (h2 `:authority`,
    /// absolute-form h1) and by its `Host` header, whichever it carries.
    fn check_authority(&self, parts: &Parts) -> Result<(), ProxyError> {
        if let Some(scheme) = parts.uri.scheme_str() {
            if scheme != "https" {
                return Err(ProxyError::BadRequest(format!(
                    "{scheme}:// requests cannot be sent inside a TLS tunnel"
                )));
            }
        }
        let host_header = match parts.headers.get(header::HOST) {
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| Authority::from_str(v).ok())
                    .ok_or_else(|| ProxyError::BadRequest("invalid Host header".into()))?,
            ),
            None => None,
        };
        let named = parts.uri.authority().into_iter().chain(&host_header);
        let mut any = false;
        for authority in named {
            any = true;
            let same_host = Host::parse(authority.host()).as_ref() == Some(&self.host);
            let same_port = authority.port_u16().is_none_or(|p| p == self.port);
            if !(same_host && same_port) {
                return Err(ProxyError::Misdirected {
                    inner: authority.to_string(),
                    tunnel: self.authority.to_string(),
                });
            }
        }
        if !any {
            return Err(ProxyError::BadRequest("missing Host header".into()));
        }
        Ok(())
    }

    /// The absolute `https://host:port/…` form of an inner request's target.
    fn absolute(&self, uri: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ProxyError::BadRequest("invalid request target".into()))
    }
}

/// Where an admitted request goes and the rule that let it through (none when report mode let
/// a denied request through).
struct Admitted<'a, 's> {
    host: Cow<'a, Host>,
    rule: Option<&'s Rule>,
}

/// Runs one request through the pipeline, filling `record`. The caller hands the result to
/// [`super::outcome::respond`].
pub async fn handle(
    conn: &ConnCtx,
    snap: &Snapshot,
    identity: &Identity,
    origin: Origin<'_>,
    req: Request<Incoming>,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, incoming) = req.into_parts();
    let mut client_body = ClientBody::Streaming(Some(incoming));
    let admitted = match admit(snap, identity, origin, &mut parts, record) {
        Ok(admitted) => admitted,
        Err(err) => {
            client_body.discard().await;
            return Err(err);
        }
    };
    let Admitted { host, rule } = admitted;
    prepare_request_headers(&mut parts.headers);
    // The upstream client derives Host (HTTP/1.1) or :authority (h2) from the absolute URI, so
    // what is sent is exactly what policy judged.
    parts.headers.remove(header::HOST);
    let applied = apply_credential(
        conn,
        snap,
        identity,
        rule,
        &mut parts,
        &mut client_body,
        record,
    )
    .await;
    let injected = match applied {
        Ok(injected) => injected,
        Err(err) => {
            client_body.discard().await;
            return Err(err);
        }
    };
    if let (Some(signer), Some(rule)) = (&snap.signer, rule) {
        if rule.sign {
            let signed = sign(snap, signer, identity, &mut parts, &mut client_body).await;
            if let Err(err) = signed {
                client_body.discard().await;
                return Err(err);
            }
            record.event.signed = true;
        }
    }
    let echoes = injected.and_then(|i| i.echoes().cloned());
    if echoes.is_some() {
        // Echoes are masked in the bytes as they come: a compressed body would hide them.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            header::HeaderValue::from_static("identity"),
        );
    }
    record.request_headers(&parts.headers);
    parts.version = http::Version::HTTP_11;
    let counted = Counted::new(client_body, record.request_body.clone());
    let upstream_req = Request::from_parts(parts, body::boxed(counted));
    let response = send(snap, upstream_req, &host, record).await?;
    Ok(match echoes {
        Some(echoes) => mask_echoes(response, echoes),
        None => response,
    })
}

/// Everything decided before any I/O: one form, precheck, policy, the plain-http guard.
fn admit<'a, 's>(
    snap: &'s Snapshot,
    identity: &Identity,
    origin: Origin<'a>,
    parts: &mut Parts,
    record: &mut Record,
) -> Result<Admitted<'a, 's>, ProxyError> {
    if let Origin::Tunnel(tunnel) = origin {
        record.event.intercepted = true;
        record.event.transparent = tunnel.transparent;
        record.target(
            Some("https"),
            &tunnel.host.to_string(),
            tunnel.port,
            Some(&parts.uri),
        );
    }
    precheck(&parts.method, &parts.headers)?;
    let (host, port) = match origin {
        Origin::Listener => {
            let (host, port) = plain_target(&parts.uri)?;
            (Cow::Owned(host), port)
        }
        Origin::Tunnel(tunnel) => {
            tunnel.check_authority(parts)?;
            parts.uri = tunnel.absolute(&parts.uri)?;
            (Cow::Borrowed(&tunnel.host), tunnel.port)
        }
    };
    // Paths are judged only where a rule restricts them, and then sent exactly as judged.
    let judged = match snap.path_rules {
        true => Some(
            policy::judged_path(parts.uri.path())
                .map_err(|e| ProxyError::BadRequest(e.to_string()))?,
        ),
        false => None,
    };
    let facts = RequestFacts {
        host: &host,
        port,
        method: Some(&parts.method),
        path: judged.as_deref(),
        client: &identity.name,
    };
    let verdict = policy::judge(&snap.config.rules, &facts, identity.mode);
    let rule = outcome::admit(record, verdict)?;
    if let Some(Cow::Owned(path)) = judged {
        parts.uri = with_path(&parts.uri, &path)?;
    }
    let plain_http = parts.uri.scheme() == Some(&Scheme::HTTP);
    if let Some(rule) = rule {
        if plain_http && rule.credential.is_some() && !rule.plaintext_credentials {
            return Err(ProxyError::Denied(Denial::PlaintextCredential {
                host: host.to_string(),
            }));
        }
    }
    Ok(Admitted { host, rule })
}

/// `uri` with its path replaced (the query kept).
fn with_path(uri: &Uri, path: &str) -> Result<Uri, ProxyError> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        PathAndQuery::from_str(&path_and_query)
            .map_err(|_| ProxyError::BadRequest("invalid request path".into()))?,
    );
    Uri::from_parts(parts).map_err(|_| ProxyError::BadRequest("invalid request target".into()))
}

/// The host and port of an absolute-form `http://` target on the proxy listener.
fn plain_target(uri: &Uri) -> Result<(Host, u16), ProxyError> {
    let Some(authority) = uri.authority() else {
        return Err(ProxyError::OriginForm);
    };
    refuse_userinfo(authority)?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ProxyError::BadRequest(
                "https:// targets must be reached through CONNECT (set HTTPS_PROXY)".into(),
            ))
        }
        _ => {
            return Err(ProxyError::BadRequest(
                "only http:// targets are forwarded".into(),
            ))
        }
    }
    let host = Host::parse(authority.host())
        .ok_or_else(|| ProxyError::BadRequest(format!("invalid host {:?}", authority.host())))?;
    Ok((host, authority.port_u16().unwrap_or(80)))
}

/// A target with userinfo (`http://a@b/`) is refused (RFC 9110 §4.2.4): what would reach the
/// upstream (`Host: a@b`) is not what policy judged (`b`).
pub fn refuse_userinfo(authority: &Authority) -> Result<(), ProxyError> {
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "a request target with userinfo (user@host) is not allowed".into(),
        ));
    }
    Ok(())
}

/// Applies the rule's credential, counts it and names it in the audit record:
/// - a static one overwrites any client-sent header of its name;
/// - a minted one (spec §10) comes from the token cache: minted now if there is no valid token,
///   or the request fails (503) naming the credential; with claim templates, the token is the
///   one for the client's rendered claims (403 when the client lacks a claim);
/// - an `aws_sigv4` one re-signs the request, reading the body whole first when its payload hash
///   needs it (413 over 10 MiB).
async fn apply_credential<'s>(
    conn: &ConnCtx,
    snap: &'s Snapshot,
    identity: &Identity,
    rule: Option<&Rule>,
    parts: &mut Parts,
    client_body: &mut ClientBody,
    record: &mut Record,
) -> Result<Option<Injected<'s>>, ProxyError> {
    let Some(name) = rule.and_then(|r| r.credential.as_ref()) else {
        return Ok(None);
    };
    let injected = if let Some(cred) = snap.config.credentials.get(name) {
        inject(&mut parts.headers, cred);
        Injected::Static(cred)
    } else if let Some(minted) = snap.config.minted.get(name) {
        record.event.credential = Some(minted.name().clone());
        let entry = conn
            .state
            .tokens
            .entry_for(minted, identity.claims.as_deref())
            .map_err(ProxyError::MissingClaim)?;
        // The token's echoes reach every audit event through the telemetry's live secrets.
        let token = entry.token(&snap.upstreams, &conn.state.telemetry).await?;
        inject(&mut parts.headers, &token.credential);
        Injected::Minted(token)
    } else if let Some(signer) = snap.config.signers.get(name) {
        record.event.credential = Some(signer.name.clone());
        let whole = match signer.needs_body(&parts.headers) {
            true => Some(
                client_body
                    .read_whole(sigv4::MAX_HASHED_BODY_BYTES, "an AWS SigV4 payload hash")
                    .await?,
            ),
            false => None,
        };
        let now = std::time::SystemTime::now();
        signer
            .sign(
                &parts.method,
                &mut parts.uri,
                &mut parts.headers,
                whole.as_deref(),
                now,
            )
            .map_err(|err| match err {
                sigv4::SigV4Error::Signing => ProxyError::Internal(format!(
                    "credential {} could not sign the request",
                    signer.name
                )),
                refused => ProxyError::BadRequest(refused.to_string()),
            })?;
        Injected::Signed(signer)
    } else {
        return Ok(None);
    };
    record.event.credential = Some(injected.name().clone());
    conn.state
        .telemetry
        .metrics
        .credential_injections
        .with_label_values(&[&**injected.name()])
        .inc();
    Ok(Some(injected))
}

/// Signs the request (spec §12), after its credential: `Portcullis-Client`, `Content-Digest` for
/// a body (read whole, up to `signing.max_body_bytes`, else 413), `Signature-Input` and
/// `Signature`; client-sent ones of these are replaced.
async fn sign(
    snap: &Snapshot,
    signer: &crate::signing::Signer,
    identity: &Identity,
    parts: &mut Parts,
    client_body: &mut ClientBody,
) -> Result<(), ProxyError> {
    use crate::signing::{content_digest, Message};
    for name in ["signature", "signature-input", "content-digest"] {
        parts.headers.remove(name);
    }
    let client = header::HeaderValue::from_str(&identity.name)
        .map_err(|_| ProxyError::Internal("the client name is not a header value".into()))?;
    parts.headers.insert("portcullis-client", client);
    let digest = match http_body::Body::is_end_stream(client_body) {
        true => None,
        false => {
            let limit = snap.config.signing.as_ref().map_or(0, |s| s.max_body_bytes);
            let body = client_body
                .read_whole(limit, "a signed Content-Digest")
                .await?;
            (!body.is_empty()).then(|| content_digest(&body))
        }
    };
    if let Some(digest) = &digest {
        let value = header::HeaderValue::from_str(digest)
            .map_err(|_| ProxyError::Internal("content digest".into()))?;
        parts.headers.insert("content-digest", value);
    }
    let uri = &parts.uri;
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let authority = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host,
    };
    let path = match uri.path() {
        "" => "/",
        path => path,
    };
    let query = format!("?{}", uri.query().unwrap_or(""));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let message = Message {
        method: parts.method.as_str(),
        authority: &authority,
        path,
        query: &query,
        client: &identity.name,
        content_digest: digest.as_deref(),
    };
    let signed = signer
        .sign(&message, created)
        .map_err(|e| ProxyError::Internal(e.to_string()))?;
    for (name, value) in [
        ("signature-input", signed.input),
        ("signature", signed.signature),
    ] {
        let value = header::HeaderValue::from_str(&value)
            .map_err(|_| ProxyError::Internal("signature header".into()))?;
        parts.headers.insert(name, value);
    }
    Ok(())
}

/// The credential a request carries: a snapshot's static one, a minted token, or a signer.
enum Injected<'s> {
    Static(&'s Credential),
    Minted(Arc<Token>),
    Signed(&'s AwsSigV4),
}

impl Injected<'_> {
    fn name(&self) -> &Arc<str> {
        match self {
            Self::Static(cred) => &cred.name,
            Self::Minted(token) => &token.credential.name,
            Self::Signed(signer) => &signer.name,
        }
    }

    /// What of its secrets must not come back in the response.
    fn echoes(&self) -> Option<&Arc<Echoes>> {
        match self {
            Self::Static(cred) => cred.echoes.as_ref(),
            Self::Minted(token) => token.credential.echoes.as_ref(),
            Self::Signed(signer) => signer.echoes.as_ref(),
        }
    }
}

/// Secrets do not come back: the response to a request that carried an injected credential has
/// every echo of its secret masked, in the headers and in the streamed body.
fn mask_echoes(response: Response<Body>, echoes: Arc<Echoes>) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    echoes.mask_headers(&mut parts.headers);
    Response::from_parts(parts, body::boxed(Masked::new(body, echoes)))
}

/// Sends `req` upstream; the response head must arrive within the idle timeout.
async fn send(
    snap: &Snapshot,
    req: Request<Body>,
    host: &Host,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let timeout = snap.config.limits.idle_timeout;
    let response = match tokio::time::timeout(timeout, snap.upstreams.request(req)).await {
        Err(_) => {
            return Err(ProxyError::Timeout {
                host: host.to_string(),
                stage: "response",
            })
        }
        Ok(Err(err)) => {
            // A body the client framed badly (a bad chunk size, …) is the client's error: 400,
            // and no upstream error counted.
            if let Some(why) = record.request_body.failure() {
                return Err(ProxyError::BadRequest(format!(
                    "malformed request body: {why}"
                )));
            }
            return Err(upstream::failure(&host.to_string(), &err));
        }
        Ok(Ok(response)) => response,
    };
    let (response, addr) = response;
    record.event.upstream_addr = addr;
    let (mut parts, body) = response.into_parts();
    prepare_response_headers(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_targets() {
        assert!(matches!(
            plain_target(&"/".parse().unwrap()),
            Err(ProxyError::OriginForm)
        ));
        assert!(matches!(
            plain_target(&"https://a.example/".parse().unwrap()),
            Err(ProxyError::BadRequest(_))
        ));
        let (host, port) = plain_target(&"http://A.Example:8080/x".parse().unwrap()).unwrap();
        assert_eq!(host, Host::Name("a.example".into()));
        assert_eq!(port, 8080);
        let (host, port) = plain_target(&"http://[::1]/".parse().unwrap()).unwrap();
        assert_eq!(port, 80);
        assert_eq!(host, Host::Ip("::1".parse().unwrap()));
        for userinfo in [
            "http://denied.test:1@rec.test/",
            "http://u:p@rec.test/",
            "http://@rec.test/",
        ] {
            assert!(
                matches!(
                    plain_target(&userinfo.parse().unwrap()),
                    Err(ProxyError::BadRequest(_))
                ),
                "{userinfo}"
            );
        }
    }

    fn inner(uri: &str, host: Option<&str>) -> Parts {
        let mut req = Request::builder().uri(uri);
        if let Some(h) = host {
            req = req.header(header::HOST, h);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn inner_requests_must_name_the_connect_host_and_become_absolute() {
        let t = TunnelTarget::new(Host::parse("api.example").unwrap(), 8443).unwrap();
        t.check_authority(&inner("/x?y=1", Some("API.example:8443")))
            .unwrap();
        t.check_authority(&inner("https://api.example:8443/x", None))
            .unwrap();
        assert!(matches!(
            t.check_authority(&inner("/x", Some("other.example:8443"))),
            Err(ProxyError::Misdirected { .. })
        ));
        assert!(matches!(
            t.check_authority(&inner("/x", Some("api.example:443"))),
            Err(ProxyError::Misdirected { .. })
        ));
        assert!(matches!(
            t.check_authority(&inner("http://api.example:8443/x", None)),
            Err(ProxyError::BadRequest(_))
        ));
        assert!(matches!(
            t.check_authority(&inner("/x", None)),
            Err(ProxyError::BadRequest(_))
        ));
        let uri = t.absolute(&"/x?y=1".parse().unwrap()).unwrap();
        assert_eq!(uri, "https://api.example:8443/x?y=1");
        let v6 = TunnelTarget::new(Host::parse("[::1]").unwrap(), 443).unwrap();
        assert_eq!(
            v6.absolute(&"/".parse().unwrap()).unwrap(),
            "https://[::1]:443/"
        );
    }
}
