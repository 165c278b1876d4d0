//! The durable spool: every accepted body is committed here before anything is acknowledged.
//!
//! Two backends keep one contract ([`SpoolBackend`]): [`SqliteSpool`], a file beside the sidecar (one
//! replica; the default), and [`PostgresSpool`], one queue shared by every replica of a route, so a
//! deleted pod loses nothing and Apple's retries are de-duplicated across replicas. The sidecar holds a
//! [`Spool`], an enum over both.

mod body_log;
mod db;
mod hand_off;
mod postgres;
mod sqlite;

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use storerelay_config::{SpoolBackendKind, SpoolConfig};
use tokio::sync::watch;

pub use db::{
    DeliveryCounts, DeliveryRow, DeliveryState, DeliveryStatus, DestinationStats, DueDelivery, ListFilter, OpenReport,
    Outcome, SetAside, SpoolDb, WAL_SIZE_LIMIT,
};
pub use hand_off::HandOff;
pub use postgres::{PostgresSpool, PostgresTools, check_settings as check_postgres_settings};
pub use sqlite::SqliteSpool;

/// What went wrong in the spool. Where is added once, at the boundary ([`SpoolError`]).
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(
        "full ({stored} of {max} bytes in use{}{})",
        held_by.as_ref().map_or(String::new(), |h| format!("; undelivered notifications hold the most for {h}")),
        if *set_aside > 0 { format!("; {set_aside} bytes are a damaged spool set aside: copy it out, then `storerelay-sidecar spool discard-set-aside`") } else { String::new() }
    )]
    Full { stored: u64, max: u64, held_by: Option<String>, set_aside: u64 },
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("schema version {found} is newer than this sidecar understands ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("{action}: {source}")]
    Io { action: &'static str, source: std::io::Error },
    #[error("the database did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("{0}")]
    Setup(String),
    #[error("the writer has stopped")]
    WriterStopped,
}

/// A spool operation that failed: what happened ([`Failure`]) and to which spool. Cheap to clone, so
/// one failed batch can answer every request that was in it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("spool {location}: {failure}")]
pub struct SpoolError {
    location: Arc<str>,
    failure: Arc<Failure>,
}

impl SpoolError {
    /// A failure of the SQLite spool at `path`.
    pub fn new(path: &std::path::Path, failure: Failure) -> SpoolError {
        SpoolError::at(&path.display().to_string(), failure)
    }

    /// A failure of the spool `location` names (a file, or `postgres queue <name>`).
    pub fn at(location: &str, failure: Failure) -> SpoolError {
        SpoolError { location: location.into(), failure: Arc::new(failure) }
    }

    pub fn failure(&self) -> &Failure {
        &self.failure
    }

    pub fn is_full(&self) -> bool {
        matches!(*self.failure, Failure::Full { .. })
    }

    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match *self.failure {
            Failure::Full { .. } => "spool_full",
            Failure::Timeout(_) | Failure::Postgres(_) => "spool_unavailable",
            _ => "spool_error",
        }
    }
}

pub type Result<T> = std::result::Result<T, SpoolError>;

/// A body to store, where it must go, and how to recognise a repeat of it.
#[derive(Debug, Clone)]
pub struct NewNotification {
    pub path: String,
    pub body: Bytes,
    pub destinations: Vec<String>,
    /// Duplicate key and the start of its window (unix ms); `None` stores unconditionally.
    pub dedupe: Option<(String, i64)>,
}

/// What storing came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub notification_id: i64,
    /// A repeat of a notification already in the spool: no new row; destinations that lacked it (or
    /// had given up on it) were queued again.
    pub duplicate: bool,
}

/// What housekeeping drops (times in unix ms).
#[derive(Debug, Clone)]
pub struct PrunePolicy {
    /// Notifications delivered everywhere before this.
    pub delivered_before: i64,
    /// Duplicate keys first seen before this.
    pub dedupe_before: i64,
    /// Dead deliveries, and deliveries to destinations not in `configured`, of notifications received
    /// before this.
    pub unfinishable_before: i64,
    pub configured: Vec<String>,
}

/// What one housekeeping pass dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub delivered: usize,
    pub dead: usize,
    pub unknown_destination: usize,
}

/// A dispatcher asking for work.
#[derive(Debug, Clone)]
pub struct DueQuery {
    pub destination: String,
    pub now: i64,
    /// Deliveries it can start now.
    pub wanted: usize,
    /// Notifications of this destination it is attempting already. A backend that does not lease them
    /// leaves them out, rather than reading their bodies again on every look.
    pub attempting: Vec<i64>,
    /// How long a claimed delivery is this replica's: past it another replica may take it over. Longer
    /// than one attempt can take.
    pub lease: Duration,
}

/// Deliveries of one destination that are due, and when its next later one falls due.
#[derive(Debug, Clone, Default)]
pub struct DueBatch {
    pub due: Vec<DueDelivery>,
    pub next_due_at: Option<i64>,
}

/// What the sidecar asks of a spool.
///
/// The contract every implementation keeps: `insert` returns only once the body and its pending
/// deliveries are durable (nothing is acknowledged before); a failed `insert` stored nothing; `record`
/// changes only a delivery that is still pending (a tool may have purged or redelivered it meanwhile);
/// `prune` never drops pending or dead work.
pub trait SpoolBackend: Clone + Send + Sync + 'static {
    /// Stores a body with a pending delivery for each destination, or queues the stored copy of a
    /// repeat. Refuses with [`Failure::Full`] past `maxBytes`.
    fn insert(&self, notification: NewNotification) -> impl Future<Output = Result<Stored>> + Send;
    /// Records one attempt's outcome.
    fn record(
        &self,
        destination: String,
        notification_id: i64,
        outcome: Outcome,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Records one attempt's outcome in a transaction the spool commits anyway, soon: returns once it is
    /// written, like `record`. For outcomes nobody waits on: at a steady rate each rides with the next
    /// notification's commit instead of costing one of its own. A backend without a single writer
    /// records at once.
    fn record_in_next_commit(
        &self,
        destination: String,
        notification_id: i64,
        outcome: Outcome,
    ) -> impl Future<Output = Result<()>> + Send {
        self.record(destination, notification_id, outcome)
    }
    /// Up to `wanted` deliveries due at `now`, oldest schedule first, now the caller's to attempt.
    fn due(&self, query: DueQuery) -> impl Future<Output = Result<DueBatch>> + Send;
    /// When the earliest pending delivery of any of `destinations` falls due.
    fn earliest_due(&self, destinations: Vec<String>) -> impl Future<Output = Result<Option<i64>>> + Send;
    fn delivery_counts(&self, notification_id: i64) -> impl Future<Output = Result<DeliveryCounts>> + Send;
    fn stats(&self) -> impl Future<Output = Result<Vec<DestinationStats>>> + Send;
    /// Drops what `policy` says is past keeping; never pending work of a configured destination.
    fn prune(&self, policy: PrunePolicy) -> impl Future<Output = Result<Pruned>> + Send;
    fn set_max_bytes(&self, max_bytes: u64);
    /// Bytes held now, as `maxBytes` counts them.
    fn stored_bytes(&self) -> u64;
    /// A receiver that changes whenever new notifications are committed (just after the requests that
    /// stored them are answered, and after their rows are handed over), so dispatchers wake at once.
    fn subscribe_inserts(&self) -> watch::Receiver<u64>;
    /// Rows of `destination` handed over as they are committed, up to `capacity` waiting ([`HandOff`]):
    /// its dispatcher then looks in the spool only when told it missed some. `None` from a backend
    /// that does not hand rows over (a shared queue, whose rows another replica may claim). A second
    /// call for the same destination replaces the first.
    fn hand_off(&self, destination: &str, capacity: usize) -> Option<HandOff>;
    /// Whether other replicas deliver what this one leaves pending (a shared queue).
    fn shared(&self) -> bool;
    /// Which of these duplicate keys were first seen since `since` (unix ms), whether or not their
    /// notifications are still kept.
    fn seen(&self, keys: Vec<String>, since: i64) -> impl Future<Output = Result<HashSet<String>>> + Send;
    /// The deliveries of the notification stored under `key` since `since`; `None` when the key was
    /// not seen (or its notification is no longer kept).
    fn deliveries_of_key(
        &self,
        key: String,
        since: i64,
    ) -> impl Future<Output = Result<Option<Vec<DeliveryStatus>>>> + Send;
}

/// The spool the sidecar runs on: the backend its config names.
#[derive(Clone)]
pub enum Spool {
    Sqlite(SqliteSpool),
    Postgres(PostgresSpool),
}

impl Spool {
    /// Opens the configured backend: the SQLite file (setting aside a corrupt one), or the PostgreSQL
    /// queue (connecting and bringing its schema up to date).
    pub async fn open(config: &SpoolConfig) -> Result<(Spool, OpenReport)> {
        let max_bytes = config.max_bytes.get();
        match (config.backend, &config.postgres) {
            (SpoolBackendKind::Postgres, Some(postgres)) => {
                let spool = PostgresSpool::open(postgres, max_bytes).await?;
                Ok((Spool::Postgres(spool), OpenReport::default()))
            }
            _ => {
                let (spool, report) = SqliteSpool::open(&config.path, config.sync, max_bytes)?;
                Ok((Spool::Sqlite(spool), report))
            }
        }
    }

    /// Where the spool is, for logs: the file, or the queue and database host.
    pub fn location(&self) -> String {
        match self {
            Spool::Sqlite(spool) => spool.path().display().to_string(),
            Spool::Postgres(spool) => spool.location().to_string(),
        }
    }
}

/// Calls the same method on whichever backend this is.
macro_rules! each {
    ($self:ident, $spool:ident => $call:expr) => {
        match $self {
            Spool::Sqlite($spool) => $call,
            Spool::Postgres($spool) => $call,
        }
    };
}

impl SpoolBackend for Spool {
    async fn insert(&self, notification: NewNotification) -> Result<Stored> {
        each!(self, spool => spool.insert(notification).await)
    }
    async fn record(&self, destination: String, notification_id: i64, outcome: Outcome) -> Result<()> {
        each!(self, spool => spool.record(destination, notification_id, outcome).await)
    }
    async fn record_in_next_commit(&self, destination: String, notification_id: i64, outcome: Outcome) -> Result<()> {
        each!(self, spool => spool.record_in_next_commit(destination, notification_id, outcome).await)
    }
    async fn due(&self, query: DueQuery) -> Result<DueBatch> {
        each!(self, spool => spool.due(query).await)
    }
    async fn earliest_due(&self, destinations: Vec<String>) -> Result<Option<i64>> {
        each!(self, spool => spool.earliest_due(destinations).await)
    }
    async fn delivery_counts(&self, notification_id: i64) -> Result<DeliveryCounts> {
        each!(self, spool => spool.delivery_counts(notification_id).await)
    }
    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        each!(self, spool => spool.stats().await)
    }
    async fn prune(&self, policy: PrunePolicy) -> Result<Pruned> {
        each!(self, spool => spool.prune(policy).await)
    }
    fn set_max_bytes(&self, max_bytes: u64) {
        each!(self, spool => spool.set_max_bytes(max_bytes))
    }
    fn stored_bytes(&self) -> u64 {
        each!(self, spool => spool.stored_bytes())
    }
    fn subscribe_inserts(&self) -> watch::Receiver<u64> {
        each!(self, spool => spool.subscribe_inserts())
    }
    fn hand_off(&self, destination: &str, capacity: usize) -> Option<HandOff> {
        each!(self, spool => spool.hand_off(destination, capacity))
    }
    fn shared(&self) -> bool {
        each!(self, spool => spool.shared())
    }
    async fn seen(&self, keys: Vec<String>, since: i64) -> Result<HashSet<String>> {
        each!(self, spool => spool.seen(keys, since).await)
    }
    async fn deliveries_of_key(&self, key: String, since: i64) -> Result<Option<Vec<DeliveryStatus>>> {
        each!(self, spool => spool.deliveries_of_key(key, since).await)
    }
}

/// The right to run a task that one replica of a queue runs at a time (gap-fill), until dropped.
pub enum Exclusive {
    /// The pod's own spool: the config says there is one replica.
    Local,
    /// A PostgreSQL session holding the queue's advisory lock for the task; closing it releases the lock,
    /// also when this process dies.
    Shared(tokio_postgres::Client),
}

impl Spool {
    /// Takes `task` for this replica, or `None` when another replica of the queue runs it now.
    pub async fn exclusive(&self, task: &str) -> Result<Option<Exclusive>> {
        match self {
            Spool::Sqlite(_) => Ok(Some(Exclusive::Local)),
            Spool::Postgres(spool) => Ok(spool.try_lock(task).await?.map(Exclusive::Shared)),
        }
    }
}
