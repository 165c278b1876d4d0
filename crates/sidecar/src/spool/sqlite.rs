//! The SQLite spool: one file beside the sidecar, for a route with one replica.
//!
//! One writer thread owns the SQLite connection. Callers send it operations; it takes whatever has queued
//! up, runs the lot in one transaction and commits once, so with `sync: full` many concurrent requests
//! share one fsync (group commit) instead of paying one each. Replies go out only after the commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use storerelay_config::SyncMode;
use tokio::sync::{mpsc, oneshot, watch};

use super::db::{
    self, Checkpointer, DeliveryCounts, DestinationStats, DueDelivery, Failure, OpenReport, Outcome, SetAside, SpoolDb,
};
use super::hand_off::{self, HandOff, Offers};
use super::{DueBatch, DueQuery, NewNotification, PrunePolicy, Pruned, Result, SpoolBackend, SpoolError, Stored};
use crate::clock::now_ms;

/// Operations taken in one transaction at most.
const MAX_BATCH: usize = 512;
/// Body bytes taken in one transaction at most, as a share of `maxBytes` and never more than 8 MiB: a
/// transaction's pages sit in the WAL until the next checkpoint, beside their place in the database,
/// so this bounds how far the files can pass `maxBytes` for a moment. A single body is always taken.
fn max_batch_bytes(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(64 << 10, 8 << 20)
}
/// Notifications evicted per pass when the spool is full and delivered rows can make room.
const EVICT_BATCH: usize = 1_000;
/// A transaction that stores at least this many body bytes (four V2 notifications) appends them to
/// the body log ([`super::body_log`]) instead of putting them in SQLite. Below it they stay inline: the
/// log costs a flush of its own per commit, which at a steady rate (a body or two per commit) costs
/// more than it saves; in a burst it spares SQLite writing every body twice, page by page.
const LOG_BODIES_FROM: u64 = 64 << 10;
/// Bytes of bodies a housekeeping pass moves back inline out of mostly-emptied segments.
const INLINE_PER_PRUNE: u64 = 8 << 20;

type ReadJob = Box<dyn FnOnce(&SpoolDb) + Send>;

enum Op {
    Insert {
        notification: NewNotification,
        reply: oneshot::Sender<Result<Stored>>,
    },
    Record {
        destination: String,
        notification_id: i64,
        outcome: Outcome,
        reply: oneshot::Sender<Result<()>>,
    },
    Prune {
        policy: PrunePolicy,
        reply: oneshot::Sender<Result<Pruned>>,
    },
    Read(ReadJob),
    /// Wakes the writer for the outcomes waiting to ride along ([`Shared::riders`]) and nothing else.
    Flush,
}

impl Op {
    fn body_bytes(&self) -> u64 {
        match self {
            Op::Insert { notification, .. } => notification.body.len() as u64,
            _ => 0,
        }
    }
}

struct Shared {
    path: PathBuf,
    max_bytes: AtomicU64,
    /// Database pages in use (`SpoolDb::used_bytes`), as of the last commit.
    stored_bytes: AtomicU64,
    /// Damaged copies set aside beside the spool ([`SetAside`]), looked at on open and each prune.
    set_aside_bytes: AtomicU64,
    /// Bumped after every commit that added notifications.
    inserted: watch::Sender<u64>,
    /// Who holds a full spool, as last looked up: while it stays full every insert is refused, and
    /// the lookup (an aggregate over all deliveries) must not run for each one.
    full_holder: std::sync::Mutex<Option<(std::time::Instant, Option<String>)>>,
    /// Dispatchers' hand-offs by destination, offered every committed row ([`hand_off`]).
    hand_offs: std::sync::Mutex<std::collections::HashMap<String, Offers>>,
    /// Outcomes waiting to be written in the writer's next transaction (`record_in_next_commit`),
    /// put here without waking it: each one woken for would cost a commit and two thread switches.
    riders: std::sync::Mutex<Vec<Op>>,
    /// When notifications were last committed (unix ms): outcomes ride along only while they come.
    last_stored_at: std::sync::atomic::AtomicI64,
}

impl Shared {
    fn error(&self, failure: Failure) -> SpoolError {
        SpoolError::new(&self.path, failure)
    }
}

/// The SQLite spool: a cheap, cloneable handle to its writer thread.
#[derive(Clone)]
pub struct SqliteSpool {
    ops: mpsc::UnboundedSender<Op>,
    shared: Arc<Shared>,
    /// [`RIDE_AT_MOST`]; longer in tests that must not race it.
    ride_at_most: std::time::Duration,
}

impl SqliteSpool {
    /// Opens the spool (setting aside a corrupt file) and starts its writer thread.
    pub fn open(path: &Path, sync: SyncMode, max_bytes: u64) -> Result<(SqliteSpool, OpenReport)> {
        let error = |failure| SpoolError::new(path, failure);
        let (db, report) = SpoolDb::open_checked(path, sync).map_err(error)?;
        let stored = db.used_bytes().map_err(error)?;
        let (ops, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            max_bytes: AtomicU64::new(max_bytes),
            stored_bytes: AtomicU64::new(stored),
            set_aside_bytes: AtomicU64::new(report.set_aside.bytes),
            inserted: watch::Sender::new(0),
            full_holder: std::sync::Mutex::new(None),
            hand_offs: std::sync::Mutex::default(),
            riders: std::sync::Mutex::default(),
            last_stored_at: std::sync::atomic::AtomicI64::new(i64::MIN),
        });
        let checkpoints = start_checkpointer(path, sync);
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(db, rx, writer_shared, checkpoints))
            .map_err(|source| error(Failure::Io { action: "cannot start the writer thread", source }))?;
        Ok((SqliteSpool { ops, shared, ride_at_most: RIDE_AT_MOST }, report))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn call<T>(&self, op: Op, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        let closed = || self.shared.error(Failure::WriterStopped);
        self.ops.send(op).map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Runs a query on the writer's connection, between its write batches.
    async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&SpoolDb) -> db::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let shared = self.shared.clone();
        let job: ReadJob = Box::new(move |db| {
            let _ = reply.send(query(db).map_err(|failure| shared.error(failure)));
        });
        self.call(Op::Read(job), rx).await
    }
}

impl SpoolBackend for SqliteSpool {
    async fn insert(&self, notification: NewNotification) -> Result<Stored> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Insert { notification, reply }, rx).await
    }

    async fn record(&self, destination: String, notification_id: i64, outcome: Outcome) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Record { destination, notification_id, outcome, reply }, rx).await
    }

    async fn record_in_next_commit(&self, destination: String, notification_id: i64, outcome: Outcome) -> Result<()> {
        let last_stored_at = self.shared.last_stored_at.load(Ordering::Relaxed);
        if now_ms().saturating_sub(last_stored_at) > self.ride_at_most.as_millis() as i64 {
            // No notification is likely to come soon (a backlog drains, or the app is quiet).
            return self.record(destination, notification_id, outcome).await;
        }
        let (reply, mut rx) = oneshot::channel();
        let op = Op::Record { destination, notification_id, outcome, reply };
        self.shared.riders.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        tokio::select! {
            written = &mut rx => return written.map_err(|_| self.shared.error(Failure::WriterStopped))?,
            () = tokio::time::sleep(self.ride_at_most) => {}
        }
        self.call(Op::Flush, rx).await
    }

    async fn due(&self, query: DueQuery) -> Result<DueBatch> {
        // No leases here: rows being attempted stay due until their outcome is recorded, so they are
        // left out by id.
        let DueQuery { destination, now, wanted, attempting, .. } = query;
        self.read(move |db| {
            Ok(DueBatch {
                due: db.due(&destination, now, wanted, &attempting)?,
                next_due_at: db.next_due_after(&destination, now)?,
            })
        })
        .await
    }

    async fn earliest_due(&self, destinations: Vec<String>) -> Result<Option<i64>> {
        self.read(move |db| {
            let mut earliest: Option<i64> = None;
            for destination in &destinations {
                if let Some(at) = db.next_due_after(destination, i64::MIN)? {
                    earliest = Some(earliest.map_or(at, |e| e.min(at)));
                }
            }
            Ok(earliest)
        })
        .await
    }

    async fn delivery_counts(&self, notification_id: i64) -> Result<DeliveryCounts> {
        self.read(move |db| db.delivery_counts(notification_id)).await
    }

    async fn stats(&self) -> Result<Vec<DestinationStats>> {
        self.read(|db| db.stats()).await
    }

    async fn deliveries_of_key(&self, key: String, since: i64) -> Result<Option<Vec<super::DeliveryStatus>>> {
        self.read(move |db| db.deliveries_of_key(&key, since)).await
    }

    async fn seen(&self, keys: Vec<String>, since: i64) -> Result<std::collections::HashSet<String>> {
        self.read(move |db| {
            let mut seen = std::collections::HashSet::new();
            for key in keys {
                if db.seen(&key, since)? {
                    seen.insert(key);
                }
            }
            Ok(seen)
        })
        .await
    }

    async fn prune(&self, policy: PrunePolicy) -> Result<Pruned> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Prune { policy, reply }, rx).await
    }

    fn set_max_bytes(&self, max_bytes: u64) {
        self.shared.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(Ordering::Relaxed) + self.shared.set_aside_bytes.load(Ordering::Relaxed)
    }

    fn subscribe_inserts(&self) -> watch::Receiver<u64> {
        self.shared.inserted.subscribe()
    }

    fn hand_off(&self, destination: &str, capacity: usize) -> Option<HandOff> {
        let (offers, hand_off) = hand_off::channel(capacity);
        let mut hand_offs = self.shared.hand_offs.lock().unwrap_or_else(|p| p.into_inner());
        hand_offs.insert(destination.to_string(), offers);
        Some(hand_off)
    }

    fn shared(&self) -> bool {
        false
    }
}

/// How long an outcome waits for a transaction to ride along with before it has the writer commit it
/// on its own; it waits at all only if notifications were stored within as long. At a steady few
/// hundred a second and more the next one nearly always comes first; slower, or while a backlog
/// drains with nothing coming in, outcomes are written at once as before (a delivery slot waiting
/// for a commit that is not coming would slow the drain to `concurrency` per this interval).
const RIDE_AT_MOST: std::time::Duration = std::time::Duration::from_millis(5);

/// A reply owed once the batch's fate is known: called with the batch's failure, if any.
type Owed = Box<dyn FnOnce(Option<&SpoolError>) + Send>;

/// Answers once the commit's fate is known. An operation that was not run (the batch had failed before
/// it) or that succeeded inside a failed batch gets the batch's error; one that failed on its own (a
/// full spool) keeps its own.
fn owe<T: Send + 'static>(reply: oneshot::Sender<Result<T>>, result: Option<Result<T>>) -> Owed {
    Box::new(move |failure| {
        let _ = reply.send(match (result, failure) {
            (Some(Err(own)), _) => Err(own),
            (Some(Ok(value)), None) => Ok(value),
            (_, Some(batch)) => Err(batch.clone()),
            (None, None) => unreachable!("an operation is skipped only after the batch failed"),
        });
    })
}

/// The writer asks for a checkpoint once about this much has been committed since it last asked (a
/// quarter of the 1,000 pages at which it would checkpoint itself): about 50 notifications of 20 KB.
const CHECKPOINT_AFTER_BYTES: u64 = 1 << 20;
/// What a write adds to the WAL besides its body, roughly: a page of rows and index.
const WRITE_OVERHEAD_BYTES: u64 = 4096;

/// Starts a thread that copies committed pages from the WAL into the database file, off the commit
/// path; returns what the writer pokes every [`CHECKPOINT_AFTER_BYTES`]. Left to itself SQLite
/// checkpoints inside the commit that takes the WAL past 1,000 pages (every ~100 notifications of 20 KB): that batch's
/// requests wait for 4 MiB to be copied and the database file to be synced. A passive checkpoint on
/// a connection of its own never blocks the writer, and once it has caught up the writer's next
/// transaction starts the WAL over. The writer's own checkpoint at 1,000 pages stays as the backstop
/// (it finds little left to copy while this keeps up). `None` (and a warning) if it cannot start.
fn start_checkpointer(path: &Path, sync: SyncMode) -> Option<std::sync::mpsc::SyncSender<()>> {
    let started = Checkpointer::open(path, sync).and_then(|checkpoints| {
        let (poke, pokes) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("spool-checkpointer".into())
            .spawn(move || checkpointer(checkpoints, pokes))
            .map_err(|source| Failure::Io { action: "cannot start the checkpointer thread", source })?;
        Ok(poke)
    });
    match started {
        Ok(poke) => Some(poke),
        Err(failure) => {
            tracing::warn!(error = %failure, "spool: no background checkpoints; the writer checkpoints in its commits");
            None
        }
    }
}

/// Ends when the writer does (it drops the sender).
fn checkpointer(checkpoints: Checkpointer, pokes: std::sync::mpsc::Receiver<()>) {
    while pokes.recv().is_ok() {
        if let Err(error) = checkpoints.checkpoint() {
            tracing::debug!(%error, "spool: checkpoint");
        }
    }
}

fn writer(
    db: SpoolDb,
    mut ops: mpsc::UnboundedReceiver<Op>,
    shared: Arc<Shared>,
    checkpoints: Option<std::sync::mpsc::SyncSender<()>>,
) {
    let mut since_checkpoint = 0;
    while let Some(first) = ops.blocking_recv() {
        let max_bytes = max_batch_bytes(shared.max_bytes.load(Ordering::Relaxed));
        // Twice a batch: whatever is left of the segment being appended to counts against `maxBytes`
        // until it is deleted.
        db.set_segment_bytes(2 * max_bytes);
        let mut bytes = first.body_bytes();
        // Outcomes riding along go first: each was put there before this wake, so before anything
        // read below could depend on it.
        let mut batch = std::mem::take(&mut *shared.riders.lock().unwrap_or_else(|p| p.into_inner()));
        batch.push(first);
        while batch.len() < MAX_BATCH && bytes < max_bytes {
            match ops.try_recv() {
                Ok(op) => {
                    bytes += op.body_bytes();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        batch.retain(|op| !matches!(op, Op::Flush));
        let (reads, writes): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(|op| matches!(op, Op::Read(_)));
        if !writes.is_empty() {
            let body_bytes: u64 = writes.iter().map(Op::body_bytes).sum();
            let log_bodies = body_bytes >= LOG_BODIES_FROM;
            // Logged bodies never pass through the WAL.
            since_checkpoint += writes.len() as u64 * WRITE_OVERHEAD_BYTES + if log_bodies { 0 } else { body_bytes };
            run_writes(&db, writes, &shared, log_bodies);
            if let Some(checkpoints) = checkpoints.as_ref().filter(|_| since_checkpoint >= CHECKPOINT_AFTER_BYTES) {
                // Full: a checkpoint is due already and will take this commit's pages too.
                let _ = checkpoints.try_send(());
                since_checkpoint = 0;
            }
        }
        for op in reads {
            if let Op::Read(job) = op {
                job(&db);
            }
        }
    }
}

/// How one transaction stores bodies, and what it did to the spool's size.
struct Space {
    /// [`SpoolDb::used_bytes`] as of the last write.
    stored: u64,
    /// Whether bodies go to the body log ([`LOG_BODIES_FROM`]).
    log_bodies: bool,
    /// Whether rows were dropped, so body segments may have been emptied.
    dropped: bool,
}

/// Runs every write in one transaction. The first SQLite error fails the whole batch (SQLite may have
/// rolled back already, e.g. on a full disk) and the writes after it are not run; a full spool fails
/// only the insert that did not fit.
fn run_writes(db: &SpoolDb, writes: Vec<Op>, shared: &Shared, log_bodies: bool) {
    let mut owed: Vec<Owed> = Vec::with_capacity(writes.len());
    // Only a batch that stores notifications is owed the configured fsync before its replies, and
    // one that prunes: the segments its dropped rows emptied are let go right after it, and a power
    // cut that took back an unflushed prune would bring back rows whose bodies are gone.
    let flushed = writes.iter().any(|op| matches!(op, Op::Insert { .. } | Op::Prune { .. }));
    let mut failure: Option<SpoolError> =
        db.flush_commits(flushed).and_then(|()| db.begin()).err().map(|f| shared.error(f));
    let mut space = Space { stored: shared.stored_bytes.load(Ordering::Relaxed), log_bodies, dropped: false };
    let mut inserted: Vec<(Stored, NewNotification)> = Vec::new();
    let now = now_ms();
    for op in writes {
        let failed = failure.is_some();
        match op {
            Op::Insert { notification, reply } => {
                let result = (!failed).then(|| store(db, shared, &mut space, now, &notification));
                match &result {
                    Some(Ok(done)) => inserted.push((*done, notification)),
                    Some(Err(e)) if !e.is_full() => failure = Some(e.clone()),
                    _ => {}
                }
                owed.push(owe(reply, result));
            }
            Op::Record { destination, notification_id, outcome, reply } => {
                let result = (!failed)
                    .then(|| db.record(&destination, notification_id, now, &outcome).map_err(|f| shared.error(f)));
                if let Some(Err(e)) = &result {
                    failure = Some(e.clone());
                }
                owed.push(owe(reply, result));
            }
            Op::Prune { policy, reply } => {
                let result = (!failed).then(|| {
                    let (dead, unknown_destination) =
                        db.expire_unfinishable(&policy.configured, policy.unfinishable_before)?;
                    let delivered = db.prune_delivered(policy.delivered_before, usize::MAX >> 1)?;
                    db.forget_dedupe_before(policy.dedupe_before)?;
                    db.inline_sparse_segments(INLINE_PER_PRUNE)?;
                    space.dropped = true;
                    space.stored = db.used_bytes()?;
                    // A set-aside copy may have been discarded (`spool discard-set-aside`) meanwhile.
                    if let Ok(set_aside) = SetAside::find(&shared.path) {
                        shared.set_aside_bytes.store(set_aside.bytes, Ordering::Relaxed);
                    }
                    Ok(Pruned { delivered, dead, unknown_destination })
                });
                let result = result.map(|r| r.map_err(|f| shared.error(f)));
                if let Some(Err(e)) = &result {
                    failure = Some(e.clone());
                }
                owed.push(owe(reply, result));
            }
            Op::Read(_) | Op::Flush => unreachable!("reads run after the writes; flushes are dropped before"),
        }
    }
    if failure.is_none() {
        failure = db.commit().err().map(|f| shared.error(f));
    }
    match failure {
        Some(batch) => {
            db.rollback();
            // The file may have changed under a failed batch: recount instead of trusting the tally.
            if let Ok(actual) = db.used_bytes() {
                shared.stored_bytes.store(actual, Ordering::Relaxed);
            }
            for reply in owed {
                reply(Some(&batch));
            }
        }
        None => {
            if space.dropped {
                // Only now that the rows are gone for good may the segments they emptied go.
                match db.delete_unreferenced_segments().and_then(|_| db.used_bytes()) {
                    Ok(now_stored) => space.stored = now_stored,
                    Err(error) => tracing::warn!(%error, "spool: body segments were left to the next housekeeping"),
                }
            }
            shared.stored_bytes.store(space.stored, Ordering::Relaxed);
            // The requests waiting for this commit are answered first: a delivery started at once
            // would compete with them for the CPU.
            for reply in owed {
                reply(None);
            }
            if !inserted.is_empty() {
                shared.last_stored_at.store(now, Ordering::Relaxed);
                // Before any later read is served: see `hand_off` for why.
                hand_over(shared, now, inserted);
                shared.inserted.send_modify(|generation| *generation += 1);
            }
        }
    }
}

/// Offers each newly stored row to its destination's hand-off. A stored repeat queued again is not
/// offered (its row may be in flight already): its destinations are told to look in the spool.
fn hand_over(shared: &Shared, received_at: i64, inserted: Vec<(Stored, NewNotification)>) {
    let mut hand_offs = shared.hand_offs.lock().unwrap_or_else(|p| p.into_inner());
    if hand_offs.is_empty() {
        return;
    }
    for (stored, notification) in inserted {
        for destination in &notification.destinations {
            let Some(offers) = hand_offs.get(destination) else { continue };
            if stored.duplicate {
                offers.mark_missed();
                continue;
            }
            let row = DueDelivery {
                notification_id: stored.notification_id,
                received_at,
                attempts: 0,
                body: notification.body.clone(),
            };
            offers.offer(row);
        }
    }
    hand_offs.retain(|_, offers| !offers.is_closed());
}

/// Stores a notification, or queues the one already stored under its duplicate key.
fn store(db: &SpoolDb, shared: &Shared, space: &mut Space, now: i64, notification: &NewNotification) -> Result<Stored> {
    let mut run = || -> db::Result<Stored> {
        if let Some((key, since)) = &notification.dedupe {
            if let Some(notification_id) = db.find_duplicate(key, *since)? {
                db.queue(notification_id, &notification.destinations, now)?;
                return Ok(Stored { notification_id, duplicate: true });
            }
        }
        let notification_id = insert_within_capacity(db, shared, space, now, notification)?;
        if let Some((key, _)) = &notification.dedupe {
            db.remember(key, notification_id, now)?;
        }
        Ok(Stored { notification_id, duplicate: false })
    };
    run().map_err(|failure| shared.error(failure))
}

/// How long a full spool's holder, once looked up, is reported without looking again.
const HOLDER_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// The destination holding most of a full spool, looked up at most every [`HOLDER_TTL`].
fn full_holder(db: &SpoolDb, shared: &Shared) -> db::Result<Option<String>> {
    let mut cached = shared.full_holder.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, holder)) = cached.as_ref().filter(|(at, _)| at.elapsed() < HOLDER_TTL) {
        return Ok(holder.clone());
    }
    let holder = db.largest_holder()?.map(|(destination, count)| format!("`{destination}` ({count} deliveries)"));
    *cached = Some((std::time::Instant::now(), holder.clone()));
    Ok(holder)
}

/// Inserts unless the body would take the spool past `maxBytes`. Before refusing, notifications that
/// every destination already has are evicted (they are kept only as a convenience); undelivered ones
/// never are.
fn insert_within_capacity(
    db: &SpoolDb,
    shared: &Shared,
    space: &mut Space,
    now: i64,
    notification: &NewNotification,
) -> db::Result<i64> {
    let set_aside = shared.set_aside_bytes.load(Ordering::Relaxed);
    let max = shared.max_bytes.load(Ordering::Relaxed).saturating_sub(set_aside);
    let size = notification.body.len() as u64;
    while space.stored + size > max {
        let evicted = db.prune_delivered(now + 1, EVICT_BATCH)?;
        space.dropped |= evicted > 0;
        // Segments the evicted rows emptied are deleted after the commit; their room counts now.
        space.stored = db.used_bytes_after_sweep()?;
        if evicted == 0 {
            break;
        }
    }
    if space.stored + size > max {
        // Rare, and what an operator needs first: whose undelivered work fills it.
        let held_by = full_holder(db, shared)?;
        return Err(Failure::Full { stored: space.stored + set_aside, max: max + set_aside, held_by, set_aside });
    }
    let NewNotification { path, body, destinations, .. } = notification;
    let id = if space.log_bodies {
        db.insert_logged(now, path, body, destinations)?
    } else {
        db.insert(now, path, body, destinations)?
    };
    // Segments emptied but not yet deleted are not counted twice.
    space.stored = if space.dropped { db.used_bytes_after_sweep()? } else { db.used_bytes()? };
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn new(path: &str, body: Bytes, destinations: &[&str]) -> NewNotification {
        NewNotification {
            path: path.into(),
            body,
            destinations: destinations.iter().map(|d| d.to_string()).collect(),
            dedupe: None,
        }
    }

    #[tokio::test]
    async fn a_repeat_within_the_window_is_queued_once_per_destination() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = SqliteSpool::open(&dir.path().join("s.db"), SyncMode::Normal, 1 << 20).unwrap();
        let mut first = new("/", Bytes::from_static(b"{\"n\":1}"), &["a"]);
        first.dedupe = Some(("v2:u1".into(), 0));
        let stored = spool.insert(first.clone()).await.unwrap();
        assert!(!stored.duplicate);
        let mut again = first.clone();
        again.destinations = vec!["a".into(), "b".into()];
        let repeat = spool.insert(again).await.unwrap();
        assert_eq!(repeat, Stored { notification_id: stored.notification_id, duplicate: true });
        let (count, states) = spool
            .read(move |db| Ok((db.notification_count()?, db.delivery_counts(stored.notification_id)?)))
            .await
            .unwrap();
        assert_eq!(count, 1, "no second copy of the body");
        assert_eq!(
            states,
            DeliveryCounts { pending: 2, delivered: 0, dead: 0 },
            "a stays queued once, b (new since) is added"
        );
        // Outside the window it is a new notification.
        let mut later = first;
        later.dedupe = Some(("v2:u1".into(), now_ms() + 1));
        assert!(!spool.insert(later).await.unwrap().duplicate);
    }

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_waiting_for_the_writers_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let (spool, _) = SqliteSpool::open(&path, SyncMode::Full, 1 << 30).unwrap();
        let empty = std::fs::metadata(&path).unwrap().len();
        // 1.2 MB: about 300 pages, under a third of what makes the writer checkpoint by itself; the first
        // 1 MiB of it (44 bodies) is due for the checkpointer.
        for i in 0..60u8 {
            spool.insert(new("/", Bytes::from(vec![b'a' + i % 26; 20_000]), &["a"])).await.unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let size = std::fs::metadata(&path).unwrap().len();
            if size >= empty + 800_000 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the database file stayed at {size} bytes (from {empty})");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = SqliteSpool::open(&dir.path().join("s.db"), SyncMode::Full, 1 << 30).unwrap();
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                spool.insert(new("/", Bytes::from(i.to_string()), &["a"])).await.map(|s| s.notification_id)
            }));
        }
        let mut ids = Vec::new();
        for task in tasks {
            ids.push(task.await.unwrap().unwrap());
        }
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 500);
        let count = spool.read(|db| db.notification_count()).await.unwrap();
        assert_eq!(count, 500);
    }

    #[tokio::test]
    async fn a_full_spool_refuses_but_evicts_delivered_first() {
        let dir = tempfile::tempdir().unwrap();
        // An empty spool's own pages take 24 KiB; room for one 16 KiB body and its rows, not two.
        let max = 52 << 10;
        let (spool, _) = SqliteSpool::open(&dir.path().join("s.db"), SyncMode::Normal, max).unwrap();
        let body = |byte: u8| Bytes::from(vec![byte; 16 << 10]);
        let first = spool.insert(new("/", body(b'a'), &["d"])).await.unwrap().notification_id;
        let one = spool.stored_bytes();
        assert!(one >= 40 << 10 && one <= max, "pages in use are counted, not only the body: {one}");
        let err = spool.insert(new("/", body(b'b'), &["d"])).await.unwrap_err();
        assert!(
            matches!(err.failure(), Failure::Full { stored, max: 53248, set_aside: 0, .. } if *stored == one),
            "{err}"
        );
        assert!(err.to_string().contains("the most for `d` (1 deliveries)"), "a full spool names its holder: {err}");
        spool.record("d".into(), first, Outcome::Delivered { status: 200 }).await.unwrap();
        // Delivered work makes room; the refused body was never stored.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        spool.insert(new("/", body(b'c'), &["d"])).await.unwrap();
        assert_eq!(spool.stored_bytes(), one);
        assert_eq!(spool.read(|db| db.notification_count()).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn large_bodies_go_to_the_body_log_and_a_full_spool_evicts_them_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        // Batches of at most 64 KiB, so segments of 128 KiB: two of these bodies fill one.
        let (spool, _) = SqliteSpool::open(&path, SyncMode::Full, 400 << 10).unwrap();
        let body = |n: usize| Bytes::from(vec![b'a' + n as u8; 70 << 10]);
        let mut ids = Vec::new();
        let full = loop {
            match spool.insert(new("/", body(ids.len()), &["d"])).await {
                Ok(stored) => ids.push(stored.notification_id),
                Err(error) => break error,
            }
            assert!(ids.len() < 10, "never full");
        };
        assert!(full.is_full(), "{full}");
        assert_eq!(ids.len(), 5, "24 KiB of pages and five bodies fit in 400 KiB, not six");
        let segments = || {
            let files = crate::spool::body_log::segment_files(&path).unwrap();
            files.into_iter().map(|(_, n)| n).collect::<Vec<_>>()
        };
        assert_eq!(segments(), [1, 2, 3]);
        let due = spool.read(|db| db.due("d", i64::MAX, 10, &[])).await.unwrap();
        for (n, row) in due.iter().enumerate() {
            assert_eq!(row.body, body(n), "body {n} came back changed");
        }
        for id in &ids {
            spool.record("d".into(), *id, Outcome::Delivered { status: 200 }).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let stored = spool.insert(new("/", body(9), &["d"])).await.unwrap();
        assert_eq!(segments(), [3], "the segments the evicted rows emptied are let go of after the commit");
        let free = dir.path().join("s.db-body-free-0000000001");
        assert!(free.exists(), "segment 1 is kept as the free segment; 2 is deleted");
        let room = (400 << 10) - spool.stored_bytes();
        assert!(room >= 70 << 10, "room for another body, the free segment counted: {room}");
        let due = spool.read(|db| db.due("d", i64::MAX, 10, &[])).await.unwrap();
        assert_eq!((due.len(), due[0].notification_id, &due[0].body), (1, stored.notification_id, &body(9)));

        // Segment 3 holds two bodies now: the next one goes to segment 4, in segment 1's file.
        let next = spool.insert(new("/", body(8), &["d"])).await.unwrap();
        assert_eq!(segments(), [3, 4]);
        assert!(!free.exists());
        let due = spool.read(|db| db.due("d", i64::MAX, 10, &[])).await.unwrap();
        assert_eq!((due[1].notification_id, &due[1].body), (next.notification_id, &body(8)));
        assert!(spool.stored_bytes() <= 400 << 10);
    }

    #[tokio::test]
    async fn a_damaged_copy_set_aside_counts_against_max_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        std::fs::write(dir.path().join("s.db.corrupt-1"), vec![0u8; 40 << 10]).unwrap();
        let (spool, _) = SqliteSpool::open(&path, SyncMode::Normal, 64 << 10).unwrap();
        let err = spool.insert(new("/", Bytes::from(vec![b'a'; 16 << 10]), &["d"])).await.unwrap_err();
        assert!(matches!(err.failure(), Failure::Full { set_aside: 40960, .. }), "{err}");
        assert!(err.to_string().contains("spool discard-set-aside"), "{err}");
        // Discarded by the tool, the next housekeeping pass gives the room back.
        SetAside::discard_all(&path).unwrap();
        let policy = PrunePolicy { delivered_before: 0, dedupe_before: 0, unfinishable_before: 0, configured: vec![] };
        spool.prune(policy).await.unwrap();
        spool.insert(new("/", Bytes::from(vec![b'a'; 16 << 10]), &["d"])).await.unwrap();
    }

    #[tokio::test]
    async fn stores_are_flushed_as_configured_and_outcomes_without_their_own_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = SqliteSpool::open(&dir.path().join("s.db"), SyncMode::Full, 1 << 20).unwrap();
        let id = spool.insert(new("/", Bytes::from_static(b"{}"), &["d"])).await.unwrap().notification_id;
        assert_eq!(spool.read(|db| Ok(db.synchronous())).await.unwrap(), 2, "an insert commits with FULL");
        spool.record("d".into(), id, Outcome::Delivered { status: 200 }).await.unwrap();
        assert_eq!(spool.read(|db| Ok(db.synchronous())).await.unwrap(), 1, "an outcome alone commits with NORMAL");
        spool.insert(new("/", Bytes::from_static(b"{}"), &["d"])).await.unwrap();
        assert_eq!(spool.read(|db| Ok(db.synchronous())).await.unwrap(), 2, "and the next insert with FULL again");
        spool.record("d".into(), id, Outcome::Delivered { status: 200 }).await.unwrap();
        let policy = PrunePolicy { delivered_before: 0, dedupe_before: 0, unfinishable_before: 0, configured: vec![] };
        spool.prune(policy).await.unwrap();
        assert_eq!(
            spool.read(|db| Ok(db.synchronous())).await.unwrap(),
            2,
            "a prune with FULL: the segments it empties go right after it"
        );
    }

    /// Polls `future` once, so whatever it does before its first wait has happened; its output if
    /// that finished it.
    async fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = future => Some(output),
            () = std::future::ready(()) => None,
        }
    }

    async fn delivered(spool: &SqliteSpool, id: i64) -> u32 {
        spool.read(move |db| db.delivery_counts(id)).await.unwrap().delivered
    }

    /// A spool whose outcomes wait at most `ride_at_most` for a transaction to ride with.
    fn riding_spool(dir: &Path, ride_at_most: Duration) -> SqliteSpool {
        let (mut spool, _) = SqliteSpool::open(&dir.join("s.db"), SyncMode::Full, 1 << 20).unwrap();
        spool.ride_at_most = ride_at_most;
        spool
    }

    /// Stores one notification for destination `d`; its id.
    async fn store_one(spool: &SqliteSpool) -> i64 {
        spool.insert(new("/", Bytes::from_static(b"{}"), &["d"])).await.unwrap().notification_id
    }

    #[tokio::test]
    async fn while_notifications_come_an_outcome_rides_with_the_next_ones_commit() {
        let dir = tempfile::tempdir().unwrap();
        // Long enough that only the insert below can be what it rides with, however slow the machine.
        let spool = riding_spool(dir.path(), Duration::from_secs(600));
        let first = store_one(&spool).await;
        let commits = spool.read(|db| Ok(db.commits())).await.unwrap();

        let outcome = spool.record_in_next_commit("d".into(), first, Outcome::Delivered { status: 200 });
        tokio::pin!(outcome);
        assert!(poll_once(outcome.as_mut()).await.is_none());
        assert_eq!(spool.shared.riders.lock().unwrap().len(), 1, "it waits for a commit without waking the writer");
        let both = async { tokio::join!(outcome, store_one(&spool)) };
        let (recorded, _) = tokio::time::timeout(Duration::from_secs(10), both).await.expect("written with the insert");
        recorded.unwrap();

        assert_eq!(spool.read(|db| Ok(db.commits())).await.unwrap(), commits + 1, "one commit for both");
        assert_eq!(delivered(&spool, first).await, 1);
    }

    #[tokio::test]
    async fn an_outcome_with_nothing_to_ride_with_is_written_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        // Longer than a slow machine's fsync, so the insert just made still counts as recent.
        let spool = riding_spool(dir.path(), Duration::from_millis(500));
        let first = store_one(&spool).await;
        let second = store_one(&spool).await;

        // Stored just now, but nothing else comes: after `ride_at_most` it is written all the same.
        let outcome = spool.record_in_next_commit("d".into(), first, Outcome::Delivered { status: 200 });
        tokio::pin!(outcome);
        assert!(poll_once(outcome.as_mut()).await.is_none());
        assert_eq!(spool.shared.riders.lock().unwrap().len(), 1);
        tokio::time::timeout(Duration::from_secs(10), outcome).await.expect("written without an insert").unwrap();
        assert_eq!(delivered(&spool, first).await, 1);

        // Nothing stored lately (a backlog draining): the writer is asked at once, no waiting.
        tokio::time::sleep(spool.ride_at_most * 2).await;
        let outcome = spool.record_in_next_commit("d".into(), second, Outcome::Delivered { status: 200 });
        tokio::pin!(outcome);
        let written = poll_once(outcome.as_mut()).await;
        assert!(spool.shared.riders.lock().unwrap().is_empty(), "not left to wait for an insert");
        match written {
            Some(written) => written.unwrap(),
            None => outcome.await.unwrap(),
        }
        assert_eq!(delivered(&spool, second).await, 1);
    }

    #[tokio::test]
    async fn inserts_wake_subscribers_once_their_rows_are_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = SqliteSpool::open(&dir.path().join("s.db"), SyncMode::Normal, 1 << 20).unwrap();
        let mut inserts = spool.subscribe_inserts();
        let mut hand_off = spool.hand_off("d", 4).unwrap();
        let id = spool.insert(new("/", Bytes::from_static(b"{\"n\":1}"), &["d"])).await.unwrap().notification_id;
        // The request is answered before the rows are handed over; the wake-up comes after.
        tokio::time::timeout(std::time::Duration::from_secs(5), inserts.changed()).await.unwrap().unwrap();
        let row = hand_off.try_recv().expect("handed over before subscribers are woken");
        assert_eq!((row.notification_id, row.attempts, &row.body[..]), (id, 0, &b"{\"n\":1}"[..]));
        assert!(!hand_off.missed());
    }
}
