//! Wiring: opens the spool, binds the listeners, starts the tasks, and on SIGTERM stops them in order.
//!
//! Shutdown is one [`CancellationToken`] tree: `ingest` (stop taking notifications) and `delivery`
//! (stop starting attempts) are children of the root, cancelled one after the other, and the root
//! stops the rest (admin endpoints, reload, housekeeping) last, so the probes answer until the end.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use storerelay_runtime::CancellationToken;
use storerelay_runtime::http::{self, ServeOptions};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::clock::now_ms;
use crate::config::RuntimeConfig;
use crate::delivery::{Delivery, Waiters};
use crate::metrics::Metrics;
use crate::spool::{PrunePolicy, Spool, SpoolBackend};
use crate::{admin, config, delivery, gap_fill, ingest, self_test, verify};

/// How often the config file and secret files are compared for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// How often delivered notifications past `retainDelivered` are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// How often shutdown looks again for work due before its deadline.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Why the sidecar could not start. Names the file or address at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] storerelay_config::ConfigError),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("cannot listen on {address} ({key}): {source}")]
    Bind { key: &'static str, address: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] rustls::Error),
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Runs the sidecar on its threads until SIGTERM or SIGINT, then drains and returns.
///
/// The threads, whatever the node's CPU count: this one (a single-threaded runtime: ingest, the
/// proxy to the app, admin, reloads, housekeeping), `delivery` (see [`delivery::start`]),
/// `spool-writer` and `spool-checkpointer` (SQLite; see [`crate::spool`]), and tokio's blocking pool
/// for DNS lookups of destination and upstream host names.
pub fn run_blocking(config_path: &Path) -> Result<(), StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(StartError::Thread)?;
    runtime.block_on(run(config_path))
}

/// Runs the sidecar until SIGTERM or SIGINT, then drains and returns: [`run_blocking`] on the runtime
/// it makes.
pub async fn run(config_path: &Path) -> Result<(), StartError> {
    // Fingerprinted before reading, so an edit made meanwhile is reloaded, not missed.
    let seen = config::Fingerprint::of_config(config_path);
    let file = storerelay_config::load(config_path)?;
    let seen = seen.with_secrets_of(&file);
    let metrics = Arc::new(Metrics::default());
    let runtime = config::resolve(file, None, &metrics);
    if runtime.verifier.mode != storerelay_config::VerifyMode::Off && !runtime.verifier.has_apple_root {
        tracing::warn!(
            expected_sha256 = verify::APPLE_ROOT_CA_G3_SHA256,
            "none of verify.rootCertificates is Apple Root CA - G3: real App Store notifications will fail verification"
        );
    }
    let settings = runtime.file.clone();

    let (spool, report) = Spool::open(&settings.spool).await?;
    if let (Some(aside), Some(problem)) = (&report.quarantined, &report.corruption) {
        tracing::error!(spool = %settings.spool.path.display(), set_aside = %aside.display(), %problem,
            "SPOOL WAS CORRUPT: the damaged file was renamed aside and a new spool started; undelivered notifications in it need manual recovery");
    }
    for file in &report.discarded {
        tracing::warn!(file = %file.display(), "deleted an older set-aside copy of a damaged spool (only the newest is kept)");
    }
    if report.set_aside.bytes > 0 {
        tracing::warn!(bytes = report.set_aside.bytes, files = ?report.set_aside.files,
            "a damaged spool set aside counts against spool.maxBytes until `storerelay-sidecar spool discard-set-aside` deletes it");
    }

    let bind = |key: &'static str, address| async move {
        TcpListener::bind(address).await.map_err(|source| StartError::Bind { key, address, source })
    };
    let ingest_listener = bind("listen", settings.listen).await?;
    let listening = ingest_listener.local_addr().map_err(|source| StartError::Bind {
        key: "listen",
        address: settings.listen,
        source,
    })?;
    let admin_listener = bind("admin", settings.admin).await?;
    let upstream = ingest::upstream_client().map_err(StartError::Client)?;

    let shutdown = CancellationToken::new();
    let stop_ingest = shutdown.child_token();
    let stop_delivery = shutdown.child_token();

    let (config_tx, config_rx) = watch::channel(Arc::new(runtime));
    let waiters = Arc::new(Waiters::default());
    let ready = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(AtomicUsize::new(0));

    let reload = config::follow(config_path.to_path_buf(), RELOAD_INTERVAL, config_tx, metrics.clone(), seen);
    tokio::spawn(until(shutdown.clone(), reload));
    tokio::spawn(until(shutdown.clone(), housekeep(spool.clone(), config_rx.clone(), metrics.clone())));

    let delivery = Delivery {
        spool: spool.clone(),
        metrics: metrics.clone(),
        config: config_rx.clone(),
        waiters: waiters.clone(),
        in_flight: in_flight.clone(),
    };
    let dispatchers = delivery::start(delivery, stop_delivery.clone()).map_err(StartError::Thread)?;
    if settings.gap_fill.is_some() {
        // Replays come in through the listener, so it stops with ingest.
        let gap_fill = gap_fill::run(config_rx.clone(), spool.clone(), listening, metrics.clone(), stop_ingest.clone());
        tokio::spawn(gap_fill);
    }
    if settings.self_test.is_some() {
        let self_test =
            self_test::run_periodically(config_rx.clone(), spool.clone(), metrics.clone(), stop_ingest.clone());
        tokio::spawn(self_test);
    }

    let header_timeout = settings.limits.header_timeout.get();
    let body_budget = Arc::new(ingest::BodyBudget::new(settings.limits.max_buffered_bytes.get()));
    let admin_router = admin::router(Arc::new(admin::AdminState {
        metrics: metrics.clone(),
        body_budget: body_budget.clone(),
        spool: spool.clone(),
        config: config_rx.clone(),
        ready: ready.clone(),
    }));
    let admin_options = ServeOptions { header_timeout, grace: Duration::from_secs(1) };
    let admin_server = tokio::spawn(http::serve(admin_listener, admin_router, admin_options, shutdown.clone()));

    let ingest_router = ingest::router(Arc::new(ingest::IngestState {
        spool: spool.clone(),
        metrics: metrics.clone(),
        config: config_rx.clone(),
        waiters,
        permits: Arc::new(Semaphore::new(settings.limits.max_concurrent_requests as usize)),
        body_budget: body_budget.clone(),
        upstream,
    }));
    let grace = settings.shutdown_grace_period.get();
    let ingest_options = ServeOptions { header_timeout, grace };
    let ingest_server = tokio::spawn(http::serve(ingest_listener, ingest_router, ingest_options, stop_ingest.clone()));

    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        listen = %settings.listen,
        admin = %settings.admin,
        spool = %spool.location(),
        ack = %settings.effective_ack(),
        destinations = ?config_rx.borrow().destination_names(),
        "storerelay-sidecar started"
    );

    wait_for_termination().await;
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(grace = %settings.shutdown_grace_period, "shutting down: not ready, no new connections, draining");
    ready.store(false, Ordering::SeqCst);
    stop_ingest.cancel();
    let _ = ingest_server.await;

    drain_until(deadline, &spool, &config_rx, &in_flight).await;
    stop_delivery.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), dispatchers.join()).await;
    report_left_behind(&spool, &metrics).await;
    shutdown.cancel();
    let _ = admin_server.await;
    Ok(())
}

/// Runs `task` until it ends or `stop` is cancelled.
async fn until(stop: CancellationToken, task: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = task => {}
        () = stop.cancelled() => {}
    }
}

/// Says what is still pending as the sidecar stops. In a shared queue the other replicas deliver it; in
/// the pod's own SQLite file it waits for this pod to start again, and is lost if the pod is deleted:
/// one line with the counts per destination, and a counter, so a lost backlog is never silent.
async fn report_left_behind(spool: &Spool, metrics: &Metrics) {
    let stats = match spool.stats().await {
        Ok(stats) => stats,
        Err(error) => {
            tracing::error!(%error, "cannot count the deliveries still pending at exit");
            return;
        }
    };
    let pending: Vec<(String, u64)> =
        stats.into_iter().filter(|s| s.pending > 0).map(|s| (s.destination, s.pending)).collect();
    let total: u64 = pending.iter().map(|(_, n)| n).sum();
    if spool.shared() {
        tracing::info!(pending = total, spool = %spool.location(), "storerelay-sidecar stopped; pending deliveries stay in the shared queue for the other replicas");
        return;
    }
    if total == 0 {
        tracing::info!("storerelay-sidecar stopped; nothing pending");
        return;
    }
    for (destination, count) in &pending {
        metrics.count_left_behind(destination, *count);
    }
    let by_destination = pending.iter().map(|(d, n)| format!("{d}={n}")).collect::<Vec<_>>().join(" ");
    tracing::warn!(pending = total, by_destination = %by_destination, spool = %spool.location(),
        "storerelay-sidecar stopped with deliveries pending in this pod's own spool: they are delivered when this pod starts again, and LOST if it is deleted (use spool.backend: postgres to share them across replicas)");
}

/// Keeps delivering while attempts are under way or a delivery falls due before `deadline`. With a
/// shared spool only the attempts under way are waited for: the other replicas deliver the rest.
async fn drain_until(
    deadline: tokio::time::Instant,
    spool: &Spool,
    config: &watch::Receiver<Arc<RuntimeConfig>>,
    in_flight: &AtomicUsize,
) {
    while tokio::time::Instant::now() < deadline {
        let horizon = now_ms() + deadline.saturating_duration_since(tokio::time::Instant::now()).as_millis() as i64;
        let deliverable: Vec<String> =
            config.borrow().destinations.iter().filter(|d| d.uri.is_some()).map(|d| d.name.clone()).collect();
        let due_soon =
            !spool.shared() && spool.earliest_due(deliverable).await.ok().flatten().is_some_and(|at| at <= horizon);
        if in_flight.load(Ordering::SeqCst) == 0 && !due_soon {
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Prunes what is past `retainDelivered` / `retainDead` and applies a changed `spool.maxBytes`.
async fn housekeep(spool: Spool, mut config: watch::Receiver<Arc<RuntimeConfig>>, metrics: Arc<Metrics>) {
    let mut ticker = tokio::time::interval(PRUNE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = config.changed() => if changed.is_err() { return },
        }
        let now = now_ms();
        let before = |window: std::time::Duration| now - window.as_millis() as i64;
        let (policy, max_bytes) = {
            let current = config.borrow_and_update();
            let settings = &current.file.spool;
            let policy = PrunePolicy {
                delivered_before: before(settings.retain_delivered.get()),
                dedupe_before: before(current.file.dedupe.window.get()),
                unfinishable_before: before(settings.retain_dead.get()),
                configured: current.destination_names(),
            };
            (policy, settings.max_bytes.get())
        };
        spool.set_max_bytes(max_bytes);
        match spool.prune(policy).await {
            Ok(pruned) => {
                if pruned.delivered > 0 {
                    tracing::info!(pruned = pruned.delivered, "pruned delivered notifications past retainDelivered");
                }
                if pruned.dead + pruned.unknown_destination > 0 {
                    tracing::warn!(
                        dead = pruned.dead,
                        unknown_destination = pruned.unknown_destination,
                        "dropped deliveries past retainDead: given up on, or for a destination no longer configured"
                    );
                }
                metrics.count_expired("dead", pruned.dead);
                metrics.count_expired("unknown_destination", pruned.unknown_destination);
            }
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
