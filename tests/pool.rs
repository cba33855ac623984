//! The plain-http upstream pool over real sockets: connections are reused, one the server closed
//! while idle is not, and one whose response was not read to the end is never reused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the origin treats a connection after its first answer.
#[derive(Clone, Copy)]
enum After {
    /// Keep-alive: answer every request.
    KeepAlive,
    /// Close 30 ms after answering, without saying so (as an origin's idle timeout does).
    Close,
    /// Read the next request, then close without answering it: an origin closing an idle
    /// connection at the moment a request arrives on it.
    DropNext,
}

/// A hand-written HTTP/1.1 origin on 127.0.0.1 that counts the connections it accepts and the
/// requests it reads. `/big` answers 4 MiB, anything else the path itself.
struct CountingOrigin {
    port: u16,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl CountingOrigin {
    async fn start(after: After) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (counter, seen) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, after, seen.clone()));
            }
        });
        Self {
            port,
            accepted,
            requests,
        }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, after: After, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    for answered in 0.. {
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        requests.fetch_add(1, Ordering::SeqCst);
        if answered > 0 && matches!(after, After::DropNext) {
            return;
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        buf.drain(..head_end);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        let body = if path == "/big" {
            vec![b'x'; 4 << 20]
        } else {
            path.into_bytes()
        };
        let response = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        if stream.write_all(response.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
        {
            return;
        }
        if matches!(after, After::Close) {
            tokio::time::sleep(Duration::from_millis(30)).await;
            return;
        }
    }
}

fn config(port: u16) -> String {
    format!(
        r#"
[network]
allow_cidrs = ["127.0.0.0/8"]
resolve = {{ "up.test" = ["127.0.0.1"] }}

[[hosts]]
host = "up.test"
ports = [{port}]
"#
    )
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let origin = CountingOrigin::start(After::KeepAlive).await;
    let proxy = start_proxy(&config(origin.port)).await;
    let client = proxied_client(&proxy.url());
    for i in 0..20 {
        let resp = client
            .get(format!("http://up.test:{}/n{i}", origin.port))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), format!("/n{i}"));
    }
    assert_eq!(origin.connections(), 1, "one pooled upstream connection");
}

#[tokio::test]
async fn a_connection_the_origin_closed_while_idle_is_not_used_again() {
    let origin = CountingOrigin::start(After::Close).await;
    let proxy = start_proxy(&config(origin.port)).await;
    let client = proxied_client(&proxy.url());
    for i in 0..5 {
        let resp = client
            .get(format!("http://up.test:{}/c{i}", origin.port))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), format!("/c{i}"));
        // Long enough for the origin to have closed the connection the proxy pooled.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(origin.connections(), 5);
}

#[tokio::test]
async fn an_idempotent_request_the_origin_dropped_on_an_idle_connection_is_sent_again() {
    let origin = CountingOrigin::start(After::DropNext).await;
    let proxy = start_proxy(&config(origin.port)).await;
    let client = proxied_client(&proxy.url());
    let url = |path: &str| format!("http://up.test:{}{path}", origin.port);
    let first = client.get(url("/one")).send().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "/one");
    // Idle long enough to meet an origin's idle timeout: the origin drops the next request on
    // this connection, and the proxy sends the GET again on a new one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = client.get(url("/two")).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.text().await.unwrap(), "/two");
    assert_eq!(origin.connections(), 2);
    assert_eq!(
        origin.requests.load(Ordering::SeqCst),
        3,
        "/one, /two dropped, /two"
    );
    // A POST is not idempotent: it is not sent twice, the client gets the failure.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let post = client
        .post(url("/three"))
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 502);
    assert_eq!(
        origin.requests.load(Ordering::SeqCst),
        4,
        "the POST reached it once"
    );
}

#[tokio::test]
async fn a_response_left_unread_does_not_leave_its_connection_in_the_pool() {
    let origin = CountingOrigin::start(After::KeepAlive).await;
    let proxy = start_proxy(&config(origin.port)).await;
    let first = proxied_client(&proxy.url());
    let mut big = first
        .get(format!("http://up.test:{}/big", origin.port))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 200);
    let chunk = big.chunk().await.unwrap().unwrap();
    assert!(!chunk.is_empty());
    drop(big);
    drop(first);
    // A new client: its request must not be answered with the rest of the 4 MiB.
    let second = proxied_client(&proxy.url());
    let resp = second
        .get(format!("http://up.test:{}/after", origin.port))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "/after");
    assert_eq!(
        origin.connections(),
        2,
        "the half-read connection was not reused"
    );
}

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let origin = CountingOrigin::start(After::KeepAlive).await;
    let proxy = start_proxy(&config(origin.port)).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let url = proxy.url();
        let port = origin.port;
        tasks.push(tokio::spawn(async move {
            let client = proxied_client(&url);
            for j in 0..5 {
                let resp = client
                    .get(format!("http://up.test:{port}/t{i}-{j}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.text().await.unwrap(), format!("/t{i}-{j}"));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Idle connections are kept per serving thread (one per CPU), so each thread may open one
    // per client at most.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(
        origin.connections() <= 40 * threads,
        "{} upstream connections for 40 clients on {threads} serving threads",
        origin.connections()
    );
}
