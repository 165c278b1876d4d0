//! The HTTP/1.1 accept loop behind every listener of both binaries.
//!
//! `axum::serve` sets no header-read timeout, so a client dribbling its headers could hold a connection
//! forever; hyper's own connection builder with a timer closes it after `header_timeout`. Stopping is
//! one [`CancellationToken`]: the listener closes at once, open connections finish the request they
//! are on (keep-alive ends), and the loop returns once they have or `grace` has passed, whichever is
//! first; the caller then goes on with its shutdown (a connection still open dies with the process).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a listener serves its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// A connection that has not sent a request's headers within this is closed.
    pub header_timeout: Duration,
    /// How long open requests may run on after the stop signal.
    pub grace: Duration,
}

/// Serves `router` over plain HTTP until `stop` is cancelled.
pub async fn serve(listener: TcpListener, router: Router, options: ServeOptions, stop: CancellationToken) {
    serve_with(listener, router, options, stop, |stream| async move { Some(stream) }).await
}

/// Serves `router` on every connection that `accept` turns into a stream (a TLS handshake, say;
/// `None` drops the connection) until `stop` is cancelled.
pub async fn serve_with<A, Fut, S>(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    stop: CancellationToken,
    accept: A,
) where
    A: Fn(TcpStream) -> Fut,
    Fut: Future<Output = Option<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let (handshake, router, stop) = (accept(stream), router.clone(), stop.clone());
        connections.spawn(async move {
            if let Some(stream) = handshake.await {
                serve_connection(stream, router, options.header_timeout, stop).await;
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(options.grace, connections.wait()).await.is_err() {
        tracing::warn!("requests still open after the grace period; closing them");
    }
}

async fn serve_connection<S>(stream: S, router: Router, header_timeout: Duration, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    fn options(grace: Duration) -> ServeOptions {
        ServeOptions { header_timeout: Duration::from_secs(5), grace }
    }

    #[tokio::test]
    async fn an_open_request_finishes_after_the_stop_and_new_connections_are_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router, options(Duration::from_secs(5)), stop.clone()));
        let client = reqwest::Client::new();
        let slow = tokio::spawn(client.get(format!("http://{addr}/slow")).send());
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        let answer = slow.await.unwrap().expect("the request under way is answered");
        assert_eq!(answer.text().await.unwrap(), "done");
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("the loop ends").unwrap();
        assert!(reqwest::Client::new().get(format!("http://{addr}/slow")).send().await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn a_hanging_request_does_not_hold_the_stop_past_the_grace_period() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/hang", get(std::future::pending::<&'static str>));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router, options(Duration::from_millis(100)), stop.clone()));
        let _hanging = tokio::spawn(reqwest::Client::new().get(format!("http://{addr}/hang")).send());
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("the loop ends after grace").unwrap();
    }
}
