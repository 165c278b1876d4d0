//! Slow and oversized clients: the listener protects itself without losing anything it accepted.

mod support;

use std::time::{Duration, Instant};

use support::{Sidecar, StandIn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbled_headers_are_cut_off_at_the_header_timeout() {
    let sidecar = Sidecar::start("limits: {headerTimeout: 1s}\n", "").await;
    let mut stream = TcpStream::connect(sidecar.listen).await.unwrap();
    let started = Instant::now();
    let request =
        b"POST /apple/notifications HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
    let mut closed_after = None;
    for byte in request.iter().cycle().take(200) {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        // Any answer at all (EOF, a reset, or a 408 before closing) means the server ended it.
        if tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await.is_ok() {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("a client dribbling headers for 20 s was never cut off");
    assert!(closed_after < Duration::from_secs(4), "closed after {closed_after:?}, headerTimeout is 1s");
    assert!(closed_after >= Duration::from_millis(900), "closed after {closed_after:?}, before headerTimeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_and_nothing_is_stored() {
    let rc = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!("limits: {{maxBodyBytes: 1Ki}}\ndestinations: [{{name: rc, url: \"{}\"}}]\n", rc.url("/")),
        "",
    )
    .await;
    // Declared too large: refused before reading.
    assert_eq!(sidecar.post(vec![b'a'; 1025]).await.status(), 413);
    // Streamed without a length: refused when the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..8).map(|_| Ok(vec![b'b'; 512])).collect();
    let streamed = support::client()
        .post(sidecar.ingest_url("/apple/notifications"))
        .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    assert_eq!(sidecar.post(json_of_len(1024)).await.status(), 200, "exactly the limit is fine");
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"too_large\"}").await, 2.0);
    assert_eq!(sidecar.metric_sum("storerelay_notifications_received_total").await, 1.0);
    rc.wait_for(1, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_the_body_timeout_gets_408() {
    let sidecar = Sidecar::start("limits: {bodyTimeout: 500ms}\n", "").await;
    let mut stream = TcpStream::connect(sidecar.listen).await.unwrap();
    stream
        .write_all(b"POST /apple/notifications HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"half\":")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(sidecar.metric_sum("storerelay_notifications_received_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_the_buffer_budget_get_503_until_it_is_free_again() {
    let rc = StandIn::start().await;
    let sidecar = Sidecar::start(
        &format!(
            "limits: {{maxBodyBytes: 64Ki, maxBufferedBytes: 100Ki}}\ndestinations: [{{name: rc, url: \"{}\"}}]\n",
            rc.url("/")
        ),
        "",
    )
    .await;
    // A client that declared 64 KiB and is still sending holds 64 KiB of the 100 KiB budget.
    let held = json_of_len(64 * 1024);
    let mut slow = TcpStream::connect(sidecar.listen).await.unwrap();
    slow.write_all(
        format!("POST /apple/notifications HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", held.len()).as_bytes(),
    )
    .await
    .unwrap();
    slow.write_all(&held[..1000]).await.unwrap();
    sidecar.wait_metric("storerelay_ingest_buffered_bytes", held.len() as f64, Duration::from_secs(5)).await;

    let refused = sidecar.post(json_of_len(40 * 1024)).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert_eq!(sidecar.metric("storerelay_notifications_rejected_total{reason=\"buffers_full\"}").await, 1.0);
    assert_eq!(sidecar.post(json_of_len(30 * 1024)).await.status(), 200, "what is left of the budget is usable");

    // The held body completes and gives its share back: the refused size fits now.
    slow.write_all(&held[1000..]).await.unwrap();
    let mut answer = vec![0u8; 12];
    slow.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    assert_eq!(sidecar.post(json_of_len(40 * 1024)).await.status(), 200);
    assert_eq!(sidecar.metric("storerelay_ingest_buffered_bytes").await, 0.0, "every share was given back");
    assert_eq!(sidecar.metric_sum("storerelay_notifications_received_total").await, 3.0);
    rc.wait_for(3, Duration::from_secs(5)).await;
}

fn futures_stream(
    chunks: Vec<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    struct Chunks(std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>);
    impl futures_core::Stream for Chunks {
        type Item = Result<Vec<u8>, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Chunks(chunks.into_iter())
}

/// A JSON body of exactly `len` bytes.
fn json_of_len(len: usize) -> Vec<u8> {
    let mut body = b"{\"pad\":\"".to_vec();
    body.resize(len - 2, b'p');
    body.extend_from_slice(b"\"}");
    body
}
