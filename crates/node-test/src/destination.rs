//! The stand-in for RevenueCat: a real HTTP server in the test's namespace that the pods' sidecars post
//! to. It records every body by path and, while "down", answers 503 to everything.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Recorded {
    down: AtomicBool,
    received: Mutex<Vec<(String, Vec<u8>)>>,
}

#[derive(Clone)]
pub struct Destination {
    pub address: SocketAddr,
    state: Arc<Recorded>,
}

impl Destination {
    /// Listens on every address of the namespace (pods reach it at the node's address).
    pub async fn start() -> anyhow::Result<Destination> {
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(Recorded::default());
        let app = axum::Router::new().fallback(record).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Destination { address, state })
    }

    /// Its URL as the pods see it: `http://<node ip>:<port><path>`.
    pub fn url(&self, node_ip: std::net::IpAddr, path: &str) -> String {
        format!("http://{}{path}", SocketAddr::new(node_ip, self.address.port()))
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Every body received so far, at any path (accepted ones only).
    pub fn all_bodies(&self) -> Vec<Vec<u8>> {
        let received = self.state.received.lock().unwrap_or_else(|e| e.into_inner());
        received.iter().map(|(_, body)| body.clone()).collect()
    }

    /// Every body received at `path` so far (accepted ones only).
    pub fn bodies(&self, path: &str) -> Vec<Vec<u8>> {
        let received = self.state.received.lock().unwrap_or_else(|e| e.into_inner());
        received.iter().filter(|(p, _)| p == path).map(|(_, body)| body.clone()).collect()
    }
}

async fn record(State(state): State<Arc<Recorded>>, uri: Uri, body: Bytes) -> StatusCode {
    if state.down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    state.received.lock().unwrap_or_else(|e| e.into_inner()).push((uri.path().to_string(), body.to_vec()));
    StatusCode::OK
}
