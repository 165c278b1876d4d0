//! HTTP(S) accept loops for the webhook (TLS) and the admin endpoints (plain).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// API servers give a webhook 10 s at most; a client that has not sent its headers in 5 s is gone.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` over TLS until `stop` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    accept_loop(listener, stop, move |stream| {
        let (acceptor, router) = (acceptor.clone(), router.clone());
        async move {
            // A failed handshake (wrong CA, port scan) is the client's problem, not ours.
            let Ok(Ok(tls)) = tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await else { return };
            serve_connection(TokioIo::new(tls), router).await;
        }
    })
    .await;
}

/// Serves `router` over plain HTTP until `stop` turns true.
pub async fn serve_plain(listener: TcpListener, router: Router, stop: watch::Receiver<bool>) {
    accept_loop(listener, stop, move |stream| {
        let router = router.clone();
        async move { serve_connection(TokioIo::new(stream), router).await }
    })
    .await;
}

async fn serve_connection<I>(io: TokioIo<I>, router: Router)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, TowerToHyperService::new(router))
        .await;
}

async fn accept_loop<F, Fut>(listener: TcpListener, mut stop: watch::Receiver<bool>, handle: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream));
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
