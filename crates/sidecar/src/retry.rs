//! When a delivery attempt's result means delivered, try again, or give up — and when to try again.
//!
//! Pure functions of the attempt's result, the policy and the clock, so every rule is unit-tested
//! without a socket.

use std::time::{Duration, SystemTime};

use storerelay_config::RetryPolicy;

use crate::spool::Outcome;

/// What one POST to a destination came to.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    Response {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within the destination's `timeout`.
    Timeout,
    /// Could not connect, or the connection broke: a short description without the URL.
    Failed(String),
}

impl AttemptResult {
    /// The label used for metrics and logs.
    pub fn describe(&self) -> String {
        match self {
            AttemptResult::Response { status, .. } => format!("HTTP {status}"),
            AttemptResult::Timeout => "timeout".to_string(),
            AttemptResult::Failed(kind) => kind.clone(),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            AttemptResult::Response { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Whether a status is worth another try. 2xx is success; 5xx and the "try later" 4xx codes are
/// transient; redirects and every other 4xx say the request itself is wrong, so retrying would only
/// repeat the failure.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

/// Decides the spool outcome of an attempt. `attempts_before` counts earlier attempts; `jitter` is a
/// uniform random number in [0, 1).
pub fn decide(
    result: &AttemptResult,
    policy: &RetryPolicy,
    attempts_before: u32,
    received_at_ms: i64,
    now_ms: i64,
    jitter: f64,
) -> Outcome {
    let status = result.status();
    let retry_after = match result {
        AttemptResult::Response { status: 200..=299, .. } => {
            return Outcome::Delivered { status: status.unwrap_or(200) };
        }
        AttemptResult::Response { status, retry_after } if is_retryable_status(*status) => *retry_after,
        AttemptResult::Response { .. } => {
            return Outcome::Dead { status, error: format!("{} is not retried", result.describe()) };
        }
        AttemptResult::Timeout | AttemptResult::Failed(_) => None,
    };
    let delay = backoff(policy, attempts_before + 1, retry_after, jitter);
    let next_attempt_at = now_ms.saturating_add(delay.as_millis() as i64);
    let expires_at = received_at_ms.saturating_add(policy.max_age.get().as_millis() as i64);
    if next_attempt_at > expires_at {
        return Outcome::Dead {
            status,
            error: format!(
                "{}; gave up after {} attempts (maxAge {})",
                result.describe(),
                attempts_before + 1,
                policy.max_age
            ),
        };
    }
    Outcome::Retry { next_attempt_at, status, error: result.describe() }
}

/// The wait before attempt number `attempts + 1`: exponential from `initialBackoff`, capped at
/// `maxBackoff`, with full jitter above `initialBackoff` so a recovering destination is not hit by
/// every sidecar at once. A `Retry-After` from the destination wins, between `initialBackoff` (so `0`
/// or a past date is no tight loop) and `maxBackoff`.
pub fn backoff(policy: &RetryPolicy, attempts: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let initial = policy.initial_backoff.get();
    let max = policy.max_backoff.get();
    if let Some(asked) = retry_after {
        return asked.max(initial).min(max);
    }
    let doublings = attempts.saturating_sub(1).min(32);
    let ceiling = initial.saturating_mul(1u32 << doublings.min(31)).min(max);
    let spread = ceiling.saturating_sub(initial);
    initial + spread.mul_f64(jitter.clamp(0.0, 1.0))
}

/// Parses a `Retry-After` value: delay seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use storerelay_config::Duration as ConfigDuration;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: ConfigDuration::from_secs(1),
            max_backoff: ConfigDuration::from_secs(600),
            max_age: ConfigDuration::from_secs(3600),
        }
    }

    fn response(status: u16) -> AttemptResult {
        AttemptResult::Response { status, retry_after: None }
    }

    #[test]
    fn success_and_permanent_failures() {
        assert_eq!(decide(&response(200), &policy(), 0, 0, 0, 0.5), Outcome::Delivered { status: 200 });
        assert_eq!(decide(&response(204), &policy(), 3, 0, 0, 0.5), Outcome::Delivered { status: 204 });
        for status in [301, 302, 400, 401, 403, 404, 410, 422] {
            assert!(
                matches!(decide(&response(status), &policy(), 0, 0, 0, 0.5), Outcome::Dead { status: Some(s), .. } if s == status),
                "{status}"
            );
        }
    }

    #[test]
    fn transient_failures_are_retried() {
        for result in [
            response(500),
            response(503),
            response(408),
            response(425),
            response(429),
            AttemptResult::Timeout,
            AttemptResult::Failed("connect error".into()),
        ] {
            match decide(&result, &policy(), 0, 0, 10_000, 0.0) {
                Outcome::Retry { next_attempt_at, .. } => assert_eq!(next_attempt_at, 11_000, "{result:?}"),
                other => panic!("{result:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn backoff_doubles_with_full_jitter_and_caps() {
        let p = policy();
        assert_eq!(backoff(&p, 1, None, 0.99), Duration::from_secs(1));
        assert_eq!(backoff(&p, 2, None, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(&p, 2, None, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&p, 4, None, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(&p, 4, None, 0.5), Duration::from_millis(4_500));
        assert_eq!(backoff(&p, 30, None, 1.0), Duration::from_secs(600));
        assert_eq!(backoff(&p, u32::MAX, None, 1.0), Duration::from_secs(600));
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let p = policy();
        assert_eq!(backoff(&p, 1, Some(Duration::from_secs(7)), 0.0), Duration::from_secs(7));
        assert_eq!(backoff(&p, 1, Some(Duration::from_secs(86_400)), 0.0), Duration::from_secs(600));
        let result = AttemptResult::Response { status: 429, retry_after: Some(Duration::from_secs(3)) };
        assert!(matches!(
            decide(&result, &p, 0, 0, 0, 0.0),
            Outcome::Retry { next_attempt_at: 3_000, status: Some(429), .. }
        ));
    }

    #[test]
    fn retry_after_zero_or_in_the_past_waits_at_least_initial_backoff() {
        // A destination answering `Retry-After: 0` (or a date already past) on every attempt must not
        // be hammered in a tight loop.
        let p = policy();
        assert_eq!(backoff(&p, 1, Some(Duration::ZERO), 0.0), Duration::from_secs(1));
        assert_eq!(backoff(&p, 3, Some(Duration::from_millis(10)), 0.0), Duration::from_secs(1));
        let result = AttemptResult::Response { status: 503, retry_after: Some(Duration::ZERO) };
        assert!(matches!(decide(&result, &p, 0, 0, 5_000, 0.0), Outcome::Retry { next_attempt_at: 6_000, .. }));
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(30)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn past_max_age_the_delivery_is_dead() {
        let p = policy();
        // Received at 0, maxAge 1h: a retry that would land after 1h is not scheduled.
        assert!(matches!(decide(&response(503), &p, 5, 0, 3_599_500, 0.0), Outcome::Dead { status: Some(503), .. }));
        assert!(matches!(decide(&response(503), &p, 0, 0, 3_598_000, 0.0), Outcome::Retry { .. }));
    }
}
