//! The one place a request from the proxy listener is routed. Read top to bottom, this is a
//! request's path through the proxy:
//!
//! 1. the configuration snapshot current now (kept to the end, so a reload never changes a
//!    request midway) and an audit record;
//! 2. **client identity** ([`crate::identity`]): `Proxy-Authorization` (a client token, or an OIDC
//!    token verified with its issuer's keys) or source network, else 407;
//! 3. draining: a new CONNECT gets 503; other requests are served, and their responses say
//!    `Connection: close`;
//! 4. **CONNECT** ([`super::connect`]): policy, dial, `200`, then a raw tunnel
//!    ([`super::tunnel`]) or interception ([`super::intercept`], whose inner requests come back
//!    through step 5 with origin `Tunnel`);
//! 5. anything else: **the one request pipeline** ([`super::request`]): policy → credentials →
//!    upstream;
//! 6. **audit + metrics**: [`super::outcome::respond`] turns a failure into its response and
//!    finishes the record when the response body ends.

use std::sync::Arc;

use http::header::PROXY_AUTHORIZATION;
use http::{Method, Request, Response};
use hyper::body::Incoming;

use super::connect;
use super::headers::close_after;
use super::oidc;
use super::outcome;
use super::request::{self, Origin};
use super::state::{ConnCtx, Snapshot};
use crate::body::Body;
use crate::credentials::Echoes;
use crate::error::ProxyError;
use crate::identity::{AuthFailure, Identity, Presented};
use crate::telemetry::{Kind, Record};

/// Serves one request from the proxy listener.
pub async fn serve(conn: &ConnCtx, mut req: Request<Incoming>) -> Response<Body> {
    let snap = conn.state.snapshot();
    let telemetry = &conn.state.telemetry;
    let kind = if req.method() == Method::CONNECT {
        Kind::Tunnel
    } else {
        Kind::Request
    };
    let mut record = Record::new(
        telemetry,
        snap.masker.clone(),
        kind,
        snap.clients.unauthenticated(),
        conn.peer,
        req.method(),
    );
    record_claimed_target(&mut record, &req);
    let identity = match identify(conn, &snap, &req, &mut record).await {
        Ok(identity) => identity,
        Err(err) => return outcome::respond(telemetry, record, Err(err)),
    };
    if kind == Kind::Tunnel {
        // No new tunnel once shutdown has begun: it could outlive the grace period.
        if conn.state.is_draining() {
            return outcome::respond(telemetry, record, Err(ProxyError::Draining));
        }
        return match connect::open(conn, &snap, &identity, &req, &mut record).await {
            Ok(opened) => connect::start(conn, &snap, identity, opened, &mut req, record),
            Err(err) => outcome::respond(telemetry, record, Err(err)),
        };
    }
    let version = req.version();
    let result = request::handle(conn, &snap, &identity, Origin::Listener, req, &mut record).await;
    let mut response = outcome::respond(telemetry, record, result);
    if conn.state.is_draining() {
        close_after(&mut response, version);
    }
    response
}

/// The destination as the client named it, so that even a refused request is audited with it.
fn record_claimed_target(record: &mut Record, req: &Request<Incoming>) {
    let Some(authority) = req.uri().authority() else {
        return;
    };
    if record.event.kind == Kind::Tunnel {
        let port = authority.port_u16().unwrap_or(0);
        record.target(None, authority.host(), port, None);
    } else {
        let port = authority.port_u16().unwrap_or(80);
        record.target(Some("http"), authority.host(), port, Some(req.uri()));
    }
}

/// Identifies the client; a failure is audited (client `unauthenticated`) and counted per
/// claimed client. Report mode never relaxes this. An OIDC token not seen before is verified
/// with its issuer's keys ([`super::oidc`]).
async fn identify(
    conn: &ConnCtx,
    snap: &Snapshot,
    req: &Request<Incoming>,
    record: &mut Record,
) -> Result<Identity, ProxyError> {
    let proxy_authorization = req.headers().get(PROXY_AUTHORIZATION);
    let identified = match snap.clients.identify(proxy_authorization, conn.peer.ip()) {
        Ok(Presented::Identified(identity)) => Ok(identity),
        Ok(Presented::Oidc(pending)) => oidc::authenticate(conn, snap, &pending).await,
        Err(failure) => {
            // A token refused before any key was needed (malformed, an unconfigured issuer).
            if let AuthFailure::Oidc { issuer, failure } = &failure {
                oidc::count(conn, issuer, failure.label());
            }
            Err(failure)
        }
    };
    match identified {
        Ok(identity) => {
            record.identified(
                &identity.name,
                identity.subject.as_ref(),
                identity.token.as_ref(),
            );
            Ok(identity)
        }
        Err(failure) => {
            // The refused token may be repeated elsewhere in the request (a query parameter): it
            // is masked there too, as an accepted one would be.
            let refused = proxy_authorization.and_then(crate::identity::refused_secret);
            if let Some(echoes) = refused.and_then(|s| Echoes::new(&[s.as_bytes()])) {
                record.runtime_secret(Arc::new(echoes));
            }
            conn.state
                .telemetry
                .metrics
                .auth_failures
                .with_label_values(&[failure.label()])
                .inc();
            tracing::info!(peer = %conn.peer, claimed = failure.label(), "{failure}");
            Err(ProxyError::ProxyAuthRequired(failure.details()))
        }
    }
}
