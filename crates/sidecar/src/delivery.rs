//! Delivery: one dispatcher per destination takes due rows from the spool, POSTs them with bounded
//! concurrency, and records each outcome back in the spool.
//!
//! Destinations never share a queue or a connection pool, so a slow or failing one cannot delay another
//! nor the ack of new notifications. The spool is the only queue: a crash loses nothing but the attempts
//! in flight, which are simply made again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT as USER_AGENT_HEADER};
use http_body_util::{BodyExt, Full};
use storerelay_runtime::CancellationToken;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::clock::now_ms;
use crate::config::{ResolvedDestination, RuntimeConfig};
use crate::metrics::Metrics;
use crate::outbound;
use crate::retry::{self, AttemptResult};
use crate::spool::{DueBatch, DueDelivery, DueQuery, HandOff, Outcome, Spool, SpoolBackend};

/// A dispatcher re-reads the spool at least this often, so rows that `spool redeliver` changed from
/// outside are picked up without a signal.
const MAX_IDLE: Duration = Duration::from_secs(1);

/// A claimed delivery stays this replica's for its destination's `timeout` plus this: time to record
/// the outcome after the last byte. Past it (the replica was killed mid-attempt) another takes it over.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

pub const USER_AGENT: &str = concat!("storerelay/", env!("CARGO_PKG_VERSION"));

/// What dispatchers share.
#[derive(Clone)]
pub struct Delivery {
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    pub config: watch::Receiver<Arc<RuntimeConfig>>,
    pub waiters: Arc<Waiters>,
    /// Attempts under way across all destinations (shutdown waits for them).
    pub in_flight: Arc<AtomicUsize>,
}

/// Requests waiting for `ack: delivered`, woken when one of their deliveries finishes. Apple's retry
/// of a notification may wait beside the first request for it, so each notification counts its
/// waiters and is forgotten only when the last one leaves.
#[derive(Default)]
pub struct Waiters {
    by_notification: Mutex<HashMap<i64, (Arc<Notify>, usize)>>,
}

impl Waiters {
    pub fn register(&self, notification_id: i64) -> Arc<Notify> {
        let mut map = self.by_notification.lock().unwrap_or_else(|p| p.into_inner());
        let (notify, count) = map.entry(notification_id).or_insert_with(|| (Arc::default(), 0));
        *count += 1;
        notify.clone()
    }

    pub fn release(&self, notification_id: i64) {
        let mut map = self.by_notification.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, count)) = map.get_mut(&notification_id) {
            *count -= 1;
            if *count == 0 {
                map.remove(&notification_id);
            }
        }
    }

    /// Whether a request waits for this notification's deliveries.
    fn waited_on(&self, notification_id: i64) -> bool {
        self.by_notification.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&notification_id)
    }

    fn finished(&self, notification_id: i64) {
        let map = self.by_notification.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((notify, _)) = map.get(&notification_id) {
            notify.notify_waiters();
        }
    }
}

/// The dispatchers, running on a thread of their own: see [`start`].
pub struct DeliveryThread {
    ended: oneshot::Receiver<()>,
}

impl DeliveryThread {
    /// Waits until every dispatcher has ended (after `stop`), or the thread is gone.
    pub async fn join(self) {
        let _ = self.ended.await;
    }
}

/// Starts [`supervise`] on a thread named `delivery` with a single-threaded runtime of its own, its
/// POSTs and their connections included; ingest runs on the caller's runtime.
///
/// Why not one multi-threaded runtime for everything: at the rates a sidecar sees, most of its CPU went
/// to threads waking each other, and a work-stealing runtime wakes an idle worker for nearly every task
/// it schedules, to find nothing to steal. Two single-threaded runtimes, one per side of the spool,
/// meet only through the spool and its hand-off channels (see docs/performance.md: 7 % less CPU per
/// notification at 1,000 req/s and at saturation, with more throughput).
pub fn start(delivery: Delivery, stop: CancellationToken) -> std::io::Result<DeliveryThread> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (done, ended) = oneshot::channel();
    std::thread::Builder::new().name("delivery".into()).spawn(move || {
        runtime.block_on(supervise(delivery, stop));
        let _ = done.send(());
    })?;
    Ok(DeliveryThread { ended })
}

/// Runs a dispatcher for every configured destination, starting new ones as the config gains
/// destinations (a removed destination's dispatcher ends by itself; its rows wait in the spool in case
/// it comes back). Returns when `stop` is cancelled and every dispatcher has ended.
pub async fn supervise(delivery: Delivery, stop: CancellationToken) {
    let mut config = delivery.config.clone();
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        running.retain(|_, task| !task.is_finished());
        let names = config.borrow_and_update().destination_names();
        for name in names {
            running.entry(name.clone()).or_insert_with(|| tokio::spawn(dispatch(name, delivery.clone(), stop.clone())));
        }
        tokio::select! {
            changed = config.changed() => if changed.is_err() { break },
            () = stop.cancelled() => break,
        }
    }
    for (_, task) in running {
        let _ = task.await;
    }
}

/// Rows a hand-off holds per slot of the destination's concurrency: enough to bridge a group commit's
/// worth of arrivals while every slot is busy.
const HAND_OFF_PER_SLOT: usize = 4;

/// An attempt that ended, as its dispatcher hears of it.
struct Finished {
    notification_id: i64,
    /// It was rescheduled: the spool has a row due later that the dispatcher has not seen.
    retried: bool,
}

/// One destination's dispatcher. Work comes from two places: rows handed over as they are committed
/// ([`HandOff`]), and due queries, which find everything else (a backlog, retries falling due, rows the
/// hand-off missed, rows changed by `spool redeliver`). A due query is made only when one of those may
/// be waiting; with the PostgreSQL backend (no hand-off) on every wake, as its leases require.
async fn dispatch(name: String, delivery: Delivery, stop: CancellationToken) {
    let mut inserts = delivery.spool.subscribe_inserts();
    let mut config = delivery.config.clone();
    let mut in_flight: HashSet<i64> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
    let mut client: Option<(Arc<ResolvedDestination>, outbound::Client)> = None;
    let mut hand_off: Option<HandOff> = None;
    // Due rows fetched ahead for the next free slots, oldest first. No due query runs while any wait
    // here, so no reply can bring one of them again.
    let mut ready: VecDeque<DueDelivery> = VecDeque::new();
    // Whether the spool may hold due rows this dispatcher has not seen; at start, any backlog.
    let mut look = true;
    let mut next_look = tokio::time::Instant::now();
    tracing::debug!(destination = %name, "dispatcher started");

    while !stop.is_cancelled() {
        let Some(destination) = config.borrow_and_update().destination(&name).cloned() else {
            tracing::info!(destination = %name, "destination removed from the config; its pending deliveries stay in the spool");
            break;
        };
        if client.as_ref().is_none_or(|(seen, _)| !Arc::ptr_eq(seen, &destination)) {
            client = match build_client(&destination) {
                Ok(built) => Some((destination.clone(), built)),
                Err(error) => {
                    tracing::error!(destination = %name, %error, "cannot build an HTTP client");
                    None
                }
            };
            // Sized by the (maybe new) concurrency; rows left in the old one are found by a look.
            hand_off = delivery.spool.hand_off(&name, destination.concurrency * HAND_OFF_PER_SLOT);
            look = true;
        }
        let http = client.as_ref().filter(|_| destination.uri.is_some()).map(|(_, http)| http.clone());
        let start = |row: DueDelivery, in_flight: &mut HashSet<i64>| {
            let Some(http) = http.clone() else { return };
            in_flight.insert(row.notification_id);
            delivery.in_flight.fetch_add(1, Ordering::SeqCst);
            let (delivery, destination, done, stop) =
                (delivery.clone(), destination.clone(), done_tx.clone(), stop.clone());
            tokio::spawn(async move {
                let notification_id = row.notification_id;
                let retried = attempt(&delivery, &destination, &http, row, &stop).await;
                delivery.in_flight.fetch_sub(1, Ordering::SeqCst);
                let _ = done.send(Finished { notification_id, retried });
            });
        };

        if tokio::time::Instant::now() >= next_look {
            look = true;
        }
        if http.is_some() {
            let free = destination.concurrency.saturating_sub(in_flight.len());
            for row in ready.drain(..free.min(ready.len())) {
                start(row, &mut in_flight);
            }
        }
        let free = destination.concurrency.saturating_sub(in_flight.len());
        if http.is_some() && free > 0 && ready.is_empty() && (look || hand_off.is_none()) {
            look = false;
            if let Some(hand_off) = &hand_off {
                hand_off.take_missed();
            }
            let now = now_ms();
            // With a hand-off (one replica, no leases) a look also fetches the rows for the next
            // `concurrency` free slots: a backlog then costs one query per that many rows, not one per
            // finished attempt.
            let prefetch = if hand_off.is_some() { destination.concurrency.min(READY_ROWS) } else { 0 };
            let wanted = free + prefetch;
            let query = DueQuery {
                destination: name.clone(),
                now,
                wanted,
                attempting: in_flight.iter().copied().collect(),
                lease: destination.timeout + LEASE_MARGIN,
            };
            delivery.metrics.count_due_query(&name);
            match delivery.spool.due(query).await {
                Ok(DueBatch { due, next_due_at }) => {
                    // Rows handed over while the query ran may be in its reply too: take them now,
                    // before sorting the reply out against what is in flight (see `spool::HandOff`).
                    let handed = hand_off.as_mut().map(|h| h.take(usize::MAX)).unwrap_or_default();
                    let replied = due.len();
                    let (picked, rest) = pick(due, handed, &in_flight, free);
                    let dropped = keep_ready(&mut ready, rest, prefetch);
                    look = dropped || replied >= wanted;
                    if let Some(hand_off) = &hand_off {
                        // Behind, the oldest rows come from the spool first; fresh ones would wait.
                        hand_off.set_behind(look || !ready.is_empty());
                    }
                    for row in picked {
                        start(row, &mut in_flight);
                    }
                    let until_due =
                        next_due_at.map_or(MAX_IDLE, |next| Duration::from_millis((next - now).max(0) as u64));
                    next_look = tokio::time::Instant::now() + until_due.min(MAX_IDLE);
                }
                Err(error) => {
                    tracing::error!(destination = %name, %error, "cannot read due deliveries");
                    next_look = tokio::time::Instant::now() + MAX_IDLE;
                }
            }
        }

        let free = destination.concurrency.saturating_sub(in_flight.len());
        // A free slot here means `ready` is empty: it was drained into free slots first, and a reply
        // leaves rows there only once it has filled every slot.
        let take_handed = http.is_some() && free > 0;
        // A look that is owed but cannot be made now (no free slot) is tried again on the next wake.
        let wake_at = if look { tokio::time::Instant::now() + MAX_IDLE } else { next_look };
        tokio::select! {
            Some(finished) = done_rx.recv() => {
                in_flight.remove(&finished.notification_id);
                look |= finished.retried;
            }
            Some(row) = recv_handed(&mut hand_off), if take_handed => {
                let mut handed = vec![row];
                handed.extend(hand_off.as_mut().map(|h| h.take(free - 1)).unwrap_or_default());
                let (picked, _) = pick(Vec::new(), handed, &in_flight, free);
                for row in picked {
                    start(row, &mut in_flight);
                }
            }
            _ = inserts.changed() => look |= hand_off.as_ref().is_none_or(HandOff::missed),
            _ = config.changed() => look = true,
            _ = tokio::time::sleep_until(wake_at) => {}
            () = stop.cancelled() => {}
        }
        // Collect every attempt that finished meanwhile before computing free slots again.
        while let Ok(finished) = done_rx.try_recv() {
            in_flight.remove(&finished.notification_id);
            look |= finished.retried;
        }
    }
}

async fn recv_handed(hand_off: &mut Option<HandOff>) -> Option<DueDelivery> {
    match hand_off {
        Some(hand_off) => hand_off.recv().await,
        None => std::future::pending().await,
    }
}

/// Rows fetched ahead at most ([`keep_ready`]), and their bodies' bytes: the bound the hand-off has
/// (`spool::HandOff`), so a destination's rows held in memory stay within twice it.
const READY_ROWS: usize = 64;
const READY_BYTES: usize = 1 << 20;

/// Keeps up to `at_most` of `rest` (and [`READY_BYTES`] of bodies, but always one row) for the next
/// free slots, in order; says whether any were left out (they stay due in the spool).
fn keep_ready(ready: &mut VecDeque<DueDelivery>, rest: Vec<DueDelivery>, at_most: usize) -> bool {
    let mut bytes: usize = ready.iter().map(|row| row.body.len()).sum();
    let mut dropped = false;
    for row in rest {
        let fits = ready.is_empty() || bytes + row.body.len() <= READY_BYTES;
        if ready.len() < at_most && fits {
            bytes += row.body.len();
            ready.push_back(row);
        } else {
            dropped = true;
        }
    }
    dropped
}

/// The rows to start in `free` slots: the due query's reply first (oldest schedule first), then rows
/// handed over, leaving out those in flight or picked already. Also returns the rows left over for
/// want of a slot, in the same order (each stays due in the spool until its outcome is recorded).
fn pick(
    reply: Vec<DueDelivery>,
    handed: Vec<DueDelivery>,
    in_flight: &HashSet<i64>,
    free: usize,
) -> (Vec<DueDelivery>, Vec<DueDelivery>) {
    let mut picked: Vec<DueDelivery> = Vec::with_capacity(free);
    let mut rest: Vec<DueDelivery> = Vec::new();
    // A reply and a full hand-off together can be thousands of rows: no scan of what is kept per row.
    let mut seen: HashSet<i64> = HashSet::new();
    for row in reply.into_iter().chain(handed) {
        let id = row.notification_id;
        if in_flight.contains(&id) || !seen.insert(id) {
            continue;
        }
        if picked.len() == free {
            rest.push(row);
        } else {
            picked.push(row);
        }
    }
    (picked, rest)
}

fn build_client(destination: &ResolvedDestination) -> Result<outbound::Client, rustls::Error> {
    outbound::client(destination.timeout.min(Duration::from_secs(5)), destination.concurrency)
}

/// One POST of the stored bytes, its outcome recorded in the spool, counted and logged. Returns whether
/// it was rescheduled.
async fn attempt(
    delivery: &Delivery,
    destination: &ResolvedDestination,
    http: &outbound::Client,
    row: DueDelivery,
    stop: &CancellationToken,
) -> bool {
    let Some(uri) = destination.uri.clone() else {
        return false;
    };
    let started = Instant::now();
    let result = post(http, uri, destination, row.body).await;
    let took = started.elapsed();
    let outcome = retry::decide(&result, &destination.retry, row.attempts, row.received_at, now_ms(), fastrand::f64());

    let name = destination.name.as_str();
    delivery.metrics.observe_delivery(name, took);
    let (label, next_attempt_at) = match &outcome {
        Outcome::Delivered { .. } => ("delivered", None),
        Outcome::Retry { next_attempt_at, .. } => ("retried", Some(crate::clock::format_ms(*next_attempt_at))),
        Outcome::Dead { .. } => ("dead", None),
    };
    delivery.metrics.count_delivery(name, label);
    let error = match &outcome {
        Outcome::Retry { error, .. } | Outcome::Dead { error, .. } => Some(error.as_str()),
        Outcome::Delivered { .. } => None,
    };
    tracing::info!(
        notification = row.notification_id,
        destination = name,
        target = %destination.display,
        outcome = label,
        result = %result.describe(),
        attempt = row.attempts + 1,
        duration_ms = took.as_millis() as u64,
        next_attempt_at,
        error,
        "delivery"
    );

    let finished = !matches!(outcome, Outcome::Retry { .. });
    if record(delivery, destination, row.notification_id, outcome, stop).await && finished {
        delivery.waiters.finished(row.notification_id);
    }
    !finished
}

/// Writes an attempt's outcome, trying again with the destination's backoff while it cannot be written
/// (a full disk, a lock held too long). Meanwhile the delivery keeps its slot, so the destination is
/// not called again for it, nor for more than `concurrency` others. Returns whether it was written;
/// on shutdown it gives up, and the row, still due, is sent again after the restart: at least once,
/// never lost.
///
/// An outcome nobody waits on (`ack: delivered` waits) rides with the spool's next commit
/// (`record_in_next_commit`): writing each on its own cost the SQLite writer a commit and two thread
/// switches per notification.
async fn record(
    delivery: &Delivery,
    destination: &ResolvedDestination,
    notification_id: i64,
    outcome: Outcome,
    stop: &CancellationToken,
) -> bool {
    let name = destination.name.as_str();
    let mut failures = 0u32;
    loop {
        let (spool, outcome) = (&delivery.spool, outcome.clone());
        let written = if failures == 0 && !delivery.waiters.waited_on(notification_id) {
            spool.record_in_next_commit(name.to_string(), notification_id, outcome).await
        } else {
            spool.record(name.to_string(), notification_id, outcome).await
        };
        let error = match written {
            Ok(()) => return true,
            Err(error) => error,
        };
        failures = failures.saturating_add(1);
        delivery.metrics.count_outcome_write_failure(name);
        let wait = retry::backoff(&destination.retry, failures, None, fastrand::f64());
        tracing::error!(
            destination = name,
            notification = notification_id,
            %error,
            failures,
            retry_in_ms = wait.as_millis() as u64,
            "cannot record delivery outcome; trying again later without calling the destination again"
        );
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return false,
        }
    }
}

/// POSTs the stored bytes with the destination's headers. The status decides the outcome; the answer's
/// body is read only so that the connection can be used again.
async fn post(
    http: &outbound::Client,
    uri: http::Uri,
    destination: &ResolvedDestination,
    body: Bytes,
) -> AttemptResult {
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri;
    let headers = request.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(USER_AGENT_HEADER, HeaderValue::from_static(USER_AGENT));
    for (name, value) in &destination.headers {
        headers.insert(name.clone(), value.clone());
    }
    let deadline = tokio::time::Instant::now() + destination.timeout;
    match outbound::send(http, request, destination.timeout).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
            let _ = tokio::time::timeout_at(deadline, response.into_body().collect()).await;
            AttemptResult::Response { status, retry_after }
        }
        Err(outbound::Failure::Timeout) => AttemptResult::Timeout,
        Err(failure) => AttemptResult::Failed(failure.describe().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64) -> DueDelivery {
        DueDelivery { notification_id: id, received_at: 0, attempts: 0, body: Bytes::new() }
    }

    fn ids(rows: &[DueDelivery]) -> Vec<i64> {
        rows.iter().map(|r| r.notification_id).collect()
    }

    #[test]
    fn a_row_both_handed_over_and_in_a_reply_is_started_once_and_nothing_in_flight_again() {
        let in_flight = HashSet::from([9]);
        let (picked, rest) = pick(vec![row(1), row(2), row(9)], vec![row(2), row(3), row(9)], &in_flight, 5);
        assert_eq!(ids(&picked), [1, 2, 3]);
        assert!(rest.is_empty());
        let (picked, rest) = pick(vec![row(1), row(2)], vec![row(2), row(3)], &in_flight, 2);
        assert_eq!(ids(&picked), [1, 2], "the reply's older rows first");
        assert_eq!(ids(&rest), [3], "3 was left for want of a slot");
        let (picked, rest) = pick(vec![row(1)], vec![row(1)], &in_flight, 1);
        assert_eq!((ids(&picked), ids(&rest)), (vec![1], vec![]), "a row counted twice does not take two slots");
        let (picked, rest) = pick(vec![row(1), row(2), row(3), row(4)], vec![row(4), row(5)], &in_flight, 1);
        assert_eq!((ids(&picked), ids(&rest)), (vec![1], vec![2, 3, 4, 5]), "left over once each, oldest first");
    }

    #[test]
    fn rows_fetched_ahead_are_kept_in_order_within_a_count_and_a_byte_bound() {
        let sized = |id: i64, bytes: usize| DueDelivery { body: Bytes::from(vec![b'x'; bytes]), ..row(id) };
        let mut ready = VecDeque::new();
        assert!(!keep_ready(&mut ready, vec![row(1), row(2)], 3));
        assert!(keep_ready(&mut ready, vec![row(3), row(4)], 3), "4 is one more than the count allows");
        assert_eq!(ready.iter().map(|r| r.notification_id).collect::<Vec<_>>(), [1, 2, 3]);

        let mut ready = VecDeque::new();
        let big = READY_BYTES / 2 + 1;
        assert!(keep_ready(&mut ready, vec![sized(1, big), sized(2, big), sized(3, 10)], 64));
        assert_eq!(ready.iter().map(|r| r.notification_id).collect::<Vec<_>>(), [1, 3], "2 would pass the byte bound");
        let mut ready = VecDeque::new();
        assert!(!keep_ready(&mut ready, vec![sized(1, READY_BYTES * 2)], 64), "one row is kept whatever its size");
        assert!(!keep_ready(&mut ready, vec![], 0));
    }

    #[tokio::test]
    async fn a_waiter_is_woken_after_another_request_for_the_same_notification_gave_up() {
        let waiters = Waiters::default();
        let _first = waiters.register(7);
        let second = waiters.register(7);
        let woken = second.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        waiters.release(7); // the first request's ackTimeout ran out
        waiters.finished(7);
        let result = tokio::time::timeout(Duration::from_millis(200), woken).await;
        assert!(result.is_ok(), "the second request must hear that its delivery finished");
        waiters.release(7);
        assert!(waiters.by_notification.lock().unwrap().is_empty(), "the last release forgets the notification");
    }
}
