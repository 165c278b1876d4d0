//! storerelay-sidecar: a durable, byte-exact mirror of App Store server notifications.
//!
//! A notification's path through the modules:
//!
//! * [`ingest`] receives Apple's POST, [`apple`] decodes it and [`verify`] checks its signature;
//! * the [`spool`] commits the raw body before anything is acknowledged (by the app's own answer in
//!   proxy mode, see [`ingest::acknowledgement`]);
//! * [`delivery`] drains the spool to every destination, with retries decided by [`retry`];
//! * [`outbound`] is the HTTP client of both the proxy path and delivery.
//!
//! Around it: [`config`] follows the config file and its secret files, [`admin`] serves health and
//! [`metrics`], [`app`] wires it all together and shuts it down in order, and [`cli`] holds the other
//! commands (`check`, `inspect`, `spool ...`).

pub mod admin;
pub mod app;
pub mod apple;
pub mod apple_api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod gap_fill;
pub mod ingest;
pub mod metrics;
pub mod outbound;
pub mod retry;
pub mod self_test;
pub mod spool;
pub mod verify;

pub use app::{StartError, run, run_blocking};
