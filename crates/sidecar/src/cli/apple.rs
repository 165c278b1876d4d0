//! `apple ...`: Apple's side of the story, from the App Store Server API ([`crate::apple_api`]).
//! `history` lists what Apple sent (or tried to) in a window, with Apple's send attempts, whether each
//! notification passes verification, and whether this spool has it. Neither the key nor a token is
//! ever printed.

use std::collections::HashSet;
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use storerelay_config::{SidecarConfig, SpoolBackendKind, VerifyMode};

use super::{CommandError, open_file, with_spool};
use crate::apple_api::{AppleApi, HistoryItem};
use crate::clock::{format_ms, now_ms, parse_time_arg};
use crate::config;
use crate::gap_fill;
use crate::metrics::Metrics;
use crate::self_test;
use crate::spool::{PostgresTools, SpoolDb};
use crate::verify::Verifier;

#[derive(Debug, Clone, PartialEq, clap::Subcommand)]
pub enum AppleCommand {
    /// Apple's notification history: per notification its UUID, type, signed date, Apple's send
    /// attempts, and whether the spool has it.
    History {
        /// Start of the window: a duration ago (72h) or an RFC 3339 time; at most 180 days back (30 in
        /// the sandbox), as far as Apple keeps history.
        #[arg(long)]
        since: String,
        /// Only notifications Apple failed to send (it may still be retrying them).
        #[arg(long)]
        only_failures: bool,
    },
    /// Replay every notification of Apple's history in the window that the spool does not have,
    /// through the running sidecar's own listener: verification, the spool, the app (with the header
    /// `x-storerelay-replay: history`), every destination.
    Replay {
        /// Start of the window, as for `history`.
        #[arg(long)]
        since: String,
        /// Only notifications Apple failed to send.
        #[arg(long)]
        only_failures: bool,
        /// List what would be replayed; replay nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask Apple to send a test notification and follow it: Apple's send attempt, the spool, each
    /// destination. Exits 0 only if every hop succeeded. Run it where the spool is (in the pod).
    Test {
        /// How long to wait for all hops.
        #[arg(long, default_value = "2m")]
        timeout: storerelay_config::Duration,
    },
}

/// Runs one `apple` command with the config file's `appStoreServerApi` and returns what to print.
pub fn apple(command: &AppleCommand, json: bool, config_path: &Path) -> Result<String, CommandError> {
    let file = storerelay_config::load(config_path)?;
    let settings = file
        .app_store_server_api
        .as_ref()
        .ok_or_else(|| CommandError::NoAppleApi { file: config_path.to_path_buf() })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CommandError::Runtime(e.to_string()))?;
    let metrics = Metrics::default();
    let (since, only_failures) = match command {
        AppleCommand::History { since, only_failures } | AppleCommand::Replay { since, only_failures, .. } => {
            (since, *only_failures)
        }
        AppleCommand::Test { timeout } => return test(&file, settings, &runtime, timeout.get(), &metrics),
    };
    let now = now_ms();
    let since_ms = parse_time_arg(since, now)?;
    let retention = settings.environment.history_retention();
    if now - since_ms > retention.as_millis() as i64 {
        return Err(CommandError::Window(format!(
            "--since {since} is before the {} days of history Apple keeps in {}",
            retention.as_secs() / 86_400,
            settings.environment
        )));
    }
    let api = AppleApi::new(settings, &metrics)?;
    let items = runtime.block_on(api.history(at(since_ms), at(now), only_failures))?;
    let in_spool = spool_has(&file, &items)?;
    match command {
        AppleCommand::History { .. } => {
            let runtime_config = config::resolve(file.clone(), None, &metrics);
            let rows: Vec<Row> =
                items.iter().map(|item| Row::of(item, &runtime_config.verifier, in_spool.as_ref())).collect();
            Ok(if json { history_json(&rows, since_ms, now)? } else { history_table(&rows, &api, since_ms, now) })
        }
        AppleCommand::Test { .. } => unreachable!("answered above"),
        AppleCommand::Replay { dry_run, .. } => {
            let seen = in_spool.ok_or_else(|| {
                CommandError::Window(format!(
                    "replay needs to know what the spool has: run it where the sidecar's spool is ({}), with dedupe.window above 0s",
                    file.spool.path.display()
                ))
            })?;
            let missing = gap_fill::missing(&items, &seen);
            let mut out = format!(
                "{} of {} notifications in Apple's history ({} to {}) are not in the spool\n",
                missing.len(),
                items.len(),
                format_ms(since_ms),
                format_ms(now)
            );
            if *dry_run {
                for item in &missing {
                    let _ = writeln!(out, "{}  would be replayed", describe(item));
                }
                return Ok(out);
            }
            let replayer = gap_fill::Replayer::new(file.listen, &file).map_err(CommandError::Runtime)?;
            let mut failed = 0;
            for item in &missing {
                let outcome = runtime.block_on(replayer.replay(item));
                failed += usize::from(!outcome.stored());
                let _ = writeln!(out, "{}  {outcome}", describe(item));
            }
            if failed > 0 {
                return Err(CommandError::Replay { failed, total: missing.len(), printed: out });
            }
            let _ = writeln!(out, "{} replayed", missing.len());
            Ok(out)
        }
    }
}

/// `apple test`: the self test, once, against the spool the config names.
fn test(
    file: &SidecarConfig,
    settings: &storerelay_config::AppStoreServerApi,
    runtime: &tokio::runtime::Runtime,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<String, CommandError> {
    let api = AppleApi::new(settings, metrics)?;
    let routing = config::resolve(file.clone(), None, metrics);
    let destinations = |notification: &crate::apple::Notification| routing.destinations_for(notification);
    // With dedupe off nothing is found by key: every hop after Apple's reports not stored.
    let since = file.dedupe_since(now_ms()).unwrap_or(i64::MAX);
    let report = runtime.block_on(async {
        let lookup = match file.spool.postgres.as_ref().filter(|_| file.spool.backend == SpoolBackendKind::Postgres) {
            Some(postgres) => SpoolLookup::Shared(PostgresTools::connect(postgres).await?, since),
            None => SpoolLookup::File(std::sync::Mutex::new(open_file(&file.spool.path)?), since),
        };
        Ok::<_, CommandError>(self_test::run(&api, &lookup, destinations, timeout).await)
    })?;
    let out = report.lines();
    if report.passed() { Ok(out) } else { Err(CommandError::SelfTest(out)) }
}

/// The spool as the self test asks it from the command line.
enum SpoolLookup {
    File(std::sync::Mutex<SpoolDb>, i64),
    Shared(PostgresTools, i64),
}

impl self_test::Lookup for SpoolLookup {
    async fn deliveries_of(&self, key: &str) -> Result<Option<Vec<crate::spool::DeliveryStatus>>, String> {
        match self {
            SpoolLookup::File(db, since) => {
                let db = db.lock().map_err(|_| "the spool connection is poisoned".to_string())?;
                db.deliveries_of_key(key, *since).map_err(|e| e.to_string())
            }
            SpoolLookup::Shared(tools, since) => tools.deliveries_of_key(key, *since).await.map_err(|e| e.to_string()),
        }
    }
}

/// A notification in one line: UUID, type and signed date.
fn describe(item: &HistoryItem) -> String {
    let n = &item.notification;
    format!(
        "{}  {}  {}",
        n.uuid.as_deref().unwrap_or("-"),
        n.notification_type.as_deref().unwrap_or("-"),
        n.signed_date.map_or("-".to_string(), format_ms)
    )
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Which notifications the spool remembers (by their duplicate keys, within `dedupe.window`), or
/// `None` when it cannot tell: duplicate keys are not kept (`dedupe.window: 0s`), or there is no
/// SQLite file here (the command runs outside the sidecar's container).
fn spool_has(file: &SidecarConfig, items: &[HistoryItem]) -> Result<Option<HashSet<String>>, CommandError> {
    let Some(since) = file.dedupe_since(now_ms()) else { return Ok(None) };
    let keys = gap_fill::keys(items);
    match with_spool(file, |spool| Ok(spool.seen(&keys, since)?)) {
        Ok(seen) => Ok(Some(seen)),
        Err(CommandError::NoSpool(_)) => Ok(None),
        Err(error) => Err(error),
    }
}

/// One notification of the history as printed.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Row<'a> {
    notification_uuid: Option<&'a str>,
    notification_type: Option<&'a str>,
    subtype: Option<&'a str>,
    signed_date: Option<i64>,
    send_attempts: &'a [crate::apple_api::SendAttempt],
    /// `passes`, `fails: <reason>`, or `not checked` (`verify.mode: off`).
    verification: String,
    /// `None`: the spool cannot tell.
    in_spool: Option<bool>,
}

impl<'a> Row<'a> {
    fn of(item: &'a HistoryItem, verifier: &Verifier, in_spool: Option<&HashSet<String>>) -> Row<'a> {
        let notification = &item.notification;
        let verification = match (verifier.mode, verifier.check(notification, &item.body)) {
            (VerifyMode::Off, _) => "not checked".to_string(),
            (_, Ok(())) => "passes".to_string(),
            (_, Err(reason)) => format!("fails: {}", reason.as_str()),
        };
        Row {
            notification_uuid: notification.uuid.as_deref(),
            notification_type: notification.notification_type.as_deref(),
            subtype: notification.subtype.as_deref(),
            signed_date: notification.signed_date,
            send_attempts: &item.attempts,
            verification,
            in_spool: in_spool.map(|seen| seen.contains(&notification.dedupe_key)),
        }
    }
}

fn history_json(rows: &[Row<'_>], since: i64, until: i64) -> Result<String, CommandError> {
    let value = serde_json::json!({
        "since": format_ms(since),
        "until": format_ms(until),
        "notifications": rows,
    });
    Ok(format!("{}\n", serde_json::to_string(&value)?))
}

fn history_table(rows: &[Row<'_>], api: &AppleApi, since: i64, until: i64) -> String {
    let missing = rows.iter().filter(|r| r.in_spool == Some(false)).count();
    let spool_note = if rows.iter().any(|r| r.in_spool.is_none()) {
        "the spool cannot tell which it has (no spool file here, or dedupe.window: 0s)".to_string()
    } else {
        format!("{missing} not in the spool")
    };
    let mut out = format!(
        "Apple's notification history ({}, {} to {}): {} notifications; {spool_note}\n",
        api.environment(),
        format_ms(since),
        format_ms(until),
        rows.len()
    );
    let _ = writeln!(
        out,
        "{:<36}  {:<40}  {:<24}  {:<9}  {:<14}  APPLE'S ATTEMPTS",
        "NOTIFICATION UUID", "TYPE", "SIGNED", "SPOOL", "VERIFICATION"
    );
    for row in rows {
        let kind = match (row.notification_type, row.subtype) {
            (Some(t), Some(s)) => format!("{t}/{s}"),
            (Some(t), None) => t.to_string(),
            _ => "-".to_string(),
        };
        let attempts = row.send_attempts.iter().map(|a| a.send_attempt_result.as_str()).collect::<Vec<_>>().join(", ");
        let spool = match row.in_spool {
            Some(true) => "has it",
            Some(false) => "MISSING",
            None => "unknown",
        };
        let _ = writeln!(
            out,
            "{:<36}  {kind:<40}  {:<24}  {spool:<9}  {:<14}  {}",
            row.notification_uuid.unwrap_or("-"),
            row.signed_date.map_or("-".to_string(), format_ms),
            row.verification,
            if attempts.is_empty() { "-".to_string() } else { attempts },
        );
    }
    out
}
