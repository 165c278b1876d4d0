//! The spool's SQL: one SQLite file in WAL mode, two tables.
//!
//! `notifications` holds each body exactly as received, inline or (stored in a burst) as its place in a
//! segment of the [`BodyLog`] beside the file; `deliveries` holds one row per (destination,
//! notification) with its state. Everything here is synchronous and owned by one thread at a time: the
//! sidecar's writer thread, or a `spool` tool running beside it (WAL lets both read while one writes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OptionalExtension, ToSql, params};
use storerelay_config::SyncMode;

use super::body_log::{self, BodyLog, BodyRef};

/// 2 added `notifications.body_segment`/`body_offset`/`body_length` (bodies in the body log).
const SCHEMA_VERSION: i64 = 2;

/// What the WAL is cut back to after each checkpoint. It grows between checkpoints by at most SQLite's
/// auto-checkpoint interval (1,000 pages, 4 MiB) plus one write batch (see `Spool`'s batch limit).
pub const WAL_SIZE_LIMIT: u64 = 4 << 20;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS notifications (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,          -- unix milliseconds
    path        TEXT    NOT NULL,
    body        BLOB    NOT NULL,          -- empty when the body is in the body log
    body_segment INTEGER,                  -- the body log's segment, offset and length, if there
    body_offset  INTEGER,
    body_length  INTEGER
);
CREATE TABLE IF NOT EXISTS deliveries (
    destination     TEXT    NOT NULL,
    notification_id INTEGER NOT NULL,
    state           TEXT    NOT NULL,      -- pending | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,      -- unix milliseconds; meaningful while pending
    finished_at     INTEGER,               -- when it became delivered or dead
    last_status     INTEGER,               -- last HTTP status, if any
    last_error      TEXT,                  -- last failure, never containing the URL
    PRIMARY KEY (destination, notification_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_notification ON deliveries (notification_id);
CREATE TABLE IF NOT EXISTS dedupe (
    key             TEXT    PRIMARY KEY,   -- v2:<notificationUUID> or sha256:<body hash>
    notification_id INTEGER NOT NULL,
    first_seen      INTEGER NOT NULL       -- unix milliseconds
) WITHOUT ROWID;
";
/// Created after [`SCHEMA`] and, on a version 1 file, after its columns were added.
const BODY_LOG_INDEX: &str = "CREATE INDEX IF NOT EXISTS notifications_by_segment
    ON notifications (body_segment, body_length) WHERE body_segment IS NOT NULL;";
/// A body's length whether it is inline or in the body log.
const BODY_LENGTH: &str = "COALESCE(n.body_length, LENGTH(n.body))";

pub use super::Failure;

pub type Result<T> = std::result::Result<T, Failure>;

/// Where a delivery stands. Stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Waiting for its next attempt (`next_attempt_at`).
    Pending,
    /// A destination answered 2xx.
    Delivered,
    /// Given up on: a status that is not retried, or past `maxAttempts`/`maxAge`.
    Dead,
}

impl DeliveryState {
    /// The state stored under `name`.
    pub fn parse(name: &str) -> Option<DeliveryState> {
        match name {
            "pending" => Some(DeliveryState::Pending),
            "delivered" => Some(DeliveryState::Delivered),
            "dead" => Some(DeliveryState::Dead),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }
}

impl std::fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ToSql for DeliveryState {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for DeliveryState {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        let name = value.as_str()?;
        DeliveryState::parse(name).ok_or_else(|| FromSqlError::Other(format!("unknown delivery state `{name}`").into()))
    }
}

/// What happened to one delivery attempt, as the spool records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered { status: u16 },
    Retry { next_attempt_at: i64, status: Option<u16>, error: String },
    Dead { status: Option<u16>, error: String },
}

/// How one notification's deliveries stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub pending: u32,
    pub delivered: u32,
    pub dead: u32,
}

/// Where one notification's delivery to one destination stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryStatus {
    pub destination: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl DeliveryCounts {
    /// Sets the count of one state (from a `GROUP BY state` row).
    pub fn set(&mut self, state: DeliveryState, count: u32) {
        match state {
            DeliveryState::Pending => self.pending = count,
            DeliveryState::Delivered => self.delivered = count,
            DeliveryState::Dead => self.dead = count,
        }
    }
}

/// Folds `(destination, state, count, oldest received_at)` rows, ordered by destination, into one entry
/// per destination: what both backends' `stats` query returns.
pub fn fold_stats(rows: impl IntoIterator<Item = (String, DeliveryState, u64, Option<i64>)>) -> Vec<DestinationStats> {
    let mut out: Vec<DestinationStats> = Vec::new();
    for (destination, state, count, oldest) in rows {
        if out.last().is_none_or(|s| s.destination != destination) {
            out.push(DestinationStats { destination, ..Default::default() });
        }
        let Some(entry) = out.last_mut() else { continue };
        match state {
            DeliveryState::Pending => {
                entry.pending = count;
                entry.oldest_pending_received_at = oldest;
            }
            DeliveryState::Delivered => entry.delivered = count,
            DeliveryState::Dead => entry.dead = count,
        }
    }
    out
}

/// A delivery that is due now, with the body to send.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub notification_id: i64,
    pub received_at: i64,
    pub attempts: u32,
    pub body: bytes::Bytes,
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DestinationStats {
    pub destination: String,
    pub pending: u64,
    pub delivered: u64,
    pub dead: u64,
    /// `received_at` of the oldest pending notification, unix milliseconds.
    pub oldest_pending_received_at: Option<i64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryRow {
    pub notification_id: i64,
    pub destination: String,
    pub state: DeliveryState,
    pub attempts: u32,
    pub received_at: i64,
    pub next_attempt_at: i64,
    pub finished_at: Option<i64>,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub destination: Option<String>,
    pub state: Option<DeliveryState>,
    pub limit: u32,
}

/// What opening found: a corrupt file that was set aside, if any.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub quarantined: Option<PathBuf>,
    pub corruption: Option<String>,
    /// Older set-aside copies deleted: only the newest is kept (see [`SetAside`]).
    pub discarded: Vec<PathBuf>,
    /// The set-aside copy kept, which counts against `maxBytes`.
    pub set_aside: SetAside,
}

/// Copies of a damaged spool that were renamed aside (`<spool>.corrupt-<unix time>`, with their `-wal`
/// and `-shm`). They share the spool's volume, so their bytes count against `maxBytes`: otherwise a
/// set-aside copy plus a new spool could pass the `emptyDir`'s sizeLimit, and the kubelet would evict
/// the pod and delete both. Only the newest copy is kept.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
}

impl SetAside {
    /// The set-aside files beside the spool at `path` now.
    pub fn find(path: &Path) -> std::io::Result<SetAside> {
        let mut found = SetAside::default();
        for (file, _) in set_aside_files(path)? {
            found.bytes += std::fs::metadata(&file).map_or(0, |m| m.len());
            found.files.push(file);
        }
        Ok(found)
    }

    /// Deletes every set-aside copy of the spool at `path` but the newest; returns what it deleted.
    pub fn keep_newest(path: &Path) -> std::io::Result<Vec<PathBuf>> {
        let files = set_aside_files(path)?;
        let newest = files.iter().map(|(_, stamp)| *stamp).max();
        let mut deleted = Vec::new();
        for (file, stamp) in files {
            if Some(stamp) != newest {
                std::fs::remove_file(&file)?;
                deleted.push(file);
            }
        }
        Ok(deleted)
    }

    /// Deletes every set-aside copy; returns what it deleted.
    pub fn discard_all(path: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut deleted = Vec::new();
        for (file, _) in set_aside_files(path)? {
            std::fs::remove_file(&file)?;
            deleted.push(file);
        }
        Ok(deleted)
    }
}

/// Keeps only the newest set-aside copy of the spool at `path`: what was deleted, and what is left.
fn tidy_set_aside(path: &Path) -> Result<(Vec<PathBuf>, SetAside)> {
    let discarded = SetAside::keep_newest(path)
        .map_err(|source| Failure::Io { action: "cannot delete an older set-aside copy", source })?;
    let kept =
        SetAside::find(path).map_err(|source| Failure::Io { action: "cannot look for set-aside copies", source })?;
    Ok((discarded, kept))
}

/// `<spool>.corrupt-<stamp>[-wal|-shm]` files beside `path`, with their stamps.
fn set_aside_files(path: &Path) -> std::io::Result<Vec<(PathBuf, u64)>> {
    let mut files: Vec<(PathBuf, u64)> = body_log::files_beside(path, ".corrupt-")?
        .into_iter()
        .filter_map(|(file, rest)| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((file, digits.parse().ok()?))
        })
        .collect();
    files.sort();
    Ok(files)
}

pub struct SpoolDb {
    conn: Connection,
    sync: SyncMode,
    /// Whether commits currently flush as `sync` says (true) or as NORMAL (false).
    flushing: std::cell::Cell<bool>,
    /// Transactions committed on this connection.
    commits: std::cell::Cell<u64>,
    bodies: std::cell::RefCell<BodyLog>,
    /// Fixed once the file exists (a WAL database cannot change it).
    page_size: u64,
}

fn pragma(sync: SyncMode) -> &'static str {
    match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    }
}

/// A second connection to the spool that only checkpoints (see `sqlite.rs`), synced as the writer's is.
pub struct Checkpointer {
    conn: Connection,
}

impl Checkpointer {
    pub fn open(path: &Path, sync: SyncMode) -> Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.execute_batch(&format!("PRAGMA synchronous = {};", pragma(sync)))?;
        Ok(Checkpointer { conn })
    }

    /// Copies what it can of the WAL into the database file without waiting for (or blocking) the
    /// writer.
    pub fn checkpoint(&self) -> Result<()> {
        Ok(self.conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?)
    }
}

/// [`SpoolDb::due`]'s query (its own constant so a test can look at the cached statement).
const DUE_SQL: &str = "SELECT d.notification_id, n.received_at, d.attempts, n.body, n.body_segment, n.body_offset,
            n.body_length
     FROM deliveries d JOIN notifications n ON n.id = d.notification_id
     WHERE d.destination = ?1 AND d.state = ?4 AND d.next_attempt_at <= ?2
       AND d.notification_id NOT IN (SELECT value FROM json_each(?5))
     ORDER BY d.next_attempt_at, d.notification_id LIMIT ?3";

impl SpoolDb {
    /// Opens (creating if needed) and checks the spool. A file that is not a database or fails its
    /// integrity check is renamed aside and replaced, so a damaged volume never becomes a crash loop.
    pub fn open_checked(path: &Path, sync: SyncMode) -> Result<(SpoolDb, OpenReport)> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|source| Failure::Io { action: "cannot create its folder", source })?;
        }
        let problem = match SpoolDb::open(path, sync) {
            Ok(db) => match db.quick_check() {
                Ok(None) => {
                    let (discarded, set_aside) = tidy_set_aside(path)?;
                    return Ok((db, OpenReport { discarded, set_aside, ..OpenReport::default() }));
                }
                Ok(Some(problem)) => problem,
                Err(Failure::Sqlite(source)) if is_corruption(&source) => source.to_string(),
                Err(other) => return Err(other),
            },
            Err(Failure::Sqlite(source)) if is_corruption(&source) => source.to_string(),
            Err(other) => return Err(other),
        };
        let aside =
            quarantine(path).map_err(|source| Failure::Io { action: "cannot set the corrupt file aside", source })?;
        let (discarded, set_aside) = tidy_set_aside(path)?;
        let db = SpoolDb::open(path, sync)?;
        Ok((db, OpenReport { quarantined: Some(aside), corruption: Some(problem), discarded, set_aside }))
    }

    /// Opens without the integrity check: for tools beside a running sidecar.
    pub fn open(path: &Path, sync: SyncMode) -> Result<SpoolDb> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // Without the query planner stability guarantee SQLite folds a bound `LIMIT ?` into the plan and
        // prepares the statement again whenever that parameter is bound: the due query, run for every
        // few notifications, was parsed and planned afresh each time (a tenth of the writer's CPU).
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        // Room for every statement this file prepares (the default 16 would evict some in turn).
        conn.set_prepared_statement_cache_capacity(64);
        let configured = sync;
        let sync = pragma(sync);
        // temp_store: the sidecar's root filesystem is read-only, so SQLite's scratch space stays in memory.
        // journal_size_limit: a WAL keeps its largest size after a checkpoint unless told otherwise, and
        // every byte of it counts against the volume's sizeLimit (see `used_bytes` for the rest).
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA temp_store = MEMORY;
             PRAGMA journal_size_limit = {WAL_SIZE_LIMIT};"
        ))?;
        let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(Failure::SchemaTooNew { found, supported: SCHEMA_VERSION });
        }
        conn.execute_batch(SCHEMA)?;
        if found < SCHEMA_VERSION {
            migrate(&conn)?;
        }
        conn.execute_batch(BODY_LOG_INDEX)?;
        conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
        let bodies =
            BodyLog::open(path).map_err(|source| Failure::Io { action: "cannot list its body segments", source })?;
        let page_size = conn.query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))?.max(0) as u64;
        Ok(SpoolDb {
            conn,
            sync: configured,
            flushing: std::cell::Cell::new(true),
            commits: std::cell::Cell::default(),
            bodies: std::cell::RefCell::new(bodies),
            page_size,
        })
    }

    /// `None` when the file is sound, else SQLite's first complaint.
    pub fn quick_check(&self) -> Result<Option<String>> {
        let verdict: String = self.conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        Ok((verdict != "ok").then_some(verdict))
    }

    /// Whether the next commits must survive a power loss as `spool.sync` says (batches that store
    /// notifications or prune), or may be flushed with the next such commit (batches that only record
    /// delivery outcomes: losing one to a power cut means a repeated delivery, never a lost
    /// notification). In WAL mode a later flushed commit flushes every earlier one with it.
    pub fn flush_commits(&self, as_configured: bool) -> Result<()> {
        if self.flushing.get() == as_configured || self.sync == SyncMode::Normal {
            return Ok(());
        }
        let mode = if as_configured { pragma(self.sync) } else { "NORMAL" };
        self.conn.execute_batch(&format!("PRAGMA synchronous = {mode}"))?;
        self.flushing.set(as_configured);
        Ok(())
    }

    /// SQLite's `synchronous` setting for this connection now (1 NORMAL, 2 FULL).
    #[cfg(test)]
    pub fn synchronous(&self) -> i64 {
        self.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap_or(-1)
    }

    pub fn begin(&self) -> Result<()> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        Ok(())
    }
    /// A body-log segment is started after about this many bytes (see [`BodyLog::set_segment_bytes`]).
    pub fn set_segment_bytes(&self, bytes: u64) {
        self.bodies.borrow_mut().set_segment_bytes(bytes);
    }

    /// Commits, after making the bodies this transaction put in the body log durable.
    pub fn commit(&self) -> Result<()> {
        self.bodies
            .borrow_mut()
            .flush()
            .map_err(|source| Failure::Io { action: "cannot flush a body segment", source })?;
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        self.commits.set(self.commits.get() + 1);
        Ok(())
    }
    /// Transactions committed since the spool was opened.
    #[cfg(test)]
    pub fn commits(&self) -> u64 {
        self.commits.get()
    }
    pub fn rollback(&self) {
        // Fails only when SQLite already rolled back on its own (e.g. on SQLITE_FULL).
        let _ = self.conn.execute_batch("ROLLBACK");
    }

    /// Stores a notification with its body inline, and a pending delivery for each destination.
    pub fn insert(&self, received_at: i64, path: &str, body: &[u8], destinations: &[String]) -> Result<i64> {
        self.conn
            .prepare_cached("INSERT INTO notifications (received_at, path, body) VALUES (?1, ?2, ?3)")?
            .execute(params![received_at, path, body])?;
        let id = self.conn.last_insert_rowid();
        self.queue(id, destinations, received_at)?;
        Ok(id)
    }

    /// As [`SpoolDb::insert`], with the body appended to the body log (made durable by the commit).
    pub fn insert_logged(&self, received_at: i64, path: &str, body: &[u8], destinations: &[String]) -> Result<i64> {
        let at = self
            .bodies
            .borrow_mut()
            .append(body)
            .map_err(|source| Failure::Io { action: "cannot append to a body segment", source })?;
        self.conn
            .prepare_cached(
                "INSERT INTO notifications (received_at, path, body, body_segment, body_offset, body_length)
                 VALUES (?1, ?2, x'', ?3, ?4, ?5)",
            )?
            .execute(params![received_at, path, at.segment, at.offset, at.length])?;
        let id = self.conn.last_insert_rowid();
        self.queue(id, destinations, received_at)?;
        Ok(id)
    }

    /// A stored body: the inline blob, or read from the body log.
    fn body(&self, inline: Vec<u8>, logged: Option<BodyRef>) -> Result<Vec<u8>> {
        let Some(at) = logged else { return Ok(inline) };
        self.bodies.borrow_mut().read(at).map_err(|source| Failure::Io { action: "cannot read a body segment", source })
    }

    /// Makes sure each destination has the notification pending or delivered: adds missing delivery
    /// rows and schedules dead ones again. Pending and delivered rows are left alone.
    pub fn queue(&self, notification_id: i64, destinations: &[String], now: i64) -> Result<()> {
        let mut add = self.conn.prepare_cached(
            "INSERT INTO deliveries (destination, notification_id, state, next_attempt_at) VALUES (?1, ?2, ?4, ?3)
             ON CONFLICT (destination, notification_id) DO UPDATE
               SET state = ?4, attempts = 0, next_attempt_at = ?3, finished_at = NULL
               WHERE state = ?5",
        )?;
        for destination in destinations {
            add.execute(params![destination, notification_id, now, DeliveryState::Pending, DeliveryState::Dead])?;
        }
        Ok(())
    }

    /// The notification stored under `key` since `since`, if it is still in the spool.
    pub fn find_duplicate(&self, key: &str, since: i64) -> Result<Option<i64>> {
        let found = self
            .conn
            .prepare_cached(
                "SELECT d.notification_id FROM dedupe d JOIN notifications n ON n.id = d.notification_id
                 WHERE d.key = ?1 AND d.first_seen >= ?2",
            )?
            .query_row(params![key, since], |r| r.get(0))
            .optional()?;
        Ok(found)
    }

    /// Whether `key` was seen since `since`, even if its notification was pruned meanwhile.
    pub fn seen(&self, key: &str, since: i64) -> Result<bool> {
        Ok(self
            .conn
            .prepare_cached("SELECT 1 FROM dedupe WHERE key = ?1 AND first_seen >= ?2")?
            .exists(params![key, since])?)
    }

    /// The deliveries of the notification stored under `key` since `since`; `None` when the key was not
    /// seen (or its notification is no longer kept).
    pub fn deliveries_of_key(&self, key: &str, since: i64) -> Result<Option<Vec<DeliveryStatus>>> {
        let Some(notification_id) = self.find_duplicate(key, since)? else { return Ok(None) };
        let mut stmt = self.conn.prepare_cached(
            "SELECT destination, state, attempts, last_error FROM deliveries WHERE notification_id = ?1 ORDER BY destination",
        )?;
        let rows = stmt.query_map(params![notification_id], |r| {
            Ok(DeliveryStatus { destination: r.get(0)?, state: r.get(1)?, attempts: r.get(2)?, last_error: r.get(3)? })
        })?;
        Ok(Some(rows.collect::<rusqlite::Result<Vec<_>>>()?))
    }

    pub fn remember(&self, key: &str, notification_id: i64, now: i64) -> Result<()> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO dedupe (key, notification_id, first_seen) VALUES (?1, ?2, ?3)")?
            .execute(params![key, notification_id, now])?;
        Ok(())
    }

    pub fn forget_dedupe_before(&self, cutoff: i64) -> Result<usize> {
        Ok(self.conn.prepare_cached("DELETE FROM dedupe WHERE first_seen < ?1")?.execute(params![cutoff])?)
    }

    /// Pending deliveries for `destination` due at `now`, oldest schedule first.
    /// Up to `limit` deliveries of `destination` due at `now`, but for the notifications in `except`
    /// (those being attempted: their bodies are not read again).
    pub fn due(&self, destination: &str, now: i64, limit: usize, except: &[i64]) -> Result<Vec<DueDelivery>> {
        let mut stmt = self.conn.prepare_cached(DUE_SQL)?;
        let except = serde_json::to_string(except).unwrap_or_else(|_| "[]".into());
        let rows = stmt.query_map(params![destination, now, limit as i64, DeliveryState::Pending, except], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                body_ref(r, 4)?,
            ))
        })?;
        let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(notification_id, received_at, attempts, inline, logged)| {
                let body = bytes::Bytes::from(self.body(inline, logged)?);
                Ok(DueDelivery { notification_id, received_at, attempts, body })
            })
            .collect()
    }

    /// When the next pending delivery for `destination` scheduled after `now` falls due.
    pub fn next_due_after(&self, destination: &str, now: i64) -> Result<Option<i64>> {
        let next = self
            .conn
            .prepare_cached(
                "SELECT MIN(next_attempt_at) FROM deliveries
                 WHERE destination = ?1 AND state = ?3 AND next_attempt_at > ?2",
            )?
            .query_row(params![destination, now, DeliveryState::Pending], |r| r.get(0))?;
        Ok(next)
    }

    /// Records an attempt. Only a pending row changes: a row that a tool purged or redelivered meanwhile
    /// keeps what the tool decided.
    pub fn record(&self, destination: &str, notification_id: i64, now: i64, outcome: &Outcome) -> Result<()> {
        let (state, next_attempt_at, finished_at, status, error) = match outcome {
            Outcome::Delivered { status } => (DeliveryState::Delivered, now, Some(now), Some(*status), None),
            Outcome::Retry { next_attempt_at, status, error } => {
                (DeliveryState::Pending, *next_attempt_at, None, *status, Some(error.as_str()))
            }
            Outcome::Dead { status, error } => (DeliveryState::Dead, now, Some(now), *status, Some(error.as_str())),
        };
        self.conn
            .prepare_cached(
                "UPDATE deliveries SET state = ?3, attempts = attempts + 1, next_attempt_at = ?4, finished_at = ?5,
                        last_status = ?6, last_error = ?7
                 WHERE destination = ?1 AND notification_id = ?2 AND state = ?8",
            )?
            .execute(params![
                destination,
                notification_id,
                state,
                next_attempt_at,
                finished_at,
                status,
                error,
                DeliveryState::Pending
            ])?;
        Ok(())
    }

    /// How one notification's deliveries stand.
    pub fn delivery_counts(&self, notification_id: i64) -> Result<DeliveryCounts> {
        let mut counts = DeliveryCounts::default();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT state, COUNT(*) FROM deliveries WHERE notification_id = ?1 GROUP BY state")?;
        let rows =
            stmt.query_map(params![notification_id], |r| Ok((r.get::<_, DeliveryState>(0)?, r.get::<_, u32>(1)?)))?;
        for row in rows {
            let (state, count) = row?;
            counts.set(state, count);
        }
        Ok(counts)
    }

    pub fn stats(&self) -> Result<Vec<DestinationStats>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.destination, d.state, COUNT(*), MIN(n.received_at)
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             GROUP BY d.destination, d.state ORDER BY d.destination",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, DeliveryState>(1)?,
                r.get::<_, u64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })?;
        Ok(fold_stats(rows.collect::<rusqlite::Result<Vec<_>>>()?))
    }

    pub fn notification_count(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT COUNT(*) FROM notifications", [], |r| r.get(0))?)
    }

    /// The bodies' bytes alone (for `spool stats`).
    pub fn body_bytes(&self) -> Result<u64> {
        let sql = format!("SELECT COALESCE(SUM({BODY_LENGTH}), 0) FROM notifications n");
        Ok(self.conn.query_row(&sql, [], |r| r.get(0))?)
    }

    /// What `spool.maxBytes` limits: the database file's pages in use (bodies, rows, indexes, duplicate
    /// keys) and the body log's segments. Pages a delete frees are reused before the file grows, so
    /// this bounds the file; a segment's bytes count until it is deleted. Read from the pager and the
    /// log's own tally, so it is exact inside a transaction too, and costs no scan.
    pub fn used_bytes(&self) -> Result<u64> {
        let read = |pragma: &str| -> Result<u64> {
            Ok(self.conn.prepare_cached(pragma)?.query_row([], |r| r.get::<_, i64>(0)).map(|n| n.max(0) as u64)?)
        };
        let pages = read("PRAGMA page_count")?.saturating_sub(read("PRAGMA freelist_count")?);
        Ok(pages * self.page_size + self.bodies.borrow().bytes())
    }

    pub fn list(&self, filter: &ListFilter) -> Result<Vec<DeliveryRow>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT d.notification_id, d.destination, d.state, d.attempts, n.received_at, d.next_attempt_at,
                    d.finished_at, d.last_status, d.last_error, {BODY_LENGTH}
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE (?1 IS NULL OR d.destination = ?1) AND (?2 IS NULL OR d.state = ?2)
             ORDER BY d.notification_id, d.destination LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![filter.destination, filter.state, filter.limit], |r| {
            Ok(DeliveryRow {
                notification_id: r.get(0)?,
                destination: r.get(1)?,
                state: r.get(2)?,
                attempts: r.get(3)?,
                received_at: r.get(4)?,
                next_attempt_at: r.get(5)?,
                finished_at: r.get(6)?,
                last_status: r.get(7)?,
                last_error: r.get(8)?,
                bytes: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Schedules deliveries to `destination` again, now. Without `dead_only`, notifications received
    /// since `since` that never had a delivery row for it (a destination added later) get one too.
    pub fn redeliver(&self, destination: &str, dead_only: bool, since: i64, now: i64) -> Result<usize> {
        let tx = self.conn.unchecked_transaction()?;
        let mut changed = 0;
        if !dead_only {
            changed += tx.execute(
                "INSERT OR IGNORE INTO deliveries (destination, notification_id, state, next_attempt_at)
                 SELECT ?1, id, ?4, ?3 FROM notifications WHERE received_at >= ?2",
                params![destination, since, now, DeliveryState::Pending],
            )?;
        }
        // Delivered rows are sent again only when asked for all of them.
        let also = if dead_only { DeliveryState::Dead } else { DeliveryState::Delivered };
        changed += tx.execute(
            "UPDATE deliveries SET state = ?4, attempts = 0, next_attempt_at = ?3, finished_at = NULL
             WHERE destination = ?1 AND state IN (?5, ?6)
               AND notification_id IN (SELECT id FROM notifications WHERE received_at >= ?2)",
            params![destination, since, now, DeliveryState::Pending, DeliveryState::Dead, also],
        )?;
        tx.commit()?;
        Ok(changed)
    }

    /// Deletes finished deliveries (dead ones only with `include_dead`) and then every notification
    /// that has no delivery left to make. Pending deliveries are never purged.
    pub fn purge(&self, destination: Option<&str>, include_dead: bool, before: i64) -> Result<usize> {
        let tx = self.conn.unchecked_transaction()?;
        let also = if include_dead { DeliveryState::Dead } else { DeliveryState::Delivered };
        let deleted = tx.execute(
            "DELETE FROM deliveries WHERE state IN (?3, ?4) AND (?1 IS NULL OR destination = ?1)
               AND COALESCE(finished_at, 0) < ?2",
            params![destination, before, DeliveryState::Delivered, also],
        )?;
        tx.execute(
            "DELETE FROM notifications WHERE received_at < ?1
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)",
            params![before],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Deletes every delivery (pending and dead too) to a destination not in `configured`, then every
    /// notification with no delivery left. For the work of a removed or misspelt destination that
    /// would otherwise wait for `retainDead`.
    pub fn purge_unknown_destinations(&self, configured: &[String]) -> Result<usize> {
        let configured = serde_json::to_string(configured).unwrap_or_else(|_| "[]".into());
        let tx = self.conn.unchecked_transaction()?;
        let notifications: Vec<i64> = tx
            .prepare(
                "DELETE FROM deliveries WHERE destination NOT IN (SELECT value FROM json_each(?1))
                 RETURNING notification_id",
            )?
            .query_map(params![configured], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut orphaned = tx.prepare(
            "DELETE FROM notifications WHERE id = ?1
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = ?1)",
        )?;
        for id in &notifications {
            orphaned.execute(params![id])?;
        }
        drop(orphaned);
        tx.commit()?;
        Ok(notifications.len())
    }

    /// Drops the deliveries of notifications received before `cutoff` that can no longer finish: dead
    /// ones, and every one to a destination not in `configured`; then those notifications if nothing
    /// is left to deliver. Returns (dead, unknown destination) deliveries dropped. Runs inside the
    /// caller's transaction.
    pub fn expire_unfinishable(&self, configured: &[String], cutoff: i64) -> Result<(usize, usize)> {
        let configured = serde_json::to_string(configured).unwrap_or_else(|_| "[]".into());
        let received_before = "notification_id IN (SELECT id FROM notifications WHERE received_at < ?1)";
        let dead = self
            .conn
            .prepare_cached(&format!("DELETE FROM deliveries WHERE state = ?2 AND {received_before}"))?
            .execute(params![cutoff, DeliveryState::Dead])?;
        let unknown = self
            .conn
            .prepare_cached(&format!(
                "DELETE FROM deliveries WHERE destination NOT IN (SELECT value FROM json_each(?2)) AND {received_before}"
            ))?
            .execute(params![cutoff, configured])?;
        self.conn
            .prepare_cached(
                "DELETE FROM notifications WHERE received_at < ?1
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = notifications.id)",
            )?
            .execute(params![cutoff])?;
        Ok((dead, unknown))
    }

    /// The destination whose unfinished deliveries hold the most body bytes, with how many it has:
    /// what a full spool names.
    pub fn largest_holder(&self) -> Result<Option<(String, u64)>> {
        let holder = self
            .conn
            .prepare_cached(&format!(
                "SELECT d.destination, COUNT(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                 WHERE d.state != ?1 GROUP BY d.destination ORDER BY SUM({BODY_LENGTH}) DESC LIMIT 1"
            ))?
            .query_row(params![DeliveryState::Delivered], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(holder)
    }

    /// Drops notifications whose every delivery was delivered before `cutoff` (or that had none and were
    /// received before it). Pending and dead work is never pruned. Runs inside the caller's transaction.
    pub fn prune_delivered(&self, cutoff: i64, limit: usize) -> Result<usize> {
        let ids = self
            .conn
            .prepare_cached(
                "DELETE FROM notifications WHERE id IN (
                   SELECT n.id FROM notifications n WHERE n.received_at < ?1
                     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.id
                                     AND (d.state != ?3 OR d.finished_at >= ?1))
                   ORDER BY n.id LIMIT ?2)
                 RETURNING id",
            )?
            .query_map(params![cutoff, limit as i64, DeliveryState::Delivered], |r| r.get::<_, i64>(0))?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        let mut forget = self.conn.prepare_cached("DELETE FROM deliveries WHERE notification_id = ?1")?;
        for id in &ids {
            forget.execute(params![id])?;
        }
        Ok(ids.len())
    }

    pub fn notification_body(&self, id: i64) -> Result<Option<Vec<u8>>> {
        let found = self
            .conn
            .query_row(
                "SELECT body, body_segment, body_offset, body_length FROM notifications WHERE id = ?1",
                params![id],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, body_ref(r, 1)?)),
            )
            .optional()?;
        found.map(|(inline, logged)| self.body(inline, logged)).transpose()
    }

    /// Body-log segments no row refers to (as this connection sees them), with their lengths.
    fn unreferenced_segments(&self) -> Result<Vec<(i64, u64)>> {
        let bodies = self.bodies.borrow();
        let mut referenced =
            self.conn.prepare_cached("SELECT EXISTS (SELECT 1 FROM notifications WHERE body_segment = ?1)")?;
        let mut unreferenced = Vec::new();
        for (segment, len) in bodies.segments() {
            if !referenced.query_row(params![segment], |r| r.get::<_, bool>(0))? {
                unreferenced.push((segment, len));
            }
        }
        Ok(unreferenced)
    }

    /// [`SpoolDb::used_bytes`] once the segments no row refers to now are let go of: what rows
    /// dropped inside a transaction free, before [`SpoolDb::delete_unreferenced_segments`] can run.
    /// The segment being appended to and the one kept as the free segment are counted still.
    pub fn used_bytes_after_sweep(&self) -> Result<u64> {
        let unreferenced = self.unreferenced_segments()?;
        let freed = self.bodies.borrow().bytes_freed(&unreferenced);
        Ok(self.used_bytes()?.saturating_sub(freed))
    }

    /// Lets go of the body-log segments no committed row refers to ([`BodyLog::delete`]). Only outside a transaction (a
    /// rolled-back delete would bring back rows that refer to them), and only by the writer: a `spool`
    /// tool beside it could see the segment the writer is appending to before its rows commit.
    pub fn delete_unreferenced_segments(&self) -> Result<usize> {
        let unreferenced = self.unreferenced_segments()?;
        let mut bodies = self.bodies.borrow_mut();
        for (segment, _) in &unreferenced {
            bodies.delete(*segment).map_err(|source| Failure::Io { action: "cannot delete a body segment", source })?;
        }
        Ok(unreferenced.len())
    }

    /// Moves the bodies still in mostly-emptied segments inline, up to `budget` bytes, so that one
    /// long-kept notification (a dead delivery waits for `retainDead`) does not pin a whole segment:
    /// the segment then goes with the next [`SpoolDb::delete_unreferenced_segments`]. Runs inside the
    /// caller's transaction; returns the bodies moved.
    pub fn inline_sparse_segments(&self, budget: u64) -> Result<usize> {
        let sizes: Vec<(i64, u64)> = {
            let bodies = self.bodies.borrow();
            bodies.segments().filter(|(segment, _)| bodies.appending() != Some(*segment)).collect()
        };
        let mut live = self
            .conn
            .prepare_cached("SELECT COALESCE(SUM(body_length), 0) FROM notifications WHERE body_segment = ?1")?;
        let mut rows = self.conn.prepare_cached(
            "SELECT id, body_segment, body_offset, body_length FROM notifications WHERE body_segment = ?1",
        )?;
        let mut inline = self.conn.prepare_cached(
            "UPDATE notifications SET body = ?2, body_segment = NULL, body_offset = NULL, body_length = NULL
             WHERE id = ?1",
        )?;
        let (mut moved, mut spent) = (0, 0u64);
        for (segment, len) in sizes {
            let live_bytes: u64 = live.query_row(params![segment], |r| r.get::<_, i64>(0))?.max(0) as u64;
            if live_bytes == 0 || live_bytes * 4 > len || spent + live_bytes > budget {
                continue;
            }
            let found = rows
                .query_map(params![segment], |r| Ok((r.get::<_, i64>(0)?, body_ref(r, 1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for (id, logged) in found {
                let body = self.body(Vec::new(), logged)?;
                inline.execute(params![id, body])?;
                moved += 1;
            }
            spent += live_bytes;
        }
        Ok(moved)
    }
}

/// The body-log columns from `first` on (segment, offset, length), if the body is there.
fn body_ref(row: &rusqlite::Row<'_>, first: usize) -> rusqlite::Result<Option<BodyRef>> {
    let segment: Option<i64> = row.get(first)?;
    Ok(match segment {
        Some(segment) => Some(BodyRef { segment, offset: row.get(first + 1)?, length: row.get(first + 2)? }),
        None => None,
    })
}

/// Brings a version 1 file (every body inline) to this schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_log_columns: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info('notifications') WHERE name = 'body_segment')",
        [],
        |r| r.get(0),
    )?;
    if !has_log_columns {
        conn.execute_batch(
            "ALTER TABLE notifications ADD COLUMN body_segment INTEGER;
             ALTER TABLE notifications ADD COLUMN body_offset INTEGER;
             ALTER TABLE notifications ADD COLUMN body_length INTEGER;",
        )?;
    }
    Ok(())
}

fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt))
}

/// Renames the file and its WAL/SHM companions to `<name>.corrupt-<unix seconds>`.
fn quarantine(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let with_suffix = |suffix: &str| {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let aside = with_suffix(&format!(".corrupt-{stamp}"));
    std::fs::rename(path, &aside)?;
    for companion in ["-wal", "-shm"] {
        let from = with_suffix(companion);
        if from.exists() {
            std::fs::rename(&from, with_suffix(&format!(".corrupt-{stamp}{companion}")))?;
        }
    }
    // Its bodies in the body log go with it: a new spool's rows must never refer to them.
    for (from, segment) in body_log::segment_files(path)? {
        std::fs::rename(&from, with_suffix(&format!(".corrupt-{stamp}-body-{segment:010}")))?;
    }
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir) -> SpoolDb {
        SpoolDb::open_checked(&dir.path().join("spool.db"), SyncMode::Normal).unwrap().0
    }

    fn counts(db: &SpoolDb, id: i64) -> (u32, u32, u32) {
        let c = db.delivery_counts(id).unwrap();
        (c.pending, c.delivered, c.dead)
    }

    fn dests(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_due_query_is_planned_once_whatever_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        db.insert(1_000, "/apple", b"{}", &dests(&["a"])).unwrap();
        for limit in [1, 16, 3, 16, 1] {
            assert_eq!(db.due("a", 1_000, limit, &[]).unwrap().len(), 1);
        }
        let statement = db.conn.prepare_cached(DUE_SQL).unwrap();
        assert_eq!(statement.get_status(rusqlite::StatementStatus::RePrepare), 0, "prepared again for a new limit");
    }

    #[test]
    fn bodies_come_back_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let id = db.insert(1_000, "/apple", &body, &dests(&["a", "b"])).unwrap();
        let due = db.due("a", 1_000, 10, &[]).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].notification_id, id);
        assert_eq!(&due[0].body[..], &body[..]);
        assert_eq!(db.due("a", 999, 10, &[]).unwrap().len(), 0, "not due before its schedule");
        assert_eq!(db.due("c", 1_000, 10, &[]).unwrap().len(), 0);
        let other = db.insert(1_000, "/apple", b"{}", &dests(&["a"])).unwrap();
        let due = db.due("a", 1_000, 1, &[id]).unwrap();
        assert_eq!(
            due.iter().map(|d| d.notification_id).collect::<Vec<_>>(),
            [other],
            "one being attempted is left out"
        );
    }

    #[test]
    fn outcomes_move_rows_between_states() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let id = db.insert(1_000, "/", b"{}", &dests(&["a", "b"])).unwrap();
        db.record(
            "a",
            id,
            1_100,
            &Outcome::Retry { next_attempt_at: 5_000, status: Some(503), error: "HTTP 503".into() },
        )
        .unwrap();
        assert!(db.due("a", 4_999, 10, &[]).unwrap().is_empty());
        assert_eq!(db.due("a", 5_000, 10, &[]).unwrap()[0].attempts, 1);
        assert_eq!(db.next_due_after("a", 1_100).unwrap(), Some(5_000));
        assert_eq!(db.next_due_after("a", 5_000).unwrap(), None);
        db.record("a", id, 5_100, &Outcome::Delivered { status: 200 }).unwrap();
        db.record("b", id, 5_100, &Outcome::Dead { status: Some(404), error: "HTTP 404".into() }).unwrap();
        assert_eq!(counts(&db, id), (0, 1, 1));
        // A finished row is not reopened by a late attempt result.
        db.record("a", id, 6_000, &Outcome::Retry { next_attempt_at: 9_000, status: None, error: "late".into() })
            .unwrap();
        assert_eq!(counts(&db, id), (0, 1, 1));
        let stats = db.stats().unwrap();
        assert_eq!(
            stats.iter().map(|s| (s.destination.as_str(), s.delivered, s.dead)).collect::<Vec<_>>(),
            vec![("a", 1, 0), ("b", 0, 1)]
        );
    }

    #[test]
    fn dedupe_keys_find_the_stored_notification_within_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let id = db.insert(1_000, "/", b"{}", &dests(&["a"])).unwrap();
        db.remember("v2:u1", id, 1_000).unwrap();
        assert_eq!(db.find_duplicate("v2:u1", 500).unwrap(), Some(id));
        assert_eq!(db.find_duplicate("v2:u1", 1_001).unwrap(), None, "outside the window");
        assert_eq!(db.find_duplicate("v2:u2", 0).unwrap(), None);
        assert!(db.seen("v2:u1", 0).unwrap());
        db.record("a", id, 2_000, &Outcome::Dead { status: Some(404), error: "HTTP 404".into() }).unwrap();
        db.queue(id, &dests(&["a", "b"]), 3_000).unwrap();
        assert_eq!(counts(&db, id), (2, 0, 0), "queue revives dead a and adds b");
        db.record("b", id, 3_100, &Outcome::Delivered { status: 200 }).unwrap();
        db.queue(id, &dests(&["b"]), 3_200).unwrap();
        assert_eq!(counts(&db, id), (1, 1, 0), "a delivered row is left alone");
        assert_eq!(db.forget_dedupe_before(2_000).unwrap(), 1);
        assert!(!db.seen("v2:u1", 0).unwrap());
    }

    #[test]
    fn redeliver_requeues_and_backfills_a_new_destination() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let first = db.insert(1_000, "/", b"1", &dests(&["a"])).unwrap();
        let second = db.insert(2_000, "/", b"2", &dests(&["a"])).unwrap();
        db.record("a", first, 3_000, &Outcome::Dead { status: Some(400), error: "HTTP 400".into() }).unwrap();
        db.record("a", second, 3_000, &Outcome::Delivered { status: 200 }).unwrap();
        assert_eq!(db.redeliver("a", true, 0, 4_000).unwrap(), 1);
        assert_eq!(
            db.due("a", 4_000, 10, &[]).unwrap().iter().map(|d| d.notification_id).collect::<Vec<_>>(),
            vec![first]
        );
        assert_eq!(db.redeliver("new", false, 1_500, 4_000).unwrap(), 1);
        assert_eq!(db.due("new", 4_000, 10, &[]).unwrap()[0].notification_id, second);
    }

    #[test]
    fn pruning_keeps_pending_and_dead_work() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let delivered = db.insert(1_000, "/", b"d", &dests(&["a"])).unwrap();
        let pending = db.insert(1_000, "/", b"p", &dests(&["a"])).unwrap();
        let dead = db.insert(1_000, "/", b"x", &dests(&["a"])).unwrap();
        db.record("a", delivered, 2_000, &Outcome::Delivered { status: 200 }).unwrap();
        db.record("a", dead, 2_000, &Outcome::Dead { status: Some(400), error: "x".into() }).unwrap();
        assert_eq!(db.prune_delivered(1_500, 100).unwrap(), 0, "delivered after the cutoff is kept");
        assert_eq!(db.prune_delivered(10_000, 100).unwrap(), 1);
        assert!(db.notification_body(delivered).unwrap().is_none());
        assert!(db.notification_body(pending).unwrap().is_some());
        assert!(db.notification_body(dead).unwrap().is_some());
        assert_eq!(db.purge(None, true, i64::MAX).unwrap(), 1);
        assert!(db.notification_body(dead).unwrap().is_none());
        assert!(db.notification_body(pending).unwrap().is_some(), "purge never drops pending work");
    }

    #[test]
    fn delivery_states_are_stored_by_name_and_unknown_names_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        for state in [DeliveryState::Pending, DeliveryState::Delivered, DeliveryState::Dead] {
            let stored: String = db.conn.query_row("SELECT ?1", params![state], |r| r.get(0)).unwrap();
            assert_eq!(stored, state.to_string());
            let read: DeliveryState = db.conn.query_row("SELECT ?1", params![stored], |r| r.get(0)).unwrap();
            assert_eq!(read, state);
        }
        let unknown = db.conn.query_row("SELECT 'lost'", [], |r| r.get::<_, DeliveryState>(0)).unwrap_err();
        assert!(unknown.to_string().contains("unknown delivery state `lost`"), "{unknown}");
        assert_eq!(serde_json::to_string(&DeliveryState::Dead).unwrap(), "\"dead\"");
    }

    #[test]
    fn a_spool_from_a_newer_sidecar_is_refused_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        drop(open(&dir));
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        match SpoolDb::open(&path, SyncMode::Full) {
            Err(Failure::SchemaTooNew { found: 99, supported: SCHEMA_VERSION }) => {}
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
    }

    #[test]
    fn dead_work_and_work_for_removed_destinations_expire_after_their_window() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let dead = db.insert(1_000, "/", b"x", &dests(&["a"])).unwrap();
        db.record("a", dead, 1_500, &Outcome::Dead { status: Some(400), error: "x".into() }).unwrap();
        let renamed = db.insert(1_000, "/", b"r", &dests(&["old-name"])).unwrap();
        let pending = db.insert(1_000, "/", b"p", &dests(&["a"])).unwrap();
        let recent = db.insert(5_000, "/", b"nnnn", &dests(&["old-name"])).unwrap();
        let configured = dests(&["a"]);
        assert_eq!(db.expire_unfinishable(&configured, 500).unwrap(), (0, 0), "nothing received before the cutoff");
        assert_eq!(db.expire_unfinishable(&configured, 2_000).unwrap(), (1, 1));
        assert!(db.notification_body(dead).unwrap().is_none(), "nothing left to deliver: the body goes too");
        assert!(db.notification_body(renamed).unwrap().is_none());
        assert!(db.notification_body(pending).unwrap().is_some(), "pending work of a configured destination stays");
        assert!(db.notification_body(recent).unwrap().is_some(), "within the window a removed destination's rows stay");
        assert_eq!(db.largest_holder().unwrap(), Some(("old-name".to_string(), 1)), "the most bytes, not rows");
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        std::fs::write(&path, vec![0x42; 8192]).unwrap();
        let (db, report) = SpoolDb::open_checked(&path, SyncMode::Full).unwrap();
        let aside = report.quarantined.expect("quarantined");
        assert!(aside.exists());
        assert_eq!(std::fs::read(&aside).unwrap(), vec![0x42; 8192]);
        assert_eq!(db.notification_count().unwrap(), 0);
        db.insert(1, "/", b"{}", &[]).unwrap();
        let found = SetAside::find(&path).unwrap();
        assert_eq!((found.files, found.bytes), (vec![aside.clone()], 8192));
    }

    #[test]
    fn only_the_newest_set_aside_copy_is_kept_and_all_can_be_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        for name in ["spool.db.corrupt-100", "spool.db.corrupt-100-wal", "spool.db.corrupt-200", "other.db.corrupt-1"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let (_db, report) = SpoolDb::open_checked(&path, SyncMode::Full).unwrap();
        let names = |files: &[PathBuf]| {
            files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>()
        };
        assert_eq!(names(&report.discarded), ["spool.db.corrupt-100", "spool.db.corrupt-100-wal"]);
        assert_eq!(names(&SetAside::find(&path).unwrap().files), ["spool.db.corrupt-200"]);
        assert_eq!(names(&SetAside::discard_all(&path).unwrap()), ["spool.db.corrupt-200"]);
        assert!(dir.path().join("other.db.corrupt-1").exists(), "another spool's copies are not ours");
    }

    fn segment_files(dir: &tempfile::TempDir) -> Vec<i64> {
        body_log::segment_files(&dir.path().join("spool.db")).unwrap().into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn logged_bodies_come_back_byte_for_byte_and_their_segment_goes_after_the_last_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let bodies: Vec<Vec<u8>> =
            (0..3u8).map(|n| (0..=255u8).cycle().skip(n.into()).take(20_000).collect()).collect();
        db.begin().unwrap();
        let inline = db.insert(1_000, "/apple", b"{}", &dests(&["a"])).unwrap();
        let ids: Vec<i64> =
            bodies.iter().map(|b| db.insert_logged(1_000, "/apple", b, &dests(&["a"])).unwrap()).collect();
        db.commit().unwrap();
        assert_eq!(segment_files(&dir), [1]);
        let due = db.due("a", 1_000, 10, &[]).unwrap();
        assert_eq!(due.iter().map(|d| d.notification_id).collect::<Vec<_>>(), [&[inline][..], &ids].concat());
        for (row, body) in due[1..].iter().zip(&bodies) {
            assert_eq!(&row.body[..], &body[..], "a logged body changed");
        }
        assert_eq!(db.notification_body(ids[2]).unwrap().unwrap(), bodies[2]);
        assert_eq!(db.body_bytes().unwrap(), 2 + 60_000, "logged bodies count by their length");
        let listed = db.list(&ListFilter { limit: 10, ..ListFilter::default() }).unwrap();
        assert_eq!(listed.iter().map(|r| r.bytes).collect::<Vec<_>>(), [2, 20_000, 20_000, 20_000]);

        db.begin().unwrap();
        for id in &ids[..2] {
            db.record("a", *id, 2_000, &Outcome::Delivered { status: 200 }).unwrap();
        }
        assert_eq!(db.prune_delivered(3_000, 100).unwrap(), 2);
        assert_eq!(db.used_bytes_after_sweep().unwrap(), db.used_bytes().unwrap(), "one body still holds the segment");
        db.record("a", ids[2], 2_000, &Outcome::Delivered { status: 200 }).unwrap();
        assert_eq!(db.prune_delivered(3_000, 100).unwrap(), 1);
        let before = db.used_bytes().unwrap();
        assert_eq!(db.used_bytes_after_sweep().unwrap(), before, "the segment being appended to is not freed");
        db.set_segment_bytes(1);
        let next = db.insert_logged(3_000, "/apple", b"next", &dests(&["a"])).unwrap();
        let before = db.used_bytes().unwrap();
        assert_eq!(db.used_bytes_after_sweep().unwrap(), before, "segment 1 will be the free one: it still counts");
        db.commit().unwrap();
        assert_eq!(segment_files(&dir), [1, 2], "nothing is let go of before the commit");
        assert_eq!(db.delete_unreferenced_segments().unwrap(), 1);
        assert_eq!(segment_files(&dir), [2]);
        assert_eq!(db.used_bytes().unwrap(), before);

        db.begin().unwrap();
        let recycled = db.insert_logged(4_000, "/apple", b"in segment 1's file", &dests(&["a"])).unwrap();
        let last = db.insert_logged(4_000, "/apple", b"last", &dests(&["a"])).unwrap();
        assert_eq!(segment_files(&dir), [2, 3, 4]);
        assert_eq!(db.notification_body(recycled).unwrap().unwrap(), b"in segment 1's file");
        for id in [next, recycled] {
            db.record("a", id, 5_000, &Outcome::Delivered { status: 200 }).unwrap();
        }
        assert_eq!(db.prune_delivered(6_000, 100).unwrap(), 2);
        let before = db.used_bytes().unwrap();
        assert_eq!(
            db.used_bytes_after_sweep().unwrap(),
            before - 60_000,
            "with segment 2 to be the free one, segment 3 (segment 1's file) is given back at once"
        );
        db.commit().unwrap();
        assert_eq!(db.delete_unreferenced_segments().unwrap(), 2);
        assert_eq!(segment_files(&dir), [4]);
        assert_eq!(db.used_bytes().unwrap(), before - 60_000);
        assert_eq!(db.notification_body(last).unwrap().unwrap(), b"last");
    }

    #[test]
    fn a_rolled_back_transaction_leaves_no_reference_to_what_it_logged() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        db.begin().unwrap();
        db.insert_logged(1_000, "/", b"rolled back", &dests(&["a"])).unwrap();
        db.rollback();
        db.begin().unwrap();
        let kept = db.insert_logged(1_000, "/", b"kept", &dests(&["a"])).unwrap();
        db.commit().unwrap();
        let due = db.due("a", 1_000, 10, &[]).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].notification_id, &due[0].body[..]), (kept, &b"kept"[..]));
        drop(db);
        let db = open(&dir);
        assert_eq!(db.notification_body(kept).unwrap().unwrap(), b"kept", "read back after a restart");
        db.begin().unwrap();
        let next = db.insert_logged(1_000, "/", b"next", &dests(&["a"])).unwrap();
        db.commit().unwrap();
        assert_eq!(segment_files(&dir), [1, 2], "a restarted writer appends to a new segment");
        assert_eq!(db.notification_body(next).unwrap().unwrap(), b"next");
    }

    #[test]
    fn a_mostly_emptied_segment_has_its_last_bodies_moved_inline_and_goes() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        db.set_segment_bytes(40_000);
        db.begin().unwrap();
        let ids: Vec<i64> =
            (0..4u8).map(|n| db.insert_logged(1_000, "/", &[b'a' + n; 10_000], &dests(&["a"])).unwrap()).collect();
        let later = db.insert_logged(1_000, "/", b"in the next segment", &dests(&["a"])).unwrap();
        for id in &ids[..2] {
            db.record("a", *id, 2_000, &Outcome::Delivered { status: 200 }).unwrap();
        }
        db.prune_delivered(3_000, 100).unwrap();
        db.commit().unwrap();
        assert_eq!(segment_files(&dir), [1, 2]);
        db.begin().unwrap();
        assert_eq!(db.inline_sparse_segments(1 << 20).unwrap(), 0, "half of segment 1 is still in use");
        db.record("a", ids[2], 2_000, &Outcome::Delivered { status: 200 }).unwrap();
        db.prune_delivered(3_000, 100).unwrap();
        assert_eq!(db.inline_sparse_segments(5_000).unwrap(), 0, "over this pass's budget");
        assert_eq!(db.inline_sparse_segments(1 << 20).unwrap(), 1, "a quarter left: moved inline");
        db.commit().unwrap();
        assert_eq!(db.delete_unreferenced_segments().unwrap(), 1);
        assert_eq!(segment_files(&dir), [2], "the segment being appended to stays");
        assert_eq!(db.notification_body(ids[3]).unwrap().unwrap(), vec![b'd'; 10_000]);
        assert_eq!(db.notification_body(later).unwrap().unwrap(), b"in the next segment");
    }

    #[test]
    fn a_version_1_spool_is_brought_up_to_date_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let v1 = Connection::open(&path).unwrap();
        v1.execute_batch(
            "CREATE TABLE notifications (id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, path TEXT NOT NULL,
                                         body BLOB NOT NULL);
             INSERT INTO notifications (received_at, path, body) VALUES (1000, '/apple', x'7b7d');
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(v1);
        let db = open(&dir);
        assert_eq!(db.notification_body(1).unwrap().unwrap(), b"{}");
        db.begin().unwrap();
        let logged = db.insert_logged(2_000, "/apple", b"logged", &dests(&["a"])).unwrap();
        db.commit().unwrap();
        assert_eq!(db.notification_body(logged).unwrap().unwrap(), b"logged");
        let version: i64 = db.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn a_corrupt_spool_takes_its_body_segments_aside_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let db = open(&dir);
        db.begin().unwrap();
        db.insert_logged(1_000, "/", b"body", &dests(&["a"])).unwrap();
        db.commit().unwrap();
        drop(db);
        std::fs::write(&path, vec![0x42; 8192]).unwrap();
        let (db, report) = SpoolDb::open_checked(&path, SyncMode::Full).unwrap();
        assert!(report.quarantined.is_some());
        assert!(segment_files(&dir).is_empty(), "a new spool starts without the old one's segments");
        assert_eq!(report.set_aside.bytes, 8192 + 4, "the set-aside segment counts against maxBytes");
        assert_eq!(db.used_bytes_after_sweep().unwrap(), db.used_bytes().unwrap());
    }

    #[test]
    fn used_bytes_follows_inserts_and_deletes_without_a_scan() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(&dir);
        let empty = db.used_bytes().unwrap();
        db.begin().unwrap();
        let id = db.insert(1, "/", &vec![7u8; 1 << 20], &["rc".into()]).unwrap();
        let full = db.used_bytes().unwrap();
        assert!(full >= empty + (1 << 20) && full < empty + (1 << 20) + (64 << 10), "{empty} -> {full}");
        db.record("rc", id, 2, &Outcome::Delivered { status: 200 }).unwrap();
        assert_eq!(db.prune_delivered(i64::MAX, 10).unwrap(), 1);
        assert!(db.used_bytes().unwrap() < empty + (64 << 10), "freed pages are not in use, even before the commit");
        db.commit().unwrap();
    }
}
