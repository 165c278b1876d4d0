//! Real servers on loopback for the integration tests and benchmarks: an etcd and kube-apiserver
//! (feature `apiserver`, for the operator) and a PostgreSQL server (for the shared spool). Each stops,
//! and its data is deleted, when its handle drops — also when a test fails.

#[cfg(feature = "apiserver")]
mod apiserver;
#[cfg(feature = "node")]
pub mod node;
pub mod postgres;
#[cfg(feature = "apiserver")]
mod process;

#[cfg(feature = "apiserver")]
pub use apiserver::*;

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
