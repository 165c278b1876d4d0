//! The webhook's HTTPS listener: the shared accept loop with a TLS handshake in front.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use storerelay_runtime::CancellationToken;
use storerelay_runtime::http::{self, ServeOptions};
use tokio::net::TcpListener;

/// API servers give a webhook 10 s at most; a client that has not sent its headers in 5 s is gone.
pub const OPTIONS: ServeOptions =
    ServeOptions { header_timeout: Duration::from_secs(5), grace: Duration::from_secs(5) };

/// Serves `router` over TLS until `stop` is cancelled.
pub async fn serve_tls(listener: TcpListener, router: Router, tls: Arc<rustls::ServerConfig>, stop: CancellationToken) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    http::serve_with(listener, router, OPTIONS, stop, move |stream| {
        let handshake = acceptor.accept(stream);
        async move {
            // A failed handshake (wrong CA, port scan) is the client's problem, not ours.
            tokio::time::timeout(OPTIONS.header_timeout, handshake).await.ok()?.ok()
        }
    })
    .await
}
