//! The shared spool: one queue in PostgreSQL for every replica of a route.
//!
//! A pod deleted with work pending loses nothing: the rows are in the database, and the other replicas
//! (or its replacement) deliver them. Three kinds of connection, each with one job:
//! - *store* (`maxConnections - 2`): inserts taken in batches, one transaction and one commit per batch
//!   (group commit, as the SQLite writer does), durable before any reply;
//! - *claim*: dispatchers take due deliveries with a lease (`FOR UPDATE SKIP LOCKED`, so replicas never
//!   take the same row at once; a replica killed mid-attempt leaves a lease that runs out and another
//!   takes the row over) and record outcomes, with `synchronous_commit` off: losing one of those to a
//!   database crash costs a repeated attempt, never a notification;
//! - *listen*: `LISTEN` for commits of any replica, so dispatchers wake at once instead of polling.
//!
//! Duplicate keys are per queue: Apple's retry reaching another replica finds the first one's row.

mod connect;
mod schema;
mod sql;
mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use futures_util::future::try_join_all;
use std::time::Duration;

use storerelay_config::PostgresSpool as Settings;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_postgres::Client;

use super::db::{DeliveryCounts, DeliveryRow, DeliveryStatus, DestinationStats, ListFilter, Outcome};
use super::{
    DueBatch, DueQuery, Failure, NewNotification, PrunePolicy, Pruned, Result, SpoolBackend, SpoolError, Stored,
};
use crate::clock::now_ms;
use connect::Target;

/// The `NOTIFY` channel; the payload is the queue whose rows were committed.
const CHANNEL: &str = "storerelay_spool";
/// Inserts taken in one transaction at most.
const MAX_BATCH: usize = 256;
/// Body bytes taken in one transaction at most.
const MAX_BATCH_BYTES: u64 = 8 << 20;
/// Notifications evicted per pass when the queue is full and delivered rows can make room.
const EVICT_BATCH: i64 = 1_000;
/// How often the queue's body bytes are read again: other replicas store into it too.
const BYTES_REFRESH: Duration = Duration::from_secs(5);
/// Wait before trying a lost connection again.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// The error text for a driver error: the server's message when it sent one, else the driver's with its
/// cause (such as "connection refused"). Neither holds the URL.
pub fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    }
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// A connection and the statements prepared on it.
struct Session {
    client: Client,
    prepared: sql::Prepared,
}

impl Session {
    fn new(client: Client) -> Session {
        Session { client, prepared: sql::Prepared::default() }
    }
}

enum Op {
    Insert { notification: NewNotification, reply: oneshot::Sender<Result<Stored>> },
    Prune { policy: PrunePolicy, reply: oneshot::Sender<Result<Pruned>> },
}

impl Op {
    fn body_bytes(&self) -> u64 {
        match self {
            Op::Insert { notification, .. } => notification.body.len() as u64,
            Op::Prune { .. } => 0,
        }
    }
}

struct Shared {
    queue: String,
    schema: String,
    location: String,
    target: Target,
    timeout: Duration,
    max_bytes: AtomicU64,
    /// The queue's body bytes as last read, plus what this replica stored since.
    stored_bytes: AtomicU64,
    /// Bumped after this replica's commits and on every NOTIFY for the queue.
    inserted: watch::Sender<u64>,
    /// The claim connection, opened again when it is lost.
    claims: Mutex<Option<Arc<Session>>>,
}

impl Shared {
    fn error(&self, failure: Failure) -> SpoolError {
        SpoolError::at(&self.location, failure)
    }

    fn wake(&self) {
        self.inserted.send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// The claim connection, (re)opened if needed.
    async fn claims(&self) -> Result<Arc<Session>> {
        let mut slot = self.claims.lock().await;
        if let Some(session) = slot.as_ref().filter(|s| !s.client.is_closed()) {
            return Ok(session.clone());
        }
        let connect = self.target.connect(&self.schema, false);
        let session = Arc::new(Session::new(self.bounded(connect).await?));
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Runs `work` within `spool.postgres.timeout`.
    async fn bounded<T>(&self, work: impl Future<Output = std::result::Result<T, Failure>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result.map_err(|f| self.error(f)),
            Err(_) => Err(self.error(Failure::Timeout(self.timeout))),
        }
    }
}

/// How to reach the queue's database, and how errors name the queue: `postgres queue <queue> (<host/db>)`.
fn target_of(settings: &Settings) -> Result<(Target, String)> {
    let target = Target::from_settings(settings)
        .map_err(|failure| SpoolError::at(&format!("postgres queue {}", settings.queue), failure))?;
    let location = format!("postgres queue {} ({})", settings.queue, target.label);
    Ok((target, location))
}

/// What `check` can tell without connecting: the URL file can be read and holds a usable URL, the CA
/// file holds certificates. The message names the key and the file, never the URL.
pub fn check_settings(settings: &Settings) -> std::result::Result<(), String> {
    Target::from_settings(settings).map(|_| ()).map_err(|failure| failure.to_string())
}

/// A cheap, cloneable handle to the shared spool of one queue.
#[derive(Clone)]
pub struct PostgresSpool {
    ops: mpsc::UnboundedSender<Op>,
    shared: Arc<Shared>,
}

impl PostgresSpool {
    /// A session of its own holding the advisory lock of `task` on this queue, or `None` when another
    /// session holds it. The lock lives as long as the returned client.
    pub async fn try_lock(&self, task: &str) -> Result<Option<Client>> {
        let shared = &self.shared;
        let fail = |failure| SpoolError::at(&shared.location, failure);
        let attempt = async {
            let client = shared.target.connect(&shared.schema, true).await?;
            let name = format!("storerelay {task} {}", shared.queue);
            let row = client.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&name]).await?;
            Ok::<_, Failure>(row.try_get::<_, bool>(0)?.then_some(client))
        };
        tokio::time::timeout(shared.timeout, attempt)
            .await
            .map_err(|_| fail(Failure::Timeout(shared.timeout)))?
            .map_err(fail)
    }

    /// Connects, brings the schema up to date, and starts the store workers and the listener. Fails
    /// when the database cannot be reached in `timeout`: the sidecar does not start without its spool.
    pub async fn open(settings: &Settings, max_bytes: u64) -> Result<PostgresSpool> {
        let (target, location) = target_of(settings)?;
        let fail = |failure| SpoolError::at(&location, failure);
        let timeout = settings.timeout.get();
        let setup = async {
            let mut client = target.connect(&settings.schema, true).await?;
            let migrated = schema::migrate(&mut client, &settings.schema).await?;
            let stored = sql::body_bytes(&client, &settings.queue).await?;
            Ok::<_, Failure>((client, migrated, stored))
        };
        let (first, migrated, stored) = match tokio::time::timeout(timeout.max(Duration::from_secs(30)), setup).await {
            Ok(result) => result.map_err(fail)?,
            Err(_) => return Err(fail(Failure::Timeout(timeout))),
        };
        tracing::info!(queue = %settings.queue, database = %target.label, schema = %settings.schema,
            schema_version = migrated.to, "shared spool open");

        let (ops, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            queue: settings.queue.clone(),
            schema: settings.schema.clone(),
            location,
            target,
            timeout,
            max_bytes: AtomicU64::new(max_bytes),
            stored_bytes: AtomicU64::new(stored),
            inserted: watch::Sender::new(0),
            claims: Mutex::new(None),
        });
        let rx = Arc::new(Mutex::new(rx));
        let writers = settings.max_connections.saturating_sub(2).max(1);
        let mut first = Some(Session::new(first));
        for _ in 0..writers {
            tokio::spawn(store_worker(first.take(), rx.clone(), shared.clone()));
        }
        tokio::spawn(listen(Arc::downgrade(&shared)));
        tokio::spawn(refresh_bytes(Arc::downgrade(&shared)));
        Ok(PostgresSpool { ops, shared })
    }

    pub fn location(&self) -> &str {
        &self.shared.location
    }

    async fn call<T>(&self, op: Op, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        let closed = || self.shared.error(Failure::WriterStopped);
        self.ops.send(op).map_err(|_| closed())?;
        match tokio::time::timeout(self.shared.timeout, rx).await {
            Ok(reply) => reply.map_err(|_| closed())?,
            // The batch may still commit: Apple's retry then finds it as a duplicate.
            Err(_) => Err(self.shared.error(Failure::Timeout(self.shared.timeout))),
        }
    }

    /// Runs a query on the claim connection, within the timeout; a lost connection is reopened next time.
    async fn on_claims<T, F>(&self, query: impl FnOnce(Arc<Session>) -> F) -> Result<T>
    where
        F: Future<Output = std::result::Result<T, Failure>>,
    {
        let client = self.shared.claims().await?;
        self.shared.bounded(query(client)).await
    }
}

impl SpoolBackend for PostgresSpool {
    async fn insert(&self, notification: NewNotification) -> Result<Stored> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Insert { notification, reply }, rx).await
    }

    async fn record(&self, destination: String, notification_id: i64, outcome: Outcome) -> Result<()> {
        let queue = self.shared.queue.clone();
        self.on_claims(|session| async move {
            sql::record(&session.client, &session.prepared, &queue, &destination, notification_id, now_ms(), &outcome)
                .await
        })
        .await
    }

    async fn due(&self, query: DueQuery) -> Result<DueBatch> {
        let queue = self.shared.queue.clone();
        self.on_claims(|session| async move {
            let lease_until = query.now + query.lease.as_millis() as i64;
            let (client, prepared) = (&session.client, &session.prepared);
            let wanted = query.wanted as i64;
            let claimed = sql::claim(client, prepared, &queue, &query.destination, query.now, wanted, lease_until);
            let next = sql::next_due_after(client, prepared, &queue, &query.destination, query.now);
            // Both go out on the connection at once (the driver pipelines them).
            let (due, next_due_at) = futures_util::future::try_join(claimed, next).await?;
            Ok(DueBatch { due, next_due_at })
        })
        .await
    }

    async fn earliest_due(&self, destinations: Vec<String>) -> Result<Option<i64>> {
        let queue = self.shared.queue.clone();
        self.on_claims(|session| async move { sql::earliest_due(&session.client, &queue, &destinations).await }).await
    }

    async fn delivery_counts(&self, notification_id: i64) -> Result<DeliveryCounts> {
        let queue = self.shared.queue.clone();
        self.on_claims(|session| async move { sql::delivery_counts(&session.client, &queue, notification_id).await })
            .await
    }

    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        let queue = self.shared.queue.clone();
        self.on_claims(|session| async move { sql::stats(&session.client, &queue).await }).await
    }

    async fn deliveries_of_key(&self, key: String, since: i64) -> Result<Option<Vec<DeliveryStatus>>> {
        let queue = self.shared.queue.clone();
        self.on_claims(|session| async move { sql::deliveries_of_key(&session.client, &queue, &key, since).await })
            .await
    }

    async fn seen(&self, keys: Vec<String>, since: i64) -> Result<std::collections::HashSet<String>> {
        let queue = self.shared.queue.clone();
        let seen =
            self.on_claims(|session| async move { sql::seen(&session.client, &queue, &keys, since).await }).await?;
        Ok(seen.into_iter().collect())
    }

    async fn prune(&self, policy: PrunePolicy) -> Result<Pruned> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Prune { policy, reply }, rx).await
    }

    fn set_max_bytes(&self, max_bytes: u64) {
        self.shared.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(Ordering::Relaxed)
    }

    fn subscribe_inserts(&self) -> watch::Receiver<u64> {
        self.shared.inserted.subscribe()
    }

    /// Rows are claimed by a due query's lease, which a hand-off would skip.
    fn hand_off(&self, _destination: &str, _capacity: usize) -> Option<super::HandOff> {
        None
    }

    fn shared(&self) -> bool {
        true
    }
}

/// Takes queued operations in batches and runs each batch in one transaction on its own connection.
async fn store_worker(mut session: Option<Session>, ops: Arc<Mutex<mpsc::UnboundedReceiver<Op>>>, shared: Arc<Shared>) {
    loop {
        let batch = {
            let mut ops = ops.lock().await;
            let Some(first) = ops.recv().await else { return };
            let mut bytes = first.body_bytes();
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match ops.try_recv() {
                    Ok(op) => {
                        bytes += op.body_bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        // Requests that gave up waiting (their timeout answered 503) are not stored after all.
        let batch: Vec<Op> = batch
            .into_iter()
            .filter(|op| match op {
                Op::Insert { reply, .. } => !reply.is_closed(),
                Op::Prune { reply, .. } => !reply.is_closed(),
            })
            .collect();
        if batch.is_empty() {
            continue;
        }
        let connection = match session.take().filter(|s| !s.client.is_closed()) {
            Some(open) => Ok(open),
            None => shared.target.connect(&shared.schema, true).await.map(Session::new),
        };
        match connection {
            Ok(mut open) => {
                run_batch(&mut open, batch, &shared).await;
                session = Some(open);
            }
            Err(failure) => {
                let error = shared.error(failure);
                tracing::warn!(%error, "cannot reach the spool database; notifications get 503 until it is back");
                for op in batch {
                    answer(op, &error);
                }
                tokio::time::sleep(RECONNECT_DELAY).await;
            }
        }
    }
}

fn answer(op: Op, error: &SpoolError) {
    match op {
        Op::Insert { reply, .. } => {
            let _ = reply.send(Err(error.clone()));
        }
        Op::Prune { reply, .. } => {
            let _ = reply.send(Err(error.clone()));
        }
    }
}

/// What one insert of a batch came to before the commit.
enum Planned {
    Stored(Stored),
    Refused(SpoolError),
}

async fn run_batch(session: &mut Session, batch: Vec<Op>, shared: &Shared) {
    let mut inserts = Vec::new();
    let mut prunes = Vec::new();
    for op in batch {
        match op {
            Op::Insert { notification, reply } => inserts.push((notification, reply)),
            Op::Prune { policy, reply } => prunes.push((policy, reply)),
        }
    }
    if !inserts.is_empty() {
        let notifications: Vec<&NewNotification> = inserts.iter().map(|(n, _)| n).collect();
        let outcome = store_all(session, &notifications, shared).await;
        match outcome {
            Ok(planned) => {
                for ((_, reply), planned) in inserts.into_iter().zip(planned) {
                    let _ = reply.send(match planned {
                        Planned::Stored(stored) => Ok(stored),
                        Planned::Refused(error) => Err(error),
                    });
                }
                shared.wake();
            }
            Err(failure) => {
                let error = shared.error(failure);
                for (_, reply) in inserts {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
    for (policy, reply) in prunes {
        let _ = reply.send(prune(&mut session.client, &policy, shared).await.map_err(|f| shared.error(f)));
    }
}

/// What becomes of one notification of a batch.
enum Step {
    /// A repeat of a stored notification: queue it for the destinations that lack it.
    Repeat(i64),
    /// A repeat of the batch's notification at this index.
    RepeatOfBatch(usize),
    Insert,
    Refused(SpoolError),
}

/// Stores a batch in one transaction: a repeat (by duplicate key, in the queue or earlier in the batch)
/// queues the stored copy; the rest are inserted while `maxBytes` allows. The statements of each stage
/// go out together (the driver pipelines them), so a batch costs a few round trips and one commit
/// however many notifications it holds. Any database error fails the whole batch: nothing of it is stored.
async fn store_all(
    session: &mut Session,
    batch: &[&NewNotification],
    shared: &Shared,
) -> std::result::Result<Vec<Planned>, Failure> {
    let queue = shared.queue.as_str();
    let now = now_ms();
    let prepared = &session.prepared;
    let tx = session.client.transaction().await?;
    // Keys are taken in sorted order, so two replicas' batches never wait on each other in a cycle.
    let mut keys: Vec<&str> = batch.iter().filter_map(|n| n.dedupe.as_ref().map(|(k, _)| k.as_str())).collect();
    keys.sort_unstable();
    keys.dedup();
    let taken = try_join_all(keys.iter().map(|key| sql::take_key(&tx, prepared, queue, key, now))).await?;
    let known: HashMap<&str, (Option<i64>, i64)> = keys.iter().copied().zip(taken).collect();

    let max = shared.max_bytes.load(Ordering::Relaxed);
    let mut stored = shared.stored_bytes.load(Ordering::Relaxed);
    let mut evicted = false;
    let mut owners: HashMap<&str, usize> = HashMap::new();
    let mut steps = Vec::with_capacity(batch.len());
    for (index, notification) in batch.iter().enumerate() {
        let key = notification.dedupe.as_ref().map(|(key, since)| (key.as_str(), *since));
        if let Some((key, since)) = key {
            if let Some(owner) = owners.get(key) {
                steps.push(Step::RepeatOfBatch(*owner));
                continue;
            }
            if let Some((Some(id), _)) = known.get(key).filter(|(_, first_seen)| *first_seen >= since) {
                steps.push(Step::Repeat(*id));
                continue;
            }
        }
        let size = notification.body.len() as u64;
        if stored + size > max && !evicted {
            // Delivered rows are kept only as a convenience: make room with them, on one replica at a time.
            evicted = true;
            if sql::try_housekeeping_lock(&tx, queue).await? {
                sql::prune_delivered(&tx, queue, now + 1, EVICT_BATCH).await?;
            }
            let planned: u64 = steps
                .iter()
                .zip(batch)
                .filter(|(step, _)| matches!(step, Step::Insert))
                .map(|(_, n)| n.body.len() as u64)
                .sum();
            stored = sql::body_bytes(&tx, queue).await? + planned;
        }
        if stored + size > max {
            let held_by = sql::largest_holder(&tx, queue)
                .await?
                .map(|(destination, count)| format!("`{destination}` ({count} deliveries)"));
            steps.push(Step::Refused(shared.error(Failure::Full { stored, max, held_by, set_aside: 0 })));
            continue;
        }
        stored += size;
        if let Some((key, _)) = key {
            owners.insert(key, index);
        }
        steps.push(Step::Insert);
    }

    let inserts = steps.iter().zip(batch).enumerate().filter(|(_, (step, _))| matches!(step, Step::Insert));
    let transaction = &tx;
    let ids: HashMap<usize, i64> = try_join_all(inserts.map(|(index, (_, n))| async move {
        let id = sql::insert(transaction, prepared, queue, now, &n.path, &n.body, &n.destinations).await?;
        Ok::<_, Failure>((index, id))
    }))
    .await?
    .into_iter()
    .collect();
    let mut planned = Vec::with_capacity(batch.len());
    let mut follow_ups = Vec::new();
    for (index, (step, notification)) in steps.into_iter().zip(batch).enumerate() {
        let (notification_id, duplicate) = match step {
            Step::Refused(error) => {
                planned.push(Planned::Refused(error));
                continue;
            }
            Step::Insert => (ids[&index], false),
            Step::Repeat(id) => (id, true),
            Step::RepeatOfBatch(owner) => (ids[&owner], true),
        };
        let tx = &tx;
        if duplicate {
            let destinations = &notification.destinations;
            follow_ups.push(Box::pin(async move {
                sql::queue_again(tx, prepared, queue, notification_id, destinations, now).await
            })
                as std::pin::Pin<Box<dyn Future<Output = std::result::Result<(), Failure>> + Send + '_>>);
        } else if let Some((key, _)) = &notification.dedupe {
            follow_ups
                .push(Box::pin(async move { sql::set_key(tx, prepared, queue, key, notification_id, now).await }));
        }
        planned.push(Planned::Stored(Stored { notification_id, duplicate }));
    }
    follow_ups.push(Box::pin(sql::notify(&tx, prepared, queue)));
    try_join_all(follow_ups).await?;
    tx.commit().await?;
    shared.stored_bytes.store(stored, Ordering::Relaxed);
    Ok(planned)
}

async fn prune(client: &mut Client, policy: &PrunePolicy, shared: &Shared) -> std::result::Result<Pruned, Failure> {
    let tx = client.transaction().await?;
    if !sql::try_housekeeping_lock(&tx, &shared.queue).await? {
        // Another replica is doing it.
        return Ok(Pruned::default());
    }
    let pruned = sql::prune(&tx, &shared.queue, policy).await?;
    let stored = sql::body_bytes(&tx, &shared.queue).await?;
    tx.commit().await?;
    shared.stored_bytes.store(stored, Ordering::Relaxed);
    Ok(pruned)
}

/// Wakes the dispatchers on every commit to the queue by any replica, for as long as the spool is open.
async fn listen(shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else { return };
        let target = strong.target.clone();
        let queue = strong.queue.clone();
        drop(strong);
        match target.open().await {
            Ok((client, mut driver)) => {
                let statement = format!("LISTEN {CHANNEL}");
                let listening = client.batch_execute(&statement);
                // Fused: polled again after it finished, it stays pending instead of panicking.
                let mut listening = std::pin::pin!(futures_util::FutureExt::fuse(listening));
                loop {
                    let message = std::future::poll_fn(|cx| {
                        // Drive the LISTEN request until it has been sent and answered, then only messages.
                        let _ = listening.as_mut().poll(cx);
                        driver.poll_message(cx)
                    })
                    .await;
                    let Some(strong) = shared.upgrade() else { return };
                    match message {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) if n.payload() == queue => {
                            strong.wake()
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => {
                            tracing::warn!(error = %describe(&error), "spool listener lost its connection; reconnecting");
                            break;
                        }
                        None => break,
                    }
                }
                // Rows committed while no one listened are found by the dispatchers' periodic look.
                if let Some(strong) = shared.upgrade() {
                    strong.wake();
                }
            }
            Err(failure) => tracing::debug!(error = %failure, "spool listener cannot connect"),
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

/// Reads the queue's body bytes again now and then: other replicas store into it too.
async fn refresh_bytes(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(BYTES_REFRESH).await;
        let Some(strong) = shared.upgrade() else { return };
        let queue = strong.queue.clone();
        let read = async {
            let session = strong.claims().await.map_err(|e| Failure::Setup(e.to_string()))?;
            sql::body_bytes(&session.client, &queue).await
        };
        if let Ok(Ok(bytes)) = tokio::time::timeout(strong.timeout, read).await {
            strong.stored_bytes.store(bytes, Ordering::Relaxed);
        }
    }
}

/// The `spool` tools against the shared queue: one connection, one command.
pub struct PostgresTools {
    client: Client,
    queue: String,
    pub location: String,
}

impl PostgresTools {
    pub async fn connect(settings: &Settings) -> std::result::Result<PostgresTools, SpoolError> {
        let (target, location) = target_of(settings)?;
        let fail = |failure| SpoolError::at(&location, failure);
        let mut client = target.connect(&settings.schema, true).await.map_err(fail)?;
        // The tools may be the first to touch a new database.
        schema::migrate(&mut client, &settings.schema).await.map_err(fail)?;
        Ok(PostgresTools { client, queue: settings.queue.clone(), location })
    }

    fn error(&self, failure: Failure) -> SpoolError {
        SpoolError::at(&self.location, failure)
    }

    pub async fn stats(&self) -> Result<Vec<DestinationStats>> {
        sql::stats(&self.client, &self.queue).await.map_err(|f| self.error(f))
    }
    pub async fn deliveries_of_key(&self, key: &str, since: i64) -> Result<Option<Vec<DeliveryStatus>>> {
        sql::deliveries_of_key(&self.client, &self.queue, key, since).await.map_err(|f| self.error(f))
    }
    pub async fn seen(&self, keys: &[String], since: i64) -> Result<std::collections::HashSet<String>> {
        let seen = sql::seen(&self.client, &self.queue, keys, since).await.map_err(|f| self.error(f))?;
        Ok(seen.into_iter().collect())
    }
    pub async fn notification_count(&self) -> Result<u64> {
        sql::notification_count(&self.client, &self.queue).await.map_err(|f| self.error(f))
    }
    pub async fn body_bytes(&self) -> Result<u64> {
        sql::body_bytes(&self.client, &self.queue).await.map_err(|f| self.error(f))
    }
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<DeliveryRow>> {
        sql::list(&self.client, &self.queue, filter).await.map_err(|f| self.error(f))
    }
    pub async fn redeliver(&mut self, destination: &str, dead_only: bool, since: i64, now: i64) -> Result<usize> {
        let result = sql::redeliver(&mut self.client, &self.queue, destination, dead_only, since, now).await;
        result.map_err(|f| self.error(f))
    }
    pub async fn purge(&mut self, destination: Option<&str>, include_dead: bool, before: i64) -> Result<usize> {
        let result = sql::purge(&mut self.client, &self.queue, destination, include_dead, before).await;
        result.map_err(|f| self.error(f))
    }
    pub async fn purge_unknown_destinations(&mut self, configured: &[String]) -> Result<usize> {
        let result = sql::purge_unknown_destinations(&mut self.client, &self.queue, configured).await;
        result.map_err(|f| self.error(f))
    }
}
