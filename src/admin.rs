//! The admin listener: `/healthz` (alive), `/readyz` (serving with a valid config; 503 while
//! draining), `/metrics` and `/ca.pem`. It is separate from the proxy listener and never proxies,
//! and it sees only what it shows ([`Admin`]), not the proxy's state.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::telemetry::Metrics;

/// What the admin listener serves.
pub struct Admin {
    /// The metrics `/metrics` renders.
    pub metrics: Metrics,
    /// The interception CA certificate, PEM (`/ca.pem`).
    pub ca_pem: Arc<str>,
    /// Cancelled when shutdown begins: `/readyz` answers 503 from then on.
    pub draining: CancellationToken,
    /// The signing public key, when `[signing]` is configured (`/signature/…`).
    pub signing: crate::signing::Published,
}

/// Serves the admin listener until `stop` is cancelled.
pub async fn serve(admin: Admin, listener: TcpListener, stop: CancellationToken) {
    let state = Arc::new(admin);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(body::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn route(state: &Admin, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if state.draining.is_cancelled() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/readyz" => text(StatusCode::OK, "ready\n"),
        "/metrics" => {
            let mut response = Response::new(body::full(state.metrics.render()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/signature/public-key" | "/signature/jwks.json" => match state.signing.load_full() {
            None => text(StatusCode::NOT_FOUND, "request signing is not configured\n"),
            Some(key) => {
                let (body, content_type) = match req.uri().path() {
                    "/signature/public-key" => (key.pem.clone(), "application/x-pem-file"),
                    _ => (key.jwks(), "application/jwk-set+json"),
                };
                let mut response = Response::new(body::full(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                response
            }
        },
        "/ca.pem" => {
            let pem = state.ca_pem.to_string();
            let mut response = Response::new(body::full(pem));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-pem-file"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
