//! The coordinator's store on PostgreSQL, shared by several coordinators.
//!
//! The same [`CoordStore`] contract as the embedded redb store, and the
//! same conformance suite. What several coordinators need from it:
//!
//! - **Revisions in commit order.** Every task change first updates the
//!   `revision` counter row and holds its lock to the commit, so task
//!   changes commit one after the other in revision order (they are rare
//!   next to runs). A reader in one snapshot that sees revision R sees
//!   every change up to R, so "changes since R" never skips a change that
//!   commits late, as `max(revision)` over a sequence could. Certificates
//!   do the same with `cert_seq`.
//! - **Runs in one statement per batch**: `unnest` of column arrays,
//!   `INSERT … ON CONFLICT DO NOTHING`, and the refused keys whose stored
//!   record differs returned by the same statement; acknowledged after the
//!   commit. Partitioned by day, partitions made ahead, retention drops
//!   whole days.
//! - **Tokens spent by one `UPDATE … WHERE uses_left > 0`**, so a token
//!   raced through two coordinators is accepted once.
//!
//! The driver is `tokio-postgres` with `deadpool-postgres` (a pool that
//! checks a connection before handing it out and replaces broken ones):
//! the trait is synchronous (its methods run on the coordinator's blocking
//! pool), so the store runs its own small runtime on a thread of its own
//! and each call waits for its answer there, whatever runtime the caller
//! is on.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use sundial_protocol::wasm::ModuleHash;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::borrow::Cow;
use std::sync::Arc;
use sundial_core::coord_store::{
    audit_matches, counts_from, live_admin, merge_labels, targets, AdminCert, Agent, AgentSeen,
    ArrivalCursor, ArrivalQuery, ArrivedRuns, AuditPage, CertPage, CertRole, ChangePage,
    CoordStore, Enrollment, JoinToken, Page, QueuedRunNow, RunCursor, RunKeyOf, RunPage, RunQuery,
    SessionMark, StoreError, StoreResult, StoredRuns, StoredTask, TokenRefusal, ADMINS_MAX,
    ARRIVAL_SCAN_MAX, PAGE_MAX, RENEW_REVOKED, RESTORE_GAP_MAX, REVOKE_REVOKED, RUN_LIST_BYTES_MAX,
    RUN_NOW_QUEUE_TTL_MS,
};
use sundial_net::at_rest::{self, StoreCipher};
use sundial_protocol::records::{self, RunRecordV1};
use sundial_protocol::wire::{AdminInfo, AuditEntry, AuditQuery, LastRun, Role, TaskDraft};
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, TaskSpec, Timestamp};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls, Row};

/// The schema's migrations, in order; each runs once, in a transaction.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/0001_init.sql")),
    (2, include_str!("../migrations/0002_session_holder.sql")),
    (3, include_str!("../migrations/0003_admins.sql")),
    (4, include_str!("../migrations/0004_modules.sql")),
    (5, include_str!("../migrations/0005_task_created.sql")),
    (6, include_str!("../migrations/0006_run_arrival.sql")),
];

/// The advisory lock key migrations and partition changes hold ("sundial").
const LOCK_KEY: i64 = 0x5355_4e44_4941_4c00;

/// The longest a call waits for PostgreSQL before it is an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A statement running longer is cancelled by the server.
const STATEMENT_TIMEOUT_MS: u64 = 20_000;
/// Tries of a transaction that met a deadlock or a serialization failure.
const TRIES_MAX: u32 = 5;
/// Connections in the pool by default.
pub const POOL_SIZE_DEFAULT: usize = 8;
/// Days of run partitions made ahead of today (and kept behind it).
const DAYS_AHEAD: i64 = 3;
const DAY_MS: i64 = 86_400_000;
/// Run-count shards (see the schema).
const COUNT_SHARDS: i32 = 16;

/// How to reach the database.
#[derive(Clone)]
pub struct PgOptions {
    /// A `postgres://` URL or a `key=value` connection string.
    pub url: String,
    /// The password, when not in the URL (read from a file or the
    /// environment by the caller).
    pub password: Option<String>,
    pub pool_size: usize,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redact(&self.url))
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// The URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:…{}", &url[..scheme + 3], &creds[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url
            .split_whitespace()
            .map(|kv| {
                if kv.starts_with("password=") {
                    "password=…"
                } else {
                    kv
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Whether a `--store` value names PostgreSQL.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://") || s.contains("dbname=")
}

/// The runtime the store's calls run on, on a thread of its own; it stops
/// when the store is dropped.
struct Driver {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Driver {
    fn start() -> StoreResult<Driver> {
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("pg-store".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|e| StoreError::unavailable("start the PostgreSQL driver", e))?;
        let handle = handle_rx
            .recv()
            .map_err(|e| StoreError::unavailable("start the PostgreSQL driver", e))?
            .map_err(|e| StoreError::unavailable("start the PostgreSQL driver", e))?;
        Ok(Driver {
            handle,
            _stop: stop_tx,
        })
    }
}

/// What went wrong inside a call, before it is a [`StoreError`].
#[derive(Debug)]
enum Fail {
    Db(tokio_postgres::Error),
    Pool(String),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        Fail::Db(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::Store(e)
    }
}

impl From<deadpool_postgres::PoolError> for Fail {
    fn from(e: deadpool_postgres::PoolError) -> Fail {
        Fail::Pool(e.to_string())
    }
}

impl From<records::RecordError> for Fail {
    fn from(e: records::RecordError) -> Fail {
        Fail::Store(e.into())
    }
}

impl Fail {
    fn retryable(&self) -> bool {
        match self {
            Fail::Db(e) => matches!(
                e.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED) | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
            ),
            _ => false,
        }
    }

    fn into_store(self, context: &'static str) -> StoreError {
        match self {
            Fail::Store(e) => e,
            Fail::Pool(e) => StoreError::unavailable(context, format!("PostgreSQL: {e}")),
            Fail::Db(e) => match e.as_db_error() {
                Some(db) => {
                    let detail = format!("PostgreSQL: {} ({})", db.message(), db.code().code());
                    if db.code() == &SqlState::UNIQUE_VIOLATION {
                        StoreError::Conflict(format!("{context}: {}", db.message()))
                    } else if db.code() == &SqlState::DATA_CORRUPTED
                        || db.code() == &SqlState::INDEX_CORRUPTED
                    {
                        StoreError::Corrupt(format!("{context}: {detail}"))
                    } else {
                        StoreError::unavailable(context, detail)
                    }
                }
                None => StoreError::unavailable(context, format!("PostgreSQL: {e}")),
            },
        }
    }
}

type R<T> = Result<T, Fail>;

/// The coordinator's store on PostgreSQL.
pub struct PgStore {
    /// Encrypts task definitions and run records at rest
    /// ([`crate::store_key`]); `None`: stored as given.
    cipher: Option<Arc<StoreCipher>>,
    driver: Driver,
    pool: Pool,
    /// The next run-count shard a write takes: concurrent batches of one
    /// coordinator update different counter rows, not wait on one.
    shard: std::sync::atomic::AtomicU32,
    /// The first day (ms) whose partitions were made ahead, so that
    /// `put_runs` makes them at most once a day.
    partitions_from: AtomicI64,
    where_: String,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.where_)
            .finish_non_exhaustive()
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn labels_json(labels: &[(String, String)]) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "[]".into())
}

fn labels_of(text: &str, what: &str) -> R<Vec<(String, String)>> {
    serde_json::from_str(text)
        .map_err(|e| Fail::Store(StoreError::Corrupt(format!("{what}: labels: {e}"))))
}

fn fp32(bytes: &[u8], what: &str) -> R<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        Fail::Store(StoreError::Corrupt(format!(
            "{what}: a fingerprint of {} bytes",
            bytes.len()
        )))
    })
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn i64_of(v: u64, what: &str) -> R<i64> {
    i64::try_from(v)
        .map_err(|_| Fail::Store(StoreError::Refused(format!("{what} {v} is out of range"))))
}

fn agent_of(row: &Row) -> R<Agent> {
    let id: i64 = row.get("id");
    let what = format!("agent {id}");
    Ok(Agent {
        id: AgentId(u64_of(id)),
        name: row.get("name"),
        labels: labels_of(row.get("labels"), &what)?,
        cert_sha256: fp32(row.get("cert_sha256"), &what)?,
        revoked: row.get("revoked"),
        forgotten: row.get("forgotten"),
        enrolled_at: Timestamp::from_millis_saturating(row.get("enrolled_at_ms")),
        last_seen: row
            .get::<_, Option<i64>>("last_seen_ms")
            .map(Timestamp::from_millis_saturating),
        clock_offset_ms: row.get("clock_offset_ms"),
        rtt_ms: row.get("rtt_ms"),
        in_session: row.get::<_, Option<i64>>("session_holder").is_some(),
    })
}

/// A stored value as plain bytes (decrypted if it is encrypted).
fn unseal<'a>(
    cipher: Option<&StoreCipher>,
    table: &'static str,
    stored: &'a [u8],
) -> R<Cow<'a, [u8]>> {
    at_rest::open_plain(cipher, table, stored).map_err(|reason| {
        Fail::Store(StoreError::from(records::RecordError {
            table,
            key: "?".into(),
            reason,
        }))
    })
}

/// `plain` as stored: encrypted when there is a cipher.
fn seal(cipher: Option<&StoreCipher>, table: &'static str, plain: Vec<u8>) -> StoreResult<Vec<u8>> {
    match cipher {
        Some(c) => c
            .seal(table, &plain)
            .map_err(|e| StoreError::Refused(format!("store key: {e}"))),
        None => Ok(plain),
    }
}

fn task_of(row: &Row, cipher: Option<&StoreCipher>) -> R<StoredTask> {
    let id: i64 = row.get("id");
    let spec = records::decode_task(
        "tasks",
        u64_of(id),
        &unseal(cipher, "tasks", row.get("spec"))?,
    )?;
    let cancelled: bool = row.get("cancelled");
    let paused: bool = row.get("paused");
    let created_ms: Option<i64> = row.get("created_ms");
    Ok(StoredTask {
        created_at: created_ms.map_or(spec.created_at, Timestamp::from_millis_saturating),
        spec,
        cancelled,
        paused: paused && !cancelled,
    })
}

/// A stored run record, opened and decoded; `key` names it in an error.
fn run_of(
    cipher: Option<&StoreCipher>,
    key: &str,
    record: &[u8],
) -> Result<RunRecord, records::RecordError> {
    at_rest::open_plain(cipher, "runs", record)
        .map_err(|reason| records::RecordError {
            table: "runs",
            key: key.to_owned(),
            reason,
        })
        .and_then(|plain| records::decode::<RunRecordV1>("runs", key.to_owned(), &plain))
        .and_then(|rec| rec.into_run(0))
}

/// A run's key from four columns starting at `from` (task, agent,
/// scheduled_at, attempt).
fn key_at(r: &Row, from: usize) -> RunKeyOf {
    (
        u64_of(r.get(from)),
        u64_of(r.get(from + 1)),
        r.get(from + 2),
        u32::try_from(r.get::<_, i32>(from + 3)).unwrap_or(0),
    )
}

/// The `created_ms` column of a task: its creation, when a resume moved
/// the spec's `created_at` away from it.
fn created_ms(t: &StoredTask) -> Option<i64> {
    (t.created_at != t.spec.created_at).then(|| t.created_at.as_millis())
}

fn token_of(row: &Row) -> R<JoinToken> {
    Ok(JoinToken {
        secret_sha256: fp32(row.get("secret_sha256"), "token")?,
        expires_at: Timestamp::from_millis_saturating(row.get("expires_at_ms")),
        uses_left: u32::try_from(row.get::<_, i32>("uses_left")).unwrap_or(0),
        labels: labels_of(row.get("labels"), "token")?,
    })
}

fn token_refusal(t: &JoinToken, now: Timestamp) -> Option<TokenRefusal> {
    if now >= t.expires_at {
        Some(TokenRefusal::Expired(t.expires_at))
    } else if t.uses_left == 0 {
        Some(TokenRefusal::UsedUp)
    } else {
        None
    }
}

const AGENT_COLUMNS: &str = "id, name, labels, cert_sha256, revoked, forgotten, enrolled_at_ms, last_seen_ms, clock_offset_ms, rtt_ms, session_holder";

/// Takes the next revision: the counter row stays locked to the commit.
async fn next_revision(t: &tokio_postgres::Transaction<'_>) -> R<u64> {
    let row = t
        .query_one(
            "UPDATE sundial_counters SET value = value + 1 WHERE name = 'revision' RETURNING value",
            &[],
        )
        .await?;
    Ok(u64_of(row.get(0)))
}

async fn counter(c: &impl deadpool_postgres::GenericClient, name: &str) -> R<u64> {
    let row = c
        .query_one(
            "SELECT value FROM sundial_counters WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(u64_of(row.get(0)))
}

/// Appends a certificate change under the next `cert_seq`.
async fn feed_cert(
    t: &tokio_postgres::Transaction<'_>,
    fingerprint: &[u8],
    agent: Option<i64>,
    revoked: bool,
) -> R<()> {
    let row = t
        .query_one(
            "UPDATE sundial_counters SET value = value + 1 WHERE name = 'cert_seq' RETURNING value",
            &[],
        )
        .await?;
    let seq: i64 = row.get(0);
    t.execute(
        "INSERT INTO sundial_certs (fingerprint, agent_id, revoked, seq) VALUES ($1, $2, $3, $4)
         ON CONFLICT (fingerprint) DO UPDATE SET agent_id = EXCLUDED.agent_id,
             revoked = EXCLUDED.revoked, seq = EXCLUDED.seq",
        &[&fingerprint, &agent, &revoked, &seq],
    )
    .await?;
    Ok(())
}

/// Appends an audit entry in the change's transaction.
async fn insert_audit(t: &tokio_postgres::Transaction<'_>, e: &AuditEntry) -> R<()> {
    let revision = e.revision.map(|r| i64_of(r, "revision")).transpose()?;
    t.execute(
        "INSERT INTO sundial_audit (at_ms, admin, cert_sha256, address, action, subject, revision, refused)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &e.at.as_millis(),
            &e.admin,
            &e.cert_sha256.as_slice(),
            &e.from,
            &e.action,
            &e.subject,
            &revision,
            &e.refused,
        ],
    )
    .await?;
    Ok(())
}

async fn audit_if(t: &tokio_postgres::Transaction<'_>, e: Option<&AuditEntry>) -> R<()> {
    match e {
        Some(e) => insert_audit(t, e).await,
        None => Ok(()),
    }
}

const ADMIN_COLUMNS: &str =
    "name, role, cert_sha256, created_at_ms, created_by, expires_at_ms, revoked_at_ms, last_used_ms";

fn role_of(text: &str) -> R<Role> {
    text.parse::<Role>()
        .map_err(|e| Fail::Store(StoreError::Corrupt(format!("sundial_admins: {e}"))))
}

fn admin_of(row: &Row) -> R<AdminInfo> {
    let ts = |ms: i64| Timestamp::from_millis_saturating(ms);
    Ok(AdminInfo {
        name: row.get(0),
        role: role_of(row.get(1))?,
        cert_sha256: fp32(row.get(2), "admin certificate")?,
        created_at: ts(row.get(3)),
        created_by: row.get(4),
        expires_at: ts(row.get(5)),
        revoked_at: row.get::<_, Option<i64>>(6).map(ts),
        last_used: row.get::<_, Option<i64>>(7).map(ts),
    })
}

/// A certificate's role from `agent_id` and its admin's (joined) name,
/// role and expiry: columns `from..from + 4`.
fn cert_role_of(row: &Row, from: usize) -> R<CertRole> {
    Ok(match row.get::<_, Option<i64>>(from) {
        Some(a) => CertRole::Agent(AgentId(u64_of(a))),
        None => match row.get::<_, Option<String>>(from + 1) {
            None => CertRole::Admin(AdminCert::legacy()),
            Some(name) => CertRole::Admin(AdminCert {
                name,
                role: role_of(row.get(from + 2))?,
                expires_at: Timestamp::from_millis_saturating(row.get(from + 3)),
            }),
        },
    })
}

/// The certificate columns [`cert_role_of`] reads, joined with admins.
const CERT_ROLE_FROM: &str = "sundial_certs c LEFT JOIN sundial_admins a
    ON c.agent_id IS NULL AND a.cert_sha256 = c.fingerprint AND a.revoked_at_ms IS NULL";

/// The name of the run partition of the day starting at `day_ms`.
fn partition_name(day_ms: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(day_ms) {
        Some(d) => format!("sundial_runs_{}", d.format("%Y%m%d")),
        None => format!("sundial_runs_d{}", day_ms / DAY_MS),
    }
}

fn day_of(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

impl PgStore {
    /// Connects, applies the migrations not yet applied (under an advisory
    /// lock, so coordinators starting together apply each once) and makes
    /// the run partitions of the days around today.
    pub fn open(opts: &PgOptions) -> StoreResult<PgStore> {
        let store = PgStore::connect(opts)?;
        store.migrate()?;
        store.ensure_partitions(wall_ms())?;
        Ok(store)
    }

    /// From now on, tasks and runs are encrypted with `cipher`.
    pub fn set_cipher(&mut self, cipher: Arc<StoreCipher>) {
        self.cipher = Some(cipher);
    }

    /// Encrypts the task and run records stored plain (a database from
    /// before encryption), a batch per statement: a crash midway loses
    /// nothing, and the next start finishes. Returns how many.
    pub fn encrypt_plain_records(&self) -> StoreResult<u64> {
        const BATCH: i64 = 1000;
        let Some(cipher) = self.cipher.clone() else {
            return Ok(0);
        };
        let mut moved = 0u64;
        let mut after_id = i64::MIN;
        loop {
            let cipher = cipher.clone();
            let (n, last, scanned) = self.call("encrypt tasks", move |pool| {
                let cipher = cipher.clone();
                async move {
                    let c = pool.get().await?;
                    let rows = c
                        .query(
                            "SELECT id, spec FROM sundial_tasks WHERE id > $1 ORDER BY id LIMIT $2",
                            &[&after_id, &BATCH],
                        )
                        .await?;
                    let mut n = 0u64;
                    for r in &rows {
                        let spec: Vec<u8> = r.get(1);
                        if spec.first() == Some(&at_rest::RECORD_ENCRYPTED) {
                            continue;
                        }
                        let id: i64 = r.get(0);
                        let sealed = seal(Some(&cipher), "tasks", spec).map_err(Fail::Store)?;
                        c.execute(
                            "UPDATE sundial_tasks SET spec = $2 WHERE id = $1",
                            &[&id, &sealed],
                        )
                        .await?;
                        n += 1;
                    }
                    let last = rows.last().map(|r| r.get::<_, i64>(0));
                    Ok((n, last, rows.len() as i64))
                }
            })?;
            moved += n;
            match last {
                Some(l) if scanned == BATCH => after_id = l,
                _ => break,
            }
        }
        let mut after = (i64::MIN, i64::MIN, i64::MIN, i32::MIN);
        loop {
            let cipher = cipher.clone();
            let (n, last, scanned) = self.call("encrypt runs", move |pool| {
                let cipher = cipher.clone();
                async move {
                    let c = pool.get().await?;
                    let rows = c
                        .query(
                            "SELECT scheduled_at_ms, task_id, agent_id, attempt, record FROM sundial_runs
                              WHERE (scheduled_at_ms, task_id, agent_id, attempt) > ($1, $2, $3, $4)
                              ORDER BY scheduled_at_ms, task_id, agent_id, attempt LIMIT $5",
                            &[&after.0, &after.1, &after.2, &after.3, &BATCH],
                        )
                        .await?;
                    let mut n = 0u64;
                    for r in &rows {
                        let record: Vec<u8> = r.get(4);
                        if record.first() == Some(&at_rest::RECORD_ENCRYPTED) {
                            continue;
                        }
                        let (sched, task, agent, attempt): (i64, i64, i64, i32) =
                            (r.get(0), r.get(1), r.get(2), r.get(3));
                        let sealed = seal(Some(&cipher), "runs", record).map_err(Fail::Store)?;
                        c.execute(
                            "UPDATE sundial_runs SET record = $5
                              WHERE scheduled_at_ms = $1 AND task_id = $2 AND agent_id = $3 AND attempt = $4",
                            &[&sched, &task, &agent, &attempt, &sealed],
                        )
                        .await?;
                        n += 1;
                    }
                    let last = rows.last().map(|r| {
                        (
                            r.get::<_, i64>(0),
                            r.get::<_, i64>(1),
                            r.get::<_, i64>(2),
                            r.get::<_, i32>(3),
                        )
                    });
                    Ok((n, last, rows.len() as i64))
                }
            })?;
            moved += n;
            match last {
                Some(l) if scanned == BATCH => after = l,
                _ => break,
            }
        }
        Ok(moved)
    }

    fn connect(opts: &PgOptions) -> StoreResult<PgStore> {
        let mut config: tokio_postgres::Config = opts.url.parse().map_err(|e| {
            StoreError::Refused(format!(
                "`{}` is not a PostgreSQL connection string: {e}",
                redact(&opts.url)
            ))
        })?;
        if let Some(p) = &opts.password {
            config.password(p.as_bytes());
        }
        if config.get_application_name().is_none() {
            config.application_name("sundial-coordinator");
        }
        config.options(format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        config.connect_timeout(Duration::from_secs(10));
        let mgr = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let driver = Driver::start()?;
        let pool = {
            let _enter = driver.handle.enter();
            Pool::builder(mgr)
                .max_size(opts.pool_size.max(1))
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(Duration::from_secs(10)))
                .create_timeout(Some(Duration::from_secs(10)))
                .recycle_timeout(Some(Duration::from_secs(5)))
                .build()
                .map_err(|e| StoreError::unavailable("PostgreSQL pool", e))?
        };
        let store = PgStore {
            cipher: None,
            driver,
            pool,
            shard: std::sync::atomic::AtomicU32::new(std::process::id()),
            partitions_from: AtomicI64::new(i64::MIN),
            where_: redact(&opts.url),
        };
        Ok(store)
    }

    /// Connects without touching the schema (`sundial-coordinator migrate`
    /// applies it then and says what it applied).
    pub fn open_unmigrated(opts: &PgOptions) -> StoreResult<PgStore> {
        PgStore::connect(opts)
    }

    /// A run-count shard, in turn.
    fn next_shard(&self) -> i32 {
        let n = self.shard.fetch_add(1, Ordering::Relaxed);
        i32::try_from(n.rem_euclid(COUNT_SHARDS as u32)).unwrap_or(0)
    }

    /// Runs `make()`'s future on the driver, again when it met a deadlock
    /// or a serialization failure, and waits for it.
    fn call<T, F, Fut>(&self, context: &'static str, make: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(Pool) -> Fut + Send + 'static,
        Fut: Future<Output = R<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let pool = self.pool.clone();
        self.driver.handle.spawn(async move {
            let mut tries = 0;
            let r = loop {
                tries += 1;
                match make(pool.clone()).await {
                    Err(e) if e.retryable() && tries < TRIES_MAX => {
                        tokio::time::sleep(Duration::from_millis(5 << tries)).await;
                    }
                    r => break r,
                }
            };
            let _ = tx.send(r);
        });
        match rx.recv_timeout(CALL_TIMEOUT) {
            Ok(r) => r.map_err(|e| e.into_store(context)),
            Err(_) => Err(StoreError::unavailable(
                context,
                format!(
                    "PostgreSQL did not answer within {} s",
                    CALL_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// Applies the migrations not yet applied, each once, under a
    /// transaction-scoped advisory lock (session locks would leak behind a
    /// transaction-pooling PgBouncer). Returns the versions applied.
    pub fn migrate(&self) -> StoreResult<Vec<i32>> {
        self.call("migrate the schema", |pool| async move {
            let mut c = pool.get().await?;
            let t = c.transaction().await?;
            t.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                .await?;
            t.batch_execute(
                "CREATE TABLE IF NOT EXISTS sundial_schema_migrations (
                     version    integer     PRIMARY KEY,
                     applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await?;
            let row = t
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM sundial_schema_migrations",
                    &[],
                )
                .await?;
            let have: i32 = row.get(0);
            let newest = MIGRATIONS.last().map_or(0, |m| m.0);
            if have > newest {
                return Err(Fail::Store(StoreError::Refused(format!(
                    "the database's schema is version {have}, newer than this coordinator knows ({newest}): upgrade the coordinator"
                ))));
            }
            let mut applied = Vec::new();
            for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
                t.batch_execute(sql).await?;
                t.execute(
                    "INSERT INTO sundial_schema_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await?;
                applied.push(*version);
            }
            t.commit().await?;
            Ok(applied)
        })
    }

    /// Makes the run partitions from yesterday to [`DAYS_AHEAD`] days on,
    /// once a day (records of a day without one wait in the default
    /// partition and move when it is made).
    pub fn ensure_partitions(&self, now_ms: i64) -> StoreResult<()> {
        let today = day_of(now_ms);
        if self.partitions_from.load(Ordering::Relaxed) == today {
            return Ok(());
        }
        for d in -1..=DAYS_AHEAD {
            self.make_partition(today + d * DAY_MS)?;
        }
        self.partitions_from.store(today, Ordering::Relaxed);
        Ok(())
    }

    /// Makes the partition of one day, moving its records out of the
    /// default partition first; a no-op when it exists.
    fn make_partition(&self, day_ms: i64) -> StoreResult<()> {
        let name = partition_name(day_ms);
        self.call("make a run partition", move |pool| {
            let name = name.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                t.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                    .await?;
                let exists = t
                    .query_opt("SELECT 1 FROM pg_class WHERE relname = $1", &[&name])
                    .await?
                    .is_some();
                if exists {
                    return Ok(());
                }
                let (lo, hi) = (day_ms, day_ms + DAY_MS);
                // Names and bounds are ours (digits), not input.
                t.batch_execute(&format!(
                    "CREATE TABLE {name} (LIKE sundial_runs INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
                     INSERT INTO {name} SELECT * FROM sundial_runs_default
                         WHERE scheduled_at_ms >= {lo} AND scheduled_at_ms < {hi};
                     DELETE FROM sundial_runs_default
                         WHERE scheduled_at_ms >= {lo} AND scheduled_at_ms < {hi};
                     ALTER TABLE sundial_runs ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi});"
                ))
                .await?;
                t.commit().await?;
                Ok(())
            }
        })
    }

    /// The day partitions, oldest first: (name, first ms, end ms).
    async fn partitions(c: &impl deadpool_postgres::GenericClient) -> R<Vec<(String, i64)>> {
        let rows = c
            .query(
                "SELECT c.relname FROM pg_inherits i
                   JOIN pg_class c ON c.oid = i.inhrelid
                   JOIN pg_class p ON p.oid = i.inhparent
                  WHERE p.relname = 'sundial_runs' AND c.relname <> 'sundial_runs_default'",
                &[],
            )
            .await?;
        let mut out: Vec<(String, i64)> = rows
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let day = chrono::NaiveDate::parse_from_str(
                    name.strip_prefix("sundial_runs_")?,
                    "%Y%m%d",
                )
                .ok()?;
                let ms = day.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis();
                Some((name, ms))
            })
            .collect();
        out.sort_by_key(|p| p.1);
        Ok(out)
    }

    /// Runs in the table, by an exact count (for checks and export).
    pub fn all_runs_count_exact(&self) -> StoreResult<u64> {
        self.call("count runs", |pool| async move {
            let c = pool.get().await?;
            let row = c
                .query_one("SELECT count(*) FROM sundial_runs", &[])
                .await?;
            Ok(u64_of(row.get(0)))
        })
    }

    /// Every stored run, oldest first (for checks and export; unbounded).
    pub fn all_runs(&self) -> StoreResult<Vec<RunRecord>> {
        let cipher = self.cipher.clone();
        self.call("read runs", move |pool| {
            let cipher = cipher.clone();
            async move {
            let c = pool.get().await?;
            let rows = c
                .query(
                    "SELECT record FROM sundial_runs ORDER BY scheduled_at_ms, task_id, agent_id, attempt",
                    &[],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let rec: RunRecordV1 =
                    records::decode("runs", "run", &unseal(cipher.as_deref(), "runs", r.get(0))?)?;
                out.push(rec.into_run(0)?);
            }
            Ok(out)
            }
        })
    }

    /// Empties every table (tests' and `import`'s fresh start).
    pub fn wipe(&self) -> StoreResult<()> {
        self.call("empty the database", |pool| async move {
            let c = pool.get().await?;
            c.batch_execute(
                "DROP TABLE IF EXISTS sundial_runs, sundial_runs_default, sundial_counters,
                     sundial_settings, sundial_certs, sundial_tokens, sundial_agents,
                     sundial_tasks, sundial_run_counts, sundial_last_runs, sundial_run_now,
                     sundial_admins, sundial_audit, sundial_schema_migrations CASCADE",
            )
            .await?;
            Ok(())
        })?;
        self.partitions_from.store(i64::MIN, Ordering::Relaxed);
        self.migrate()?;
        self.ensure_partitions(wall_ms())
    }

    /// Stores a task as it is (id, revision, flags), for `import`; the
    /// counters follow with [`PgStore::import_counters`].
    pub fn import_task(&self, t: &StoredTask) -> StoreResult<()> {
        let id = i64::try_from(t.spec.id.0).unwrap_or(i64::MAX);
        let revision = i64::try_from(t.spec.revision).unwrap_or(i64::MAX);
        let name = t.spec.name.clone();
        let spec = seal(
            self.cipher.as_deref(),
            "tasks",
            records::encode_task(&t.spec),
        )?;
        let (cancelled, paused) = (t.cancelled, t.paused);
        let created_ms = created_ms(t);
        self.call("import a task", move |pool| {
            let (name, spec) = (name.clone(), spec.clone());
            async move {
                let c = pool.get().await?;
                c.execute(
                    "INSERT INTO sundial_tasks (id, revision, name, cancelled, paused, spec, created_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&id, &revision, &name, &cancelled, &paused, &spec, &created_ms],
                )
                .await?;
                Ok(())
            }
        })
    }

    /// Stores an agent as it is, and its certificate unless revoked.
    pub fn import_agent(&self, a: &Agent) -> StoreResult<()> {
        let a = a.clone();
        self.call("import an agent", move |pool| {
            let a = a.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let id = i64_of(a.id.0, "agent id")?;
                t.execute(
                    &format!("INSERT INTO sundial_agents ({AGENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL)"),
                    &[
                        &id,
                        &a.name,
                        &labels_json(&a.labels),
                        &a.cert_sha256.as_slice(),
                        &a.revoked,
                        &a.forgotten,
                        &a.enrolled_at.as_millis(),
                        &a.last_seen.map(Timestamp::as_millis),
                        &a.clock_offset_ms,
                        &a.rtt_ms,
                    ],
                )
                .await?;
                feed_cert(&t, &a.cert_sha256, Some(id), a.revoked).await?;
                t.commit().await?;
                Ok(())
            }
        })
    }

    /// Sets the counters after an import: no id or revision handed out by
    /// the old store is handed out again.
    pub fn import_counters(
        &self,
        revision: u64,
        next_task: u64,
        next_agent: u64,
    ) -> StoreResult<()> {
        let v = [
            ("revision", i64::try_from(revision).unwrap_or(i64::MAX)),
            ("next_task", i64::try_from(next_task).unwrap_or(i64::MAX)),
            ("next_agent", i64::try_from(next_agent).unwrap_or(i64::MAX)),
        ];
        self.call("import counters", move |pool| async move {
            let mut c = pool.get().await?;
            let t = c.transaction().await?;
            for (name, value) in v {
                t.execute(
                    "UPDATE sundial_counters SET value = greatest(value, $2) WHERE name = $1",
                    &[&name, &value],
                )
                .await?;
            }
            t.commit().await?;
            Ok(())
        })
    }

    /// Adds a join token as it is (import).
    pub fn import_token(&self, tok: &JoinToken) -> StoreResult<()> {
        self.put_token(tok, None)
    }

    /// Changes a task's row under the next revision, after `check` passed
    /// on what is stored; returns the revision.
    fn change_task(
        &self,
        context: &'static str,
        id: TaskId,
        audit: Option<&AuditEntry>,
        change: impl Fn(&mut StoredTask, u64) -> Result<(), StoreError> + Send + Sync + Clone + 'static,
    ) -> StoreResult<u64> {
        let key = i64::try_from(id.0).unwrap_or(i64::MAX);
        let audit = audit.cloned();
        let cipher = self.cipher.clone();
        self.call(context, move |pool| {
            let change = change.clone();
            let audit = audit.clone();
            let cipher = cipher.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let revision = next_revision(&t).await?;
                let row = t
                    .query_opt(
                        "SELECT id, spec, cancelled, paused, created_ms FROM sundial_tasks WHERE id = $1",
                        &[&key],
                    )
                    .await?;
                let Some(row) = row else {
                    return Err(Fail::Store(StoreError::NotFound(format!("no task {id}"))));
                };
                let mut task = task_of(&row, cipher.as_deref())?;
                change(&mut task, revision)?;
                task.spec.revision = revision;
                let spec = seal(cipher.as_deref(), "tasks", records::encode_task(&task.spec))?;
                let rev = i64_of(revision, "revision")?;
                let created = created_ms(&task);
                t.execute(
                    "UPDATE sundial_tasks SET revision = $2, name = $3, cancelled = $4, paused = $5, spec = $6,
                            created_ms = $7
                      WHERE id = $1",
                    &[&key, &rev, &task.spec.name, &task.cancelled, &task.paused, &spec, &created],
                )
                .await?;
                audit_if(&t, audit.map(|a| a.for_task(id, revision)).as_ref()).await?;
                t.commit().await?;
                Ok(revision)
            }
        })
    }
}

/// Reads a page of changes after `since` (all tasks, or those `filter`
/// keeps), in one snapshot with the revision counter.
async fn changes_page(
    pool: Pool,
    since: u64,
    limit: usize,
    filter: Option<(AgentId, Vec<(String, String)>)>,
    cipher: Option<Arc<StoreCipher>>,
) -> R<ChangePage> {
    let mut c = pool.get().await?;
    let t = c
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let since_i = i64::try_from(since).unwrap_or(i64::MAX);
    let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = t
        .query(
            "SELECT id, revision, spec, cancelled, paused, created_ms FROM sundial_tasks
              WHERE revision > $1 ORDER BY revision LIMIT $2",
            &[&since_i, &(limit_i + 1)],
        )
        .await?;
    let more = rows.len() > limit;
    let mut changes = Vec::new();
    let mut upto = since;
    for row in rows.iter().take(limit) {
        upto = u64_of(row.get("revision"));
        let task = task_of(row, cipher.as_deref())?;
        let removed = task.removed();
        match &filter {
            Some((agent, labels)) => {
                if since == 0 && removed {
                    continue;
                }
                if targets(&task.spec.target, *agent, labels) {
                    changes.push((task.spec, removed));
                }
            }
            None => changes.push((task.spec, removed)),
        }
    }
    if !more {
        upto = upto.max(counter(&t, "revision").await?);
    }
    t.commit().await?;
    Ok(ChangePage {
        changes,
        upto,
        more,
    })
}

impl CoordStore for PgStore {
    fn revision(&self) -> StoreResult<u64> {
        self.call("read the revision", |pool| async move {
            let c = pool.get().await?;
            counter(&c, "revision").await
        })
    }

    fn setting(&self, key: &str) -> StoreResult<Option<String>> {
        let key = key.to_owned();
        self.call("read a setting", move |pool| {
            let key = key.clone();
            async move {
                let c = pool.get().await?;
                let row = c
                    .query_opt("SELECT value FROM sundial_settings WHERE key = $1", &[&key])
                    .await?;
                Ok(row.map(|r| r.get(0)))
            }
        })
    }

    fn put_module(&self, hash: ModuleHash, bytes: &[u8]) -> StoreResult<()> {
        let bytes = bytes.to_vec();
        self.call("write a module", move |pool| {
            let bytes = bytes.clone();
            async move {
                let c = pool.get().await?;
                c.execute(
                    "INSERT INTO sundial_modules (sha256, bytes) VALUES ($1, $2)
                     ON CONFLICT (sha256) DO NOTHING",
                    &[&hash.0.as_slice(), &bytes],
                )
                .await?;
                Ok(())
            }
        })
    }

    fn module(&self, hash: ModuleHash) -> StoreResult<Option<Vec<u8>>> {
        self.call("read a module", move |pool| async move {
            let c = pool.get().await?;
            let row = c
                .query_opt(
                    "SELECT bytes FROM sundial_modules WHERE sha256 = $1",
                    &[&hash.0.as_slice()],
                )
                .await?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn put_setting(&self, key: &str, value: &str) -> StoreResult<()> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.call("write a setting", move |pool| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                let c = pool.get().await?;
                c.execute(
                    "INSERT INTO sundial_settings (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&key, &value],
                )
                .await?;
                Ok(())
            }
        })
    }

    fn catch_up_restored(
        &self,
        agent_revision: u64,
    ) -> StoreResult<Option<(std::ops::Range<u64>, u64)>> {
        self.call("catch up a restore", move |pool| async move {
            let mut c = pool.get().await?;
            let t = c.transaction().await?;
            // The revision row first, as every task change takes it.
            let rows = t
                .query(
                    "SELECT name, value FROM sundial_counters
                      WHERE name IN ('revision', 'next_task', 'lost_ids_from')
                      ORDER BY name = 'revision' DESC, name FOR UPDATE",
                    &[],
                )
                .await?;
            let get = |n: &str| {
                rows.iter()
                    .find(|r| r.get::<_, &str>(0) == n)
                    .map_or(0, |r| u64_of(r.get(1)))
            };
            let revision = get("revision");
            let gap = agent_revision.saturating_sub(revision);
            if gap == 0 || gap > RESTORE_GAP_MAX {
                return Ok(None);
            }
            let next = get("next_task").max(1);
            let new_next = next.saturating_add(gap);
            let new_revision = agent_revision.saturating_add(1);
            let from = match get("lost_ids_from") {
                0 => next,
                f => f.min(next),
            };
            for (name, v) in [
                ("lost_ids_from", from),
                ("next_task", new_next),
                ("revision", new_revision),
            ] {
                t.execute(
                    "UPDATE sundial_counters SET value = $2 WHERE name = $1",
                    &[&name, &i64_of(v, name)?],
                )
                .await?;
            }
            t.commit().await?;
            let from = from.max(new_next.saturating_sub(RESTORE_GAP_MAX));
            Ok(Some((from..new_next, new_revision)))
        })
    }

    fn known_certs(
        &self,
        after: Option<[u8; 32]>,
        limit: usize,
    ) -> StoreResult<Vec<([u8; 32], CertRole)>> {
        let limit = i64::try_from(limit.clamp(1, PAGE_MAX)).unwrap_or(1);
        self.call("read certificates", move |pool| async move {
            let c = pool.get().await?;
            let from = after.map(|a| a.to_vec()).unwrap_or_default();
            let rows = c
                .query(
                    &format!(
                        "SELECT c.fingerprint, c.agent_id, a.name, a.role, a.expires_at_ms
                           FROM {CERT_ROLE_FROM}
                          WHERE NOT c.revoked AND c.fingerprint > $1 ORDER BY c.fingerprint LIMIT $2"
                    ),
                    &[&from, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((fp32(r.get(0), "certificate")?, cert_role_of(r, 1)?)))
                .collect()
        })
    }

    fn admins(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<AdminInfo>> {
        let limit = i64::try_from(limit.clamp(1, PAGE_MAX)).unwrap_or(1);
        let after = after.unwrap_or("").to_string();
        self.call("read admins", move |pool| {
            let after = after.clone();
            async move {
                let c = pool.get().await?;
                let rows = c
                    .query(
                        &format!(
                            "SELECT {ADMIN_COLUMNS} FROM sundial_admins WHERE name > $1 ORDER BY name LIMIT $2"
                        ),
                        &[&after, &limit],
                    )
                    .await?;
                rows.iter().map(admin_of).collect()
            }
        })
    }

    fn create_admin(&self, admin: &AdminInfo, audit: Option<&AuditEntry>) -> StoreResult<()> {
        let admin = admin.clone();
        let audit = audit.cloned();
        self.call("create an admin", move |pool| {
            let (admin, audit) = (admin.clone(), audit.clone());
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                // One admin change at a time: the name and the count checks
                // hold to the commit.
                t.execute("LOCK TABLE sundial_admins IN EXCLUSIVE MODE", &[])
                    .await?;
                let row = t
                    .query_opt(
                        "SELECT revoked_at_ms FROM sundial_admins WHERE name = $1",
                        &[&admin.name],
                    )
                    .await?;
                match row.map(|r| r.get::<_, Option<i64>>(0)) {
                    Some(None) => {
                        return Err(Fail::Store(StoreError::Refused(format!(
                            "an admin named {:?} exists already (renew it with `sundialctl admin renew {}`, or revoke it first)",
                            admin.name, admin.name
                        ))))
                    }
                    Some(Some(_)) => {}
                    None => {
                        let n: i64 = t
                            .query_one("SELECT count(*) FROM sundial_admins", &[])
                            .await?
                            .get(0);
                        if n >= i64::try_from(ADMINS_MAX).unwrap_or(i64::MAX) {
                            return Err(Fail::Store(StoreError::Refused(format!(
                                "this coordinator keeps at most {ADMINS_MAX} admins"
                            ))));
                        }
                    }
                }
                t.execute(
                    &format!(
                        "INSERT INTO sundial_admins ({ADMIN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)
                         ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, cert_sha256 = EXCLUDED.cert_sha256,
                             created_at_ms = EXCLUDED.created_at_ms, created_by = EXCLUDED.created_by,
                             expires_at_ms = EXCLUDED.expires_at_ms, revoked_at_ms = NULL, last_used_ms = NULL"
                    ),
                    &[
                        &admin.name,
                        &admin.role.name(),
                        &admin.cert_sha256.as_slice(),
                        &admin.created_at.as_millis(),
                        &admin.created_by,
                        &admin.expires_at.as_millis(),
                    ],
                )
                .await?;
                feed_cert(&t, &admin.cert_sha256, None, false).await?;
                audit_if(&t, audit.as_ref()).await?;
                t.commit().await?;
                Ok(())
            }
        })
    }

    fn renew_admin(
        &self,
        name: &str,
        cert_sha256: [u8; 32],
        expires_at: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<AdminInfo> {
        let name = name.to_string();
        let audit = audit.cloned();
        self.call("renew an admin", move |pool| {
            let (name, audit) = (name.clone(), audit.clone());
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let row = t
                    .query_opt(
                        &format!("SELECT {ADMIN_COLUMNS} FROM sundial_admins WHERE name = $1 FOR UPDATE"),
                        &[&name],
                    )
                    .await?;
                let old = live_admin(row.map(|r| admin_of(&r)).transpose()?, &name, RENEW_REVOKED)?;
                t.execute(
                    "UPDATE sundial_admins SET cert_sha256 = $2, expires_at_ms = $3 WHERE name = $1",
                    &[&name, &cert_sha256.as_slice(), &expires_at.as_millis()],
                )
                .await?;
                feed_cert(&t, &old.cert_sha256, None, true).await?;
                feed_cert(&t, &cert_sha256, None, false).await?;
                audit_if(&t, audit.as_ref()).await?;
                t.commit().await?;
                Ok(old)
            }
        })
    }

    fn revoke_admin(
        &self,
        name: &str,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<AdminInfo> {
        let name = name.to_string();
        let audit = audit.cloned();
        self.call("revoke an admin", move |pool| {
            let (name, audit) = (name.clone(), audit.clone());
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                // Two owners revoking each other at once through two
                // coordinators must not both succeed.
                t.execute("LOCK TABLE sundial_admins IN EXCLUSIVE MODE", &[])
                    .await?;
                let row = t
                    .query_opt(
                        &format!("SELECT {ADMIN_COLUMNS} FROM sundial_admins WHERE name = $1"),
                        &[&name],
                    )
                    .await?;
                let old = live_admin(row.map(|r| admin_of(&r)).transpose()?, &name, REVOKE_REVOKED)?;
                if old.role == Role::Owner {
                    let owners: i64 = t
                        .query_one(
                            "SELECT count(*) FROM sundial_admins
                              WHERE role = 'owner' AND revoked_at_ms IS NULL AND expires_at_ms > $1",
                            &[&now.as_millis()],
                        )
                        .await?
                        .get(0);
                    if owners <= 1 {
                        return Err(Fail::Store(StoreError::Refused(
                            crate::store::last_owner(&name),
                        )));
                    }
                }
                t.execute(
                    "UPDATE sundial_admins SET revoked_at_ms = $2 WHERE name = $1",
                    &[&name, &now.as_millis()],
                )
                .await?;
                feed_cert(&t, &old.cert_sha256, None, true).await?;
                audit_if(&t, audit.as_ref()).await?;
                t.commit().await?;
                Ok(old)
            }
        })
    }

    fn admin_used(&self, cert_sha256: [u8; 32], at: Timestamp) -> StoreResult<()> {
        self.call("record an admin's use", move |pool| async move {
            let c = pool.get().await?;
            c.execute(
                "UPDATE sundial_admins SET last_used_ms = greatest(coalesce(last_used_ms, $2), $2)
                  WHERE cert_sha256 = $1",
                &[&cert_sha256.as_slice(), &at.as_millis()],
            )
            .await?;
            Ok(())
        })
    }

    fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()> {
        let entry = entry.clone();
        self.call("append to the audit log", move |pool| {
            let entry = entry.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                insert_audit(&t, &entry).await?;
                t.commit().await?;
                Ok(())
            }
        })
    }

    fn audit(&self, q: &AuditQuery) -> StoreResult<AuditPage> {
        let q = q.clone();
        self.call("read the audit log", move |pool| {
            let q = q.clone();
            async move {
                let c = pool.get().await?;
                let limit = i64::from(q.limit.max(1));
                let forward = q.after.is_some();
                let after = q.after.map(|a| i64::try_from(a).unwrap_or(i64::MAX));
                let before = q.before.map(|b| i64::try_from(b).unwrap_or(i64::MAX));
                let since = q.since.map(Timestamp::as_millis);
                let sql = format!(
                    "SELECT seq, at_ms, admin, cert_sha256, address, action, subject, revision, refused
                       FROM sundial_audit
                      WHERE ($1::bigint IS NULL OR seq > $1) AND ($2::bigint IS NULL OR seq < $2)
                        AND ($3::text IS NULL OR admin = $3) AND ($4::text IS NULL OR subject = $4)
                        AND ($5::bigint IS NULL OR at_ms >= $5) AND (NOT $6 OR refused IS NOT NULL)
                      ORDER BY seq {} LIMIT $7",
                    if forward { "ASC" } else { "DESC" }
                );
                let rows = c
                    .query(
                        &sql,
                        &[
                            &after,
                            &before,
                            &q.admin,
                            &q.subject,
                            &since,
                            &q.refused,
                            &(limit + 1),
                        ],
                    )
                    .await?;
                let more = rows.len() as i64 > limit;
                let mut entries = Vec::new();
                for r in rows.iter().take(usize::try_from(limit).unwrap_or(usize::MAX)) {
                    let e = AuditEntry {
                        seq: u64_of(r.get(0)),
                        at: Timestamp::from_millis_saturating(r.get(1)),
                        admin: r.get(2),
                        cert_sha256: fp32(r.get(3), "audit certificate")?,
                        from: r.get(4),
                        action: r.get(5),
                        subject: r.get(6),
                        revision: r.get::<_, Option<i64>>(7).map(u64_of),
                        refused: r.get(8),
                    };
                    debug_assert!(audit_matches(&q, &e));
                    entries.push(e);
                }
                if !forward {
                    entries.reverse();
                }
                Ok(AuditPage { entries, more })
            }
        })
    }

    fn purge_audit_before(&self, before: Timestamp, max: usize) -> StoreResult<usize> {
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        self.call("purge the audit log", move |pool| async move {
            let c = pool.get().await?;
            let n = c
                .execute(
                    "DELETE FROM sundial_audit WHERE seq IN
                       (SELECT seq FROM sundial_audit WHERE at_ms < $1 ORDER BY seq LIMIT $2)",
                    &[&before.as_millis(), &max],
                )
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn put_token(&self, token: &JoinToken, audit: Option<&AuditEntry>) -> StoreResult<()> {
        let tok = token.clone();
        let audit = audit.cloned();
        self.call("create a token", move |pool| {
            let tok = tok.clone();
            let audit = audit.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let uses = i32::try_from(tok.uses_left).unwrap_or(i32::MAX);
                t.execute(
                    "INSERT INTO sundial_tokens (secret_sha256, expires_at_ms, uses_left, labels)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (secret_sha256) DO UPDATE SET expires_at_ms = EXCLUDED.expires_at_ms,
                         uses_left = EXCLUDED.uses_left, labels = EXCLUDED.labels",
                    &[
                        &tok.secret_sha256.as_slice(),
                        &tok.expires_at.as_millis(),
                        &uses,
                        &labels_json(&tok.labels),
                    ],
                )
                .await?;
                audit_if(&t, audit.as_ref()).await?;
                t.commit().await?;
                Ok(())
            }
        })
    }

    fn tokens(&self, after: Option<[u8; 32]>, limit: usize) -> StoreResult<Vec<JoinToken>> {
        let limit = i64::try_from(limit.clamp(1, PAGE_MAX)).unwrap_or(1);
        self.call("read tokens", move |pool| async move {
            let c = pool.get().await?;
            let from = after.map(|a| a.to_vec()).unwrap_or_default();
            let rows = c
                .query(
                    "SELECT secret_sha256, expires_at_ms, uses_left, labels FROM sundial_tokens
                      WHERE secret_sha256 > $1 ORDER BY secret_sha256 LIMIT $2",
                    &[&from, &limit],
                )
                .await?;
            rows.iter().map(token_of).collect()
        })
    }

    fn delete_token(&self, secret_sha256: [u8; 32], audit: Option<&AuditEntry>) -> StoreResult<()> {
        let audit = audit.cloned();
        self.call("revoke a token", move |pool| {
            let audit = audit.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let n = t
                    .execute(
                        "DELETE FROM sundial_tokens WHERE secret_sha256 = $1",
                        &[&secret_sha256.as_slice()],
                    )
                    .await?;
                if n == 0 {
                    return Err(Fail::Store(StoreError::NotFound(
                        "no such join token".into(),
                    )));
                }
                audit_if(&t, audit.as_ref()).await?;
                t.commit().await?;
                Ok(())
            }
        })
    }

    fn check_token(
        &self,
        secret_sha256: [u8; 32],
        now: Timestamp,
    ) -> StoreResult<Result<JoinToken, TokenRefusal>> {
        self.call("read a token", move |pool| async move {
            let c = pool.get().await?;
            let row = c
                .query_opt(
                    "SELECT secret_sha256, expires_at_ms, uses_left, labels FROM sundial_tokens
                      WHERE secret_sha256 = $1",
                    &[&secret_sha256.as_slice()],
                )
                .await?;
            Ok(match row {
                None => Err(TokenRefusal::Unknown),
                Some(r) => {
                    let tok = token_of(&r)?;
                    match token_refusal(&tok, now) {
                        Some(why) => Err(why),
                        None => Ok(tok),
                    }
                }
            })
        })
    }

    fn reserve_agent_id(&self) -> StoreResult<AgentId> {
        self.call("reserve an agent id", |pool| async move {
            let c = pool.get().await?;
            let row = c
                .query_one(
                    "UPDATE sundial_counters SET value = greatest(value, 1) + 1
                      WHERE name = 'next_agent' RETURNING value - 1",
                    &[],
                )
                .await?;
            Ok(AgentId(u64_of(row.get(0))))
        })
    }

    fn enroll(&self, e: &Enrollment) -> StoreResult<Result<Agent, TokenRefusal>> {
        let e = e.clone();
        self.call("enroll", move |pool| {
            let e = e.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                // One statement spends one use: two coordinators racing for
                // the last use cannot both have it.
                let spent = t
                    .query_opt(
                        "UPDATE sundial_tokens SET uses_left = uses_left - 1
                          WHERE secret_sha256 = $1 AND uses_left > 0 AND expires_at_ms > $2
                          RETURNING labels",
                        &[&e.token_sha256.as_slice(), &e.now.as_millis()],
                    )
                    .await?;
                let Some(spent) = spent else {
                    let row = t
                        .query_opt(
                            "SELECT secret_sha256, expires_at_ms, uses_left, labels FROM sundial_tokens
                              WHERE secret_sha256 = $1",
                            &[&e.token_sha256.as_slice()],
                        )
                        .await?;
                    return Ok(Err(match row {
                        None => TokenRefusal::Unknown,
                        Some(r) => token_refusal(&token_of(&r)?, e.now).unwrap_or(TokenRefusal::UsedUp),
                    }));
                };
                let token_labels = labels_of(spent.get(0), "token")?;
                let labels = merge_labels(&token_labels, &e.labels);
                let id = i64_of(e.agent.0, "agent id")?;
                let inserted = t
                    .execute(
                        "INSERT INTO sundial_agents (id, name, labels, cert_sha256, enrolled_at_ms)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
                        &[
                            &id,
                            &e.name,
                            &labels_json(&labels),
                            &e.cert_sha256.as_slice(),
                            &e.now.as_millis(),
                        ],
                    )
                    .await?;
                if inserted == 0 {
                    return Err(Fail::Store(StoreError::Conflict(format!(
                        "agent id {} is taken (reserve one first)",
                        e.agent
                    ))));
                }
                feed_cert(&t, &e.cert_sha256, Some(id), false).await?;
                t.commit().await?;
                Ok(Ok(Agent {
                    id: e.agent,
                    name: e.name.clone(),
                    labels,
                    cert_sha256: e.cert_sha256,
                    revoked: false,
                    forgotten: false,
                    enrolled_at: e.now,
                    last_seen: None,
                    clock_offset_ms: None,
                    rtt_ms: None,
                    in_session: false,
                }))
            }
        })
    }

    fn agent(&self, id: AgentId) -> StoreResult<Option<Agent>> {
        self.call("read an agent", move |pool| async move {
            let c = pool.get().await?;
            let Ok(key) = i64::try_from(id.0) else {
                return Ok(None);
            };
            let row = c
                .query_opt(
                    &format!("SELECT {AGENT_COLUMNS} FROM sundial_agents WHERE id = $1"),
                    &[&key],
                )
                .await?;
            row.as_ref().map(agent_of).transpose()
        })
    }

    fn agents(&self, after: Option<AgentId>, limit: usize) -> StoreResult<Vec<Agent>> {
        let limit = i64::try_from(limit.clamp(1, PAGE_MAX)).unwrap_or(1);
        self.call("read agents", move |pool| async move {
            let c = pool.get().await?;
            let from = after.map_or(-1, |a| i64::try_from(a.0).unwrap_or(i64::MAX));
            let rows = c
                .query(
                    &format!(
                        "SELECT {AGENT_COLUMNS} FROM sundial_agents WHERE id > $1 ORDER BY id LIMIT $2"
                    ),
                    &[&from, &limit],
                )
                .await?;
            rows.iter().map(agent_of).collect()
        })
    }

    fn agent_seen(&self, id: AgentId, seen: AgentSeen) -> StoreResult<()> {
        self.call("record an agent's contact", move |pool| async move {
            let c = pool.get().await?;
            let key = i64_of(id.0, "agent id")?;
            let (offset, rtt) = seen.clock.unzip();
            // Up: this holder now; Down: cleared if this holder still has it.
            let (up, down) = match seen.session {
                Some(SessionMark::Up { holder }) => (Some(holder as i64), None),
                Some(SessionMark::Down { holder }) => (None, Some(holder as i64)),
                None => (None, None),
            };
            let n = c
                .execute(
                    "UPDATE sundial_agents SET last_seen_ms = $2,
                         clock_offset_ms = coalesce($3, clock_offset_ms),
                         rtt_ms = coalesce($4, rtt_ms),
                         session_holder = CASE
                             WHEN $5::bigint IS NOT NULL THEN $5::bigint
                             WHEN session_holder = $6::bigint THEN NULL
                             ELSE session_holder END
                      WHERE id = $1",
                    &[&key, &seen.at.as_millis(), &offset, &rtt, &up, &down],
                )
                .await?;
            if n == 0 {
                return Err(Fail::Store(StoreError::NotFound(format!("no agent {id}"))));
            }
            Ok(())
        })
    }

    fn revoke_agent(&self, id: AgentId, audit: Option<&AuditEntry>) -> StoreResult<Agent> {
        let audit = audit.cloned();
        self.call("revoke an agent", move |pool| {
            let audit = audit.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let key = i64_of(id.0, "agent id")?;
                let row = t
                    .query_opt(
                        &format!(
                            "SELECT {AGENT_COLUMNS} FROM sundial_agents WHERE id = $1 FOR UPDATE"
                        ),
                        &[&key],
                    )
                    .await?;
                let Some(row) = row else {
                    return Err(Fail::Store(StoreError::NotFound(format!("no agent {id}"))));
                };
                let mut agent = agent_of(&row)?;
                if !agent.revoked {
                    t.execute(
                        "UPDATE sundial_agents SET revoked = true WHERE id = $1",
                        &[&key],
                    )
                    .await?;
                    feed_cert(&t, &agent.cert_sha256, Some(key), true).await?;
                    agent.revoked = true;
                }
                audit_if(&t, audit.as_ref()).await?;
                t.commit().await?;
                Ok(agent)
            }
        })
    }

    fn forget_agent(&self, id: AgentId, audit: Option<&AuditEntry>) -> StoreResult<()> {
        let audit = audit.cloned();
        self.call("forget an agent", move |pool| {
            let audit = audit.clone();
            async move {
            let mut c = pool.get().await?;
            let t = c.transaction().await?;
            let key = i64_of(id.0, "agent id")?;
            let row = t
                .query_opt(
                    "UPDATE sundial_agents SET forgotten = forgotten OR revoked WHERE id = $1 RETURNING revoked",
                    &[&key],
                )
                .await?;
            match row.map(|r| r.get::<_, bool>(0)) {
                None => Err(Fail::Store(StoreError::NotFound(format!("no agent {id}")))),
                Some(false) => Err(Fail::Store(StoreError::Refused(format!(
                    "agent {id} is not revoked; revoke it first (sundialctl agent revoke {id})"
                )))),
                Some(true) => {
                    audit_if(&t, audit.as_ref()).await?;
                    t.commit().await?;
                    Ok(())
                }
            }
        }})
    }

    fn create_task(
        &self,
        draft: TaskDraft,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<TaskSpec> {
        let audit = audit.cloned();
        let cipher = self.cipher.clone();
        self.call("create a task", move |pool| {
            let draft = draft.clone();
            let audit = audit.clone();
            let cipher = cipher.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                let revision = next_revision(&t).await?;
                if let Some(name) = &draft.name {
                    let taken = t
                        .query_opt(
                            "SELECT 1 FROM sundial_tasks WHERE name = $1 AND NOT cancelled",
                            &[name],
                        )
                        .await?;
                    if taken.is_some() {
                        return Err(Fail::Store(StoreError::Refused(format!(
                            "a task named `{name}` exists already"
                        ))));
                    }
                }
                let row = t
                    .query_one(
                        "UPDATE sundial_counters SET value = greatest(value, 1) + 1
                          WHERE name = 'next_task' RETURNING value - 1",
                        &[],
                    )
                    .await?;
                let id: i64 = row.get(0);
                let created_at = counts_from(&draft.schedule, now);
                let spec = TaskSpec {
                    id: TaskId(u64_of(id)),
                    name: draft.name,
                    target: draft.target,
                    schedule: draft.schedule,
                    action: draft.action,
                    policies: draft.policies,
                    revision,
                    created_at,
                    // Checked by the node before it is stored (`draft_refusal`).
                    placement: draft.placement.0.and_then(|a| a.placement().ok()),
                };
                let bytes = seal(cipher.as_deref(), "tasks", records::encode_task(&spec))?;
                t.execute(
                    "INSERT INTO sundial_tasks (id, revision, name, spec) VALUES ($1, $2, $3, $4)",
                    &[&id, &i64_of(revision, "revision")?, &spec.name, &bytes],
                )
                .await?;
                audit_if(&t, audit.map(|a| a.for_task(spec.id, revision)).as_ref()).await?;
                t.commit().await?;
                Ok(spec)
            }
        })
    }

    fn update_task(
        &self,
        spec: &TaskSpec,
        expected_revision: u64,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<u64> {
        let new = spec.clone();
        let id = spec.id;
        self.change_task("update a task", id, audit, move |task, _| {
            if task.cancelled {
                return Err(StoreError::Refused(format!("task {id} is cancelled")));
            }
            if task.spec.revision != expected_revision {
                return Err(StoreError::Conflict(format!(
                    "task {id} changed since it was read (revision {} now, {expected_revision} read); read it again",
                    task.spec.revision
                )));
            }
            task.spec = new.clone();
            Ok(())
        })
    }

    fn cancel_task(&self, id: TaskId, audit: Option<&AuditEntry>) -> StoreResult<u64> {
        self.change_task("cancel a task", id, audit, move |task, _| {
            if task.cancelled {
                return Err(StoreError::Refused(format!(
                    "task {id} is already cancelled"
                )));
            }
            task.cancelled = true;
            Ok(())
        })
    }

    fn set_paused(
        &self,
        id: TaskId,
        paused: bool,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<u64> {
        self.change_task("pause a task", id, audit, move |task, _| {
            if task.cancelled {
                return Err(StoreError::Refused(format!("task {id} is cancelled")));
            }
            if task.paused == paused {
                return Err(StoreError::Refused(format!(
                    "task {id} is {}",
                    if paused {
                        "paused already"
                    } else {
                        "not paused"
                    }
                )));
            }
            task.paused = paused;
            if !paused {
                // Occurrences while paused are not expected of anyone.
                task.spec.created_at = task.spec.created_at.max(now);
            }
            Ok(())
        })
    }

    fn task(&self, id: TaskId) -> StoreResult<Option<StoredTask>> {
        let cipher = self.cipher.clone();
        self.call("read a task", move |pool| {
            let cipher = cipher.clone();
            async move {
                let c = pool.get().await?;
                let Ok(key) = i64::try_from(id.0) else {
                    return Ok(None);
                };
                let row = c
                    .query_opt(
                        "SELECT id, spec, cancelled, paused, created_ms FROM sundial_tasks WHERE id = $1",
                        &[&key],
                    )
                    .await?;
                row.as_ref()
                    .map(|r| task_of(r, cipher.as_deref()))
                    .transpose()
            }
        })
    }

    fn tasks(&self, after: Option<TaskId>, limit: usize) -> StoreResult<Vec<StoredTask>> {
        let limit = i64::try_from(limit.clamp(1, PAGE_MAX)).unwrap_or(1);
        let cipher = self.cipher.clone();
        self.call("read tasks", move |pool| {
            let cipher = cipher.clone();
            async move {
                let c = pool.get().await?;
                let from = after.map_or(-1, |a| i64::try_from(a.0).unwrap_or(i64::MAX));
                let rows = c
                    .query(
                        "SELECT id, spec, cancelled, paused, created_ms FROM sundial_tasks
                      WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&from, &limit],
                    )
                    .await?;
                rows.iter().map(|r| task_of(r, cipher.as_deref())).collect()
            }
        })
    }

    fn changes_for(
        &self,
        agent: AgentId,
        labels: &[(String, String)],
        since: u64,
        limit: usize,
    ) -> StoreResult<ChangePage> {
        let labels = labels.to_vec();
        let limit = limit.clamp(1, PAGE_MAX);
        let cipher = self.cipher.clone();
        self.call("read changes", move |pool| {
            changes_page(
                pool,
                since,
                limit,
                Some((agent, labels.clone())),
                cipher.clone(),
            )
        })
    }

    fn store_runs(&self, runs: &[RunRecord]) -> StoreResult<StoredRuns> {
        if runs.is_empty() {
            return Ok(StoredRuns::default());
        }
        let _ = self.ensure_partitions(wall_ms());
        // The first of a key in the batch is the one offered; a later one
        // that differs is refused as a stored one would be.
        let mut seen: std::collections::HashMap<RunKeyOf, Vec<u8>> = Default::default();
        let mut conflicts = Vec::new();
        let mut cols = RunColumns::default();
        for r in runs {
            let key = (
                r.task_id.0,
                r.agent_id.0,
                r.scheduled_at.as_millis(),
                r.attempt,
            );
            let bytes = seal(
                self.cipher.as_deref(),
                "runs",
                records::encode(&RunRecordV1::from_run(r)),
            )?;
            match seen.get(&key) {
                Some(b) if *b == bytes => continue,
                Some(_) => {
                    conflicts.push(key);
                    continue;
                }
                None => {}
            }
            seen.insert(key, bytes.clone());
            let (Ok(task), Ok(agent)) = (i64::try_from(key.0), i64::try_from(key.1)) else {
                conflicts.push(key);
                continue;
            };
            cols.task.push(task);
            cols.agent.push(agent);
            cols.sched.push(key.2);
            cols.attempt.push(i32::try_from(key.3).unwrap_or(i32::MAX));
            cols.outcome.push(r.outcome.as_str().to_owned());
            cols.finished.push(r.finished_at.map(Timestamp::as_millis));
            cols.detail.push(r.why());
            cols.record.push(bytes);
        }
        let shard = self.next_shard();
        let refused = self.call("store runs", move |pool| {
            let cols = cols.clone();
            async move {
                // One statement is one transaction (autocommit): no
                // BEGIN and COMMIT round trips around it.
                let c = pool.get().await?;
                // One statement: insert what is new, keep the latest run
                // per (task, agent), count what went in, and return the
                // keys already stored with a different record (the final
                // SELECT sees the table as before the statement, and looks
                // up only the keys not inserted: a batch of new runs costs
                // no lookups; the data-modifying parts run to completion
                // whether read or not).
                let rows = c
                    .query(
                        "WITH input AS (
                             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int[],
                                                  $5::text[], $6::bigint[], $7::text[], $8::bytea[])
                                 AS i(task_id, agent_id, scheduled_at_ms, attempt, outcome,
                                      finished_at_ms, detail, record)
                         ),
                         ins AS (
                             INSERT INTO sundial_runs (scheduled_at_ms, task_id, agent_id, attempt, outcome, record)
                             SELECT scheduled_at_ms, task_id, agent_id, attempt, outcome, record FROM input
                             ON CONFLICT DO NOTHING
                             RETURNING task_id, agent_id, scheduled_at_ms, attempt
                         ),
                         latest AS (
                             SELECT DISTINCT ON (i.task_id, i.agent_id) i.*
                               FROM input i JOIN ins USING (task_id, agent_id, scheduled_at_ms, attempt)
                              ORDER BY i.task_id, i.agent_id, i.scheduled_at_ms DESC, i.attempt DESC
                         ),
                         last AS (
                             INSERT INTO sundial_last_runs AS l
                                 (task_id, agent_id, scheduled_at_ms, attempt, outcome, finished_at_ms, detail)
                             SELECT task_id, agent_id, scheduled_at_ms, attempt, outcome, finished_at_ms, detail
                               FROM latest
                             ON CONFLICT (task_id, agent_id) DO UPDATE
                                 SET scheduled_at_ms = EXCLUDED.scheduled_at_ms, attempt = EXCLUDED.attempt,
                                     outcome = EXCLUDED.outcome, finished_at_ms = EXCLUDED.finished_at_ms,
                                     detail = EXCLUDED.detail
                               WHERE (l.scheduled_at_ms, l.attempt) <= (EXCLUDED.scheduled_at_ms, EXCLUDED.attempt)
                             RETURNING 1
                         ),
                         counted AS (
                             INSERT INTO sundial_run_counts AS rc (shard, n)
                             SELECT $9, count(*) FROM ins
                             ON CONFLICT (shard) DO UPDATE SET n = rc.n + EXCLUDED.n
                             RETURNING 1
                         )
                         SELECT i.task_id, i.agent_id, i.scheduled_at_ms, i.attempt, true
                           FROM (SELECT * FROM input
                                  WHERE (task_id, agent_id, scheduled_at_ms, attempt) NOT IN
                                        (SELECT task_id, agent_id, scheduled_at_ms, attempt FROM ins)) i
                           JOIN sundial_runs r USING (task_id, agent_id, scheduled_at_ms, attempt)
                          WHERE r.record <> i.record
                         UNION ALL
                         SELECT task_id, agent_id, scheduled_at_ms, attempt, false FROM ins",
                        &[
                            &cols.task,
                            &cols.agent,
                            &cols.sched,
                            &cols.attempt,
                            &cols.outcome,
                            &cols.finished,
                            &cols.detail,
                            &cols.record,
                            &shard,
                        ],
                    )
                    .await?;
                let mut out = StoredRuns::default();
                for r in &rows {
                    let key: RunKeyOf = (
                        u64_of(r.get(0)),
                        u64_of(r.get(1)),
                        r.get::<_, i64>(2),
                        u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                    );
                    if r.get::<_, bool>(4) {
                        out.conflicts.push(key);
                    } else {
                        out.fresh.push(key);
                    }
                }
                Ok(out)
            }
        })?;
        let mut refused = refused;
        conflicts.append(&mut refused.conflicts);
        refused.conflicts = conflicts;
        Ok(refused)
    }

    fn runs_arrived(&self, q: &ArrivalQuery) -> StoreResult<ArrivedRuns> {
        let q = *q;
        let cipher = self.cipher.clone();
        self.call("read runs", move |pool| {
            let cipher = cipher.clone();
            async move {
                let c = pool.get().await?;
                let limit = q.limit.clamp(1, RUN_LIST_MAX_ROWS);
                let filtered = q.task.is_some() || q.agent.is_some();
                let scan = if filtered { ARRIVAL_SCAN_MAX } else { limit + 1 };
                let scan_i = i64::try_from(scan).unwrap_or(i64::MAX);
                // Keys in arrival order, short of the oldest transaction
                // still running (it may commit runs before them).
                let rows = match q.after {
                    Some(after) => {
                        let seq = i64::try_from(after.seq).unwrap_or(i64::MAX);
                        c.query(
                            "SELECT arrival_xid::text, arrival_seq, task_id, agent_id, scheduled_at_ms, attempt
                               FROM sundial_runs
                              WHERE arrival_xid < pg_snapshot_xmin(pg_current_snapshot())
                                AND (arrival_xid, arrival_seq) > ($1::text::xid8, $2)
                              ORDER BY arrival_xid, arrival_seq LIMIT $3",
                            &[&after.epoch.to_string(), &seq, &scan_i],
                        )
                        .await?
                    }
                    None => {
                        c.query(
                            "SELECT arrival_xid::text, arrival_seq, task_id, agent_id, scheduled_at_ms, attempt
                               FROM sundial_runs
                              WHERE arrival_xid < pg_snapshot_xmin(pg_current_snapshot())
                              ORDER BY arrival_xid DESC, arrival_seq DESC LIMIT $1",
                            &[&scan_i],
                        )
                        .await?
                    }
                };
                let at = |r: &Row| ArrivalCursor {
                    epoch: r.get::<_, String>(0).parse().unwrap_or(0),
                    seq: u64_of(r.get(1)),
                };
                let key = |r: &Row| key_at(r, 2);
                let wanted = |(task, agent, _, _): RunKeyOf| {
                    q.task.is_none_or(|x| x.0 == task) && q.agent.is_none_or(|x| x.0 == agent)
                };
                let mut out = ArrivedRuns::default();
                let mut page: Vec<(ArrivalCursor, RunKeyOf)> = Vec::new();
                match q.after {
                    Some(after) => {
                        out.next = after;
                        for (i, r) in rows.iter().enumerate() {
                            if page.len() >= limit || i >= ARRIVAL_SCAN_MAX {
                                out.more = true;
                                break;
                            }
                            out.next = at(r);
                            if wanted(key(r)) {
                                page.push((at(r), key(r)));
                            }
                        }
                        // A filtered scan that read all it may: more may follow.
                        out.more |= rows.len() >= scan;
                    }
                    None => {
                        out.next = rows.first().map_or(ArrivalCursor::START, at);
                        for r in &rows {
                            if page.len() >= limit {
                                break;
                            }
                            if wanted(key(r)) {
                                page.push((at(r), key(r)));
                            }
                        }
                        page.reverse();
                    }
                }
                if page.is_empty() {
                    return Ok(out);
                }
                let (mut tasks, mut agents, mut scheds, mut attempts) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (_, (t, a, s, n)) in &page {
                    tasks.push(i64::try_from(*t).unwrap_or(i64::MAX));
                    agents.push(i64::try_from(*a).unwrap_or(i64::MAX));
                    scheds.push(*s);
                    attempts.push(i32::try_from(*n).unwrap_or(i32::MAX));
                }
                let records = c
                    .query(
                        "SELECT task_id, agent_id, scheduled_at_ms, attempt, record FROM sundial_runs
                          WHERE (task_id, agent_id, scheduled_at_ms, attempt) IN
                                (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::int[]))",
                        &[&tasks, &agents, &scheds, &attempts],
                    )
                    .await?;
                let mut by_key: std::collections::HashMap<RunKeyOf, Vec<u8>> = records
                    .iter()
                    .map(|r| (key_at(r, 0), r.get::<_, Vec<u8>>(4)))
                    .collect();
                let mut bytes = 0usize;
                for (i, (cur, k)) in page.iter().enumerate() {
                    if bytes >= RUN_LIST_BYTES_MAX {
                        if q.after.is_some() {
                            out.more = true;
                            out.next = page[i - 1].0;
                        }
                        break;
                    }
                    // Purged between the two reads: gone.
                    let Some(record) = by_key.remove(k) else {
                        continue;
                    };
                    bytes = bytes.saturating_add(record.len());
                    out.first.get_or_insert(*cur);
                    match run_of(cipher.as_deref(), &cur.to_string(), &record) {
                        Ok(run) => out.runs.push(run),
                        Err(e) => {
                            out.unreadable += 1;
                            tracing::warn!(error = %e, "skipped an unreadable run record");
                        }
                    }
                }
                Ok(out)
            }
        })
    }

    fn runs(&self, q: &RunQuery) -> StoreResult<RunPage> {
        let q = *q;
        let cipher = self.cipher.clone();
        self.call("read runs", move |pool| {
            let cipher = cipher.clone();
            async move {
            let c = pool.get().await?;
            let limit = q.limit.clamp(1, RUN_LIST_MAX_ROWS);
            let forward = matches!(q.page, Page::After(_))
                || (q.since.is_some() && q.page == Page::Latest && q.forward_from_since);
            let mut sql = String::from(
                "SELECT scheduled_at_ms, task_id, agent_id, attempt, record FROM sundial_runs WHERE true",
            );
            let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            let arg = |v: Box<dyn ToSql + Sync + Send>, params: &mut Vec<_>| {
                params.push(v);
                format!("${}", params.len())
            };
            if let Some(task) = q.task {
                let p = arg(Box::new(i64::try_from(task.0).unwrap_or(i64::MAX)), &mut params);
                sql += &format!(" AND task_id = {p}");
            }
            if let Some(agent) = q.agent {
                let p = arg(Box::new(i64::try_from(agent.0).unwrap_or(i64::MAX)), &mut params);
                sql += &format!(" AND agent_id = {p}");
            }
            if let Some(since) = q.since {
                let p = arg(Box::new(since.as_millis()), &mut params);
                sql += &format!(" AND scheduled_at_ms >= {p}");
            }
            // Keyset paging in the cursor's order (time, task, agent,
            // attempt), written on the columns of the index that serves it.
            let cursor = match q.page {
                Page::After(c) => Some((c, ">")),
                Page::Before(c) => Some((c, "<")),
                Page::Latest => None,
            };
            if let Some((cur, op)) = cursor {
                let s = arg(Box::new(cur.scheduled_at_ms), &mut params);
                let tk = arg(Box::new(i64::try_from(cur.task).unwrap_or(i64::MAX)), &mut params);
                let ag = arg(Box::new(i64::try_from(cur.agent).unwrap_or(i64::MAX)), &mut params);
                let at = arg(Box::new(i32::try_from(cur.attempt).unwrap_or(i32::MAX)), &mut params);
                sql += &match (q.task, q.agent) {
                    (Some(_), _) => format!(" AND (scheduled_at_ms, agent_id, attempt) {op} ({s}, {ag}, {at})"),
                    (None, Some(_)) => format!(" AND (scheduled_at_ms, task_id, attempt) {op} ({s}, {tk}, {at})"),
                    (None, None) => format!(
                        " AND (scheduled_at_ms, task_id, agent_id, attempt) {op} ({s}, {tk}, {ag}, {at})"
                    ),
                };
            }
            let dir = if forward { "ASC" } else { "DESC" };
            sql += &format!(
                " ORDER BY scheduled_at_ms {dir}, task_id {dir}, agent_id {dir}, attempt {dir} LIMIT {}",
                limit + 1
            );
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
            let rows = c.query(&sql, &refs).await?;
            let mut more = rows.len() > limit;
            let mut keys = Vec::new();
            let mut runs = Vec::new();
            let mut unreadable = 0u64;
            let mut bytes = 0usize;
            for r in rows.iter().take(limit) {
                if bytes >= RUN_LIST_BYTES_MAX {
                    more = true;
                    break;
                }
                let cur = RunCursor {
                    scheduled_at_ms: r.get(0),
                    task: u64_of(r.get(1)),
                    agent: u64_of(r.get(2)),
                    attempt: u32::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                };
                let record: &[u8] = r.get(4);
                bytes = bytes.saturating_add(record.len());
                keys.push(cur);
                match run_of(cipher.as_deref(), &cur.to_string(), record) {
                    Ok(run) => runs.push(run),
                    Err(e) => {
                        unreadable += 1;
                        tracing::warn!(error = %e, "skipped an unreadable run record");
                    }
                }
            }
            if !forward {
                keys.reverse();
                runs.reverse();
            }
            let matched = if q.task.is_none() && q.agent.is_none() && q.since.is_none() {
                let row = c
                    .query_one("SELECT coalesce(sum(n), 0)::bigint FROM sundial_run_counts", &[])
                    .await?;
                Some(u64_of(row.get(0)))
            } else {
                None
            };
            Ok(RunPage {
                runs,
                first: keys.first().copied(),
                last: keys.last().copied(),
                more,
                matched,
                unreadable,
            })
            }
        })
    }

    fn last_runs(&self, task: TaskId, limit: usize) -> StoreResult<Vec<LastRun>> {
        let limit = i64::try_from(limit.clamp(1, PAGE_MAX)).unwrap_or(1);
        self.call("read last runs", move |pool| async move {
            let c = pool.get().await?;
            let key = i64::try_from(task.0).unwrap_or(i64::MAX);
            let rows = c
                .query(
                    "SELECT agent_id, scheduled_at_ms, attempt, outcome, finished_at_ms, detail
                       FROM sundial_last_runs WHERE task_id = $1 ORDER BY agent_id LIMIT $2",
                    &[&key, &limit],
                )
                .await?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    Some(LastRun {
                        agent_id: AgentId(u64_of(r.get(0))),
                        scheduled_at: Timestamp::from_millis_saturating(r.get(1)),
                        attempt: u32::try_from(r.get::<_, i32>(2)).ok()?,
                        outcome: Outcome::parse(r.get(3))?,
                        finished_at: r
                            .get::<_, Option<i64>>(4)
                            .map(Timestamp::from_millis_saturating),
                        detail: r.get(5),
                    })
                })
                .collect())
        })
    }

    /// Drops the day partitions wholly before `before` (counted, so the
    /// answer may exceed `max`: whole days go at once), then deletes at
    /// most `max` older runs from the partition `before` falls in and the
    /// default one.
    fn purge_runs_before(&self, before: Timestamp, max: usize) -> StoreResult<usize> {
        let before = before.as_millis();
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        let shard = self.next_shard();
        self.call("purge runs", move |pool| async move {
            let mut c = pool.get().await?;
            let t = c.transaction().await?;
            t.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                .await?;
            let mut gone: i64 = 0;
            for (name, day) in PgStore::partitions(&t).await? {
                if day + DAY_MS > before {
                    break;
                }
                let row = t
                    .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                    .await?;
                gone += row.get::<_, i64>(0);
                t.batch_execute(&format!(
                    "ALTER TABLE sundial_runs DETACH PARTITION {name}; DROP TABLE {name};"
                ))
                .await?;
            }
            if gone < max {
                gone += t
                    .query_one(
                        "WITH doomed AS (
                             SELECT task_id, agent_id, scheduled_at_ms, attempt FROM sundial_runs
                              WHERE scheduled_at_ms < $1
                              ORDER BY scheduled_at_ms, task_id, agent_id, attempt LIMIT $2
                         ), del AS (
                             DELETE FROM sundial_runs r USING doomed d
                              WHERE (r.task_id, r.agent_id, r.scheduled_at_ms, r.attempt)
                                  = (d.task_id, d.agent_id, d.scheduled_at_ms, d.attempt)
                             RETURNING 1
                         ) SELECT count(*) FROM del",
                        &[&before, &(max - gone)],
                    )
                    .await?
                    .get::<_, i64>(0);
            }
            if gone > 0 {
                t.execute(
                    "INSERT INTO sundial_run_counts AS rc (shard, n) VALUES ($1, $2)
                     ON CONFLICT (shard) DO UPDATE SET n = rc.n + EXCLUDED.n",
                    &[&shard, &(-gone)],
                )
                .await?;
            }
            t.commit().await?;
            Ok(usize::try_from(gone).unwrap_or(0))
        })
    }

    fn run_count(&self) -> StoreResult<u64> {
        self.call("count runs", |pool| async move {
            let c = pool.get().await?;
            let row = c
                .query_one(
                    "SELECT coalesce(sum(n), 0)::bigint FROM sundial_run_counts",
                    &[],
                )
                .await?;
            Ok(u64_of(row.get(0)))
        })
    }

    fn cert_seq(&self) -> StoreResult<u64> {
        self.call("read the certificate sequence", |pool| async move {
            let c = pool.get().await?;
            counter(&c, "cert_seq").await
        })
    }

    fn cert_changes(&self, since: u64, limit: usize) -> StoreResult<CertPage> {
        let limit = limit.clamp(1, PAGE_MAX);
        self.call("read certificate changes", move |pool| async move {
            let c = pool.get().await?;
            let since_i = i64::try_from(since).unwrap_or(i64::MAX);
            let rows = c
                .query(
                    &format!(
                        "SELECT c.fingerprint, c.revoked, c.seq, c.agent_id, a.name, a.role, a.expires_at_ms
                           FROM {CERT_ROLE_FROM}
                          WHERE c.seq > $1 ORDER BY c.seq LIMIT $2"
                    ),
                    &[&since_i, &(i64::try_from(limit).unwrap_or(1) + 1)],
                )
                .await?;
            let more = rows.len() > limit;
            let mut changes = Vec::new();
            let mut upto = since;
            for r in rows.iter().take(limit) {
                upto = u64_of(r.get(2));
                let fp = fp32(r.get(0), "certificate")?;
                let role = if r.get::<_, bool>(1) {
                    None
                } else {
                    Some(cert_role_of(r, 3)?)
                };
                changes.push((fp, role));
            }
            Ok(CertPage {
                changes,
                upto,
                more,
            })
        })
    }

    fn task_changes(&self, since: u64, limit: usize) -> StoreResult<ChangePage> {
        let limit = limit.clamp(1, PAGE_MAX);
        let cipher = self.cipher.clone();
        self.call("read changes", move |pool| {
            changes_page(pool, since, limit, None, cipher.clone())
        })
    }

    fn queue_run_now(&self, runs: &[QueuedRunNow], now: Timestamp) -> StoreResult<()> {
        let mut agents = Vec::new();
        let mut tasks = Vec::new();
        let mut ats = Vec::new();
        for r in runs {
            let (Ok(a), Ok(t)) = (i64::try_from(r.agent.0), i64::try_from(r.task.0)) else {
                continue;
            };
            agents.push(a);
            tasks.push(t);
            ats.push(r.at.as_millis());
        }
        self.call("queue run-now", move |pool| {
            let (agents, tasks, ats) = (agents.clone(), tasks.clone(), ats.clone());
            async move {
                let c = pool.get().await?;
                c.execute(
                    "INSERT INTO sundial_run_now (agent_id, task_id, at_ms, queued_at_ms)
                     SELECT a, t, at, $4 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS u(a, t, at)
                     ON CONFLICT DO NOTHING",
                    &[&agents, &tasks, &ats, &now.as_millis()],
                )
                .await?;
                Ok(())
            }
        })
    }

    fn take_run_now(&self, agents: &[AgentId], now: Timestamp) -> StoreResult<Vec<QueuedRunNow>> {
        let ids: Vec<i64> = agents
            .iter()
            .filter_map(|a| i64::try_from(a.0).ok())
            .collect();
        self.call("take run-now", move |pool| {
            let ids = ids.clone();
            async move {
                let mut c = pool.get().await?;
                let t = c.transaction().await?;
                t.execute(
                    "DELETE FROM sundial_run_now WHERE queued_at_ms < $1",
                    &[&(now.as_millis() - RUN_NOW_QUEUE_TTL_MS)],
                )
                .await?;
                let rows = t
                    .query(
                        "DELETE FROM sundial_run_now WHERE agent_id = ANY($1)
                         RETURNING agent_id, task_id, at_ms",
                        &[&ids],
                    )
                    .await?;
                t.commit().await?;
                Ok(rows
                    .iter()
                    .map(|r| QueuedRunNow {
                        agent: AgentId(u64_of(r.get(0))),
                        task: TaskId(u64_of(r.get(1))),
                        at: Timestamp::from_millis_saturating(r.get(2)),
                    })
                    .collect())
            }
        })
    }
}

/// The most rows one `run list` page reads.
const RUN_LIST_MAX_ROWS: usize = PAGE_MAX;

/// A batch of runs as column arrays, for `unnest`.
#[derive(Debug, Clone, Default)]
struct RunColumns {
    task: Vec<i64>,
    agent: Vec<i64>,
    sched: Vec<i64>,
    attempt: Vec<i32>,
    outcome: Vec<String>,
    finished: Vec<Option<i64>>,
    detail: Vec<Option<String>>,
    record: Vec<Vec<u8>>,
}
