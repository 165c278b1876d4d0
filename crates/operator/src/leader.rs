//! Leader election through a `coordination.k8s.io` Lease, so one replica writes while all serve the
//! webhook. The decision rule is pure ([`next`]); [`run`] applies it against the API with optimistic
//! concurrency (a replace with the Lease's resourceVersion), so two replicas never both win.
//!
//! As client-go does, a follower never compares the holder's `renewTime` with its own wall clock (two
//! nodes' clocks may disagree by minutes): it notes *when it saw the Lease change*, by its own
//! monotonic clock, and takes over only once the Lease has not changed for `leaseDurationSeconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

use crate::metrics::Metrics;

pub const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What to do with the Lease as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No Lease yet: create it, holding it.
    Create,
    /// Ours: renew.
    Renew,
    /// Someone else's and expired: take it over.
    Acquire,
    /// Someone else holds it.
    Follow,
}

/// The Lease as a follower last saw it change, and when by its own clock.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    at: Instant,
}

impl Observed {
    /// What was seen at `now`: unchanged since `before` keeps `before`'s time.
    pub fn of(spec: &LeaseSpec, before: Option<&Observed>, now: Instant) -> Observed {
        let (holder, renew_time) = (spec.holder_identity.clone(), spec.renew_time.as_ref().map(|t| t.0));
        match before {
            Some(seen) if seen.holder == holder && seen.renew_time == renew_time => seen.clone(),
            _ => Observed { holder, renew_time, at: now },
        }
    }
}

/// The step for a Lease as it stands, given when it was last seen to change (`observed`, made from
/// this same Lease with [`Observed::of`]).
pub fn next(lease: Option<&LeaseSpec>, identity: &str, observed: Option<&Observed>, now: Instant) -> Step {
    let Some(spec) = lease else { return Step::Create };
    if spec.holder_identity.as_deref() == Some(identity) {
        return Step::Renew;
    }
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    let expired =
        spec.holder_identity.is_none() || observed.is_none_or(|seen| now.saturating_duration_since(seen.at) > duration);
    if expired { Step::Acquire } else { Step::Follow }
}

fn held_by(identity: &str, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let keeps = previous.is_some_and(|p| p.holder_identity.as_deref() == Some(identity));
    LeaseSpec {
        holder_identity: Some(identity.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: if keeps { previous.and_then(|p| p.acquire_time.clone()) } else { Some(MicroTime(now)) },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            previous.and_then(|p| p.lease_transitions).unwrap_or(0) + if keeps || previous.is_none() { 0 } else { 1 },
        ),
        ..Default::default()
    }
}

/// Campaigns forever, publishing whether this replica leads.
pub async fn run(
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    leading: watch::Sender<bool>,
    metrics: Arc<Metrics>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    let mut observed: Option<Observed> = None;
    loop {
        let now = Timestamp::now();
        let outcome = async {
            let current = api.get_opt(&name).await?;
            let spec = current.as_ref().and_then(|l| l.spec.as_ref());
            let seen_now = Instant::now();
            observed = spec.map(|spec| Observed::of(spec, observed.as_ref(), seen_now));
            match next(spec, &identity, observed.as_ref(), seen_now) {
                Step::Follow => Ok::<bool, kube::Error>(false),
                Step::Create => {
                    let lease = Lease {
                        metadata: kube::core::ObjectMeta { name: Some(name.clone()), ..Default::default() },
                        spec: Some(held_by(&identity, None, now)),
                    };
                    api.create(&PostParams::default(), &lease).await?;
                    Ok(true)
                }
                step @ (Step::Renew | Step::Acquire) => {
                    let Some(mut lease) = current.clone() else { return Ok(false) };
                    lease.spec = Some(held_by(&identity, spec, now));
                    // resourceVersion travels with the object: a concurrent writer makes this fail.
                    api.replace(&name, &PostParams::default(), &lease).await?;
                    if step == Step::Acquire {
                        tracing::info!(identity, "acquired the leader lease");
                    }
                    Ok(true)
                }
            }
        }
        .await;
        let leads = match outcome {
            Ok(leads) => {
                if leads {
                    last_renewed = Some(tokio::time::Instant::now());
                }
                leads
            }
            Err(error) => {
                tracing::warn!(%error, "leader election");
                // Keep leading only while the last renewal is still valid.
                last_renewed.is_some_and(|at| at.elapsed() < LEASE_DURATION - RENEW_EVERY) && *leading.borrow()
            }
        };
        if leads != *leading.borrow() {
            tracing::info!(identity, leader = leads, "leadership changed");
        }
        metrics.set_leader(leads);
        leading.send_if_modified(|current| std::mem::replace(current, leads) != leads);
        tokio::time::sleep(RENEW_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use k8s_openapi::jiff::SignedDuration;

    fn lease(holder: Option<&str>, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }
    }

    /// What a follower decides on each look at `leases`, taken `every` apart.
    fn follow(leases: &[LeaseSpec], every: Duration) -> Vec<Step> {
        let start = Instant::now();
        let mut observed = None;
        leases
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let now = start + every * i as u32;
                observed = Some(Observed::of(spec, observed.as_ref(), now));
                next(Some(spec), "a", observed.as_ref(), now)
            })
            .collect()
    }

    #[test]
    fn creates_renews_and_counts_transitions() {
        let now = Timestamp::now();
        assert_eq!(next(None, "a", None, Instant::now()), Step::Create);
        assert_eq!(next(Some(&lease(Some("a"), now)), "a", None, Instant::now()), Step::Renew);
        assert_eq!(next(Some(&lease(None, now)), "a", None, Instant::now()), Step::Acquire, "released");
        let taken = held_by("a", Some(&lease(Some("b"), now)), now);
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(held_by("a", Some(&taken), now).lease_transitions, Some(1), "renewing is no transition");
    }

    #[test]
    fn a_holder_that_keeps_renewing_is_followed_whatever_its_clock_says() {
        // The holder's clock is an hour behind ours: by wall clocks its lease looks long expired.
        let skewed = Timestamp::now() - SignedDuration::from_secs(3600);
        let renewals: Vec<LeaseSpec> =
            (0..10).map(|i| lease(Some("b"), skewed + SignedDuration::from_secs(5 * i))).collect();
        assert!(follow(&renewals, Duration::from_secs(5)).iter().all(|s| *s == Step::Follow));
    }

    #[test]
    fn a_holder_that_stops_renewing_is_replaced_after_the_lease_duration_of_silence() {
        // Its clock is ahead of ours: by wall clocks its last renewal looks fresh for a long time.
        let ahead = Timestamp::now() + SignedDuration::from_secs(3600);
        let silent = vec![lease(Some("b"), ahead); 5];
        let steps = follow(&silent, Duration::from_secs(5));
        assert_eq!(steps, [Step::Follow, Step::Follow, Step::Follow, Step::Follow, Step::Acquire]);
    }
}
