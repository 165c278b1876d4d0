//! Structured JSON log lines on stderr, filtered by `STORERELAY_LOG`.
//!
//! The filter is tracing's `Targets` grammar (`level` or `target=level,...`, default `info`), not
//! `EnvFilter`: the same syntax for what we need, without a regex engine in a binary that runs beside
//! every app pod. A value that does not parse is not fatal: both binaries log at info and say why.

use tracing_subscriber::filter::{LevelFilter, ParseError, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable both binaries read.
pub const ENV: &str = "STORERELAY_LOG";

/// Parses a `STORERELAY_LOG` value; `None` (unset) means `info`.
pub fn filter(value: Option<&str>) -> Result<Targets, ParseError> {
    match value {
        None => Ok(Targets::new().with_default(LevelFilter::INFO)),
        Some(text) => text.parse::<Targets>(),
    }
}

/// Installs the JSON logger once per process (later calls do nothing).
pub fn init() {
    let value = std::env::var(ENV).ok();
    let (targets, refused) = match filter(value.as_deref()) {
        Ok(targets) => (targets, None),
        Err(error) => (Targets::new().with_default(LevelFilter::INFO), Some(error)),
    };
    let layer = tracing_subscriber::fmt::layer().json().with_current_span(false).with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry().with(layer).with(targets).try_init();
    if let Some(error) = refused {
        tracing::warn!(%error, "{ENV} is not a valid filter; logging at info");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn one_grammar_for_levels_and_targets() {
        let unset = filter(None).unwrap();
        assert!(unset.would_enable("anything", &Level::INFO));
        assert!(!unset.would_enable("anything", &Level::DEBUG));

        let targeted = filter(Some("warn,storerelay_sidecar::delivery=debug")).unwrap();
        assert!(targeted.would_enable("storerelay_sidecar::delivery", &Level::DEBUG));
        assert!(!targeted.would_enable("storerelay_sidecar::ingest", &Level::INFO));
        assert!(targeted.would_enable("kube", &Level::WARN));

        assert!(filter(Some("debug")).unwrap().would_enable("x", &Level::DEBUG));
        assert!(filter(Some("storerelay=loud")).is_err(), "a word that is no level is refused");
    }
}
