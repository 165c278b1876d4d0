//! The shared spool's SQL, one function per question, for the sidecar and the `spool` tools alike.
//!
//! Every statement is confined to one queue (`$1`): routes sharing a database never see each other's
//! rows. The connection's search path names the schema.

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Row, Statement, Transaction};

use super::super::db::{
    DeliveryCounts, DeliveryRow, DeliveryState, DeliveryStatus, DestinationStats, DueDelivery, ListFilter, Outcome,
    fold_stats,
};
use super::super::{Failure, PrunePolicy, Pruned};

type Result<T> = std::result::Result<T, Failure>;

/// The hot statements of one connection, prepared on first use: the server parses and plans each once,
/// and a call is one round trip (a query given as text is prepared again on every call: two).
#[derive(Default)]
pub struct Prepared(std::sync::Mutex<HashMap<&'static str, Statement>>);

impl Prepared {
    async fn get(&self, client: &impl GenericClient, sql: &'static str) -> Result<Statement> {
        if let Some(statement) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql).await?;
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(sql, statement.clone());
        Ok(statement)
    }
}

/// Holder of the per-queue housekeeping lock: pruning and eviction run on one replica at a time.
const HOUSEKEEPING_LOCK: &str =
    "SELECT pg_try_advisory_xact_lock(hashtextextended('storerelay housekeeping ' || $1, 0))";

fn state(row: &Row, index: usize) -> Result<DeliveryState> {
    let name: &str = row.try_get(index)?;
    DeliveryState::parse(name).ok_or_else(|| Failure::Setup(format!("unknown delivery state `{name}` in the database")))
}

/// Rows of deliveries due now, claimed for `lease_until`: other replicas skip them until then.
pub async fn claim(
    client: &Client,
    prepared: &Prepared,
    queue: &str,
    destination: &str,
    now: i64,
    limit: i64,
    lease_until: i64,
) -> Result<Vec<DueDelivery>> {
    const CLAIM: &str = "WITH c AS (
                 SELECT notification_id FROM deliveries
                 WHERE queue = $1 AND destination = $2 AND state = 'pending' AND next_attempt_at <= $3
                   AND COALESCE(lease_until, 0) <= $3
                 ORDER BY next_attempt_at, notification_id LIMIT $4
                 FOR UPDATE SKIP LOCKED)
             UPDATE deliveries d SET lease_until = $5
             FROM c, notifications n
             WHERE d.queue = $1 AND d.destination = $2 AND d.notification_id = c.notification_id
               AND n.id = c.notification_id
             RETURNING d.notification_id, n.received_at, d.attempts, n.body, d.next_attempt_at";
    let statement = prepared.get(client, CLAIM).await?;
    let rows = client.query(&statement, &[&queue, &destination, &now, &limit, &lease_until]).await?;
    let mut due: Vec<(i64, DueDelivery)> = rows
        .iter()
        .map(|row| {
            let attempts: i32 = row.try_get(2)?;
            let body: Vec<u8> = row.try_get(3)?;
            Ok((
                row.try_get(4)?,
                DueDelivery {
                    notification_id: row.try_get(0)?,
                    received_at: row.try_get(1)?,
                    attempts: attempts.max(0) as u32,
                    body: body.into(),
                },
            ))
        })
        .collect::<Result<_>>()?;
    due.sort_by_key(|(at, row)| (*at, row.notification_id));
    Ok(due.into_iter().map(|(_, row)| row).collect())
}

/// When the next pending delivery of `destination` after `now` may be attempted (its schedule, or the
/// end of another replica's lease on it).
pub async fn next_due_after(
    client: &Client,
    prepared: &Prepared,
    queue: &str,
    destination: &str,
    now: i64,
) -> Result<Option<i64>> {
    const NEXT: &str = "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0))) FROM deliveries
         WHERE queue = $1 AND destination = $2 AND state = 'pending'
           AND GREATEST(next_attempt_at, COALESCE(lease_until, 0)) > $3";
    let statement = prepared.get(client, NEXT).await?;
    let row = client.query_one(&statement, &[&queue, &destination, &now]).await?;
    Ok(row.try_get(0)?)
}

pub async fn earliest_due(client: &Client, queue: &str, destinations: &[String]) -> Result<Option<i64>> {
    let row = client
        .query_one(
            "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0))) FROM deliveries
             WHERE queue = $1 AND destination = ANY($2) AND state = 'pending'",
            &[&queue, &destinations],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Records an attempt and gives its lease up. Only a pending row changes, as in SQLite.
pub async fn record(
    client: &Client,
    prepared: &Prepared,
    queue: &str,
    destination: &str,
    notification_id: i64,
    now: i64,
    outcome: &Outcome,
) -> Result<()> {
    let (state, next_attempt_at, finished_at, status, error) = match outcome {
        Outcome::Delivered { status } => (DeliveryState::Delivered, now, Some(now), Some(*status), None),
        Outcome::Retry { next_attempt_at, status, error } => {
            (DeliveryState::Pending, *next_attempt_at, None, *status, Some(error.as_str()))
        }
        Outcome::Dead { status, error } => (DeliveryState::Dead, now, Some(now), *status, Some(error.as_str())),
    };
    let status = status.map(i32::from);
    const RECORD: &str = "UPDATE deliveries SET state = $4, attempts = attempts + 1, next_attempt_at = $5,
            finished_at = $6, last_status = $7, last_error = $8, lease_until = NULL
         WHERE queue = $1 AND destination = $2 AND notification_id = $3 AND state = 'pending'";
    let statement = prepared.get(client, RECORD).await?;
    let params: [&(dyn ToSql + Sync); 8] =
        [&queue, &destination, &notification_id, &state.as_str(), &next_attempt_at, &finished_at, &status, &error];
    client.execute(&statement, &params).await?;
    Ok(())
}

pub async fn delivery_counts(client: &Client, queue: &str, notification_id: i64) -> Result<DeliveryCounts> {
    let rows = client
        .query(
            "SELECT state, COUNT(*) FROM deliveries WHERE queue = $1 AND notification_id = $2 GROUP BY state",
            &[&queue, &notification_id],
        )
        .await?;
    let mut counts = DeliveryCounts::default();
    for row in rows {
        let count: i64 = row.try_get(1)?;
        counts.set(state(&row, 0)?, count.max(0) as u32);
    }
    Ok(counts)
}

pub async fn stats(client: &impl GenericClient, queue: &str) -> Result<Vec<DestinationStats>> {
    let rows = client
        .query(
            "SELECT d.destination, d.state, COUNT(*), MIN(n.received_at)
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.queue = $1 GROUP BY d.destination, d.state ORDER BY d.destination",
            &[&queue],
        )
        .await?;
    let rows = rows
        .iter()
        .map(|row| {
            let count: i64 = row.try_get(2)?;
            Ok((row.try_get(0)?, state(row, 1)?, count.max(0) as u64, row.try_get(3)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(fold_stats(rows))
}

/// Body bytes the queue holds: what `spool.maxBytes` limits. `octet_length` reads a stored value's
/// size from its header, so this costs an index scan, not the bodies.
pub async fn body_bytes(client: &impl GenericClient, queue: &str) -> Result<u64> {
    let row = client
        .query_one("SELECT COALESCE(SUM(octet_length(body)), 0)::bigint FROM notifications WHERE queue = $1", &[&queue])
        .await?;
    Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
}

pub async fn notification_count(client: &impl GenericClient, queue: &str) -> Result<u64> {
    let row = client.query_one("SELECT COUNT(*) FROM notifications WHERE queue = $1", &[&queue]).await?;
    Ok(row.try_get::<_, i64>(0)?.max(0) as u64)
}

/// Which of `keys` the queue's duplicate keys hold, first seen since `since`.
pub async fn seen(client: &impl GenericClient, queue: &str, keys: &[String], since: i64) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT key FROM dedupe WHERE queue = $1 AND key = ANY($2) AND first_seen >= $3",
            &[&queue, &keys, &since],
        )
        .await?;
    rows.iter().map(|row| Ok(row.try_get::<_, String>(0)?)).collect()
}

/// The deliveries of the notification stored under `key` since `since`; `None` when the key was not seen
/// or its notification is no longer kept.
pub async fn deliveries_of_key(
    client: &impl GenericClient,
    queue: &str,
    key: &str,
    since: i64,
) -> Result<Option<Vec<DeliveryStatus>>> {
    let found = client
        .query_opt(
            "SELECT notification_id FROM dedupe WHERE queue = $1 AND key = $2 AND first_seen >= $3 AND notification_id IS NOT NULL",
            &[&queue, &key, &since],
        )
        .await?;
    let Some(found) = found else { return Ok(None) };
    let notification_id: i64 = found.try_get(0)?;
    let rows = client
        .query(
            "SELECT destination, state, attempts, last_error FROM deliveries
             WHERE queue = $1 AND notification_id = $2 ORDER BY destination",
            &[&queue, &notification_id],
        )
        .await?;
    let statuses = rows
        .iter()
        .map(|row| {
            Ok(DeliveryStatus {
                destination: row.try_get(0)?,
                state: state(row, 1)?,
                attempts: row.try_get::<_, i32>(2)?.max(0) as u32,
                last_error: row.try_get(3)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(statuses))
}

pub async fn list(client: &impl GenericClient, queue: &str, filter: &ListFilter) -> Result<Vec<DeliveryRow>> {
    let wanted_state = filter.state.map(DeliveryState::as_str);
    let limit = i64::from(filter.limit);
    let rows = client
        .query(
            "SELECT d.notification_id, d.destination, d.state, d.attempts, n.received_at, d.next_attempt_at,
                    d.finished_at, d.last_status, d.last_error, octet_length(n.body)::bigint
             FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.queue = $1 AND ($2::text IS NULL OR d.destination = $2) AND ($3::text IS NULL OR d.state = $3)
             ORDER BY d.notification_id, d.destination LIMIT $4",
            &[&queue, &filter.destination, &wanted_state, &limit],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let attempts: i32 = row.try_get(3)?;
            let status: Option<i32> = row.try_get(7)?;
            let bytes: i64 = row.try_get(9)?;
            Ok(DeliveryRow {
                notification_id: row.try_get(0)?,
                destination: row.try_get(1)?,
                state: state(row, 2)?,
                attempts: attempts.max(0) as u32,
                received_at: row.try_get(4)?,
                next_attempt_at: row.try_get(5)?,
                finished_at: row.try_get(6)?,
                last_status: status.and_then(|s| u16::try_from(s).ok()),
                last_error: row.try_get(8)?,
                bytes: bytes.max(0) as u64,
            })
        })
        .collect()
}

/// As `SpoolDb::redeliver`, for the queue.
pub async fn redeliver(
    client: &mut Client,
    queue: &str,
    destination: &str,
    dead_only: bool,
    since: i64,
    now: i64,
) -> Result<usize> {
    let tx = client.transaction().await?;
    let mut changed = 0;
    if !dead_only {
        changed += tx
            .execute(
                "INSERT INTO deliveries (queue, destination, notification_id, state, next_attempt_at)
                 SELECT $1, $2, id, 'pending', $4 FROM notifications WHERE queue = $1 AND received_at >= $3
                 ON CONFLICT DO NOTHING",
                &[&queue, &destination, &since, &now],
            )
            .await?;
    }
    let also = if dead_only { "dead" } else { "delivered" };
    changed += tx
        .execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = $4, finished_at = NULL,
                    lease_until = NULL
             WHERE queue = $1 AND destination = $2 AND state IN ('dead', $5)
               AND notification_id IN (SELECT id FROM notifications WHERE queue = $1 AND received_at >= $3)",
            &[&queue, &destination, &since, &now, &also],
        )
        .await?;
    tx.commit().await?;
    Ok(changed as usize)
}

/// As `SpoolDb::purge`, for the queue.
pub async fn purge(
    client: &mut Client,
    queue: &str,
    destination: Option<&str>,
    include_dead: bool,
    before: i64,
) -> Result<usize> {
    let tx = client.transaction().await?;
    let also = if include_dead { "dead" } else { "delivered" };
    let deleted = tx
        .execute(
            "DELETE FROM deliveries WHERE queue = $1 AND state IN ('delivered', $4)
               AND ($2::text IS NULL OR destination = $2) AND COALESCE(finished_at, 0) < $3",
            &[&queue, &destination, &before, &also],
        )
        .await?;
    delete_orphans(&tx, queue, before).await?;
    tx.commit().await?;
    Ok(deleted as usize)
}

/// As `SpoolDb::purge_unknown_destinations`, for the queue.
pub async fn purge_unknown_destinations(client: &mut Client, queue: &str, configured: &[String]) -> Result<usize> {
    let tx = client.transaction().await?;
    let deleted = tx
        .execute("DELETE FROM deliveries WHERE queue = $1 AND NOT (destination = ANY($2))", &[&queue, &configured])
        .await?;
    delete_orphans(&tx, queue, i64::MAX).await?;
    tx.commit().await?;
    Ok(deleted as usize)
}

/// Notifications received before `before` with no delivery left to make.
async fn delete_orphans(tx: &Transaction<'_>, queue: &str, before: i64) -> Result<u64> {
    Ok(tx
        .execute(
            "DELETE FROM notifications n WHERE n.queue = $1 AND n.received_at < $2
               AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.id)",
            &[&queue, &before],
        )
        .await?)
}

/// Takes the queue's housekeeping lock for this transaction, if no other replica holds it.
pub async fn try_housekeeping_lock(tx: &Transaction<'_>, queue: &str) -> Result<bool> {
    Ok(tx.query_one(HOUSEKEEPING_LOCK, &[&queue]).await?.try_get(0)?)
}

/// Notifications every destination had before `cutoff` (or that had none), up to `limit`; their
/// deliveries and duplicate keys go with them (the foreign keys). Pending and dead work never goes.
pub async fn prune_delivered(tx: &Transaction<'_>, queue: &str, cutoff: i64, limit: i64) -> Result<usize> {
    Ok(tx
        .execute(
            "DELETE FROM notifications WHERE id IN (
               SELECT n.id FROM notifications n WHERE n.queue = $1 AND n.received_at < $2
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.notification_id = n.id
                                 AND (d.state <> 'delivered' OR d.finished_at >= $2))
               ORDER BY n.id LIMIT $3)",
            &[&queue, &cutoff, &limit],
        )
        .await? as usize)
}

/// One housekeeping pass, as `SpoolDb` does it, inside the caller's transaction (which holds the lock).
pub async fn prune(tx: &Transaction<'_>, queue: &str, policy: &PrunePolicy) -> Result<Pruned> {
    let received_before = "notification_id IN (SELECT id FROM notifications WHERE queue = $1 AND received_at < $2)";
    let cutoff = policy.unfinishable_before;
    let dead = tx
        .execute(
            &format!("DELETE FROM deliveries WHERE queue = $1 AND state = 'dead' AND {received_before}"),
            &[&queue, &cutoff],
        )
        .await? as usize;
    let unknown = tx
        .execute(
            &format!("DELETE FROM deliveries WHERE queue = $1 AND NOT (destination = ANY($3)) AND {received_before}"),
            &[&queue, &cutoff, &policy.configured],
        )
        .await? as usize;
    delete_orphans(tx, queue, cutoff).await?;
    let delivered = prune_delivered(tx, queue, policy.delivered_before, i64::MAX).await?;
    tx.execute("DELETE FROM dedupe WHERE queue = $1 AND first_seen < $2", &[&queue, &policy.dedupe_before]).await?;
    Ok(Pruned { delivered, dead, unknown_destination: unknown })
}

/// The destination whose unfinished deliveries hold the most body bytes, with how many it has.
pub async fn largest_holder(tx: &Transaction<'_>, queue: &str) -> Result<Option<(String, u64)>> {
    let row = tx
        .query_opt(
            "SELECT d.destination, COUNT(*) FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.queue = $1 AND d.state <> 'delivered'
             GROUP BY d.destination ORDER BY SUM(octet_length(n.body)) DESC LIMIT 1",
            &[&queue],
        )
        .await?;
    row.map(|row| Ok((row.try_get(0)?, row.try_get::<_, i64>(1)?.max(0) as u64))).transpose()
}

/// Locks the duplicate key for this transaction (a concurrent replica with the same key waits for our
/// commit) and returns the notification it names and when it was first seen, if it existed.
pub async fn take_key(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    queue: &str,
    key: &str,
    now: i64,
) -> Result<(Option<i64>, i64)> {
    const TAKE: &str = "INSERT INTO dedupe (queue, key, notification_id, first_seen) VALUES ($1, $2, NULL, $3)
         ON CONFLICT (queue, key) DO UPDATE SET first_seen = dedupe.first_seen
         RETURNING notification_id, first_seen";
    let statement = prepared.get(tx, TAKE).await?;
    let row = tx.query_one(&statement, &[&queue, &key, &now]).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

pub async fn set_key(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    queue: &str,
    key: &str,
    notification_id: i64,
    now: i64,
) -> Result<()> {
    const SET: &str = "UPDATE dedupe SET notification_id = $3, first_seen = $4 WHERE queue = $1 AND key = $2";
    let statement = prepared.get(tx, SET).await?;
    tx.execute(&statement, &[&queue, &key, &notification_id, &now]).await?;
    Ok(())
}

/// Stores a body with a pending delivery per destination; returns its id.
pub async fn insert(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    queue: &str,
    now: i64,
    path: &str,
    body: &[u8],
    destinations: &[String],
) -> Result<i64> {
    const INSERT: &str = "WITH n AS (INSERT INTO notifications (queue, received_at, path, body)
                        VALUES ($1, $2, $3, $4) RETURNING id),
              d AS (INSERT INTO deliveries (queue, destination, notification_id, state, next_attempt_at)
                    SELECT $1, destination, n.id, 'pending', $2 FROM n, unnest($5::text[]) AS destination)
         SELECT id FROM n";
    let statement = prepared.get(tx, INSERT).await?;
    let row = tx.query_one(&statement, &[&queue, &now, &path, &body, &destinations]).await?;
    Ok(row.try_get(0)?)
}

/// Makes sure each destination has the stored notification pending or delivered, as `SpoolDb::queue`.
pub async fn queue_again(
    tx: &Transaction<'_>,
    prepared: &Prepared,
    queue: &str,
    notification_id: i64,
    destinations: &[String],
    now: i64,
) -> Result<()> {
    const QUEUE: &str = "INSERT INTO deliveries (queue, destination, notification_id, state, next_attempt_at)
         SELECT $1, destination, $2, 'pending', $3 FROM unnest($4::text[]) AS destination
         ON CONFLICT (queue, destination, notification_id) DO UPDATE
           SET state = 'pending', attempts = 0, next_attempt_at = $3, finished_at = NULL, lease_until = NULL
           WHERE deliveries.state = 'dead'";
    let statement = prepared.get(tx, QUEUE).await?;
    let params: [&(dyn ToSql + Sync); 4] = [&queue, &notification_id, &now, &destinations];
    tx.execute(&statement, &params).await?;
    Ok(())
}

/// Wakes every replica's dispatchers for the queue once this transaction commits.
pub async fn notify(tx: &Transaction<'_>, prepared: &Prepared, queue: &str) -> Result<()> {
    let statement = prepared.get(tx, "SELECT pg_notify($1, $2)").await?;
    tx.execute(&statement, &[&super::CHANNEL, &queue]).await?;
    Ok(())
}
