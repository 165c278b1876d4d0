//! The shared spool's tables, as numbered migrations embedded in the binary.
//!
//! Every sidecar applies what is missing when it starts, under a session advisory lock: ten replicas
//! starting at once is normal, and exactly one of them does the work while the others wait and then
//! find nothing to do. A database migrated by a newer sidecar is refused, never rewritten.

use tokio_postgres::Client;

use super::super::Failure;

/// Migration `n` is `MIGRATIONS[n - 1]`. Append only: an applied migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: notifications, their deliveries, duplicate keys. Times are unix milliseconds, as in SQLite.
    "CREATE TABLE notifications (
        id          bigserial PRIMARY KEY,
        queue       text   NOT NULL,
        received_at bigint NOT NULL,
        path        text   NOT NULL,
        body        bytea  NOT NULL
    );
    -- Bodies are stored as received, out of line and uncompressed: compressing a 20 KB signed payload
    -- costs the database more CPU than the bytes it saves, and the bodies are read back only to send.
    ALTER TABLE notifications ALTER COLUMN body SET STORAGE EXTERNAL;
    CREATE INDEX notifications_by_queue ON notifications (queue, received_at);
    CREATE TABLE deliveries (
        queue           text    NOT NULL,
        destination     text    NOT NULL,
        notification_id bigint  NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
        state           text    NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
        attempts        integer NOT NULL DEFAULT 0,
        next_attempt_at bigint  NOT NULL,
        lease_until     bigint,            -- a replica is attempting it until then
        finished_at     bigint,
        last_status     integer,
        last_error      text,              -- never containing the URL
        PRIMARY KEY (queue, destination, notification_id)
    );
    CREATE INDEX deliveries_due ON deliveries (queue, destination, state, next_attempt_at);
    CREATE INDEX deliveries_by_notification ON deliveries (notification_id);
    CREATE TABLE dedupe (
        queue           text   NOT NULL,
        key             text   NOT NULL,  -- v2:<notificationUUID> or sha256:<body hash>
        notification_id bigint REFERENCES notifications (id) ON DELETE SET NULL,
        first_seen      bigint NOT NULL,
        PRIMARY KEY (queue, key)
    );
    CREATE INDEX dedupe_by_notification ON dedupe (notification_id);",
];

pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// What [`migrate`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: i64,
    pub to: i64,
}

/// Creates `schema` if missing and applies the migrations it lacks, one transaction each, under an
/// advisory lock keyed by the schema's name.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<Migrated, Failure> {
    let key = format!("storerelay migrate {schema}");
    client.execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&key]).await?;
    let result = apply(client, schema).await;
    // Also released when the connection closes, should this fail.
    let _ = client.execute("SELECT pg_advisory_unlock(hashtextextended($1, 0))", &[&key]).await;
    result
}

async fn apply(client: &mut Client, schema: &str) -> Result<Migrated, Failure> {
    // `schema` is checked by the config (lowercase letters, digits, `_`), so it is safe unquoted.
    client
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                 version    integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let found: i64 = client
        .query_one(&format!("SELECT COALESCE(MAX(version), 0)::bigint FROM {schema}.schema_migrations"), &[])
        .await?
        .get(0);
    if found > LATEST {
        return Err(Failure::SchemaTooNew { found, supported: LATEST });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i32 + 1;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!("SET LOCAL search_path TO {schema}; {migration}")).await?;
        tx.execute(&format!("INSERT INTO {schema}.schema_migrations (version) VALUES ($1)"), &[&version]).await?;
        tx.commit().await?;
        tracing::info!(schema, version, "applied a spool schema migration");
    }
    Ok(Migrated { from: found, to: LATEST })
}
