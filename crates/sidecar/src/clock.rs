//! Wall-clock time as the spool stores it: unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 in UTC with milliseconds, for people reading tool output and logs.
pub fn format_ms(ms: i64) -> String {
    let time = UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Parses `--since`/`--before` arguments: an RFC 3339 time, or a duration ago such as `2h`.
pub fn parse_time_arg(text: &str, now: i64) -> Result<i64, TimeArgError> {
    if let Ok(ago) = text.parse::<storerelay_config::Duration>() {
        return Ok(now - ago.get().as_millis() as i64);
    }
    humantime::parse_rfc3339_weak(text)
        .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64))
        .map_err(|_| TimeArgError(text.to_string()))
}

/// A `--since`/`--before` argument that is neither a time nor a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither a time like 2026-11-27T10:00:00Z nor a duration ago like 2h")]
pub struct TimeArgError(pub String);
