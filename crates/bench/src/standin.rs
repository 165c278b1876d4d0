//! The stand-in app and destination: hyper servers that answer 200 at once (the destination counts).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

pub async fn serve(port: u16, count_bodies: bool) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind stand-in");
    let received = Arc::new(AtomicU64::new(0));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let received = received.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let received = received.clone();
                async move {
                    let path = request.uri().path().to_string();
                    let _ = request.into_body().collect().await;
                    let body = if path == "/count" {
                        Bytes::from(received.load(Ordering::Relaxed).to_string())
                    } else {
                        if count_bodies {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Bytes::from_static(b"{}")
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// How many bodies the destination on `port` has received.
pub async fn count(port: u16) -> u64 {
    let client = reqwest::Client::builder().no_proxy().build().unwrap_or_default();
    match client.get(format!("http://127.0.0.1:{port}/count")).send().await {
        Ok(response) => response.text().await.ok().and_then(|t| t.parse().ok()).unwrap_or(0),
        Err(_) => 0,
    }
}
