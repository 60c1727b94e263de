//! The coordinator's durable state, in one redb database: agents and their
//! certificate fingerprints, hashed join tokens, tasks with revisions, and
//! run records.
//!
//! Invariants:
//! - Every change is one write transaction with immediate durability; a
//!   result batch is acknowledged only after [`CoordinatorStore::put_runs`]
//!   returned `Ok`.
//! - Runs are keyed by (task, agent, scheduled_at, attempt): storing the same
//!   run twice leaves one record (uploads are idempotent).
//! - Every task change takes the next global revision; cancelled tasks stay
//!   as tombstones, so "changes since revision R" is always answerable.
//! - Tokens are stored as SHA-256 of their secret, never in clear.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use sundial_net::at_rest::{self, StoreCipher};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use sundial_protocol::placement::Placement;
use sundial_protocol::records::{self, RunRecordV1, TaskRecordV1};
use sundial_protocol::seal::SealedEnv;
use sundial_protocol::wasm::ModuleHash;
use sundial_protocol::wire::{AdminInfo, AuditEntry, AuditQuery, LastRun, Role, TaskDraft};
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, TaskSpec, Timestamp};

pub use sundial_core::coord_store::{
    audit_matches, counts_from, live_admin, merge_labels, targets, AdminCert, Agent, AgentSeen,
    ArrivalCursor, ArrivalQuery, ArrivedRuns, AuditPage, CertPage, CertRole, ChangePage,
    CoordStore, Enrollment, JoinToken, Page, QueuedRunNow, RunCursor, RunKeyOf, RunPage, RunQuery,
    StoreError, StoreResult, StoredRuns, StoredTask, TokenRefusal, ADMINS_MAX, ARRIVAL_SCAN_MAX,
    PAGE_MAX, RENEW_REVOKED, RESTORE_GAP_MAX, REVOKE_REVOKED, RUN_LIST_BYTES_MAX,
    RUN_NOW_QUEUE_TTL_MS,
};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const AGENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("agents");
const CERTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("certs");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const RUNS: TableDefinition<(u64, u64, i64, u32), &[u8]> = TableDefinition::new("runs");
/// Each task's current revision → its id: "changes since R" is a range scan.
const TASK_REVS: TableDefinition<u64, u64> = TableDefinition::new("task_revisions");
/// Names of live (not cancelled) tasks → id.
const TASK_NAMES: TableDefinition<&str, u64> = TableDefinition::new("task_names");
/// (task, agent) → its latest run ([`LastRunV1`]): `task list`, `task get`.
const LAST_RUNS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("last_runs");
/// Paused tasks (their records are unchanged otherwise).
const PAUSED: TableDefinition<u64, u8> = TableDefinition::new("paused_tasks");
/// Task id → when it was created (ms), for the tasks a resume made count
/// from a later instant (their record's `created_at`); new in 0.8.
const CREATED: TableDefinition<u64, i64> = TableDefinition::new("task_created");
/// Runs by time: (scheduled_at, task, agent, attempt). With the two below,
/// `run list` reads one page of an index, never the whole table.
const RUNS_BY_TIME: TableDefinition<(i64, u64, u64, u32), u8> =
    TableDefinition::new("runs_by_time");
/// Runs of a task by time: (task, scheduled_at, agent, attempt).
const RUNS_BY_TASK: TableDefinition<(u64, i64, u64, u32), u8> =
    TableDefinition::new("runs_by_task");
/// Runs of an agent by time: (agent, scheduled_at, task, attempt).
const RUNS_BY_AGENT: TableDefinition<(u64, i64, u64, u32), u8> =
    TableDefinition::new("runs_by_agent");
/// Set once the run indexes cover every stored run (stores written before
/// the indexes existed are indexed when first opened).
const RUNS_INDEXED: &str = "runs_indexed";
/// Runs in the order they were stored (new in 0.8): seq → (task, agent,
/// scheduled_at, attempt), and back, so a purge finds a run's entry.
const ARRIVALS: TableDefinition<u64, (u64, u64, i64, u32)> = TableDefinition::new("run_arrivals");
const ARRIVAL_OF: TableDefinition<(u64, u64, i64, u32), u64> =
    TableDefinition::new("run_arrival_of");
/// The next arrival sequence number (never reused, even after a purge).
const ARRIVAL_NEXT: &str = "arrival_next";
/// Set once every run stored before arrival order existed has an entry
/// (in time order: when they arrived was not kept).
const ARRIVALS_INDEXED: &str = "arrivals_indexed";
/// Revoked agents an operator removed from the lists (their runs stay).
const FORGOTTEN: TableDefinition<u64, u8> = TableDefinition::new("forgotten_agents");
/// Certificates added and revoked, by sequence number: seq → fingerprint
/// and role (`None`: revoked).
const CERT_FEED: TableDefinition<u64, &[u8]> = TableDefinition::new("cert_feed");
/// Queued run-nows: (agent, task, at ms) → queued at ms.
const RUN_NOW: TableDefinition<(u64, u64, i64), i64> = TableDefinition::new("run_now");
const CERT_SEQ: &str = "cert_seq";
/// Admins by name.
const ADMINS: TableDefinition<&str, &[u8]> = TableDefinition::new("admins");
/// The audit log: sequence number → entry.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Functions' modules by SHA-256 (new in 0.7).
const MODULES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("modules");
const AUDIT_SEQ: &str = "audit_seq";
/// Set once the admin certificates of a store from before named admins
/// were given names.
const ADMINS_NAMED: &str = "admins_named";

/// The latest run of a task on an agent, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LastRunV1 {
    scheduled_at_ms: i64,
    attempt: u32,
    outcome: String,
    finished_at_ms: Option<i64>,
    detail: Option<String>,
}

const NEXT_AGENT: &str = "next_agent_id";
const NEXT_TASK: &str = "next_task_id";
const REVISION: &str = "revision";
/// The first task id a restore may have lost (set at the first catch-up).
const LOST_IDS_FROM: &str = "lost_ids_from";

fn db_err<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| {
        match e.into() {
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked(format!(
            "{context}: another process has the store open (is a coordinator running on this data directory?)"
        )),
        redb::Error::Corrupted(why) => StoreError::Corrupt(format!("{context}: {why}")),
        other => StoreError::unavailable(context, other),
    }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Records encrypted per transaction when a plain store is migrated.
const ENCRYPT_BATCH: usize = 10_000;

/// Who a client certificate belongs to, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum CertRoleV1 {
    /// From before named admins: read as [`AdminCert::legacy`].
    Admin,
    Agent(AgentId),
    NamedAdmin {
        name: String,
        role: Role,
        expires_at_ms: i64,
    },
}

impl From<CertRoleV1> for CertRole {
    fn from(r: CertRoleV1) -> CertRole {
        match r {
            CertRoleV1::Admin => CertRole::Admin(AdminCert::legacy()),
            CertRoleV1::Agent(a) => CertRole::Agent(a),
            CertRoleV1::NamedAdmin {
                name,
                role,
                expires_at_ms,
            } => CertRole::Admin(AdminCert {
                name,
                role,
                expires_at: Timestamp::from_millis_saturating(expires_at_ms),
            }),
        }
    }
}

fn admin_cert_role(a: &AdminInfo) -> CertRoleV1 {
    CertRoleV1::NamedAdmin {
        name: a.name.clone(),
        role: a.role,
        expires_at_ms: a.expires_at.as_millis(),
    }
}

/// A stored agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct AgentRecordV1 {
    name: Option<String>,
    labels: Vec<(String, String)>,
    cert_sha256: Vec<u8>,
    revoked: bool,
    enrolled_at_ms: i64,
    last_seen_ms: Option<i64>,
    clock_offset_ms: Option<i64>,
    rtt_ms: Option<i64>,
}

impl AgentRecordV1 {
    fn into_agent(self, id: AgentId, forgotten: bool) -> Result<Agent> {
        let cert_sha256 = <[u8; 32]>::try_from(self.cert_sha256.as_slice()).map_err(|_| {
            StoreError::Corrupt(format!(
                "agent {id}: a certificate fingerprint of {} bytes",
                self.cert_sha256.len()
            ))
        })?;
        Ok(Agent {
            id,
            name: self.name,
            labels: self.labels,
            cert_sha256,
            revoked: self.revoked,
            forgotten,
            enrolled_at: Timestamp::from_millis_saturating(self.enrolled_at_ms),
            last_seen: self.last_seen_ms.map(Timestamp::from_millis_saturating),
            clock_offset_ms: self.clock_offset_ms,
            rtt_ms: self.rtt_ms,
            in_session: false,
        })
    }
}

/// A stored join token (by hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TokenRecordV1 {
    expires_at_ms: i64,
    uses_left: u32,
    labels: Vec<(String, String)>,
}

impl TokenRecordV1 {
    fn into_token(self, secret_sha256: [u8; 32]) -> JoinToken {
        JoinToken {
            secret_sha256,
            expires_at: Timestamp::from_millis_saturating(self.expires_at_ms),
            uses_left: self.uses_left,
            labels: self.labels,
        }
    }

    fn refusal(&self, now: Timestamp) -> Option<TokenRefusal> {
        if now.as_millis() >= self.expires_at_ms {
            Some(TokenRefusal::Expired(Timestamp::from_millis_saturating(
                self.expires_at_ms,
            )))
        } else if self.uses_left == 0 {
            Some(TokenRefusal::UsedUp)
        } else {
            None
        }
    }
}

/// When `spec`'s task was created: kept apart once a resume moved its
/// `created_at` (see [`CREATED`]).
fn created_of(created: &impl ReadableTable<u64, i64>, spec: &TaskSpec) -> Result<Timestamp> {
    Ok(match created.get(spec.id.0).map_err(db_err("read task"))? {
        Some(ms) => Timestamp::from_millis_saturating(ms.value()),
        None => spec.created_at,
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CoordTaskV1 {
    task: TaskRecordV1,
    cancelled: bool,
    /// The task's sealed variables: stored after the record (see
    /// [`records::encode_with_sealed`]), not inside it.
    #[serde(skip)]
    sealed: Vec<SealedEnv>,
    /// Its placement, stored after them ([`records::encode_placed`]).
    #[serde(skip)]
    placement: Option<Placement>,
    /// Its function's module and limits (if it is one), stored last
    /// ([`records::encode_parts`]).
    #[serde(skip)]
    wasm: Option<records::WasmV1>,
}

impl CoordTaskV1 {
    fn new(spec: &TaskSpec, cancelled: bool) -> CoordTaskV1 {
        CoordTaskV1 {
            task: TaskRecordV1::from_spec(spec),
            cancelled,
            sealed: spec.action.sealed_env().to_vec(),
            placement: spec.placement.clone(),
            wasm: records::WasmV1::of(&spec.action),
        }
    }

    fn encode(&self) -> Vec<u8> {
        records::encode_parts(
            self,
            &self.sealed,
            self.placement.as_ref(),
            self.wasm.as_ref(),
        )
    }

    fn decode(id: u64, bytes: &[u8]) -> std::result::Result<CoordTaskV1, records::RecordError> {
        let (mut rec, sealed, placement, wasm) =
            records::decode_with_action::<CoordTaskV1>("tasks", id, bytes)?;
        rec.sealed = sealed;
        rec.placement = placement;
        rec.wasm = wasm;
        Ok(rec)
    }

    fn into_spec(self, id: u64) -> std::result::Result<TaskSpec, records::RecordError> {
        let spec = self.task.into_spec(id)?;
        records::assemble("tasks", spec, self.sealed, self.placement, self.wasm)
    }
}

/// The coordinator's store; see the module doc.
#[derive(Debug)]
pub struct CoordinatorStore {
    db: Database,
    /// Encrypts task definitions and run records at rest
    /// ([`crate::store_key`]); `None`: stored as given.
    cipher: Option<Arc<StoreCipher>>,
    /// When a contact was last committed with a flush to disk, ms after
    /// `opened` (see [`SEEN_DURABLE_EVERY_MS`]).
    seen_flushed_ms: std::sync::atomic::AtomicU64,
    opened: std::time::Instant,
}

/// Agent contacts are committed with a flush to disk at most this often,
/// ms; the others ride on the next durable commit (any run batch, any
/// change, the next contact flushed, the store's close). A contact is when
/// an agent was last heard and its clock estimate: a crash of the
/// coordinator can lose the last second of them, which every agent's next
/// session writes again. Flushing each one made a session's start cost two
/// fsyncs behind redb's one writer, so a fleet coming up was held to about
/// 450 sessions a second by the disk, whatever the CPU; flushing one in 64
/// still held the writer for the flush of all they had dirtied.
const SEEN_DURABLE_EVERY_MS: u64 = 1_000;

impl CoordinatorStore {
    /// `plain` as stored: encrypted when the store has a cipher.
    fn seal(&self, table: &'static str, plain: Vec<u8>) -> Result<Vec<u8>> {
        match &self.cipher {
            Some(c) => c
                .seal(table, &plain)
                .map_err(|e| StoreError::Refused(format!("store key: {e}"))),
            None => Ok(plain),
        }
    }

    /// A stored value as plain bytes (decrypted if it is encrypted).
    fn unseal<'a>(&self, table: &'static str, stored: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        at_rest::open_plain(self.cipher.as_deref(), table, stored).map_err(|reason| {
            StoreError::from(records::RecordError {
                table,
                key: "?".into(),
                reason,
            })
        })
    }

    fn task_rec(&self, id: u64, stored: &[u8]) -> Result<CoordTaskV1> {
        Ok(CoordTaskV1::decode(id, &self.unseal("tasks", stored)?)?)
    }

    /// From now on, tasks and runs are encrypted with `cipher`.
    pub fn set_cipher(&mut self, cipher: Arc<StoreCipher>) {
        self.cipher = Some(cipher);
    }

    /// Compacts the file (after encrypting a plain store: drops freed
    /// pages at its end, which hold the plain copies).
    pub fn compact(&mut self) {
        if let Err(e) = self.db.compact() {
            tracing::warn!(error = %e, "compacting the store failed");
        }
    }

    /// Encrypts the task and run records stored plain (a store from before
    /// encryption), in batches of their own transactions: a crash midway
    /// loses nothing, and the next start finishes. Returns how many.
    pub fn encrypt_plain_records(&self) -> Result<u64> {
        let mut moved = 0u64;
        let mut from = 0u64;
        loop {
            let txn = self.db.begin_write().map_err(db_err("encrypt records"))?;
            let scanned = {
                let mut t = txn.open_table(TASKS).map_err(db_err("encrypt records"))?;
                let batch: Vec<(u64, Vec<u8>)> = t
                    .range(from..)
                    .map_err(db_err("encrypt records"))?
                    .take(ENCRYPT_BATCH)
                    .map(|i| i.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(db_err("encrypt records"))?;
                for (k, v) in &batch {
                    if v.first() != Some(&at_rest::RECORD_ENCRYPTED) {
                        t.insert(*k, self.seal("tasks", v.clone())?.as_slice())
                            .map_err(db_err("encrypt records"))?;
                        moved += 1;
                    }
                }
                if let Some((k, _)) = batch.last() {
                    from = k.saturating_add(1);
                }
                batch.len()
            };
            txn.commit().map_err(db_err("encrypt records"))?;
            if scanned < ENCRYPT_BATCH {
                break;
            }
        }
        let mut from = (0u64, 0u64, i64::MIN, 0u32);
        loop {
            let txn = self.db.begin_write().map_err(db_err("encrypt records"))?;
            let scanned = {
                let mut t = txn.open_table(RUNS).map_err(db_err("encrypt records"))?;
                let batch: Vec<(RunKeyOf, Vec<u8>)> = t
                    .range(from..)
                    .map_err(db_err("encrypt records"))?
                    .take(ENCRYPT_BATCH)
                    .map(|i| i.map(|(k, v)| (k.value(), v.value().to_vec())))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(db_err("encrypt records"))?;
                for (k, v) in &batch {
                    if v.first() != Some(&at_rest::RECORD_ENCRYPTED) {
                        t.insert(*k, self.seal("runs", v.clone())?.as_slice())
                            .map_err(db_err("encrypt records"))?;
                        moved += 1;
                    }
                }
                if let Some((k, _)) = batch.last() {
                    // The next key after k in the tuple order.
                    from = match k.3.checked_add(1) {
                        Some(a) => (k.0, k.1, k.2, a),
                        None => (k.0, k.1, k.2.saturating_add(1), 0),
                    };
                }
                batch.len()
            };
            txn.commit().map_err(db_err("encrypt records"))?;
            if scanned < ENCRYPT_BATCH {
                break;
            }
        }
        Ok(moved)
    }

    /// Opens (creating if needed) the store at `path`. A key ring beside it
    /// (`store.key`, as `init` makes it) is checked and used to read and
    /// write its records as `serve` does; without one, encrypted records do
    /// not read (a clear error says so).
    pub fn open(path: &Path) -> Result<CoordinatorStore> {
        let key = path.parent().map(|d| d.join(at_rest::KEY_FILE));
        let (mut store, cipher) =
            Self::open_checked(path, crate::store_key::CHECKS_KEY, |checks| {
                let Some(key) = &key else { return Ok(None) };
                let Some(c) = StoreCipher::from_file(key, false)? else {
                    return Ok(None);
                };
                let used = crate::store_key::parse_checks(checks)?;
                at_rest::check_ring(&c, &used, key)?;
                Ok(Some(c))
            })?;
        if let Some(c) = cipher {
            store.cipher = Some(Arc::new(c));
        }
        Ok(store)
    }

    /// [`CoordinatorStore::open`], calling `check` with the setting `key`
    /// as stored before anything is written (a new store has none): an
    /// error from it is returned as a refusal, with the store as it was.
    pub fn open_checked<T>(
        path: &Path,
        key: &str,
        check: impl Fn(Option<String>) -> std::result::Result<T, String>,
    ) -> Result<(CoordinatorStore, T)> {
        fn read(db: &impl ReadableDatabase, key: &str) -> Result<Option<String>> {
            let txn = db.begin_read().map_err(db_err("read meta"))?;
            match txn.open_table(META) {
                Ok(t) => Ok(t
                    .get(key)
                    .map_err(db_err("read meta"))?
                    .map(|v| records::decode::<String>("meta", key, v.value()))
                    .transpose()?),
                Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
                Err(e) => Err(db_err("read meta")(e)),
            }
        }
        // Read-only first, so that a refusal leaves the file as it was (an
        // open for writing marks the file); a store that needs a repair
        // (an unclean stop) is read once repaired.
        let early = match redb::Builder::new().open_read_only(path) {
            Ok(db) => Some(read(&db, key)?),
            Err(_) => None,
        };
        let checked = match early {
            Some(value) => Some(check(value).map_err(StoreError::Refused)?),
            None => None,
        };
        let db = Database::create(path).map_err(db_err("open"))?;
        let checked = match checked {
            Some(c) => c,
            None => {
                let value = read(&db, key)?;
                check(value).map_err(StoreError::Refused)?
            }
        };
        Ok((
            Self::init(CoordinatorStore {
                db,
                cipher: None,
                seen_flushed_ms: Default::default(),
                opened: std::time::Instant::now(),
            })?,
            checked,
        ))
    }

    /// Creates the tables a new store lacks and indexes old runs.
    fn init(store: CoordinatorStore) -> Result<CoordinatorStore> {
        let txn = store.db.begin_write().map_err(db_err("create tables"))?;
        {
            txn.open_table(META).map_err(db_err("create tables"))?;
            txn.open_table(AGENTS).map_err(db_err("create tables"))?;
            txn.open_table(CERTS).map_err(db_err("create tables"))?;
            txn.open_table(TOKENS).map_err(db_err("create tables"))?;
            txn.open_table(TASKS).map_err(db_err("create tables"))?;
            txn.open_table(RUNS).map_err(db_err("create tables"))?;
            txn.open_table(TASK_REVS).map_err(db_err("create tables"))?;
            txn.open_table(TASK_NAMES)
                .map_err(db_err("create tables"))?;
            txn.open_table(LAST_RUNS).map_err(db_err("create tables"))?;
            txn.open_table(PAUSED).map_err(db_err("create tables"))?;
            txn.open_table(CREATED).map_err(db_err("create tables"))?;
            txn.open_table(ARRIVALS).map_err(db_err("create tables"))?;
            txn.open_table(ARRIVAL_OF)
                .map_err(db_err("create tables"))?;
            txn.open_table(RUNS_BY_TIME)
                .map_err(db_err("create tables"))?;
            txn.open_table(RUNS_BY_TASK)
                .map_err(db_err("create tables"))?;
            txn.open_table(RUNS_BY_AGENT)
                .map_err(db_err("create tables"))?;
            txn.open_table(FORGOTTEN).map_err(db_err("create tables"))?;
            txn.open_table(CERT_FEED).map_err(db_err("create tables"))?;
            txn.open_table(RUN_NOW).map_err(db_err("create tables"))?;
            txn.open_table(ADMINS).map_err(db_err("create tables"))?;
            txn.open_table(AUDIT).map_err(db_err("create tables"))?;
        }
        txn.commit().map_err(db_err("create tables"))?;
        store.index_runs()?;
        store.index_arrivals()?;
        store.name_admins()?;
        Ok(store)
    }

    /// Gives the admin certificates of a store from before named admins a
    /// name and a role: `owner` (then `owner-2`, …), valid as their
    /// certificate is (to the year 4000; the README says how to rotate).
    fn name_admins(&self) -> Result<()> {
        const CX: &str = "name the admins";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        {
            let mut meta = txn.open_table(META).map_err(db_err(CX))?;
            if Self::meta_u64(&meta, ADMINS_NAMED)? == 1 {
                return Ok(());
            }
            let mut certs = txn.open_table(CERTS).map_err(db_err(CX))?;
            let mut legacy = Vec::new();
            for item in certs.iter().map_err(db_err(CX))? {
                let (k, v) = item.map_err(db_err(CX))?;
                let role: CertRoleV1 = records::decode("certs", records_hex(k.value()), v.value())?;
                if role == CertRoleV1::Admin {
                    legacy.push(k.value().to_vec());
                }
            }
            let mut admins = txn.open_table(ADMINS).map_err(db_err(CX))?;
            for (i, fp) in legacy.iter().enumerate() {
                let Ok(cert_sha256) = <[u8; 32]>::try_from(fp.as_slice()) else {
                    continue;
                };
                let legacy = AdminCert::legacy();
                let name = if i == 0 {
                    legacy.name.clone()
                } else {
                    format!("{}-{}", legacy.name, i + 1)
                };
                let admin = AdminInfo {
                    name: name.clone(),
                    role: legacy.role,
                    cert_sha256,
                    created_at: Timestamp::EPOCH,
                    created_by: "init".into(),
                    expires_at: legacy.expires_at,
                    revoked_at: None,
                    last_used: None,
                };
                admins
                    .insert(name.as_str(), records::encode(&admin).as_slice())
                    .map_err(db_err(CX))?;
                certs
                    .insert(
                        fp.as_slice(),
                        records::encode(&admin_cert_role(&admin)).as_slice(),
                    )
                    .map_err(db_err(CX))?;
                tracing::warn!(admin = %name, "an admin credential from before named admins is now the owner {name:?}, valid to the year 4000: rotate it (README: rotating the owner credential)");
            }
            meta.insert(ADMINS_NAMED, records::encode(&1u64).as_slice())
                .map_err(db_err(CX))?;
        }
        txn.commit().map_err(db_err(CX))
    }

    /// Appends `entry` to the audit log under the next sequence number.
    fn write_audit(
        txn: &redb::WriteTransaction,
        entry: &AuditEntry,
        context: &'static str,
    ) -> Result<()> {
        let mut meta = txn.open_table(META).map_err(db_err(context))?;
        let seq = Self::meta_u64(&meta, AUDIT_SEQ)? + 1;
        meta.insert(AUDIT_SEQ, records::encode(&seq).as_slice())
            .map_err(db_err(context))?;
        let mut log = txn.open_table(AUDIT).map_err(db_err(context))?;
        let entry = AuditEntry {
            seq,
            ..entry.clone()
        };
        log.insert(seq, records::encode(&entry).as_slice())
            .map_err(db_err(context))?;
        Ok(())
    }

    fn audit_if(
        txn: &redb::WriteTransaction,
        entry: Option<AuditEntry>,
        context: &'static str,
    ) -> Result<()> {
        match entry {
            Some(e) => Self::write_audit(txn, &e, context),
            None => Ok(()),
        }
    }

    fn read_admin(
        t: &impl ReadableTable<&'static str, &'static [u8]>,
        name: &str,
        context: &'static str,
    ) -> Result<Option<AdminInfo>> {
        t.get(name)
            .map_err(db_err(context))?
            .map(|v| records::decode("admins", name, v.value()))
            .transpose()
            .map_err(StoreError::from)
    }

    /// Builds the run indexes of a store written before they existed.
    fn index_runs(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err("index runs"))?;
        {
            let mut meta = txn.open_table(META).map_err(db_err("index runs"))?;
            if Self::meta_u64(&meta, RUNS_INDEXED)? == 1 {
                return Ok(());
            }
            let runs = txn.open_table(RUNS).map_err(db_err("index runs"))?;
            let mut by_time = txn.open_table(RUNS_BY_TIME).map_err(db_err("index runs"))?;
            let mut by_task = txn.open_table(RUNS_BY_TASK).map_err(db_err("index runs"))?;
            let mut by_agent = txn
                .open_table(RUNS_BY_AGENT)
                .map_err(db_err("index runs"))?;
            let mut n = 0u64;
            for item in runs.iter().map_err(db_err("index runs"))? {
                let (k, _) = item.map_err(db_err("index runs"))?;
                let (task, agent, sched, attempt) = k.value();
                by_time
                    .insert((sched, task, agent, attempt), 1)
                    .map_err(db_err("index runs"))?;
                by_task
                    .insert((task, sched, agent, attempt), 1)
                    .map_err(db_err("index runs"))?;
                by_agent
                    .insert((agent, sched, task, attempt), 1)
                    .map_err(db_err("index runs"))?;
                n += 1;
            }
            if n > 0 {
                tracing::info!(runs = n, "indexed the stored runs by time, task and agent");
            }
            meta.insert(RUNS_INDEXED, records::encode(&1u64).as_slice())
                .map_err(db_err("index runs"))?;
        }
        txn.commit().map_err(db_err("commit run index"))
    }

    /// Gives every run stored before arrival order existed its entry, in
    /// time order (their arrival was not kept), once.
    fn index_arrivals(&self) -> Result<()> {
        const CX: &str = "index runs by arrival";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        {
            let mut meta = txn.open_table(META).map_err(db_err(CX))?;
            if Self::meta_u64(&meta, ARRIVALS_INDEXED)? == 1 {
                return Ok(());
            }
            let by_time = txn.open_table(RUNS_BY_TIME).map_err(db_err(CX))?;
            let mut arrivals = txn.open_table(ARRIVALS).map_err(db_err(CX))?;
            let mut arrival_of = txn.open_table(ARRIVAL_OF).map_err(db_err(CX))?;
            let mut seq = Self::meta_u64(&meta, ARRIVAL_NEXT)?.max(1);
            let first = seq;
            for item in by_time.iter().map_err(db_err(CX))? {
                let (k, _) = item.map_err(db_err(CX))?;
                let (sched, task, agent, attempt) = k.value();
                let key = (task, agent, sched, attempt);
                if arrival_of.get(key).map_err(db_err(CX))?.is_some() {
                    continue;
                }
                arrivals.insert(seq, key).map_err(db_err(CX))?;
                arrival_of.insert(key, seq).map_err(db_err(CX))?;
                seq += 1;
            }
            if seq > first {
                tracing::info!(
                    runs = seq - first,
                    "indexed the stored runs in arrival order (as they stand in time)"
                );
            }
            meta.insert(ARRIVAL_NEXT, records::encode(&seq).as_slice())
                .map_err(db_err(CX))?;
            meta.insert(ARRIVALS_INDEXED, records::encode(&1u64).as_slice())
                .map_err(db_err(CX))?;
        }
        txn.commit().map_err(db_err(CX))
    }

    /// One stored run record, decoded; `Err` inside: stored but unreadable.
    fn read_run(
        &self,
        t: &impl ReadableTable<(u64, u64, i64, u32), &'static [u8]>,
        key: RunKeyOf,
    ) -> Result<Option<(usize, std::result::Result<RunRecord, records::RecordError>)>> {
        let Some(v) = t.get(key).map_err(db_err("read runs"))? else {
            return Ok(None);
        };
        let decoded = self
            .unseal("runs", v.value())
            .map_err(|e| records::RecordError {
                table: "runs",
                key: format!("{key:?}"),
                reason: e.to_string(),
            })
            .and_then(|plain| records::decode::<RunRecordV1>("runs", format!("{key:?}"), &plain))
            .and_then(|rec| rec.into_run(0));
        Ok(Some((v.value().len(), decoded)))
    }

    fn meta_u64(
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        key: &'static str,
    ) -> Result<u64> {
        match table.get(key).map_err(db_err("read meta"))? {
            Some(v) => Ok(records::decode("meta", key, v.value())?),
            None => Ok(0),
        }
    }

    /// Appends a certificate change to the feed under the next sequence number.
    fn feed_cert(
        txn: &redb::WriteTransaction,
        fingerprint: &[u8],
        role: Option<CertRoleV1>,
        context: &'static str,
    ) -> Result<()> {
        let mut meta = txn.open_table(META).map_err(db_err(context))?;
        let seq = Self::meta_u64(&meta, CERT_SEQ)? + 1;
        meta.insert(CERT_SEQ, records::encode(&seq).as_slice())
            .map_err(db_err(context))?;
        let mut feed = txn.open_table(CERT_FEED).map_err(db_err(context))?;
        feed.insert(
            seq,
            records::encode(&(fingerprint.to_vec(), role)).as_slice(),
        )
        .map_err(db_err(context))?;
        Ok(())
    }

    /// Gives task `id` the next global revision: the revision index moves
    /// from its `old` revision to the new one, so "changes since R" sees it.
    fn next_task_revision(
        txn: &redb::WriteTransaction,
        id: TaskId,
        old: u64,
        context: &'static str,
    ) -> Result<u64> {
        let mut meta = txn.open_table(META).map_err(db_err(context))?;
        let revision = Self::meta_u64(&meta, REVISION)? + 1;
        meta.insert(REVISION, records::encode(&revision).as_slice())
            .map_err(db_err(context))?;
        let mut revs = txn.open_table(TASK_REVS).map_err(db_err(context))?;
        revs.remove(old).map_err(db_err(context))?;
        revs.insert(revision, id.0).map_err(db_err(context))?;
        Ok(revision)
    }

    /// The counters an export carries: (revision, next task id, next agent id).
    pub fn counters(&self) -> Result<(u64, u64, u64)> {
        let txn = self.db.begin_read().map_err(db_err("read counters"))?;
        let meta = txn.open_table(META).map_err(db_err("read counters"))?;
        Ok((
            Self::meta_u64(&meta, REVISION)?,
            Self::meta_u64(&meta, NEXT_TASK)?.max(1),
            Self::meta_u64(&meta, NEXT_AGENT)?.max(1),
        ))
    }

    /// Every stored run, in key order (for checkers and tests; O(runs)).
    pub fn all_runs(&self) -> Result<Vec<RunRecord>> {
        let txn = self.db.begin_read().map_err(db_err("read runs"))?;
        let t = txn.open_table(RUNS).map_err(db_err("read runs"))?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err("read runs"))? {
            let (k, v) = item.map_err(db_err("read runs"))?;
            let rec: RunRecordV1 = records::decode(
                "runs",
                format!("{:?}", k.value()),
                &self.unseal("runs", v.value())?,
            )?;
            out.push(rec.into_run(0)?);
        }
        Ok(out)
    }

    /// Opens a store on another storage backend (tests: a disk that fails).
    pub fn open_with_backend(backend: impl redb::StorageBackend) -> Result<CoordinatorStore> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(db_err("open"))?;
        Self::init(CoordinatorStore {
            db,
            cipher: None,
            seen_flushed_ms: Default::default(),
            opened: std::time::Instant::now(),
        })
    }

    fn read_agent(forgotten: &impl ReadableTable<u64, u8>, id: u64, v: &[u8]) -> Result<Agent> {
        let rec: AgentRecordV1 = records::decode("agents", id, v)?;
        let gone = forgotten.get(id).map_err(db_err("read agents"))?.is_some();
        rec.into_agent(AgentId(id), gone)
    }
}

impl CoordStore for CoordinatorStore {
    fn setting(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(db_err("read meta"))?;
        let t = txn.open_table(META).map_err(db_err("read meta"))?;
        let v = t.get(key).map_err(db_err("read meta"))?;
        Ok(v.map(|v| records::decode("meta", key, v.value()))
            .transpose()?)
    }

    fn put_module(&self, hash: ModuleHash, bytes: &[u8]) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err("write a module"))?;
        {
            let mut t = txn.open_table(MODULES).map_err(db_err("write a module"))?;
            if t.get(&hash.0).map_err(db_err("read a module"))?.is_none() {
                t.insert(&hash.0, bytes).map_err(db_err("write a module"))?;
            }
        }
        txn.commit().map_err(db_err("commit a module"))
    }

    fn module(&self, hash: ModuleHash) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read().map_err(db_err("read a module"))?;
        let t = match txn.open_table(MODULES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err("read a module")(e)),
        };
        let v = t.get(&hash.0).map_err(db_err("read a module"))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn put_setting(&self, key: &str, value: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err("write meta"))?;
        {
            let mut t = txn.open_table(META).map_err(db_err("write meta"))?;
            t.insert(key, records::encode(&value.to_owned()).as_slice())
                .map_err(db_err("write meta"))?;
        }
        txn.commit().map_err(db_err("commit meta"))
    }

    /// An agent says it has applied revision `agent_revision`, beyond this
    /// store's: the store was restored from an older backup. So that no
    /// revision nor task id is used twice, the revision jumps past the
    /// agent's and the next task id by as many (every task created took a
    /// revision, so the ids lost are among those). Returns the ids that may
    /// have been lost (for the agent to drop) and the revision of that
    /// news; `None` when the agent is not ahead, or claims more than
    /// [`RESTORE_GAP_MAX`] (not believed: a peer could push the counters).
    fn catch_up_restored(
        &self,
        agent_revision: u64,
    ) -> Result<Option<(std::ops::Range<u64>, u64)>> {
        let txn = self
            .db
            .begin_write()
            .map_err(db_err("catch up a restore"))?;
        let out = {
            let mut meta = txn.open_table(META).map_err(db_err("catch up a restore"))?;
            let revision = Self::meta_u64(&meta, REVISION)?;
            let gap = agent_revision.saturating_sub(revision);
            if gap == 0 || gap > RESTORE_GAP_MAX {
                None
            } else {
                let next = Self::meta_u64(&meta, NEXT_TASK)?.max(1);
                let new_next = next.saturating_add(gap);
                let new_revision = agent_revision.saturating_add(1);
                // Agents further ahead may hold ids lost before an earlier
                // catch-up too: the range starts where the first began.
                let from = match Self::meta_u64(&meta, LOST_IDS_FROM)? {
                    0 => next,
                    f => f.min(next),
                };
                meta.insert(LOST_IDS_FROM, records::encode(&from).as_slice())
                    .map_err(db_err("catch up a restore"))?;
                meta.insert(NEXT_TASK, records::encode(&new_next).as_slice())
                    .map_err(db_err("catch up a restore"))?;
                meta.insert(REVISION, records::encode(&new_revision).as_slice())
                    .map_err(db_err("catch up a restore"))?;
                // At most RESTORE_GAP_MAX cancels per resync, however often
                // agents (honest or not) claim to be ahead.
                let from = from.max(new_next.saturating_sub(RESTORE_GAP_MAX));
                Some((from..new_next, new_revision))
            }
        };
        txn.commit().map_err(db_err("commit catch-up"))?;
        Ok(out)
    }

    /// The current global revision.
    fn revision(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(db_err("read revision"))?;
        let t = txn.open_table(META).map_err(db_err("read revision"))?;
        Self::meta_u64(&t, REVISION)
    }

    fn known_certs(
        &self,
        after: Option<[u8; 32]>,
        limit: usize,
    ) -> Result<Vec<([u8; 32], CertRole)>> {
        let txn = self.db.begin_read().map_err(db_err("read certs"))?;
        let t = txn.open_table(CERTS).map_err(db_err("read certs"))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let from = after.unwrap_or([0; 32]);
        let mut out = Vec::new();
        for item in t.range(from.as_slice()..).map_err(db_err("read certs"))? {
            let (k, v) = item.map_err(db_err("read certs"))?;
            let Ok(fp) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            if after == Some(fp) {
                continue;
            }
            let role: CertRoleV1 = records::decode("certs", records_hex(k.value()), v.value())?;
            out.push((fp, role.into()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn admins(&self, after: Option<&str>, limit: usize) -> Result<Vec<AdminInfo>> {
        const CX: &str = "read admins";
        let txn = self.db.begin_read().map_err(db_err(CX))?;
        let t = txn.open_table(ADMINS).map_err(db_err(CX))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let mut out = Vec::new();
        for item in t.range(after.unwrap_or("")..).map_err(db_err(CX))? {
            let (k, v) = item.map_err(db_err(CX))?;
            if after == Some(k.value()) {
                continue;
            }
            out.push(records::decode("admins", k.value(), v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn create_admin(&self, admin: &AdminInfo, audit: Option<&AuditEntry>) -> Result<()> {
        const CX: &str = "create admin";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        {
            let mut admins = txn.open_table(ADMINS).map_err(db_err(CX))?;
            match Self::read_admin(&admins, &admin.name, CX)? {
                Some(a) if a.revoked_at.is_none() => {
                    return Err(StoreError::Refused(format!(
                        "an admin named {:?} exists already (renew it with `sundialctl admin renew {}`, or revoke it first)",
                        admin.name, admin.name
                    )))
                }
                Some(_) => {}
                None => {
                    if admins.iter().map_err(db_err(CX))?.count() >= ADMINS_MAX {
                        return Err(StoreError::Refused(format!(
                            "this coordinator keeps at most {ADMINS_MAX} admins"
                        )));
                    }
                }
            }
            admins
                .insert(admin.name.as_str(), records::encode(admin).as_slice())
                .map_err(db_err(CX))?;
            let mut certs = txn.open_table(CERTS).map_err(db_err(CX))?;
            certs
                .insert(
                    admin.cert_sha256.as_slice(),
                    records::encode(&admin_cert_role(admin)).as_slice(),
                )
                .map_err(db_err(CX))?;
        }
        Self::feed_cert(&txn, &admin.cert_sha256, Some(admin_cert_role(admin)), CX)?;
        Self::audit_if(&txn, audit.cloned(), CX)?;
        txn.commit().map_err(db_err(CX))
    }

    fn renew_admin(
        &self,
        name: &str,
        cert_sha256: [u8; 32],
        expires_at: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> Result<AdminInfo> {
        const CX: &str = "renew admin";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        let (old, new) = {
            let mut admins = txn.open_table(ADMINS).map_err(db_err(CX))?;
            let old = live_admin(Self::read_admin(&admins, name, CX)?, name, RENEW_REVOKED)?;
            let new = AdminInfo {
                cert_sha256,
                expires_at,
                ..old.clone()
            };
            admins
                .insert(name, records::encode(&new).as_slice())
                .map_err(db_err(CX))?;
            let mut certs = txn.open_table(CERTS).map_err(db_err(CX))?;
            certs
                .remove(old.cert_sha256.as_slice())
                .map_err(db_err(CX))?;
            certs
                .insert(
                    cert_sha256.as_slice(),
                    records::encode(&admin_cert_role(&new)).as_slice(),
                )
                .map_err(db_err(CX))?;
            (old, new)
        };
        Self::feed_cert(&txn, &old.cert_sha256, None, CX)?;
        Self::feed_cert(&txn, &cert_sha256, Some(admin_cert_role(&new)), CX)?;
        Self::audit_if(&txn, audit.cloned(), CX)?;
        txn.commit().map_err(db_err(CX))?;
        Ok(old)
    }

    fn revoke_admin(
        &self,
        name: &str,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> Result<AdminInfo> {
        const CX: &str = "revoke admin";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        let old = {
            let mut admins = txn.open_table(ADMINS).map_err(db_err(CX))?;
            let old = live_admin(Self::read_admin(&admins, name, CX)?, name, REVOKE_REVOKED)?;
            if old.role == Role::Owner {
                let mut owners = 0;
                for item in admins.iter().map_err(db_err(CX))? {
                    let (k, v) = item.map_err(db_err(CX))?;
                    let a: AdminInfo = records::decode("admins", k.value(), v.value())?;
                    if a.role == Role::Owner && a.revoked_at.is_none() && a.expires_at > now {
                        owners += 1;
                    }
                }
                if owners <= 1 {
                    return Err(StoreError::Refused(last_owner(name)));
                }
            }
            let new = AdminInfo {
                revoked_at: Some(now),
                ..old.clone()
            };
            admins
                .insert(name, records::encode(&new).as_slice())
                .map_err(db_err(CX))?;
            let mut certs = txn.open_table(CERTS).map_err(db_err(CX))?;
            certs
                .remove(old.cert_sha256.as_slice())
                .map_err(db_err(CX))?;
            old
        };
        Self::feed_cert(&txn, &old.cert_sha256, None, CX)?;
        Self::audit_if(&txn, audit.cloned(), CX)?;
        txn.commit().map_err(db_err(CX))?;
        Ok(old)
    }

    fn admin_used(&self, cert_sha256: [u8; 32], at: Timestamp) -> Result<()> {
        const CX: &str = "record an admin's use";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        {
            let mut admins = txn.open_table(ADMINS).map_err(db_err(CX))?;
            let mut found = None;
            for item in admins.iter().map_err(db_err(CX))? {
                let (k, v) = item.map_err(db_err(CX))?;
                let a: AdminInfo = records::decode("admins", k.value(), v.value())?;
                if a.cert_sha256 == cert_sha256 {
                    found = Some(a);
                    break;
                }
            }
            let Some(mut a) = found else {
                return Ok(());
            };
            if a.last_used.is_some_and(|t| t >= at) {
                return Ok(());
            }
            a.last_used = Some(at);
            admins
                .insert(a.name.as_str(), records::encode(&a).as_slice())
                .map_err(db_err(CX))?;
        }
        txn.commit().map_err(db_err(CX))
    }

    fn append_audit(&self, entry: &AuditEntry) -> Result<()> {
        const CX: &str = "append to the audit log";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        Self::write_audit(&txn, entry, CX)?;
        txn.commit().map_err(db_err(CX))
    }

    fn audit(&self, q: &AuditQuery) -> Result<AuditPage> {
        const CX: &str = "read the audit log";
        let txn = self.db.begin_read().map_err(db_err(CX))?;
        let t = txn.open_table(AUDIT).map_err(db_err(CX))?;
        let limit = (q.limit as usize).max(1);
        let mut entries = Vec::new();
        let mut more = false;
        let mut take = |k: u64, v: &[u8]| -> Result<bool> {
            let e: AuditEntry = records::decode("audit", k, v)?;
            if !audit_matches(q, &e) {
                return Ok(true);
            }
            if entries.len() >= limit {
                more = true;
                return Ok(false);
            }
            entries.push(e);
            Ok(true)
        };
        match (q.after, q.before) {
            (Some(after), _) => {
                for item in t.range(after.saturating_add(1)..).map_err(db_err(CX))? {
                    let (k, v) = item.map_err(db_err(CX))?;
                    if !take(k.value(), v.value())? {
                        break;
                    }
                }
            }
            (None, before) => {
                for item in t
                    .range(..before.unwrap_or(u64::MAX))
                    .map_err(db_err(CX))?
                    .rev()
                {
                    let (k, v) = item.map_err(db_err(CX))?;
                    if !take(k.value(), v.value())? {
                        break;
                    }
                }
                entries.reverse();
            }
        }
        Ok(AuditPage { entries, more })
    }

    fn purge_audit_before(&self, before: Timestamp, max: usize) -> Result<usize> {
        const CX: &str = "purge the audit log";
        let txn = self.db.begin_write().map_err(db_err(CX))?;
        let n = {
            let mut t = txn.open_table(AUDIT).map_err(db_err(CX))?;
            let mut doomed = Vec::new();
            for item in t.iter().map_err(db_err(CX))? {
                let (k, v) = item.map_err(db_err(CX))?;
                let e: AuditEntry = records::decode("audit", k.value(), v.value())?;
                // In the order written: the first entry kept ends the old ones.
                if e.at >= before || doomed.len() >= max {
                    break;
                }
                doomed.push(k.value());
            }
            for k in &doomed {
                t.remove(*k).map_err(db_err(CX))?;
            }
            doomed.len()
        };
        txn.commit().map_err(db_err(CX))?;
        Ok(n)
    }

    fn put_token(&self, token: &JoinToken, audit: Option<&AuditEntry>) -> Result<()> {
        let rec = TokenRecordV1 {
            expires_at_ms: token.expires_at.as_millis(),
            uses_left: token.uses_left,
            labels: token.labels.clone(),
        };
        let txn = self.db.begin_write().map_err(db_err("create token"))?;
        {
            let mut t = txn.open_table(TOKENS).map_err(db_err("create token"))?;
            t.insert(
                token.secret_sha256.as_slice(),
                records::encode(&rec).as_slice(),
            )
            .map_err(db_err("create token"))?;
        }
        Self::audit_if(&txn, audit.cloned(), "create token")?;
        txn.commit().map_err(db_err("commit token"))
    }

    fn tokens(&self, after: Option<[u8; 32]>, limit: usize) -> Result<Vec<JoinToken>> {
        let txn = self.db.begin_read().map_err(db_err("read tokens"))?;
        let t = txn.open_table(TOKENS).map_err(db_err("read tokens"))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let from = after.unwrap_or([0; 32]);
        let mut out = Vec::new();
        for item in t.range(from.as_slice()..).map_err(db_err("read tokens"))? {
            let (k, v) = item.map_err(db_err("read tokens"))?;
            let Ok(hash) = <[u8; 32]>::try_from(k.value()) else {
                continue;
            };
            if after == Some(hash) {
                continue;
            }
            if let Ok(rec) = records::decode::<TokenRecordV1>("tokens", "token", v.value()) {
                out.push(rec.into_token(hash));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn delete_token(&self, secret_sha256: [u8; 32], audit: Option<&AuditEntry>) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err("revoke token"))?;
        let gone = {
            let mut t = txn.open_table(TOKENS).map_err(db_err("revoke token"))?;
            let x = t
                .remove(secret_sha256.as_slice())
                .map_err(db_err("revoke token"))?
                .is_some();
            x
        };
        if !gone {
            return Err(StoreError::NotFound("no such join token".into()));
        }
        Self::audit_if(&txn, audit.cloned(), "revoke token")?;
        txn.commit().map_err(db_err("commit token"))
    }

    fn check_token(
        &self,
        secret_sha256: [u8; 32],
        now: Timestamp,
    ) -> Result<std::result::Result<JoinToken, TokenRefusal>> {
        let txn = self.db.begin_read().map_err(db_err("read token"))?;
        let t = txn.open_table(TOKENS).map_err(db_err("read token"))?;
        let rec: Option<TokenRecordV1> = t
            .get(secret_sha256.as_slice())
            .map_err(db_err("read token"))?
            .map(|v| records::decode("tokens", "token", v.value()))
            .transpose()?;
        Ok(match rec {
            None => Err(TokenRefusal::Unknown),
            Some(rec) => match rec.refusal(now) {
                Some(why) => Err(why),
                None => Ok(rec.into_token(secret_sha256)),
            },
        })
    }

    fn reserve_agent_id(&self) -> Result<AgentId> {
        let txn = self.db.begin_write().map_err(db_err("reserve agent id"))?;
        let id = {
            let mut meta = txn.open_table(META).map_err(db_err("reserve agent id"))?;
            let id = Self::meta_u64(&meta, NEXT_AGENT)?.max(1);
            meta.insert(NEXT_AGENT, records::encode(&(id + 1)).as_slice())
                .map_err(db_err("reserve agent id"))?;
            id
        };
        txn.commit().map_err(db_err("commit agent id"))?;
        Ok(AgentId(id))
    }

    fn enroll(&self, e: &Enrollment) -> Result<std::result::Result<Agent, TokenRefusal>> {
        let txn = self.db.begin_write().map_err(db_err("enroll"))?;
        let agent = {
            let mut tokens = txn.open_table(TOKENS).map_err(db_err("enroll"))?;
            let rec: Option<TokenRecordV1> = tokens
                .get(e.token_sha256.as_slice())
                .map_err(db_err("enroll"))?
                .map(|v| records::decode("tokens", "token", v.value()))
                .transpose()?;
            let Some(mut rec) = rec else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            if let Some(why) = rec.refusal(e.now) {
                return Ok(Err(why));
            }
            rec.uses_left -= 1;
            tokens
                .insert(e.token_sha256.as_slice(), records::encode(&rec).as_slice())
                .map_err(db_err("enroll"))?;
            let mut agents = txn.open_table(AGENTS).map_err(db_err("enroll"))?;
            if agents.get(e.agent.0).map_err(db_err("enroll"))?.is_some() {
                return Err(StoreError::Conflict(format!(
                    "agent id {} is taken (reserve one first)",
                    e.agent
                )));
            }
            let stored = AgentRecordV1 {
                name: e.name.clone(),
                labels: merge_labels(&rec.labels, &e.labels),
                cert_sha256: e.cert_sha256.to_vec(),
                revoked: false,
                enrolled_at_ms: e.now.as_millis(),
                last_seen_ms: None,
                clock_offset_ms: None,
                rtt_ms: None,
            };
            agents
                .insert(e.agent.0, records::encode(&stored).as_slice())
                .map_err(db_err("enroll"))?;
            let mut certs = txn.open_table(CERTS).map_err(db_err("enroll"))?;
            certs
                .insert(
                    e.cert_sha256.as_slice(),
                    records::encode(&CertRoleV1::Agent(e.agent)).as_slice(),
                )
                .map_err(db_err("enroll"))?;
            stored.into_agent(e.agent, false)?
        };
        Self::feed_cert(
            &txn,
            &e.cert_sha256,
            Some(CertRoleV1::Agent(e.agent)),
            "enroll",
        )?;
        txn.commit().map_err(db_err("commit enrollment"))?;
        Ok(Ok(agent))
    }

    fn agent(&self, id: AgentId) -> Result<Option<Agent>> {
        let txn = self.db.begin_read().map_err(db_err("read agent"))?;
        let t = txn.open_table(AGENTS).map_err(db_err("read agent"))?;
        let f = txn.open_table(FORGOTTEN).map_err(db_err("read agent"))?;
        let v = t.get(id.0).map_err(db_err("read agent"))?;
        v.map(|v| Self::read_agent(&f, id.0, v.value())).transpose()
    }

    fn agents(&self, after: Option<AgentId>, limit: usize) -> Result<Vec<Agent>> {
        let txn = self.db.begin_read().map_err(db_err("read agents"))?;
        let t = txn.open_table(AGENTS).map_err(db_err("read agents"))?;
        let f = txn.open_table(FORGOTTEN).map_err(db_err("read agents"))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let from = after.map_or(0, |a| a.0.saturating_add(1));
        let mut out = Vec::new();
        for item in t.range(from..).map_err(db_err("read agents"))? {
            let (k, v) = item.map_err(db_err("read agents"))?;
            out.push(Self::read_agent(&f, k.value(), v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn agents_seen(&self, seen: &[(AgentId, AgentSeen)]) -> Result<()> {
        const CONTEXT: &str = "record agents' contacts";
        if seen.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(db_err(CONTEXT))?;
        if !self.seen_durable_now() {
            txn.set_durability(redb::Durability::None)
                .map_err(db_err(CONTEXT))?;
        }
        {
            let mut t = txn.open_table(AGENTS).map_err(db_err(CONTEXT))?;
            for (id, s) in seen {
                let rec: Option<AgentRecordV1> = t
                    .get(id.0)
                    .map_err(db_err(CONTEXT))?
                    .map(|v| records::decode("agents", id.0, v.value()))
                    .transpose()?;
                // Forgotten since: nothing to record.
                let Some(mut rec) = rec else { continue };
                rec.last_seen_ms = Some(s.at.as_millis());
                if let Some((offset, rtt)) = s.clock {
                    rec.clock_offset_ms = Some(offset);
                    rec.rtt_ms = Some(rtt);
                }
                t.insert(id.0, records::encode(&rec).as_slice())
                    .map_err(db_err(CONTEXT))?;
            }
        }
        txn.commit().map_err(db_err(CONTEXT))
    }

    fn agent_seen(&self, id: AgentId, seen: AgentSeen) -> Result<()> {
        let durable = self.seen_durable_now();
        self.change_agent_with(id, "record an agent's contact", None, durable, |r| {
            r.last_seen_ms = Some(seen.at.as_millis());
            if let Some((offset, rtt)) = seen.clock {
                r.clock_offset_ms = Some(offset);
                r.rtt_ms = Some(rtt);
            }
        })
        .map(|_| ())
    }

    fn revoke_agent(&self, id: AgentId, audit: Option<&AuditEntry>) -> Result<Agent> {
        self.change_agent(id, "revoke agent", audit, |r| r.revoked = true)
    }

    /// Removes a revoked agent from the lists; its runs stay.
    fn forget_agent(&self, id: AgentId, audit: Option<&AuditEntry>) -> Result<()> {
        let rec = self
            .agent(id)?
            .ok_or_else(|| StoreError::NotFound(format!("no agent {id}")))?;
        if !rec.revoked {
            return Err(StoreError::Refused(format!(
                "agent {id} is not revoked; revoke it first (sundialctl agent revoke {id})"
            )));
        }
        let txn = self.db.begin_write().map_err(db_err("forget agent"))?;
        {
            let mut t = txn.open_table(FORGOTTEN).map_err(db_err("forget agent"))?;
            t.insert(id.0, 1).map_err(db_err("forget agent"))?;
        }
        Self::audit_if(&txn, audit.cloned(), "forget agent")?;
        txn.commit().map_err(db_err("commit forget"))
    }

    /// Creates a task with the next id and revision.
    fn create_task(
        &self,
        draft: TaskDraft,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> Result<TaskSpec> {
        let txn = self.db.begin_write().map_err(db_err("create task"))?;
        let spec = {
            let mut names = txn.open_table(TASK_NAMES).map_err(db_err("create task"))?;
            if let Some(name) = &draft.name {
                if names
                    .get(name.as_str())
                    .map_err(db_err("create task"))?
                    .is_some()
                {
                    return Err(StoreError::Refused(format!(
                        "a task named `{name}` exists already"
                    )));
                }
            }
            let mut meta = txn.open_table(META).map_err(db_err("create task"))?;
            let id = Self::meta_u64(&meta, NEXT_TASK)?.max(1);
            let revision = Self::meta_u64(&meta, REVISION)? + 1;
            meta.insert(NEXT_TASK, records::encode(&(id + 1)).as_slice())
                .map_err(db_err("create task"))?;
            meta.insert(REVISION, records::encode(&revision).as_slice())
                .map_err(db_err("create task"))?;
            let created_at = counts_from(&draft.schedule, now);
            let spec = TaskSpec {
                id: TaskId(id),
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
            let rec = CoordTaskV1::new(&spec, false);
            let mut tasks = txn.open_table(TASKS).map_err(db_err("create task"))?;
            tasks
                .insert(id, self.seal("tasks", rec.encode())?.as_slice())
                .map_err(db_err("create task"))?;
            let mut revs = txn.open_table(TASK_REVS).map_err(db_err("create task"))?;
            revs.insert(revision, id).map_err(db_err("create task"))?;
            if let Some(name) = &spec.name {
                names
                    .insert(name.as_str(), id)
                    .map_err(db_err("create task"))?;
            }
            spec
        };
        Self::audit_if(
            &txn,
            audit.map(|a| a.for_task(spec.id, spec.revision)),
            "create task",
        )?;
        txn.commit().map_err(db_err("commit task"))?;
        Ok(spec)
    }

    /// Replaces a live task's spec (same id and target) under a new revision.
    fn update_task(
        &self,
        spec: &TaskSpec,
        expected_revision: u64,
        audit: Option<&AuditEntry>,
    ) -> Result<u64> {
        let id = spec.id;
        let txn = self.db.begin_write().map_err(db_err("update task"))?;
        let revision = {
            let mut tasks = txn.open_table(TASKS).map_err(db_err("update task"))?;
            let rec: Option<CoordTaskV1> = tasks
                .get(id.0)
                .map_err(db_err("update task"))?
                .map(|v| self.task_rec(id.0, v.value()))
                .transpose()?;
            let Some(old) = rec else {
                return Err(StoreError::NotFound(format!("no task {id}")));
            };
            if old.cancelled {
                return Err(StoreError::Refused(format!("task {id} is cancelled")));
            }
            if old.task.revision != expected_revision {
                return Err(StoreError::Conflict(format!(
                    "task {id} changed since it was read (revision {} now, {expected_revision} read); read it again",
                    old.task.revision
                )));
            }
            let revision = Self::next_task_revision(&txn, id, old.task.revision, "update task")?;
            let mut new = spec.clone();
            new.revision = revision;
            let rec = CoordTaskV1::new(&new, false);
            tasks
                .insert(id.0, self.seal("tasks", rec.encode())?.as_slice())
                .map_err(db_err("update task"))?;
            revision
        };
        Self::audit_if(&txn, audit.map(|a| a.for_task(id, revision)), "update task")?;
        txn.commit().map_err(db_err("commit task update"))?;
        Ok(revision)
    }

    /// Cancels a task: it becomes a tombstone with a new revision.
    fn cancel_task(&self, id: TaskId, audit: Option<&AuditEntry>) -> Result<u64> {
        let txn = self.db.begin_write().map_err(db_err("cancel task"))?;
        let revision = {
            let mut tasks = txn.open_table(TASKS).map_err(db_err("cancel task"))?;
            let rec: Option<CoordTaskV1> = tasks
                .get(id.0)
                .map_err(db_err("cancel task"))?
                .map(|v| self.task_rec(id.0, v.value()))
                .transpose()?;
            let Some(mut rec) = rec else {
                return Err(StoreError::NotFound(format!("no task {id}")));
            };
            if rec.cancelled {
                return Err(StoreError::Refused(format!(
                    "task {id} is already cancelled"
                )));
            }
            let revision = Self::next_task_revision(&txn, id, rec.task.revision, "cancel task")?;
            if let Some(name) = &rec.task.name {
                let mut names = txn.open_table(TASK_NAMES).map_err(db_err("cancel task"))?;
                names.remove(name.as_str()).map_err(db_err("cancel task"))?;
            }
            rec.cancelled = true;
            rec.task.revision = revision;
            tasks
                .insert(id.0, self.seal("tasks", rec.encode())?.as_slice())
                .map_err(db_err("cancel task"))?;
            revision
        };
        Self::audit_if(&txn, audit.map(|a| a.for_task(id, revision)), "cancel task")?;
        txn.commit().map_err(db_err("commit cancel"))?;
        Ok(revision)
    }

    /// Pauses (`true`) or resumes a task: a new revision, so agents drop it
    /// (paused) or take it again, counting from `now` (resumed).
    fn set_paused(
        &self,
        id: TaskId,
        paused: bool,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> Result<u64> {
        let txn = self.db.begin_write().map_err(db_err("pause task"))?;
        let revision = {
            let mut tasks = txn.open_table(TASKS).map_err(db_err("pause task"))?;
            let rec: Option<CoordTaskV1> = tasks
                .get(id.0)
                .map_err(db_err("pause task"))?
                .map(|v| self.task_rec(id.0, v.value()))
                .transpose()?;
            let Some(mut rec) = rec else {
                return Err(StoreError::NotFound(format!("no task {id}")));
            };
            if rec.cancelled {
                return Err(StoreError::Refused(format!("task {id} is cancelled")));
            }
            let mut p = txn.open_table(PAUSED).map_err(db_err("pause task"))?;
            let was = p.get(id.0).map_err(db_err("pause task"))?.is_some();
            if was == paused {
                return Err(StoreError::Refused(format!(
                    "task {id} is {}",
                    if paused {
                        "paused already"
                    } else {
                        "not paused"
                    }
                )));
            }
            if paused {
                p.insert(id.0, 1).map_err(db_err("pause task"))?;
            } else {
                p.remove(id.0).map_err(db_err("pause task"))?;
                // Occurrences while paused are not expected of anyone: the
                // task counts from now, and its creation is kept apart.
                let mut created = txn.open_table(CREATED).map_err(db_err("pause task"))?;
                if created.get(id.0).map_err(db_err("pause task"))?.is_none() {
                    created
                        .insert(id.0, rec.task.created_at_ms)
                        .map_err(db_err("pause task"))?;
                }
                rec.task.created_at_ms = rec.task.created_at_ms.max(now.as_millis());
            }
            let revision = Self::next_task_revision(&txn, id, rec.task.revision, "pause task")?;
            rec.task.revision = revision;
            tasks
                .insert(id.0, self.seal("tasks", rec.encode())?.as_slice())
                .map_err(db_err("pause task"))?;
            revision
        };
        Self::audit_if(&txn, audit.map(|a| a.for_task(id, revision)), "pause task")?;
        txn.commit().map_err(db_err("commit pause"))?;
        Ok(revision)
    }

    fn task(&self, id: TaskId) -> Result<Option<StoredTask>> {
        let txn = self.db.begin_read().map_err(db_err("read task"))?;
        let t = txn.open_table(TASKS).map_err(db_err("read task"))?;
        let p = txn.open_table(PAUSED).map_err(db_err("read task"))?;
        let Some(v) = t.get(id.0).map_err(db_err("read task"))? else {
            return Ok(None);
        };
        let rec: CoordTaskV1 = self.task_rec(id.0, v.value())?;
        let paused = !rec.cancelled && p.get(id.0).map_err(db_err("read task"))?.is_some();
        let cancelled = rec.cancelled;
        let spec = rec.into_spec(id.0)?;
        let created = txn.open_table(CREATED).map_err(db_err("read task"))?;
        let created_at = created_of(&created, &spec)?;
        Ok(Some(StoredTask {
            spec,
            cancelled,
            paused,
            created_at,
        }))
    }

    fn tasks(&self, after: Option<TaskId>, limit: usize) -> Result<Vec<StoredTask>> {
        let txn = self.db.begin_read().map_err(db_err("read tasks"))?;
        let t = txn.open_table(TASKS).map_err(db_err("read tasks"))?;
        let p = txn.open_table(PAUSED).map_err(db_err("read tasks"))?;
        let created = txn.open_table(CREATED).map_err(db_err("read tasks"))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let from = after.map_or(0, |a| a.0.saturating_add(1));
        let mut out = Vec::new();
        for item in t.range(from..).map_err(db_err("read tasks"))? {
            let (k, v) = item.map_err(db_err("read tasks"))?;
            let rec = self.task_rec(k.value(), v.value())?;
            let paused =
                !rec.cancelled && p.get(k.value()).map_err(db_err("read tasks"))?.is_some();
            let cancelled = rec.cancelled;
            let spec = rec.into_spec(k.value())?;
            let created_at = created_of(&created, &spec)?;
            out.push(StoredTask {
                spec,
                cancelled,
                paused,
                created_at,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn changes_for(
        &self,
        agent: AgentId,
        labels: &[(String, String)],
        since: u64,
        limit: usize,
    ) -> Result<ChangePage> {
        let txn = self.db.begin_read().map_err(db_err("read changes"))?;
        let meta = txn.open_table(META).map_err(db_err("read changes"))?;
        let revs = txn.open_table(TASK_REVS).map_err(db_err("read changes"))?;
        let tasks = txn.open_table(TASKS).map_err(db_err("read changes"))?;
        let paused = txn.open_table(PAUSED).map_err(db_err("read changes"))?;
        let limit = limit.max(1);
        let mut changes = Vec::new();
        let mut upto = since;
        let mut more = false;
        for (looked, item) in revs
            .range(since.saturating_add(1)..)
            .map_err(db_err("read changes"))?
            .enumerate()
        {
            if looked >= limit {
                more = true;
                break;
            }
            let (rev, id) = item.map_err(db_err("read changes"))?;
            upto = rev.value();
            let id = id.value();
            let Some(v) = tasks.get(id).map_err(db_err("read changes"))? else {
                continue;
            };
            let rec: CoordTaskV1 = self.task_rec(id, v.value())?;
            // A paused task is, for agents, removed until it is resumed.
            let removed =
                rec.cancelled || paused.get(id).map_err(db_err("read changes"))?.is_some();
            if since == 0 && removed {
                continue;
            }
            let spec = rec.into_spec(id)?;
            if targets(&spec.target, agent, labels) {
                changes.push((spec, removed));
            }
        }
        if !more {
            // Everything was looked at: the page is current to the store's revision.
            upto = upto.max(Self::meta_u64(&meta, REVISION)?);
        }
        Ok(ChangePage {
            changes,
            upto,
            more,
        })
    }

    /// Stores run records in one transaction. The first record of a run key
    /// wins: a resend of the same record is a no-op, a *different* record
    /// for a key already stored is not written and is returned, so the
    /// caller can log it (an agent cannot rewrite its history).
    fn store_runs(&self, runs: &[RunRecord]) -> Result<StoredRuns> {
        let txn = self.db.begin_write().map_err(db_err("store runs"))?;
        let mut conflicts = Vec::new();
        let mut fresh = Vec::new();
        {
            let mut t = txn.open_table(RUNS).map_err(db_err("store runs"))?;
            let mut last = txn.open_table(LAST_RUNS).map_err(db_err("store runs"))?;
            let mut by_time = txn.open_table(RUNS_BY_TIME).map_err(db_err("store runs"))?;
            let mut by_task = txn.open_table(RUNS_BY_TASK).map_err(db_err("store runs"))?;
            let mut by_agent = txn
                .open_table(RUNS_BY_AGENT)
                .map_err(db_err("store runs"))?;
            let mut arrivals = txn.open_table(ARRIVALS).map_err(db_err("store runs"))?;
            let mut arrival_of = txn.open_table(ARRIVAL_OF).map_err(db_err("store runs"))?;
            let mut meta = txn.open_table(META).map_err(db_err("store runs"))?;
            let first_seq = Self::meta_u64(&meta, ARRIVAL_NEXT)?.max(1);
            let mut seq = first_seq;
            // The newest fresh run of each (task, agent) in this batch: its
            // last run is looked at and written once, not once per run.
            let mut newest: std::collections::HashMap<(u64, u64), &RunRecord> =
                std::collections::HashMap::new();
            for r in runs {
                let key = (
                    r.task_id.0,
                    r.agent_id.0,
                    r.scheduled_at.as_millis(),
                    r.attempt,
                );
                let plain = records::encode(&RunRecordV1::from_run(r));
                let bytes = self.seal("runs", plain.clone())?;
                // Written first and put back if it was there: a fresh run
                // (nearly every one) costs one descent of the tree, not two.
                let existing = t
                    .insert(key, bytes.as_slice())
                    .map_err(db_err("store runs"))?
                    .map(|v| v.value().to_vec());
                match existing {
                    // The same record again (under another key, after a
                    // rotation, its bytes differ: compared in plain).
                    Some(old) if old == bytes => {}
                    Some(old) => {
                        // The first record of a key stays.
                        t.insert(key, old.as_slice())
                            .map_err(db_err("store runs"))?;
                        if self.unseal("runs", &old)?.as_ref() != plain {
                            conflicts.push(key);
                        }
                    }
                    None => {
                        fresh.push(key);
                        let (task, agent, sched, attempt) = key;
                        by_time
                            .insert((sched, task, agent, attempt), 1)
                            .map_err(db_err("store runs"))?;
                        by_task
                            .insert((task, sched, agent, attempt), 1)
                            .map_err(db_err("store runs"))?;
                        by_agent
                            .insert((agent, sched, task, attempt), 1)
                            .map_err(db_err("store runs"))?;
                        arrivals.insert(seq, key).map_err(db_err("store runs"))?;
                        arrival_of.insert(key, seq).map_err(db_err("store runs"))?;
                        seq += 1;
                        let at = (sched, attempt);
                        newest
                            .entry((task, agent))
                            .and_modify(|n| {
                                if (n.scheduled_at.as_millis(), n.attempt) <= at {
                                    *n = r;
                                }
                            })
                            .or_insert(r);
                    }
                }
            }
            for ((task, agent), r) in newest {
                let (sched, attempt) = (r.scheduled_at.as_millis(), r.attempt);
                let newer = match last.get((task, agent)).map_err(db_err("store runs"))? {
                    Some(v) => records::decode::<LastRunV1>("last_runs", task, v.value())
                        .map(|l| (l.scheduled_at_ms, l.attempt) <= (sched, attempt))
                        .unwrap_or(true),
                    None => true,
                };
                if newer {
                    let l = LastRunV1 {
                        scheduled_at_ms: sched,
                        attempt,
                        outcome: r.outcome.as_str().to_owned(),
                        finished_at_ms: r.finished_at.map(Timestamp::as_millis),
                        detail: r.why(),
                    };
                    last.insert((task, agent), records::encode(&l).as_slice())
                        .map_err(db_err("store runs"))?;
                }
            }
            if seq != first_seq {
                meta.insert(ARRIVAL_NEXT, records::encode(&seq).as_slice())
                    .map_err(db_err("store runs"))?;
            }
        }
        txn.commit().map_err(db_err("commit runs"))?;
        Ok(StoredRuns { conflicts, fresh })
    }

    /// One page of runs matching `q`, oldest first, read from an index by
    /// time (of all runs, of a task, or of an agent): O(page), whatever the
    /// number stored. A stored record that does not decode is skipped and
    /// counted, never fatal to the listing.
    fn runs(&self, q: &RunQuery) -> Result<RunPage> {
        let txn = self.db.begin_read().map_err(db_err("read runs"))?;
        let t = txn.open_table(RUNS).map_err(db_err("read runs"))?;
        let limit = q.limit.max(1);
        let since = q.since.map(Timestamp::as_millis);
        // Keys in time order, up to limit + 1 (to know whether more match).
        let mut keys: Vec<RunCursor> = Vec::with_capacity(limit + 1);
        let forward = matches!(q.page, Page::After(_))
            || (q.since.is_some() && q.page == Page::Latest && q.forward_from_since);
        // Reads one index in time order from `lo` to `hi` (backwards for the
        // latest page), keeping what matches until the page is full.
        macro_rules! scan {
            ($table:expr, $lo:expr, $hi:expr, $to_cursor:expr) => {{
                let table = txn.open_table($table).map_err(db_err("read runs"))?;
                let (lo, hi) = ($lo, $hi);
                // A cursor past the other bound: an empty page.
                let range = table.range(lo..=hi.max(lo)).map_err(db_err("read runs"))?;
                let mut push = |c: RunCursor| -> bool {
                    if q.task.is_some_and(|x| x.0 != c.task)
                        || q.agent.is_some_and(|x| x.0 != c.agent)
                        || since.is_some_and(|s| c.scheduled_at_ms < s)
                    {
                        return true;
                    }
                    match q.page {
                        Page::After(a) if c <= a => return true,
                        Page::Before(b) if c >= b => return true,
                        _ => {}
                    }
                    keys.push(c);
                    keys.len() <= limit
                };
                if forward {
                    for item in range {
                        let (k, _) = item.map_err(db_err("read runs"))?;
                        if !push($to_cursor(k.value())) {
                            break;
                        }
                    }
                } else {
                    for item in range.rev() {
                        let (k, _) = item.map_err(db_err("read runs"))?;
                        if !push($to_cursor(k.value())) {
                            break;
                        }
                    }
                }
            }};
        }
        let lo_ms = since.unwrap_or(i64::MIN);
        // The range starts (or ends) at the cursor: a page costs its own
        // size however deep it is. Items equal to the cursor are skipped.
        let after = match q.page {
            Page::After(a) if a.scheduled_at_ms >= lo_ms => Some(a),
            _ => None,
        };
        let before = match q.page {
            Page::Before(b) => Some(b),
            _ => None,
        };
        let cursor = |scheduled_at_ms, task, agent, attempt| RunCursor {
            scheduled_at_ms,
            task,
            agent,
            attempt,
        };
        match (q.task, q.agent) {
            (Some(task), _) => scan!(
                RUNS_BY_TASK,
                after.map_or((task.0, lo_ms, 0, 0), |a| {
                    (task.0, a.scheduled_at_ms, a.agent, a.attempt)
                }),
                before.map_or((task.0, i64::MAX, u64::MAX, u32::MAX), |b| {
                    (task.0, b.scheduled_at_ms, b.agent, b.attempt)
                }),
                |(task, sched, agent, attempt)| cursor(sched, task, agent, attempt)
            ),
            (None, Some(agent)) => scan!(
                RUNS_BY_AGENT,
                after.map_or((agent.0, lo_ms, 0, 0), |a| {
                    (agent.0, a.scheduled_at_ms, a.task, a.attempt)
                }),
                before.map_or((agent.0, i64::MAX, u64::MAX, u32::MAX), |b| {
                    (agent.0, b.scheduled_at_ms, b.task, b.attempt)
                }),
                |(agent, sched, task, attempt)| cursor(sched, task, agent, attempt)
            ),
            (None, None) => scan!(
                RUNS_BY_TIME,
                after.map_or((lo_ms, 0, 0, 0), |a| {
                    (a.scheduled_at_ms, a.task, a.agent, a.attempt)
                }),
                before.map_or((i64::MAX, u64::MAX, u64::MAX, u32::MAX), |b| {
                    (b.scheduled_at_ms, b.task, b.agent, b.attempt)
                }),
                |(sched, task, agent, attempt)| cursor(sched, task, agent, attempt)
            ),
        }
        let mut more = keys.len() > limit;
        keys.truncate(limit);
        let matched = if q.task.is_none() && q.agent.is_none() && q.since.is_none() {
            use redb::ReadableTableMetadata;
            Some(t.len().map_err(db_err("read runs"))?)
        } else {
            None
        };
        // Read in the order of the scan (from the cursor on), and stop at
        // the byte budget of one answer: the rest is the next page's.
        let mut runs = Vec::with_capacity(keys.len());
        let mut unreadable = 0u64;
        let mut bytes = 0usize;
        let mut read = 0usize;
        for c in &keys {
            if bytes >= RUN_LIST_BYTES_MAX {
                more = true;
                break;
            }
            read += 1;
            let key = (c.task, c.agent, c.scheduled_at_ms, c.attempt);
            let Some((size, decoded)) = self.read_run(&t, key)? else {
                continue;
            };
            bytes = bytes.saturating_add(size);
            match decoded {
                Ok(r) => runs.push(r),
                Err(e) => {
                    unreadable += 1;
                    tracing::warn!(error = %e, "skipped an unreadable run record");
                }
            }
        }
        keys.truncate(read);
        if !forward {
            keys.reverse();
            runs.reverse();
        }
        Ok(RunPage {
            runs,
            first: keys.first().copied(),
            last: keys.last().copied(),
            more,
            matched,
            unreadable,
        })
    }

    fn runs_arrived(&self, q: &ArrivalQuery) -> Result<ArrivedRuns> {
        let txn = self.db.begin_read().map_err(db_err("read runs"))?;
        let t = txn.open_table(RUNS).map_err(db_err("read runs"))?;
        let arrivals = txn.open_table(ARRIVALS).map_err(db_err("read runs"))?;
        let limit = q.limit.clamp(1, PAGE_MAX);
        let at = |seq| ArrivalCursor { epoch: 0, seq };
        let wanted = |(task, agent, _, _): RunKeyOf| {
            q.task.is_none_or(|x| x.0 == task) && q.agent.is_none_or(|x| x.0 == agent)
        };
        let mut out = ArrivedRuns::default();
        let mut bytes = 0usize;
        // (seq, key) of the page, in the order scanned.
        let mut page: Vec<(u64, RunKeyOf)> = Vec::new();
        let mut scanned = 0usize;
        match q.after {
            Some(after) => {
                // Embedded stores write one epoch (0): a cursor of another
                // epoch is past all of it or before all of it.
                let from = match after.epoch {
                    0 => after.seq.saturating_add(1),
                    _ => u64::MAX,
                };
                out.next = after;
                for item in arrivals.range(from..).map_err(db_err("read runs"))? {
                    let (k, v) = item.map_err(db_err("read runs"))?;
                    if page.len() >= limit || scanned >= ARRIVAL_SCAN_MAX {
                        out.more = true;
                        break;
                    }
                    scanned += 1;
                    out.next = at(k.value());
                    if wanted(v.value()) {
                        page.push((k.value(), v.value()));
                    }
                }
            }
            None => {
                out.next = match arrivals.last().map_err(db_err("read runs"))? {
                    Some((k, _)) => at(k.value()),
                    None => ArrivalCursor::START,
                };
                for item in arrivals.iter().map_err(db_err("read runs"))?.rev() {
                    let (k, v) = item.map_err(db_err("read runs"))?;
                    if page.len() >= limit || scanned >= ARRIVAL_SCAN_MAX {
                        break;
                    }
                    scanned += 1;
                    if wanted(v.value()) {
                        page.push((k.value(), v.value()));
                    }
                }
                page.reverse();
            }
        }
        for (i, &(seq, key)) in page.iter().enumerate() {
            if bytes >= RUN_LIST_BYTES_MAX {
                // The rest is the next page's: continue after the last read.
                if q.after.is_some() {
                    out.more = true;
                    out.next = at(page[i - 1].0);
                }
                break;
            }
            let Some((size, decoded)) = self.read_run(&t, key)? else {
                continue;
            };
            bytes = bytes.saturating_add(size);
            if out.first.is_none() {
                out.first = Some(at(seq));
            }
            match decoded {
                Ok(r) => out.runs.push(r),
                Err(e) => {
                    out.unreadable += 1;
                    tracing::warn!(error = %e, "skipped an unreadable run record");
                }
            }
        }
        Ok(out)
    }

    /// Deletes runs scheduled before `before`, at most `max` in one
    /// transaction, oldest first by the time index; returns how many went
    /// (call again while it is `max`).
    fn purge_runs_before(&self, before: Timestamp, max: usize) -> Result<usize> {
        let txn = self.db.begin_write().map_err(db_err("purge runs"))?;
        let n = {
            let mut runs = txn.open_table(RUNS).map_err(db_err("purge runs"))?;
            let mut by_time = txn.open_table(RUNS_BY_TIME).map_err(db_err("purge runs"))?;
            let mut by_task = txn.open_table(RUNS_BY_TASK).map_err(db_err("purge runs"))?;
            let mut by_agent = txn
                .open_table(RUNS_BY_AGENT)
                .map_err(db_err("purge runs"))?;
            let mut arrivals = txn.open_table(ARRIVALS).map_err(db_err("purge runs"))?;
            let mut arrival_of = txn.open_table(ARRIVAL_OF).map_err(db_err("purge runs"))?;
            let mut doomed = Vec::new();
            for item in by_time
                .range((i64::MIN, 0, 0, 0)..(before.as_millis(), 0, 0, 0))
                .map_err(db_err("purge runs"))?
            {
                let (k, _) = item.map_err(db_err("purge runs"))?;
                doomed.push(k.value());
                if doomed.len() >= max {
                    break;
                }
            }
            for &(sched, task, agent, attempt) in &doomed {
                runs.remove((task, agent, sched, attempt))
                    .map_err(db_err("purge runs"))?;
                by_time
                    .remove((sched, task, agent, attempt))
                    .map_err(db_err("purge runs"))?;
                by_task
                    .remove((task, sched, agent, attempt))
                    .map_err(db_err("purge runs"))?;
                by_agent
                    .remove((agent, sched, task, attempt))
                    .map_err(db_err("purge runs"))?;
                let seq = arrival_of
                    .remove((task, agent, sched, attempt))
                    .map_err(db_err("purge runs"))?
                    .map(|v| v.value());
                if let Some(seq) = seq {
                    arrivals.remove(seq).map_err(db_err("purge runs"))?;
                }
            }
            doomed.len()
        };
        txn.commit().map_err(db_err("commit purge"))?;
        Ok(n)
    }

    /// The latest run of `task` on each agent.
    fn last_runs(&self, task: TaskId, limit: usize) -> Result<Vec<LastRun>> {
        let txn = self.db.begin_read().map_err(db_err("read last runs"))?;
        let t = txn
            .open_table(LAST_RUNS)
            .map_err(db_err("read last runs"))?;
        let mut out = Vec::new();
        for item in t
            .range((task.0, 0)..=(task.0, u64::MAX))
            .map_err(db_err("read last runs"))?
        {
            if out.len() >= limit.clamp(1, PAGE_MAX) {
                break;
            }
            let (k, v) = item.map_err(db_err("read last runs"))?;
            let Ok(l) = records::decode::<LastRunV1>("last_runs", task.0, v.value()) else {
                continue;
            };
            let Some(outcome) = Outcome::parse(&l.outcome) else {
                continue;
            };
            out.push(LastRun {
                agent_id: AgentId(k.value().1),
                scheduled_at: Timestamp::from_millis_saturating(l.scheduled_at_ms),
                attempt: l.attempt,
                outcome,
                finished_at: l.finished_at_ms.map(Timestamp::from_millis_saturating),
                detail: l.detail,
            });
        }
        Ok(out)
    }

    /// Number of stored runs.
    fn run_count(&self) -> Result<u64> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read().map_err(db_err("read runs"))?;
        let t = txn.open_table(RUNS).map_err(db_err("read runs"))?;
        t.len().map_err(db_err("read runs"))
    }

    fn cert_seq(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(db_err("read cert feed"))?;
        let t = txn.open_table(META).map_err(db_err("read cert feed"))?;
        Self::meta_u64(&t, CERT_SEQ)
    }

    fn cert_changes(&self, since: u64, limit: usize) -> Result<CertPage> {
        let txn = self.db.begin_read().map_err(db_err("read cert feed"))?;
        let feed = txn
            .open_table(CERT_FEED)
            .map_err(db_err("read cert feed"))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let mut changes = Vec::new();
        let mut upto = since;
        let mut more = false;
        for item in feed
            .range(since.saturating_add(1)..)
            .map_err(db_err("read cert feed"))?
        {
            if changes.len() >= limit {
                more = true;
                break;
            }
            let (k, v) = item.map_err(db_err("read cert feed"))?;
            upto = k.value();
            let (fp, role): (Vec<u8>, Option<CertRoleV1>) =
                records::decode("cert_feed", k.value(), v.value())?;
            let Ok(fp) = <[u8; 32]>::try_from(fp.as_slice()) else {
                continue;
            };
            changes.push((fp, role.map(CertRole::from)));
        }
        Ok(CertPage {
            changes,
            upto,
            more,
        })
    }

    fn task_changes(&self, since: u64, limit: usize) -> Result<ChangePage> {
        let txn = self.db.begin_read().map_err(db_err("read changes"))?;
        let meta = txn.open_table(META).map_err(db_err("read changes"))?;
        let revs = txn.open_table(TASK_REVS).map_err(db_err("read changes"))?;
        let tasks = txn.open_table(TASKS).map_err(db_err("read changes"))?;
        let paused = txn.open_table(PAUSED).map_err(db_err("read changes"))?;
        let limit = limit.clamp(1, PAGE_MAX);
        let mut changes = Vec::new();
        let mut upto = since;
        let mut more = false;
        for item in revs
            .range(since.saturating_add(1)..)
            .map_err(db_err("read changes"))?
        {
            if changes.len() >= limit {
                more = true;
                break;
            }
            let (rev, id) = item.map_err(db_err("read changes"))?;
            upto = rev.value();
            let id = id.value();
            let Some(v) = tasks.get(id).map_err(db_err("read changes"))? else {
                continue;
            };
            let rec: CoordTaskV1 = self.task_rec(id, v.value())?;
            let removed =
                rec.cancelled || paused.get(id).map_err(db_err("read changes"))?.is_some();
            changes.push((rec.into_spec(id)?, removed));
        }
        if !more {
            upto = upto.max(Self::meta_u64(&meta, REVISION)?);
        }
        Ok(ChangePage {
            changes,
            upto,
            more,
        })
    }

    fn queue_run_now(&self, runs: &[QueuedRunNow], now: Timestamp) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err("queue run-now"))?;
        {
            let mut t = txn.open_table(RUN_NOW).map_err(db_err("queue run-now"))?;
            for r in runs {
                t.insert((r.agent.0, r.task.0, r.at.as_millis()), now.as_millis())
                    .map_err(db_err("queue run-now"))?;
            }
        }
        txn.commit().map_err(db_err("commit run-now"))
    }

    fn take_run_now(&self, agents: &[AgentId], now: Timestamp) -> Result<Vec<QueuedRunNow>> {
        let txn = self.db.begin_write().map_err(db_err("take run-now"))?;
        let mut out = Vec::new();
        {
            let mut t = txn.open_table(RUN_NOW).map_err(db_err("take run-now"))?;
            let mut gone = Vec::new();
            // Bounded by what was queued, itself bounded by the run-nows
            // an admin can send (targets × requests within the TTL).
            for item in t.iter().map_err(db_err("take run-now"))? {
                let (k, v) = item.map_err(db_err("take run-now"))?;
                let (agent, task, at) = k.value();
                if v.value() + RUN_NOW_QUEUE_TTL_MS < now.as_millis() {
                    gone.push(k.value());
                } else if agents.contains(&AgentId(agent)) {
                    gone.push(k.value());
                    out.push(QueuedRunNow {
                        agent: AgentId(agent),
                        task: TaskId(task),
                        at: Timestamp::from_millis_saturating(at),
                    });
                }
            }
            for k in gone {
                t.remove(k).map_err(db_err("take run-now"))?;
            }
        }
        txn.commit().map_err(db_err("commit run-now"))?;
        Ok(out)
    }
}

impl CoordinatorStore {
    /// Read-modify-write of one agent's record, in one transaction; a
    /// revoked agent's certificate goes with it.
    fn change_agent(
        &self,
        id: AgentId,
        context: &'static str,
        audit: Option<&AuditEntry>,
        f: impl FnOnce(&mut AgentRecordV1),
    ) -> Result<Agent> {
        self.change_agent_with(id, context, audit, true, f)
    }

    /// [`Self::change_agent`], committed without a flush to disk unless
    /// `durable` (it is then made durable by the next commit that is).
    /// Whether this contact's commit is the second's flushed one: one
    /// caller in a second wins the flush; the rest do not wait for it.
    fn seen_durable_now(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now_ms = self.opened.elapsed().as_millis() as u64;
        let last = self.seen_flushed_ms.load(Relaxed);
        now_ms >= last + SEEN_DURABLE_EVERY_MS
            && self
                .seen_flushed_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
    }

    fn change_agent_with(
        &self,
        id: AgentId,
        context: &'static str,
        audit: Option<&AuditEntry>,
        durable: bool,
        f: impl FnOnce(&mut AgentRecordV1),
    ) -> Result<Agent> {
        let mut txn = self.db.begin_write().map_err(db_err(context))?;
        if !durable {
            txn.set_durability(redb::Durability::None)
                .map_err(db_err(context))?;
        }
        let agent = {
            let mut t = txn.open_table(AGENTS).map_err(db_err(context))?;
            let rec: Option<AgentRecordV1> = t
                .get(id.0)
                .map_err(db_err(context))?
                .map(|v| records::decode("agents", id.0, v.value()))
                .transpose()?;
            let Some(mut rec) = rec else {
                return Err(StoreError::NotFound(format!("no agent {id}")));
            };
            let was_revoked = rec.revoked;
            f(&mut rec);
            if rec.revoked {
                let mut certs = txn.open_table(CERTS).map_err(db_err(context))?;
                certs
                    .remove(rec.cert_sha256.as_slice())
                    .map_err(db_err(context))?;
            }
            if rec.revoked && !was_revoked {
                Self::feed_cert(&txn, &rec.cert_sha256, None, context)?;
            }
            t.insert(id.0, records::encode(&rec).as_slice())
                .map_err(db_err(context))?;
            let f = txn.open_table(FORGOTTEN).map_err(db_err(context))?;
            let gone = f.get(id.0).map_err(db_err(context))?.is_some();
            rec.into_agent(id, gone)?
        };
        Self::audit_if(&txn, audit.cloned(), context)?;
        txn.commit().map_err(db_err(context))?;
        Ok(agent)
    }
}

/// Why the last owner cannot be revoked.
pub fn last_owner(name: &str) -> String {
    format!(
        "admin {name:?} is the last owner: nobody could manage admins any more; create another owner first (sundialctl admin create NAME --role owner)"
    )
}

fn records_hex(b: &[u8]) -> String {
    sundial_protocol::token::hex(b)
}
