//! storerelay-runtime: what the sidecar and the operator do the same way, so they cannot drift apart.
//!
//! [`log`] reads `STORERELAY_LOG` with one grammar and writes JSON lines; [`http`] is the HTTP/1.1
//! accept loop with a header-read timeout and a graceful stop on a [`CancellationToken`]; [`metrics`]
//! holds the histogram buckets both binaries use.
//!
//! [`CancellationToken`]: tokio_util::sync::CancellationToken

pub mod http;
pub mod log;
pub mod metrics;

pub use tokio_util::sync::CancellationToken;
