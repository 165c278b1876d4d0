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

/// A loopback port free now, for a server to bind soon. Picked below the kernel's ephemeral range: the
/// outgoing connections of everything running meanwhile (sidecars to PostgreSQL, clients of the
/// stand-ins) take ephemeral ports, and one took a port picked there before its server had bound it
/// (ten sidecar replicas starting at once). Below it only another pick can collide.
pub fn free_port() -> u16 {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if first_ephemeral > 11_000 {
        for _ in 0..100 {
            let port = fastrand::u16(10_000..first_ephemeral);
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
