//! The commands besides `run`: `check`, `inspect`, `spool ...` and `apple ...` ([`apple`]). Each returns
//! the text to print.
//!
//! The spool commands open the same SQLite file as a running sidecar (WAL lets them read while it
//! writes, and SQLite's lock makes their few writes wait their turn), or the shared PostgreSQL queue
//! its config names. Bodies are never printed: V1
//! bodies carry the app's shared secret.

mod apple;

use std::collections::HashSet;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use storerelay_config::{SpoolBackendKind, SyncMode};

use crate::clock::{self, TimeArgError, format_ms, now_ms, parse_time_arg};
use crate::config;
use crate::metrics::Metrics;
use crate::spool::{
    DeliveryRow, DeliveryState, DestinationStats, Failure, ListFilter, PostgresTools, SetAside, SpoolDb, SpoolError,
};

pub use apple::{AppleCommand, apple};

/// The default config path when neither `--config` nor `STORERELAY_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/storerelay/config.yaml";

/// Why a command failed; the message names the file at fault and never a secret.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] storerelay_config::ConfigError),
    #[error("{}: {}", file.display(), problems.join("; "))]
    Problems { file: PathBuf, problems: Vec<String> },
    #[error(transparent)]
    Decode(#[from] crate::apple::DecodeError),
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("no spool at {}", .0.display())]
    NoSpool(PathBuf),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    TimeArg(#[from] TimeArgError),
    #[error(
        "destination `{destination}` is not in {} (it has: {}); check the name, or pass --force to schedule deliveries to it anyway",
        file.display(),
        if configured.is_empty() { "none".to_string() } else { configured.join(", ") }
    )]
    UnknownDestination { destination: String, file: PathBuf, configured: Vec<String> },
    #[error(
        "{}: no `appStoreServerApi:` section; the apple commands call Apple's App Store Server API with an In-App Purchase key (README, \"Closing the loop with Apple\")",
        file.display()
    )]
    NoAppleApi { file: PathBuf },
    #[error(transparent)]
    AppleApi(#[from] crate::apple_api::ApiError),
    #[error("{0}")]
    Window(String),
    #[error("cannot start a runtime: {0}")]
    Runtime(String),
    #[error("{printed}{failed} of {total} could not be replayed (is the sidecar running, and its app answering?)")]
    Replay { failed: usize, total: usize, printed: String },
    #[error("{0}the self test failed")]
    SelfTest(String),
}

/// `spool ...`: look at and repair a spool, beside a running sidecar or not.
#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum SpoolCommand {
    /// Counts per destination and the oldest pending notification.
    Stats,
    /// Deliveries, oldest first (never bodies).
    List {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, value_enum)]
        state: Option<DeliveryState>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Deliveries given up on.
    Dead {
        #[arg(long)]
        destination: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Schedule deliveries to a destination again now (all finished ones, or only dead ones).
    Redeliver {
        /// A destination of the config file (`--config`).
        #[arg(long)]
        destination: String,
        /// Schedule deliveries to a destination the config does not have (they wait in the spool until
        /// it is configured, and count towards `retainDead`).
        #[arg(long)]
        force: bool,
        /// Only deliveries that were given up on.
        #[arg(long = "dead")]
        dead_only: bool,
        /// Only notifications received since this time (RFC 3339) or duration ago (e.g. 2h).
        #[arg(long)]
        since: Option<String>,
    },
    /// Delete the copies of a damaged spool that were set aside (`<spool>.corrupt-*`): they count
    /// against `maxBytes` until they are gone. Copy them out first if they are to be recovered.
    DiscardSetAside,
    /// Delete finished deliveries and the notifications nobody needs any more. Pending ones stay.
    Purge {
        #[arg(long)]
        destination: Option<String>,
        /// Dead deliveries too.
        #[arg(long = "dead")]
        include_dead: bool,
        /// Only deliveries finished before this time or duration ago (default: now).
        #[arg(long)]
        before: Option<String>,
        /// Instead: every delivery, pending ones too, to a destination that is not in the config file
        /// (`--config`), such as a removed destination's backlog.
        #[arg(long, conflicts_with_all = ["destination", "include_dead", "before"])]
        unknown_destinations: bool,
    },
}

/// `check`: validates the file (and that its secret files can be read) and returns the effective
/// config with secrets redacted.
pub fn check(config_path: &Path) -> Result<String, CommandError> {
    let file = storerelay_config::load(config_path)?;
    let resolved = config::resolve(file.clone(), None, &Metrics::default());
    let mut problems = resolved.problems();
    if let Some(settings) = file.spool.postgres.as_ref().filter(|_| file.spool.backend == SpoolBackendKind::Postgres) {
        problems.extend(crate::spool::check_postgres_settings(settings).err());
    }
    if let Some(api) = &file.app_store_server_api {
        // Reads and parses the key as a run would, so a wrong file is found now.
        problems.extend(crate::apple_api::AppleApi::new(api, &Metrics::default()).err().map(|e| e.to_string()));
    }
    if !problems.is_empty() {
        return Err(CommandError::Problems { file: config_path.to_path_buf(), problems });
    }
    Ok(format!("# {}: valid\n{}", config_path.display(), file.redacted().to_yaml()))
}

/// `inspect`: what the sidecar makes of a body, and with a config, whether it would pass verification
/// and where it would go. Never prints the V1 password.
pub fn inspect(body: &[u8], config_path: Option<&Path>) -> Result<String, CommandError> {
    let notification = crate::apple::decode(body)?;
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
        let _ = writeln!(out, "malformed:    {problem}");
    }
    if let Some(path) = config_path {
        let file = storerelay_config::load(path)?;
        let runtime = config::resolve(file, None, &Metrics::default());
        let verdict = match (runtime.verifier.mode, runtime.verifier.check(&notification, body)) {
            (storerelay_config::VerifyMode::Off, _) => "not checked (verify.mode: off)".to_string(),
            (_, Ok(())) => "passes".to_string(),
            (mode, Err(reason)) => {
                format!("fails: {} (verify.mode: {})", reason.as_str(), format!("{mode:?}").to_lowercase())
            }
        };
        let _ = writeln!(out, "verification: {verdict}");
        let destinations = runtime.destinations_for(&notification);
        let _ = writeln!(
            out,
            "destinations: {}",
            if destinations.is_empty() { "none".to_string() } else { destinations.join(", ") }
        );
    }
    Ok(out)
}

/// The destination names of the config file, for the spool commands that must not act on a name the
/// sidecar does not know.
fn configured_destinations(config_path: &Path) -> Result<Vec<String>, CommandError> {
    let file = storerelay_config::load(config_path)?;
    Ok(file.destinations.into_iter().map(|d| d.name).collect())
}

/// Runs one spool command and returns what to print: on the SQLite file `path`, or without one on the
/// spool the config file names (its `spool.path`, or its shared PostgreSQL queue). `config_path` is
/// also read by the commands that check destination names against it.
pub fn spool(
    path: Option<&Path>,
    command: &SpoolCommand,
    json: bool,
    config_path: &Path,
) -> Result<String, CommandError> {
    let file = match path {
        Some(path) => return spool_file(path, command, json, config_path),
        None => storerelay_config::load(config_path)?,
    };
    if file.spool.backend == SpoolBackendKind::Postgres && *command == SpoolCommand::DiscardSetAside {
        return Ok("a shared spool sets nothing aside\n".to_string());
    }
    match file.spool.postgres.as_ref().filter(|_| file.spool.backend == SpoolBackendKind::Postgres) {
        Some(settings) => run(&mut Shared::connect(settings)?, command, json, config_path),
        None => spool_file(&file.spool.path, command, json, config_path),
    }
}

/// Runs `action` on the spool the config file names, whichever backend holds it.
fn with_spool<R>(
    file: &storerelay_config::SidecarConfig,
    action: impl FnOnce(&mut dyn Tools) -> Result<R, CommandError>,
) -> Result<R, CommandError> {
    match file.spool.postgres.as_ref().filter(|_| file.spool.backend == SpoolBackendKind::Postgres) {
        Some(settings) => action(&mut Shared::connect(settings)?),
        None => {
            let path = &file.spool.path;
            action(&mut File { db: open_file(path)?, path })
        }
    }
}

/// The SQLite spool at `path`, beside a running sidecar or not; an error when there is none.
fn open_file(path: &Path) -> Result<SpoolDb, CommandError> {
    if !path.exists() {
        return Err(CommandError::NoSpool(path.to_path_buf()));
    }
    Ok(SpoolDb::open(path, SyncMode::Full).map_err(|failure| SpoolError::new(path, failure))?)
}

fn spool_file(path: &Path, command: &SpoolCommand, json: bool, config_path: &Path) -> Result<String, CommandError> {
    if *command == SpoolCommand::DiscardSetAside {
        let deleted = SetAside::discard_all(path).map_err(|source| {
            SpoolError::new(path, Failure::Io { action: "cannot delete a set-aside copy", source })
        })?;
        let mut out = format!("{} set-aside files deleted\n", deleted.len());
        for file in deleted {
            let _ = writeln!(out, "deleted {}", file.display());
        }
        return Ok(out);
    }
    run(&mut File { db: open_file(path)?, path }, command, json, config_path)
}

/// What the spool commands ask of a spool, whichever backend holds it.
trait Tools {
    fn location(&self) -> String;
    fn stats(&mut self) -> Result<Vec<DestinationStats>, SpoolError>;
    fn notification_count(&mut self) -> Result<u64, SpoolError>;
    fn body_bytes(&mut self) -> Result<u64, SpoolError>;
    /// Bytes counted against `maxBytes`, and the damaged copies set aside among them.
    fn counted_bytes(&mut self) -> Result<(u64, SetAside), SpoolError>;
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, SpoolError>;
    fn redeliver(&mut self, destination: &str, dead_only: bool, since: i64, now: i64) -> Result<usize, SpoolError>;
    fn purge(&mut self, destination: Option<&str>, include_dead: bool, before: i64) -> Result<usize, SpoolError>;
    fn purge_unknown_destinations(&mut self, configured: &[String]) -> Result<usize, SpoolError>;
    /// Which of these duplicate keys the spool has seen since `since` (unix ms).
    fn seen(&mut self, keys: &[String], since: i64) -> Result<HashSet<String>, SpoolError>;
}

/// A SQLite spool file.
struct File<'a> {
    db: SpoolDb,
    path: &'a Path,
}

impl File<'_> {
    fn at(&self, failure: Failure) -> SpoolError {
        SpoolError::new(self.path, failure)
    }
}

impl Tools for File<'_> {
    fn location(&self) -> String {
        self.path.display().to_string()
    }
    fn stats(&mut self) -> Result<Vec<DestinationStats>, SpoolError> {
        self.db.stats().map_err(|f| self.at(f))
    }
    fn notification_count(&mut self) -> Result<u64, SpoolError> {
        self.db.notification_count().map_err(|f| self.at(f))
    }
    fn body_bytes(&mut self) -> Result<u64, SpoolError> {
        self.db.body_bytes().map_err(|f| self.at(f))
    }
    fn counted_bytes(&mut self) -> Result<(u64, SetAside), SpoolError> {
        let set_aside = SetAside::find(self.path)
            .map_err(|source| self.at(Failure::Io { action: "cannot list set-aside copies", source }))?;
        Ok((self.db.used_bytes().map_err(|f| self.at(f))? + set_aside.bytes, set_aside))
    }
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, SpoolError> {
        self.db.list(filter).map_err(|f| self.at(f))
    }
    fn redeliver(&mut self, destination: &str, dead_only: bool, since: i64, now: i64) -> Result<usize, SpoolError> {
        self.db.redeliver(destination, dead_only, since, now).map_err(|f| self.at(f))
    }
    fn purge(&mut self, destination: Option<&str>, include_dead: bool, before: i64) -> Result<usize, SpoolError> {
        self.db.purge(destination, include_dead, before).map_err(|f| self.at(f))
    }
    fn purge_unknown_destinations(&mut self, configured: &[String]) -> Result<usize, SpoolError> {
        self.db.purge_unknown_destinations(configured).map_err(|f| self.at(f))
    }
    fn seen(&mut self, keys: &[String], since: i64) -> Result<HashSet<String>, SpoolError> {
        let mut seen = HashSet::new();
        for key in keys {
            if self.db.seen(key, since).map_err(|f| self.at(f))? {
                seen.insert(key.clone());
            }
        }
        Ok(seen)
    }
}

/// A queue of the shared PostgreSQL spool.
struct Shared {
    tools: PostgresTools,
    runtime: tokio::runtime::Runtime,
}

impl Shared {
    fn connect(settings: &storerelay_config::PostgresSpool) -> Result<Shared, SpoolError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| SpoolError::at("postgres", Failure::Io { action: "cannot start a runtime", source }))?;
        let tools = runtime.block_on(PostgresTools::connect(settings))?;
        Ok(Shared { tools, runtime })
    }
}

impl Tools for Shared {
    fn location(&self) -> String {
        self.tools.location.clone()
    }
    fn stats(&mut self) -> Result<Vec<DestinationStats>, SpoolError> {
        self.runtime.block_on(self.tools.stats())
    }
    fn notification_count(&mut self) -> Result<u64, SpoolError> {
        self.runtime.block_on(self.tools.notification_count())
    }
    fn body_bytes(&mut self) -> Result<u64, SpoolError> {
        self.runtime.block_on(self.tools.body_bytes())
    }
    fn counted_bytes(&mut self) -> Result<(u64, SetAside), SpoolError> {
        Ok((self.body_bytes()?, SetAside::default()))
    }
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, SpoolError> {
        self.runtime.block_on(self.tools.list(filter))
    }
    fn redeliver(&mut self, destination: &str, dead_only: bool, since: i64, now: i64) -> Result<usize, SpoolError> {
        self.runtime.block_on(self.tools.redeliver(destination, dead_only, since, now))
    }
    fn purge(&mut self, destination: Option<&str>, include_dead: bool, before: i64) -> Result<usize, SpoolError> {
        self.runtime.block_on(self.tools.purge(destination, include_dead, before))
    }
    fn purge_unknown_destinations(&mut self, configured: &[String]) -> Result<usize, SpoolError> {
        self.runtime.block_on(self.tools.purge_unknown_destinations(configured))
    }
    fn seen(&mut self, keys: &[String], since: i64) -> Result<HashSet<String>, SpoolError> {
        self.runtime.block_on(self.tools.seen(keys, since))
    }
}

fn run(spool: &mut impl Tools, command: &SpoolCommand, json: bool, config_path: &Path) -> Result<String, CommandError> {
    let now = now_ms();
    let mut out = String::new();
    match command {
        SpoolCommand::Stats => {
            let stats = spool.stats()?;
            let notifications = spool.notification_count()?;
            let bytes = spool.body_bytes()?;
            let (used, set_aside) = spool.counted_bytes()?;
            if json {
                let value = serde_json::json!({
                    "notifications": notifications,
                    "bytes": bytes,
                    "usedBytes": used,
                    "setAsideBytes": set_aside.bytes,
                    "destinations": stats,
                });
                return Ok(format!("{value}\n"));
            }
            let _ = writeln!(
                out,
                "spool {}: {notifications} notifications, {bytes} bytes of bodies, {used} bytes counted against maxBytes",
                spool.location()
            );
            for file in &set_aside.files {
                let _ = writeln!(out, "set aside (damaged, counted): {}", file.display());
            }
            let _ = writeln!(
                out,
                "{:<24} {:>9} {:>10} {:>6}  OLDEST PENDING",
                "DESTINATION", "PENDING", "DELIVERED", "DEAD"
            );
            for s in stats {
                let oldest = s
                    .oldest_pending_received_at
                    .map_or("-".to_string(), |t| format!("{} ({}s ago)", format_ms(t), (now - t).max(0) / 1000));
                let _ =
                    writeln!(out, "{:<24} {:>9} {:>10} {:>6}  {oldest}", s.destination, s.pending, s.delivered, s.dead);
            }
        }
        SpoolCommand::List { destination, state, limit } => {
            let filter = ListFilter { destination: destination.clone(), state: *state, limit: *limit };
            let rows = spool.list(&filter)?;
            if json {
                for row in rows {
                    let _ = writeln!(out, "{}", serde_json::to_string(&row)?);
                }
                return Ok(out);
            }
            let _ = writeln!(
                out,
                "{:>8} {:<20} {:<9} {:>8} {:>7}  {:<24} {:<24} LAST",
                "ID", "DESTINATION", "STATE", "ATTEMPTS", "BYTES", "RECEIVED", "NEXT/FINISHED"
            );
            for row in rows {
                let when = format_ms(row.finished_at.unwrap_or(row.next_attempt_at));
                let _ = writeln!(
                    out,
                    "{:>8} {:<20} {:<9} {:>8} {:>7}  {:<24} {:<24} {}",
                    row.notification_id,
                    row.destination,
                    row.state,
                    row.attempts,
                    row.bytes,
                    format_ms(row.received_at),
                    when,
                    row.last_error.unwrap_or_default()
                );
            }
        }
        SpoolCommand::Dead { destination, limit } => {
            let list = SpoolCommand::List {
                destination: destination.clone(),
                state: Some(DeliveryState::Dead),
                limit: *limit,
            };
            return run(spool, &list, json, config_path);
        }
        SpoolCommand::Redeliver { destination, force, dead_only, since } => {
            let since = since.as_deref().map(|t| parse_time_arg(t, now)).transpose()?.unwrap_or(0);
            if !force {
                let configured = configured_destinations(config_path)?;
                if !configured.contains(destination) {
                    return Err(CommandError::UnknownDestination {
                        destination: destination.clone(),
                        file: config_path.to_path_buf(),
                        configured,
                    });
                }
            }
            let changed = spool.redeliver(destination, *dead_only, since, now)?;
            let _ = writeln!(out, "{changed} deliveries to {destination} scheduled now");
        }
        SpoolCommand::DiscardSetAside => unreachable!("handled before the spool is opened"),
        SpoolCommand::Purge { unknown_destinations: true, .. } => {
            let configured = configured_destinations(config_path)?;
            let purged = spool.purge_unknown_destinations(&configured)?;
            let _ = writeln!(
                out,
                "{purged} deliveries to destinations not in {} purged, pending ones included",
                config_path.display()
            );
        }
        SpoolCommand::Purge { destination, include_dead, before, .. } => {
            let before = before.as_deref().map(|t| parse_time_arg(t, now)).transpose()?.unwrap_or(now);
            let purged = spool.purge(destination.as_deref(), *include_dead, before)?;
            let what = if *include_dead { "delivered and dead" } else { "delivered" };
            let _ = writeln!(out, "{purged} {what} deliveries purged; pending deliveries are never purged");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Outcome;

    #[test]
    fn stats_list_redeliver_purge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, "destinations: [{name: rc, url: \"http://127.0.0.1:9/\"}]\n").unwrap();
        let run = |command: &SpoolCommand, json: bool| spool(Some(&path), command, json, &config);
        assert!(run(&SpoolCommand::Stats, false).unwrap_err().to_string().contains("no spool at"));
        {
            let (db, _) = SpoolDb::open_checked(&path, SyncMode::Full).unwrap();
            let a = db.insert(now_ms(), "/apple", b"{\"password\":\"SECRET\"}", &["rc".into()]).unwrap();
            db.insert(now_ms(), "/apple", b"{}", &["rc".into()]).unwrap();
            db.record("rc", a, now_ms(), &Outcome::Dead { status: Some(400), error: "HTTP 400 is not retried".into() })
                .unwrap();
        }
        let stats = run(&SpoolCommand::Stats, false).unwrap();
        assert!(stats.contains("2 notifications"), "{stats}");
        assert!(
            stats
                .lines()
                .any(|l| l.starts_with("rc")
                    && l.split_whitespace().take(4).collect::<Vec<_>>() == ["rc", "1", "0", "1"]),
            "{stats}"
        );
        let dead = run(&SpoolCommand::Dead { destination: None, limit: 10 }, false).unwrap();
        assert_eq!(dead.lines().count(), 2, "{dead}");
        assert!(dead.contains("HTTP 400") && dead.contains(" dead ") && !dead.contains("SECRET"), "{dead}");
        let pending = SpoolCommand::List { destination: None, state: Some(DeliveryState::Pending), limit: 10 };
        assert_eq!(run(&pending, true).unwrap().lines().count(), 1);
        let redeliver = SpoolCommand::Redeliver {
            destination: "rc".into(),
            force: false,
            dead_only: true,
            since: Some("1h".into()),
        };
        assert!(run(&redeliver, false).unwrap().starts_with("1 deliveries"));
        let json = run(&SpoolCommand::Stats, true).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["destinations"][0]["pending"], 2);
        let bad_time = SpoolCommand::Redeliver {
            destination: "rc".into(),
            force: false,
            dead_only: false,
            since: Some("soon".into()),
        };
        assert!(matches!(run(&bad_time, false), Err(CommandError::TimeArg(_))));
        assert!(
            run(
                &SpoolCommand::Purge {
                    destination: None,
                    include_dead: true,
                    before: None,
                    unknown_destinations: false
                },
                false
            )
            .unwrap()
            .starts_with("0 ")
        );
    }

    #[test]
    fn redeliver_refuses_a_destination_the_config_lacks_and_purge_removes_their_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let config = dir.path().join("config.yaml");
        let text = format!(
            "spool: {{path: {}}}\ndestinations: [{{name: rc, url: \"http://127.0.0.1:9/\"}}]\n",
            path.display()
        );
        std::fs::write(&config, text).unwrap();
        {
            let (db, _) = SpoolDb::open_checked(&path, SyncMode::Full).unwrap();
            db.insert(now_ms(), "/apple", b"{}", &["rc".into(), "removed".into()]).unwrap();
            db.insert(now_ms(), "/apple", b"{\"n\":2}", &["removed".into()]).unwrap();
        }
        let redeliver = |destination: &str, force: bool| SpoolCommand::Redeliver {
            destination: destination.into(),
            force,
            dead_only: false,
            since: None,
        };
        let refused = spool(Some(&path), &redeliver("rc-typo", false), false, &config).unwrap_err();
        assert!(matches!(refused, CommandError::UnknownDestination { .. }));
        let message = refused.to_string();
        assert!(message.contains("`rc-typo`") && message.contains("config.yaml") && message.contains("it has: rc"));
        assert!(message.contains("--force"), "{message}");
        let missing_config = spool(Some(&path), &redeliver("rc", false), false, &dir.path().join("nope.yaml"));
        assert!(matches!(missing_config, Err(CommandError::Config(_))), "a name cannot be checked without the config");
        let forced = spool(Some(&path), &redeliver("rc-typo", true), false, &config).unwrap();
        assert!(forced.starts_with("2 deliveries to rc-typo"), "{forced}");

        let purge =
            SpoolCommand::Purge { destination: None, include_dead: false, before: None, unknown_destinations: true };
        let purged = spool(Some(&path), &purge, false, &config).unwrap();
        assert!(purged.starts_with("4 deliveries to destinations not in"), "{purged}");
        let db = SpoolDb::open(&path, SyncMode::Full).unwrap();
        let left: Vec<_> = db.stats().unwrap().into_iter().map(|s| (s.destination, s.pending)).collect();
        assert_eq!(left, [("rc".to_string(), 1)]);
        assert_eq!(db.notification_count().unwrap(), 1, "the notification only `removed` needed is gone");
        // Without --spool the config file says where the spool is.
        let stats = spool(None, &SpoolCommand::Stats, false, &config);
        assert!(stats.unwrap().contains("1 notifications"));
    }
}
