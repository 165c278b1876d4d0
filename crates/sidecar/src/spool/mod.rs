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

pub use db::{
    DeliveryRow, DestinationStats, DueDelivery, ListFilter, OpenReport, Outcome, SpoolDb,
    SpoolError,
};

use crate::clock::now_ms;

pub type Result<T> = std::result::Result<T, SpoolError>;

/// Operations taken in one transaction at most.
const MAX_BATCH: usize = 512;
/// Notifications evicted per pass when the spool is full and delivered rows can make room.
const EVICT_BATCH: usize = 1_000;

type ReadJob = Box<dyn FnOnce(&SpoolDb) + Send>;

enum Op {
    Insert {
        path: String,
        body: Bytes,
        destinations: Vec<String>,
        reply: oneshot::Sender<Result<i64>>,
    },
    Record {
        destination: String,
        notification_id: i64,
        outcome: Outcome,
        reply: oneshot::Sender<Result<()>>,
    },
    Prune {
        cutoff: i64,
        reply: oneshot::Sender<Result<usize>>,
    },
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
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer(db, rx, writer_shared))
            .map_err(|e| SpoolError::Io {
                path: path.to_path_buf(),
                message: format!("cannot start writer thread: {e}"),
            })?;
        Ok((Spool { ops, shared }, report))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
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
    pub async fn insert(
        &self,
        path: String,
        body: Bytes,
        destinations: Vec<String>,
    ) -> Result<i64> {
        let (reply, rx) = oneshot::channel();
        self.call(
            Op::Insert {
                path,
                body,
                destinations,
                reply,
            },
            rx,
        )
        .await
    }

    pub async fn record(
        &self,
        destination: String,
        notification_id: i64,
        outcome: Outcome,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.call(
            Op::Record {
                destination,
                notification_id,
                outcome,
                reply,
            },
            rx,
        )
        .await
    }

    /// Prunes delivered notifications older than `cutoff` and recounts the stored bytes.
    pub async fn prune(&self, cutoff: i64) -> Result<usize> {
        let (reply, rx) = oneshot::channel();
        self.call(Op::Prune { cutoff, reply }, rx).await
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

/// A reply owed once the batch's fate is known.
enum Owed {
    Insert(oneshot::Sender<Result<i64>>, Result<i64>),
    Record(oneshot::Sender<Result<()>>, Result<()>),
    Prune(oneshot::Sender<Result<usize>>, Result<usize>),
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
        run_batch(&db, batch, &shared);
    }
}

fn run_batch(db: &SpoolDb, batch: Vec<Op>, shared: &Shared) {
    let (reads, writes): (Vec<Op>, Vec<Op>) =
        batch.into_iter().partition(|op| matches!(op, Op::Read(_)));
    if !writes.is_empty() {
        run_writes(db, writes, shared);
    }
    for op in reads {
        if let Op::Read(job) = op {
            job(db);
        }
    }
}

fn run_writes(db: &SpoolDb, writes: Vec<Op>, shared: &Shared) {
    let mut owed = Vec::with_capacity(writes.len());
    let mut failure: Option<String> = db.begin().err().map(|e| e.to_string());
    let mut stored = shared.stored_bytes.load(Ordering::Relaxed);
    let mut inserted = 0usize;
    let now = now_ms();
    for op in writes {
        let result_failed = |message: &String| SpoolError::Io {
            path: shared.path.clone(),
            message: message.clone(),
        };
        match op {
            Op::Insert {
                path,
                body,
                destinations,
                reply,
            } => {
                let result = match &failure {
                    Some(message) => Err(result_failed(message)),
                    None => insert_within_capacity(
                        db,
                        shared,
                        &mut stored,
                        now,
                        &path,
                        &body,
                        &destinations,
                    ),
                };
                if let Err(e @ (SpoolError::Sqlite { .. } | SpoolError::Io { .. })) = &result {
                    failure = Some(e.to_string());
                }
                inserted += usize::from(result.is_ok());
                owed.push(Owed::Insert(reply, result));
            }
            Op::Record {
                destination,
                notification_id,
                outcome,
                reply,
            } => {
                let result = match &failure {
                    Some(message) => Err(result_failed(message)),
                    None => db.record(&destination, notification_id, now, &outcome),
                };
                if let Err(e) = &result {
                    failure.get_or_insert_with(|| e.to_string());
                }
                owed.push(Owed::Record(reply, result));
            }
            Op::Prune { cutoff, reply } => {
                let result = match &failure {
                    Some(message) => Err(result_failed(message)),
                    None => db.prune_delivered(cutoff, usize::MAX >> 1).and_then(|n| {
                        stored = db.stored_bytes()?;
                        Ok(n)
                    }),
                };
                if let Err(e) = &result {
                    failure.get_or_insert_with(|| e.to_string());
                }
                owed.push(Owed::Prune(reply, result));
            }
            Op::Read(_) => unreachable!("reads are run after the writes"),
        }
    }
    if failure.is_none() {
        if let Err(e) = db.commit() {
            failure = Some(e.to_string());
        }
    }
    let failed = |message: &str| SpoolError::Io {
        path: shared.path.clone(),
        message: message.to_string(),
    };
    match &failure {
        Some(message) => {
            db.rollback();
            // The file may have changed under a failed batch: recount instead of trusting the tally.
            if let Ok(actual) = db.stored_bytes() {
                shared.stored_bytes.store(actual, Ordering::Relaxed);
            }
            for item in owed {
                match item {
                    Owed::Insert(reply, result) => {
                        let _ = reply.send(result.and(Err(failed(message))));
                    }
                    Owed::Record(reply, result) => {
                        let _ = reply.send(result.and(Err(failed(message))));
                    }
                    Owed::Prune(reply, result) => {
                        let _ = reply.send(result.and(Err(failed(message))));
                    }
                }
            }
        }
        None => {
            shared.stored_bytes.store(stored, Ordering::Relaxed);
            if inserted > 0 {
                shared.inserted.send_modify(|generation| *generation += 1);
            }
            for item in owed {
                match item {
                    Owed::Insert(reply, result) => {
                        let _ = reply.send(result);
                    }
                    Owed::Record(reply, result) => {
                        let _ = reply.send(result);
                    }
                    Owed::Prune(reply, result) => {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    }
}

/// Inserts unless the body would take the spool past `maxBytes`. Before refusing, notifications that
/// every destination already has are evicted (they are kept only as a convenience); undelivered ones
/// never are.
fn insert_within_capacity(
    db: &SpoolDb,
    shared: &Shared,
    stored: &mut u64,
    now: i64,
    path: &str,
    body: &[u8],
    destinations: &[String],
) -> Result<i64> {
    let max = shared.max_bytes.load(Ordering::Relaxed);
    let size = body.len() as u64;
    while *stored + size > max {
        let evicted = db.prune_delivered(now + 1, EVICT_BATCH)?;
        *stored = db.stored_bytes()?;
        if evicted == 0 {
            break;
        }
    }
    if *stored + size > max {
        return Err(SpoolError::Full {
            stored: *stored,
            max,
        });
    }
    let id = db.insert(now, path, body, destinations)?;
    *stored += size;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Full, 1 << 30).unwrap();
        let mut tasks = Vec::new();
        for i in 0..500u32 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                spool
                    .insert("/".into(), Bytes::from(i.to_string()), vec!["a".into()])
                    .await
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
        let first = spool
            .insert("/".into(), Bytes::from(vec![b'a'; 60]), vec!["d".into()])
            .await
            .unwrap();
        let err = spool
            .insert("/".into(), Bytes::from(vec![b'b'; 60]), vec!["d".into()])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::Full {
                    stored: 60,
                    max: 100
                }
            ),
            "{err}"
        );
        spool
            .record("d".into(), first, Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        // Delivered work makes room; the refused body was never stored.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        spool
            .insert("/".into(), Bytes::from(vec![b'c'; 60]), vec!["d".into()])
            .await
            .unwrap();
        assert_eq!(spool.stored_bytes(), 60);
    }

    #[tokio::test]
    async fn inserts_wake_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(&dir.path().join("s.db"), SyncMode::Normal, 1 << 20).unwrap();
        let inserts = spool.subscribe_inserts();
        spool
            .insert("/".into(), Bytes::from_static(b"{}"), vec![])
            .await
            .unwrap();
        assert!(inserts.has_changed().unwrap());
    }
}
