//! When `rollout.policy: RestartWorkloads` may restart a workload again.
//!
//! A restart that does not help (the webhook keeps failing, the image cannot be pulled) must not repeat
//! every few minutes forever: each further restart of the same workload waits twice as long as the
//! last, up to a ceiling, and a workload that no longer needs one starts afresh. Only a restart that
//! happened counts: a failed patch is tried again at the next reconcile. Pure, so it is tested without
//! a cluster.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The wait after a workload's first restart.
pub const FIRST_INTERVAL: Duration = Duration::from_secs(600);
/// The longest wait between two restarts of one workload.
pub const CEILING: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, Clone, Copy)]
struct Restarted {
    at: Instant,
    times: u32,
}

/// Restarts so far, by `namespace/Kind/name`.
#[derive(Debug, Default)]
pub struct RestartSchedule {
    by_workload: HashMap<String, Restarted>,
}

impl RestartSchedule {
    /// The wait after the `times`-th restart: 10 min, 20 min, 40 min, ... at most [`CEILING`].
    pub fn interval(times: u32) -> Duration {
        let doublings = times.saturating_sub(1).min(16);
        FIRST_INTERVAL.saturating_mul(1 << doublings).min(CEILING)
    }

    /// When `workload` may be restarted next; `None` if it may be now.
    pub fn not_before(&self, workload: &str) -> Option<Instant> {
        self.by_workload.get(workload).map(|r| r.at + Self::interval(r.times))
    }

    pub fn may_restart(&self, workload: &str, now: Instant) -> bool {
        self.not_before(workload).is_none_or(|at| now >= at)
    }

    /// Records a restart that happened; returns how many this workload has had in a row.
    pub fn restarted(&mut self, workload: &str, now: Instant) -> u32 {
        let entry = self.by_workload.entry(workload.to_string()).or_insert(Restarted { at: now, times: 0 });
        entry.at = now;
        entry.times += 1;
        entry.times
    }

    /// Forgets the workloads of `namespace` that no longer need a restart, so a later rollout that
    /// leaves pods behind starts again at [`FIRST_INTERVAL`].
    pub fn keep_only(&mut self, namespace: &str, still_needed: &BTreeSet<String>) {
        let prefix = format!("{namespace}/");
        self.by_workload.retain(|key, _| !key.starts_with(&prefix) || still_needed.contains(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn each_restart_waits_twice_as_long_up_to_the_ceiling() {
        let mut schedule = RestartSchedule::default();
        let t0 = Instant::now();
        let key = "shop/Deployment/payments";
        assert!(schedule.may_restart(key, t0), "the first restart is at once");
        assert_eq!(schedule.restarted(key, t0), 1);
        assert!(!schedule.may_restart(key, t0 + 9 * MIN));
        assert!(schedule.may_restart(key, t0 + 10 * MIN));
        let t1 = t0 + 10 * MIN;
        schedule.restarted(key, t1);
        assert!(!schedule.may_restart(key, t1 + 19 * MIN), "the second wait is 20 minutes");
        assert!(schedule.may_restart(key, t1 + 20 * MIN));
        assert_eq!(RestartSchedule::interval(3), 40 * MIN);
        assert_eq!(RestartSchedule::interval(10), CEILING);
        assert_eq!(RestartSchedule::interval(u32::MAX), CEILING);
        assert!(schedule.may_restart("shop/Deployment/other", t1), "workloads are scheduled apart");
    }

    #[test]
    fn a_workload_that_no_longer_needs_a_restart_starts_afresh() {
        let mut schedule = RestartSchedule::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            schedule.restarted("shop/Deployment/payments", t0);
        }
        schedule.restarted("other/Deployment/payments", t0);
        schedule.keep_only("shop", &BTreeSet::new());
        assert!(schedule.may_restart("shop/Deployment/payments", t0));
        assert!(!schedule.may_restart("other/Deployment/payments", t0), "another namespace's route is not touched");
        assert_eq!(schedule.restarted("shop/Deployment/payments", t0), 1);
    }
}
