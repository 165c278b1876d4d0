//! Kubernetes Events (events.k8s.io/v1) about routes, with repeats folded into a series as
//! client-go's recorder does: the same type, reason and action about the same object within
//! [`SERIES_WINDOW`] patches the first Event's `series` instead of creating another.
//!
//! Why not kube's `Recorder`: it keeps a clone of every Event it published for six minutes (and its
//! hash table at its largest size after that). One reconcile of 1,000 new routes publishes about five
//! thousand, which held 12 MiB of the operator's memory (measured with massif, docs/performance.md).
//! This keeps what a series needs, about a hundred bytes an entry, and at most [`REMEMBERED`] of them.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType};

/// Repeats within this time join the first Event's series (client-go uses the same six minutes).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);
/// Series remembered at most; past it the oldest is forgotten (its next repeat starts a new Event).
pub const REMEMBERED: usize = 4096;

/// Who reports: `reportingController` and `reportingInstance` of every Event.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

pub struct Recorder {
    client: Client,
    reporter: Reporter,
    series: Mutex<Series>,
}

/// An Event that repeats can join: its name, how often it was seen and when last.
#[derive(Debug, Clone)]
struct Recent {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

/// The series the recorder remembers, by a hash of what makes two Events the same (type, reason,
/// action, the object). Pure, so its rules are tested without an API server.
#[derive(Debug, Default)]
struct Series {
    recent: HashMap<u64, Recent>,
}

/// What publishing an Event means for the API server.
#[derive(Debug, PartialEq)]
enum Publish {
    Create,
    /// Patch this Event's series to `count`.
    Repeat {
        namespace: String,
        name: String,
        count: i32,
    },
}

impl Series {
    fn publish(&mut self, key: u64, now: Instant) -> Publish {
        match self.recent.get_mut(&key) {
            Some(recent) if now.saturating_duration_since(recent.last) < SERIES_WINDOW => {
                recent.count += 1;
                recent.last = now;
                Publish::Repeat { namespace: recent.namespace.clone(), name: recent.name.clone(), count: recent.count }
            }
            _ => Publish::Create,
        }
    }

    /// Remembers a created Event; forgets expired series, then the oldest if still full.
    fn created(&mut self, key: u64, namespace: String, name: String, now: Instant) {
        if self.recent.len() >= REMEMBERED && !self.recent.contains_key(&key) {
            self.recent.retain(|_, r| now.saturating_duration_since(r.last) < SERIES_WINDOW);
            if self.recent.len() >= REMEMBERED {
                if let Some(oldest) = self.recent.iter().min_by_key(|(_, r)| r.last).map(|(k, _)| *k) {
                    self.recent.remove(&oldest);
                }
            }
        }
        self.recent.insert(key, Recent { namespace, name, count: 1, last: now });
    }
}

fn key(event: &Event, regarding: &ObjectReference) -> u64 {
    let mut hasher = DefaultHasher::new();
    let type_ = match event.type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    };
    (type_, &event.reason, &event.action).hash(&mut hasher);
    (&regarding.namespace, &regarding.name, &regarding.uid, &regarding.kind).hash(&mut hasher);
    hasher.finish()
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Recorder {
        Recorder { client, reporter, series: Mutex::new(Series::default()) }
    }

    /// Creates the Event in the object's namespace, or counts a repeat in the first one's series.
    pub async fn publish(&self, event: &Event, regarding: &ObjectReference) -> Result<(), kube::Error> {
        let key = key(event, regarding);
        let now = Instant::now();
        let decision = self.series.lock().unwrap_or_else(|p| p.into_inner()).publish(key, now);
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        match decision {
            Publish::Repeat { namespace, name, count } => {
                let series = EventSeries { count, last_observed_time: MicroTime(Timestamp::now()) };
                let patch = serde_json::json!({ "series": series });
                let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                events.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            }
            Publish::Create => {
                let created = self.event(event, regarding, &namespace);
                let name = created.metadata.name.clone().unwrap_or_default();
                let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
                events.create(&PostParams::default(), &created).await?;
                self.series.lock().unwrap_or_else(|p| p.into_inner()).created(key, namespace, name, now);
            }
        }
        Ok(())
    }

    fn event(&self, event: &Event, regarding: &ObjectReference, namespace: &str) -> K8sEvent {
        let now = Timestamp::now();
        let object = regarding.name.as_deref().unwrap_or(&self.reporter.controller);
        K8sEvent {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                ..Default::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            type_: Some(match event.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(self.reporter.instance.clone()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_join_the_series_and_later_ones_start_anew() {
        let mut series = Series::default();
        let t0 = Instant::now();
        assert_eq!(series.publish(1, t0), Publish::Create);
        series.created(1, "shop".into(), "payments.1a".into(), t0);
        let repeat = |count| Publish::Repeat { namespace: "shop".into(), name: "payments.1a".into(), count };
        assert_eq!(series.publish(1, t0 + Duration::from_secs(10)), repeat(2));
        assert_eq!(series.publish(1, t0 + Duration::from_secs(300)), repeat(3));
        assert_eq!(series.publish(2, t0), Publish::Create, "another event is its own series");
        // Six minutes after the last repeat, not the first.
        assert_eq!(series.publish(1, t0 + Duration::from_secs(300) + SERIES_WINDOW), Publish::Create);
    }

    #[test]
    fn at_most_the_bound_is_remembered_expired_first_then_the_oldest() {
        let mut series = Series::default();
        let t0 = Instant::now();
        for key in 0..REMEMBERED as u64 {
            series.created(key, "shop".into(), format!("e.{key}"), t0 + Duration::from_millis(key));
        }
        let later = t0 + Duration::from_secs(1);
        series.created(u64::MAX, "shop".into(), "e.new".into(), later);
        assert_eq!(series.recent.len(), REMEMBERED);
        assert!(!series.recent.contains_key(&0), "the oldest went");
        assert!(series.recent.contains_key(&1) && series.recent.contains_key(&u64::MAX));

        let expired = t0 + Duration::from_secs(10) + SERIES_WINDOW;
        series.created(u64::MAX - 1, "shop".into(), "e.newer".into(), expired);
        assert_eq!(series.recent.len(), 1, "expired series are forgotten first");
    }

    #[test]
    fn what_makes_events_the_same() {
        let regarding = |uid: &str| ObjectReference {
            kind: Some("NotificationRoute".into()),
            namespace: Some("shop".into()),
            name: Some("payments".into()),
            uid: Some(uid.into()),
            ..Default::default()
        };
        let event = |reason: &str, note: &str| Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let a = key(&event("PodsMissingSidecar", "2 pods"), &regarding("u1"));
        assert_eq!(a, key(&event("PodsMissingSidecar", "3 pods"), &regarding("u1")), "the note is not part of it");
        assert_ne!(a, key(&event("Ready", "2 pods"), &regarding("u1")));
        assert_ne!(a, key(&event("PodsMissingSidecar", "2 pods"), &regarding("u2")), "a recreated route is another");
    }
}
