//! The durable spool: every accepted body is committed here before anything is acknowledged.
//!
//! One writer thread owns the SQLite connection. Callers send it operations; it takes whatever has queued
//! up, runs the lot in one transaction and commits once, so with `sync: full` many concurrent requests
//! share one fsync (group commit) instead of paying one each. Replies go out only after the commit.

mod db;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use storerelay_config::SyncMode;
use tokio::sync::{mpsc, oneshot, watch};

pub use db::{DeliveryRow, DestinationStats, DueDelivery, ListFilter, OpenReport, Outcome, SpoolDb, SpoolError};

use crate::clock::now_ms;

pub type Result<T> = std::result::Result<T, SpoolError>;

/// Operations taken in one transaction at most.
const MAX_BATCH: usize = 512;
/// Notifications evicted per pass when the spool is full and delivered rows can make room.
const EVICT_BATCH: usize = 1_000;

type ReadJob = Box<dyn FnOnce(&SpoolDb) + Send>;

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

enum Op {
    Insert { notification: NewNotification, reply: oneshot::Sender<Result<Stored>> },
    Record { destination: String, notification_id: i64, outcome: Outcome, reply: oneshot::Sender<Result<()>> },
    Prune { delivered_before: i64, dedupe_before: i64, reply: oneshot::Sender<Result<usize>> },
    Read(ReadJob),
}

struct Shared {
    path: PathBuf,
    max_bytes: AtomicU64,
    stored_bytes: AtomicU64,
    /// Bumped after every commit that added notifications, so dispatchers wake at once.
    inserted: watch::Sender<u64>,
}

/// A cheap, cloneable handle to the spool's writer thread.
#[derive(Clone)]
pub struct Spool {
    ops: mpsc::UnboundedSender<Op>,
    shared: Arc<Shared>,
}

impl Spool {
    /// Opens the spool (setting aside a corrupt file) and starts its writer thread.
    pub fn open(path: &Path, sync: SyncMode, max_bytes: u64) -> Result<(Spool, OpenReport)> {
        let (db, report) = SpoolDb::open_checked(path, sync)?;
        let stored = db.stored_bytes()?;
        let (ops, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            max_bytes: AtomicU64::new(max_bytes),
            stored_bytes: AtomicU64::new(stored),
            inserted: watch::Sender::new(0),
        });
        let writer_shared = shared.clone();
        std::thread::Builder::new().name("spool-writer".into()).spawn(move || writer(db, rx, writer_shared)).map_err(
            |e| SpoolError::Io { path: path.to_path_buf(), message: format!("cannot start writer thread: {e}") },
        )?;
        Ok((Spool { ops, shared }, report))
    }

    pub fn set_max_bytes(&self, max_bytes: u64) {
        self.shared.max_bytes.store(max_bytes, Ordering::Relaxed);
    }

    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(Ordering::Relaxed)
    }

    /// A receiver that changes whenever new notifications are committed.
    pub fn subscribe_inserts(&self) -> watch::Receiver<u64> {
        self.shared.inserted.subscribe()
    }

    fn closed(&self) -> SpoolError {
        SpoolError::Closed(self.shared.path.clone())
    }

    async fn call<T>(&self, op: Op, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.ops.send(op).map_err(|_| self.closed())?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Stores a body with a pending delivery for each destination; returns once it is committed.
    pub async fn insert(&self, notification: NewNotification) -> Result<Stored> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Insert { notification, reply }, rx).await
    }

    pub async fn record(&self, destination: String, notification_id: i64, outcome: Outcome) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Record { destination, notification_id, outcome, reply }, rx).await
    }

    /// Prunes notifications delivered before `delivered_before` and duplicate keys first seen before
    /// `dedupe_before`, then recounts the stored bytes.
    pub async fn prune(&self, delivered_before: i64, dedupe_before: i64) -> Result<usize> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Prune { delivered_before, dedupe_before, reply }, rx).await
    }

    /// Runs a query on the writer's connection.
    pub async fn read<T: Send + 'static>(
        &self,
        query: impl FnOnce(&SpoolDb) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |db| {
            let _ = reply.send(query(db));
        });
        self.call(Op::Read(job), rx).await
    }
}

/// A reply owed once the batch's fate is known: called with the batch's failure, if any.
type Owed = Box<dyn FnOnce(Option<SpoolError>) + Send>;

/// Sends `result` once the commit succeeded; an operation that failed on its own keeps its own error,
/// one that succeeded inside a failed batch gets the batch's.
fn owe<T: Send + 'static>(reply: oneshot::Sender<Result<T>>, result: Result<T>) -> Owed {
    Box::new(move |failure| {
        let _ = reply.send(match (result, failure) {
            (Err(own), _) => Err(own),
            (Ok(_), Some(batch)) => Err(batch),
            (Ok(value), None) => Ok(value),
        });
    })
}

fn writer(db: SpoolDb, mut ops: mpsc::UnboundedReceiver<Op>, shared: Arc<Shared>) {
    while let Some(first) = ops.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let (reads, writes): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(|op| matches!(op, Op::Read(_)));
        if !writes.is_empty() {
            run_writes(&db, writes, &shared);
        }
        for op in reads {
            if let Op::Read(job) = op {
                job(&db);
            }
        }
    }
}

/// Runs every write in one transaction. The first SQLite error fails the whole batch (SQLite may have
/// rolled back already, e.g. on a full disk); a full spool fails only the insert that did not fit.
fn run_writes(db: &SpoolDb, writes: Vec<Op>, shared: &Shared) {
    let mut owed: Vec<Owed> = Vec::with_capacity(writes.len());
    // Only a batch that stores notifications is owed the configured fsync before its replies.
    let stores = writes.iter().any(|op| matches!(op, Op::Insert { .. }));
    let mut failure: Option<String> = db.flush_commits(stores).and_then(|()| db.begin()).err().map(|e| e.to_string());
    let mut stored = shared.stored_bytes.load(Ordering::Relaxed);
    let mut inserted = false;
    let now = now_ms();
    for op in writes {
        let skipped = || SpoolError::Io { path: shared.path.clone(), message: "batch failed".into() };
        match op {
            Op::Insert { notification, reply } => {
                let result = match failure {
                    Some(_) => Err(skipped()),
                    None => store(db, shared, &mut stored, now, &notification),
                };
                match &result {
                    Ok(_) => inserted = true,
                    Err(SpoolError::Full { .. }) => {}
                    Err(e) => failure = Some(e.to_string()),
                }
                owed.push(owe(reply, result));
            }
            Op::Record { destination, notification_id, outcome, reply } => {
                let result = match failure {
                    Some(_) => Err(skipped()),
                    None => db.record(&destination, notification_id, now, &outcome),
                };
                if let Err(e) = &result {
                    failure.get_or_insert_with(|| e.to_string());
                }
                owed.push(owe(reply, result));
            }
            Op::Prune { delivered_before, dedupe_before, reply } => {
                let result = match failure {
                    Some(_) => Err(skipped()),
                    None => db.prune_delivered(delivered_before, usize::MAX >> 1).and_then(|pruned| {
                        db.forget_dedupe_before(dedupe_before)?;
                        stored = db.stored_bytes()?;
                        Ok(pruned)
                    }),
                };
                if let Err(e) = &result {
                    failure.get_or_insert_with(|| e.to_string());
                }
                owed.push(owe(reply, result));
            }
            Op::Read(_) => unreachable!("reads run after the writes"),
        }
    }
    if failure.is_none() {
        failure = db.commit().err().map(|e| e.to_string());
    }
    match failure {
        Some(message) => {
            db.rollback();
            // The file may have changed under a failed batch: recount instead of trusting the tally.
            if let Ok(actual) = db.stored_bytes() {
                shared.stored_bytes.store(actual, Ordering::Relaxed);
            }
            for reply in owed {
                reply(Some(SpoolError::Io { path: shared.path.clone(), message: message.clone() }));
            }
        }
        None => {
            shared.stored_bytes.store(stored, Ordering::Relaxed);
            if inserted {
                shared.inserted.send_modify(|generation| *generation += 1);
            }
            for reply in owed {
                reply(None);
            }
        }
    }
}

/// Stores a notification, or queues the one already stored under its duplicate key.
fn store(db: &SpoolDb, shared: &Shared, stored: &mut u64, now: i64, notification: &NewNotification) -> Result<Stored> {
    if let Some((key, since)) = &notification.dedupe {
        if let Some(notification_id) = db.find_duplicate(key, *since)? {
            db.queue(notification_id, &notification.destinations, now)?;
            return Ok(Stored { notification_id, duplicate: true });
        }
    }
    let notification_id = insert_within_capacity(db, shared, stored, now, notification)?;
    if let Some((key, _)) = &notification.dedupe {
        db.remember(key, notification_id, now)?;
    }
    Ok(Stored { notification_id, duplicate: false })
}

/// Inserts unless the body would take the spool past `maxBytes`. Before refusing, notifications that
/// every destination already has are evicted (they are kept only as a convenience); undelivered ones
/// never are.
fn insert_within_capacity(
    db: &SpoolDb,
    shared: &Shared,
    stored: &mut u64,
    now: i64,
    notification: &NewNotification,
) -> Result<i64> {
    let max = shared.max_bytes.load(Ordering::Relaxed);
    let size = notification.body.len() as u64;
    while *stored + size > max {
        let evicted = db.prune_delivered(now + 1, EVICT_BATCH)?;
        *stored = db.stored_bytes()?;
        if evicted == 0 {
            break;
        }
    }
    if *stored + size > max {
        return Err(SpoolError::Full { stored: *stored, max });
    }
    let id = db.insert(now, &notification.path, &notification.body, &notification.destinations)?;
    *stored += size;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Normal, 1 << 20).unwrap();
        let mut first = new("/", Bytes::from_static(b"{\"n\":1}"), &["a"]);
        first.dedupe = Some(("v2:u1".into(), 0));
        let stored = spool.insert(first.clone()).await.unwrap();
        assert!(!stored.duplicate);
        let mut again = first.clone();
        again.destinations = vec!["a".into(), "b".into()];
        let repeat = spool.insert(again).await.unwrap();
        assert_eq!(repeat, Stored { notification_id: stored.notification_id, duplicate: true });
        let (count, states) = spool
            .read(move |db| Ok((db.notification_count()?, db.delivery_states(stored.notification_id)?)))
            .await
            .unwrap();
        assert_eq!(count, 1, "no second copy of the body");
        assert_eq!(states, (2, 0, 0), "a stays queued once, b (new since) is added");
        // Outside the window it is a new notification.
        let mut later = first;
        later.dedupe = Some(("v2:u1".into(), now_ms() + 1));
        assert!(!spool.insert(later).await.unwrap().duplicate);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Full, 1 << 30).unwrap();
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
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Normal, 100).unwrap();
        let first = spool.insert(new("/", Bytes::from(vec![b'a'; 60]), &["d"])).await.unwrap().notification_id;
        let err = spool.insert(new("/", Bytes::from(vec![b'b'; 60]), &["d"])).await.unwrap_err();
        assert!(matches!(err, SpoolError::Full { stored: 60, max: 100 }), "{err}");
        spool.record("d".into(), first, Outcome::Delivered { status: 200 }).await.unwrap();
        // Delivered work makes room; the refused body was never stored.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        spool.insert(new("/", Bytes::from(vec![b'c'; 60]), &["d"])).await.unwrap();
        assert_eq!(spool.stored_bytes(), 60);
    }

    #[tokio::test]
    async fn stores_are_flushed_as_configured_and_outcomes_without_their_own_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Full, 1 << 20).unwrap();
        let id = spool.insert(new("/", Bytes::from_static(b"{}"), &["d"])).await.unwrap().notification_id;
        assert_eq!(spool.read(|db| Ok(db.synchronous())).await.unwrap(), 2, "an insert commits with FULL");
        spool.record("d".into(), id, Outcome::Delivered { status: 200 }).await.unwrap();
        assert_eq!(spool.read(|db| Ok(db.synchronous())).await.unwrap(), 1, "an outcome alone commits with NORMAL");
        spool.insert(new("/", Bytes::from_static(b"{}"), &["d"])).await.unwrap();
        assert_eq!(spool.read(|db| Ok(db.synchronous())).await.unwrap(), 2, "and the next insert with FULL again");
    }

    #[tokio::test]
    async fn inserts_wake_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Normal, 1 << 20).unwrap();
        let inserts = spool.subscribe_inserts();
        spool.insert(new("/", Bytes::from_static(b"{}"), &[])).await.unwrap();
        assert!(inserts.has_changed().unwrap());
    }
}
