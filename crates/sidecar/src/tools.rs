//! `storerelay-sidecar spool …`: look at and repair a spool, beside a running sidecar or not.
//!
//! They open the same SQLite file; WAL lets them read while the sidecar writes, and SQLite's lock makes
//! their few writes wait their turn. Bodies are never printed: V1 bodies carry the app's shared secret.

use std::fmt::Write;
use std::path::Path;

use storerelay_config::SyncMode;

use crate::clock::{format_ms, now_ms, parse_time_arg};
use crate::spool::{ListFilter, SpoolDb};

#[derive(Debug, Clone, PartialEq)]
pub enum SpoolCommand {
    Stats,
    List { destination: Option<String>, state: Option<String>, limit: u32 },
    Redeliver { destination: String, dead_only: bool, since: Option<String> },
    Purge { destination: Option<String>, include_dead: bool, before: Option<String> },
}

/// Runs one command and returns what to print.
pub fn run(path: &Path, command: &SpoolCommand, json: bool) -> Result<String, String> {
    if !path.exists() {
        return Err(format!("no spool at {}", path.display()));
    }
    let db = SpoolDb::open(path, SyncMode::Full).map_err(|e| e.to_string())?;
    let now = now_ms();
    let mut out = String::new();
    match command {
        SpoolCommand::Stats => {
            let stats = db.stats().map_err(|e| e.to_string())?;
            let notifications = db.notification_count().map_err(|e| e.to_string())?;
            let bytes = db.stored_bytes().map_err(|e| e.to_string())?;
            if json {
                let value = serde_json::json!({"notifications": notifications, "bytes": bytes, "destinations": stats});
                return Ok(format!("{value}\n"));
            }
            let _ = writeln!(out, "spool {}: {notifications} notifications, {bytes} bytes", path.display());
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
            if let Some(state) = state.as_deref().filter(|s| !matches!(*s, "pending" | "delivered" | "dead")) {
                return Err(format!("unknown state `{state}`: use pending, delivered or dead"));
            }
            let filter = ListFilter { destination: destination.clone(), state: state.clone(), limit: *limit };
            let rows = db.list(&filter).map_err(|e| e.to_string())?;
            if json {
                for row in rows {
                    let _ = writeln!(out, "{}", serde_json::to_string(&row).map_err(|e| e.to_string())?);
                }
                return Ok(out);
            }
            let _ = writeln!(
                out,
                "{:>8} {:<20} {:<9} {:>8} {:>7}  {:<24} {:<24} LAST",
                "ID", "DESTINATION", "STATE", "ATTEMPTS", "BYTES", "RECEIVED", "NEXT/FINISHED"
            );
            for row in rows {
                let when = match row.finished_at {
                    Some(t) => format_ms(t),
                    None => format_ms(row.next_attempt_at),
                };
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
        SpoolCommand::Redeliver { destination, dead_only, since } => {
            let since = since.as_deref().map(|t| parse_time_arg(t, now)).transpose()?.unwrap_or(0);
            let changed = db.redeliver(destination, *dead_only, since, now).map_err(|e| e.to_string())?;
            let _ = writeln!(out, "{changed} deliveries to {destination} scheduled now");
        }
        SpoolCommand::Purge { destination, include_dead, before } => {
            let before = before.as_deref().map(|t| parse_time_arg(t, now)).transpose()?.unwrap_or(now);
            let purged = db.purge(destination.as_deref(), *include_dead, before).map_err(|e| e.to_string())?;
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
        assert!(run(&path, &SpoolCommand::Stats, false).unwrap_err().contains("no spool at"));
        {
            let (db, _) = SpoolDb::open_checked(&path, SyncMode::Full).unwrap();
            let a = db.insert(now_ms(), "/apple", b"{\"password\":\"SECRET\"}", &["rc".into()]).unwrap();
            db.insert(now_ms(), "/apple", b"{}", &["rc".into()]).unwrap();
            db.record("rc", a, now_ms(), &Outcome::Dead { status: Some(400), error: "HTTP 400 is not retried".into() })
                .unwrap();
        }
        let stats = run(&path, &SpoolCommand::Stats, false).unwrap();
        assert!(stats.contains("2 notifications"), "{stats}");
        assert!(
            stats
                .lines()
                .any(|l| l.starts_with("rc")
                    && l.split_whitespace().take(4).collect::<Vec<_>>() == ["rc", "1", "0", "1"]),
            "{stats}"
        );
        let dead = run(&path, &SpoolCommand::List { destination: None, state: Some("dead".into()), limit: 10 }, false)
            .unwrap();
        assert_eq!(dead.lines().count(), 2, "{dead}");
        assert!(dead.contains("HTTP 400") && !dead.contains("SECRET"), "{dead}");
        let redeliver = SpoolCommand::Redeliver { destination: "rc".into(), dead_only: true, since: Some("1h".into()) };
        assert!(run(&path, &redeliver, false).unwrap().starts_with("1 deliveries"));
        let json = run(&path, &SpoolCommand::Stats, true).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["destinations"][0]["pending"], 2);
        assert!(
            run(&path, &SpoolCommand::List { destination: None, state: Some("lost".into()), limit: 1 }, false).is_err()
        );
        assert!(
            run(&path, &SpoolCommand::Purge { destination: None, include_dead: true, before: None }, false)
                .unwrap()
                .starts_with("0 ")
        );
    }
}
