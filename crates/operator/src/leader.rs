//! Leader election through a `coordination.k8s.io` Lease, so one replica writes while all serve the
//! webhook. The decision rule is pure ([`next`]); [`run`] applies it against the API with optimistic
//! concurrency (a replace with the Lease's resourceVersion), so two replicas never both win.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
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

pub fn next(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Step {
    let Some(spec) = lease else { return Step::Create };
    if spec.holder_identity.as_deref() == Some(identity) {
        return Step::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let expired = match (&spec.renew_time, &spec.holder_identity) {
        (_, None) => true,
        (Some(renewed), _) => renewed.0 + duration < now,
        (None, _) => true,
    };
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
    loop {
        let now = Timestamp::now();
        let outcome = async {
            let current = api.get_opt(&name).await?;
            let spec = current.as_ref().and_then(|l| l.spec.as_ref());
            match next(spec, &identity, now) {
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

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
            ..Default::default()
        }
    }

    #[test]
    fn creates_renews_follows_and_takes_over_expired_leases() {
        let now = Timestamp::now();
        assert_eq!(next(None, "a", now), Step::Create);
        assert_eq!(next(Some(&lease(Some("a"), 3, now)), "a", now), Step::Renew);
        assert_eq!(next(Some(&lease(Some("b"), 3, now)), "a", now), Step::Follow);
        assert_eq!(next(Some(&lease(Some("b"), 30, now)), "a", now), Step::Acquire);
        assert_eq!(next(Some(&lease(None, 0, now)), "a", now), Step::Acquire);
        let taken = held_by("a", Some(&lease(Some("b"), 30, now)), now);
        assert_eq!(taken.lease_transitions, Some(1));
        assert_eq!(held_by("a", Some(&taken), now).lease_transitions, Some(1), "renewing is no transition");
    }
}
