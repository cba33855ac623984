//! A 1 GiB response streams through the proxy without being buffered: the whole test process
//! (upstream, proxy and client together) stays far below 1 GiB of resident memory.
//! Its own test binary, so the peak RSS measured is this test's alone.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::*;
use futures_util::StreamExt;

const GIB: u64 = 1024 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_streams_through_in_bounded_memory() {
    let up = http_upstream().await;
    let port = up.port();
    let proxy = start_proxy(&format!(
        "[network]\nallow_cidrs = [\"127.0.0.0/8\"]\nresolve = {{ \"big.test\" = [\"127.0.0.1\"] }}\n[[hosts]]\nhost = \"big.test\"\nports = [{port}]\n"
    ))
    .await;
    let before = rss_bytes("VmRSS:");
    let resp = proxied_client(&proxy.url())
        .get(format!("http://big.test:{port}/stream/{GIB}"))
        .timeout(std::time::Duration::from_secs(300))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], GIB.to_string().as_str());
    let mut stream = resp.bytes_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len() as u64;
    }
    assert_eq!(total, GIB);
    let peak = rss_bytes("VmHWM:");
    eprintln!("RSS before {} MiB, peak {} MiB", before >> 20, peak >> 20);
    assert!(
        peak < 128 * 1024 * 1024,
        "peak RSS {} MiB: the body was buffered",
        peak >> 20
    );
    proxy.stop().await;
}
