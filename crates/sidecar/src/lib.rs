//! storerelay-sidecar: a durable, byte-exact mirror of App Store server notifications.
//!
//! Apple's POST arrives at [`ingest`], is committed to the [`spool`] and only then acknowledged (by the
//! app's own answer in proxy mode). [`delivery`] drains the spool to every destination with retries
//! decided by [`retry`]. [`config`] follows the config file and its secrets, [`admin`] serves health and
//! metrics, and [`tools`] inspects a spool from the command line.

pub mod admin;
pub mod apple;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod ingest;
pub mod metrics;
pub mod retry;
pub mod server;
pub mod spool;
pub mod tools;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::clock::now_ms;
use crate::delivery::{Delivery, Waiters};
use crate::metrics::Metrics;
use crate::spool::Spool;

/// How often the config file and secret files are compared for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// How often delivered notifications past `retainDelivered` are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Why the sidecar could not start. Names the file or address at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] storerelay_config::ConfigError),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("cannot listen on {address} ({key}): {source}")]
    Bind { key: &'static str, address: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("{file}: {message}")]
    Verify { file: PathBuf, message: String },
}

/// Structured JSON log lines on stderr; `STORERELAY_LOG` takes `level` or `target=level,...` directives
/// (default `info`). Parsed as tracing's `Targets`, not `EnvFilter`: the same syntax for these, without
/// a regex engine in a binary that runs beside every app pod.
pub fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let default = Targets::new().with_default(LevelFilter::INFO);
    let (filter, refused) = match std::env::var("STORERELAY_LOG") {
        Ok(text) => match text.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(error) => (default, Some(error)),
        },
        Err(_) => (default, None),
    };
    let layer = tracing_subscriber::fmt::layer().json().with_current_span(false).with_writer(std::io::stderr);
    let _ = tracing_subscriber::registry().with(layer).with(filter).try_init();
    if let Some(error) = refused {
        tracing::warn!(%error, "STORERELAY_LOG is not a valid filter; logging at info");
    }
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains and returns.
pub async fn run(config_path: &Path) -> Result<(), StartError> {
    let file = storerelay_config::load(config_path)?;
    let metrics = Arc::new(Metrics::default());
    let runtime = config::resolve(file, None, &metrics)
        .map_err(|message| StartError::Verify { file: config_path.to_path_buf(), message })?;
    if runtime.verifier.mode != storerelay_config::VerifyMode::Off && !runtime.verifier.has_apple_root {
        tracing::warn!(
            expected_sha256 = verify::APPLE_ROOT_CA_G3_SHA256,
            "none of verify.rootCertificates is Apple Root CA - G3: real App Store notifications will fail verification"
        );
    }
    let settings = runtime.file.clone();

    let (spool, report) = Spool::open(&settings.spool.path, settings.spool.sync, settings.spool.max_bytes.get())?;
    if let (Some(aside), Some(problem)) = (&report.quarantined, &report.corruption) {
        tracing::error!(spool = %settings.spool.path.display(), set_aside = %aside.display(), %problem,
            "SPOOL WAS CORRUPT: the damaged file was renamed aside and a new spool started; undelivered notifications in it need manual recovery");
    }

    let bind = |key: &'static str, address| async move {
        TcpListener::bind(address).await.map_err(|source| StartError::Bind { key, address, source })
    };
    let ingest_listener = bind("listen", settings.listen).await?;
    let admin_listener = bind("admin", settings.admin).await?;
    let upstream = ingest::upstream_client().map_err(|e| StartError::Client(e.to_string()))?;

    let (config_tx, config_rx) = watch::channel(Arc::new(runtime));
    let waiters = Arc::new(Waiters::default());
    let ready = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));

    let reload = tokio::spawn(config::follow(config_path.to_path_buf(), RELOAD_INTERVAL, config_tx, metrics.clone()));
    let housekeeping = tokio::spawn(housekeep(spool.clone(), config_rx.clone()));

    let (stop_delivery, delivery_stopped) = watch::channel(false);
    let delivery = Delivery {
        spool: spool.clone(),
        metrics: metrics.clone(),
        config: config_rx.clone(),
        waiters: waiters.clone(),
        in_flight: in_flight.clone(),
    };
    let dispatchers = tokio::spawn(delivery::supervise(delivery, delivery_stopped));

    let (stop_admin, admin_stopped) = watch::channel(false);
    let admin_router = admin::router(Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        spool: spool.clone(),
        config: config_rx.clone(),
        ready: ready.clone(),
    }));
    let header_timeout = settings.limits.header_timeout.get();
    let admin_server = tokio::spawn(server::serve(
        admin_listener,
        admin_router,
        header_timeout,
        admin_stopped,
        Duration::from_secs(1),
    ));

    let (stop_ingest, ingest_stopped) = watch::channel(false);
    let ingest_router = ingest::router(Arc::new(ingest::IngestState {
        spool: spool.clone(),
        metrics: metrics.clone(),
        config: config_rx.clone(),
        waiters,
        permits: Arc::new(Semaphore::new(settings.limits.max_concurrent_requests as usize)),
        upstream,
    }));
    let grace = settings.shutdown_grace_period.get();
    let ingest_server =
        tokio::spawn(server::serve(ingest_listener, ingest_router, header_timeout, ingest_stopped, grace));

    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %settings.listen,
        admin = %settings.admin,
        spool = %settings.spool.path.display(),
        ack = %settings.effective_ack(),
        destinations = ?config_rx.borrow().destination_names(),
        "storerelay-sidecar started"
    );

    wait_for_termination().await;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(grace = %settings.shutdown_grace_period, "shutting down: not ready, no new connections, draining");
    ready.store(false, Ordering::SeqCst);
    let _ = stop_ingest.send(true);
    let _ = ingest_server.await;

    // Keep delivering while there is something to deliver before the deadline.
    while tokio::time::Instant::now() < deadline {
        let horizon = now_ms() + deadline.saturating_duration_since(tokio::time::Instant::now()).as_millis() as i64;
        let busy = in_flight.load(Ordering::SeqCst) > 0 || work_due_before(&spool, &config_rx, horizon).await;
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_delivery.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), dispatchers).await;
    let left = spool.read(|db| db.stats()).await.map(|stats| stats.iter().map(|s| s.pending).sum::<u64>()).unwrap_or(0);
    let _ = stop_admin.send(true);
    let _ = admin_server.await;
    reload.abort();
    housekeeping.abort();
    tracing::info!(pending = left, "storerelay-sidecar stopped; pending deliveries stay in the spool");
    Ok(())
}

/// Whether any deliverable destination has a delivery due before `horizon` (unix ms).
async fn work_due_before(spool: &Spool, config: &watch::Receiver<Arc<config::RuntimeConfig>>, horizon: i64) -> bool {
    let names: Vec<String> =
        config.borrow().destinations.iter().filter(|d| d.url.is_some()).map(|d| d.name.clone()).collect();
    spool
        .read(move |db| {
            for name in &names {
                if db.next_due_after(name, i64::MIN)?.is_some_and(|t| t <= horizon) {
                    return Ok(true);
                }
            }
            Ok(false)
        })
        .await
        .unwrap_or(false)
}

/// Prunes delivered notifications past `retainDelivered` and applies a changed `spool.maxBytes`.
async fn housekeep(spool: Spool, mut config: watch::Receiver<Arc<config::RuntimeConfig>>) {
    let mut ticker = tokio::time::interval(PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = config.changed() => if changed.is_err() { return },
        }
        let (retain, window, max_bytes) = {
            let current = config.borrow_and_update();
            let spool = &current.file.spool;
            (spool.retain_delivered.get(), current.file.dedupe.window.get(), spool.max_bytes.get())
        };
        spool.set_max_bytes(max_bytes);
        let now = now_ms();
        match spool.prune(now - retain.as_millis() as i64, now - window.as_millis() as i64).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned delivered notifications past retainDelivered"),
            Err(error) => tracing::error!(%error, "pruning the spool failed"),
        }
    }
}

async fn wait_for_termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

/// `check`: validates the file (and that its secret files can be read) and returns the effective
/// config with secrets redacted.
pub fn check(config_path: &Path) -> Result<String, String> {
    let file = storerelay_config::load(config_path).map_err(|e| e.to_string())?;
    let resolved = config::resolve(file.clone(), None, &Metrics::default())
        .map_err(|message| format!("{}: {message}", config_path.display()))?;
    let problems = resolved.problems();
    if !problems.is_empty() {
        return Err(format!("{}: {}", config_path.display(), problems.join("; ")));
    }
    Ok(format!("# {}: valid\n{}", config_path.display(), file.redacted().to_yaml()))
}

/// The default config path when neither `--config` nor `STORERELAY_CONFIG` is given.
pub fn default_config_path() -> PathBuf {
    PathBuf::from("/etc/storerelay/config.yaml")
}

/// `inspect`: what the sidecar makes of a body, and with a config, whether it would pass verification
/// and where it would go. Never prints the V1 password.
pub fn inspect(body: &[u8], config_path: Option<&Path>) -> Result<String, String> {
    let notification = apple::decode(body).map_err(|e| e.to_string())?;
    let field = |value: Option<&str>| value.unwrap_or("-").to_string();
    let mut out = format!(
        "version:      {}\ntype:         {}\nsubtype:      {}\nuuid:         {}\nenvironment:  {}\nbundleId:     {}\nappAppleId:   {}\nsignedDate:   {}\n",
        notification.version_label(),
        field(notification.notification_type.as_deref()),
        field(notification.subtype.as_deref()),
        field(notification.uuid.as_deref()),
        notification.environment_label(),
        field(notification.bundle_id.as_deref()),
        notification.app_apple_id.map_or("-".to_string(), |id| id.to_string()),
        notification.signed_date.map_or("-".to_string(), clock::format_ms),
    );
    if let Some(problem) = &notification.malformed {
        out.push_str(&format!("malformed:    {problem}\n"));
    }
    if let Some(path) = config_path {
        let file = storerelay_config::load(path).map_err(|e| e.to_string())?;
        let runtime =
            config::resolve(file, None, &Metrics::default()).map_err(|e| format!("{}: {e}", path.display()))?;
        let verdict = match (runtime.verifier.mode, runtime.verifier.check(&notification)) {
            (storerelay_config::VerifyMode::Off, _) => "not checked (verify.mode: off)".to_string(),
            (_, Ok(())) => "passes".to_string(),
            (mode, Err(reason)) => {
                format!("fails: {} (verify.mode: {})", reason.as_str(), format!("{mode:?}").to_lowercase())
            }
        };
        out.push_str(&format!("verification: {verdict}\n"));
        let destinations = runtime.destinations_for(&notification);
        out.push_str(&format!(
            "destinations: {}\n",
            if destinations.is_empty() { "none".to_string() } else { destinations.join(", ") }
        ));
    }
    Ok(out)
}
