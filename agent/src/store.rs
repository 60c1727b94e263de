//! The agent's durable state, in one redb database: tasks with revisions,
//! per-task schedule state, `started` markers, the run outbox, and metadata
//! (identity, applied revision, clock state).
//!
//! Records are the store's own versioned types (`*V1`), not wire types: a
//! record is one version byte followed by postcard. A record that does not
//! decode is reported as [`StoreError::Corrupt`] naming its table and key;
//! nothing is silently dropped.
//!
//! Invariants:
//! - Every method that changes state does so in one write transaction with
//!   immediate durability: after it returns `Ok`, the change survives a crash;
//!   after it returns `Err`, either all of it or none of it is stored.
//! - A `started` marker is committed before its run is spawned
//!   ([`AgentStore::apply_step`]), and removed in the same transaction that
//!   puts the run's record into the outbox ([`AgentStore::finish_run`]).
//! - Every stored task has a state (its next due occurrence, or none), and
//!   the `due` index holds `(next due, id)` of every task with one: the
//!   agent loads only the tasks due soon, in that order. Both change in the
//!   transaction that changes the state.
//! - The outbox holds at most one record per run key; a record leaves it only
//!   through [`AgentStore::outbox_ack`], after the coordinator's acknowledgement.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use redb::{
    ConcurrencyMode, Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, StorageBackend, TableDefinition,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sundial_core::node::{FanInState, StoredTask};
use sundial_core::scheduler::first_occurrence;
use sundial_protocol::records::{self, RecordError, RunRecordV1};
use sundial_protocol::wasm::ModuleHash;
use sundial_protocol::{AgentId, Outcome, RunKey, RunRecord, TaskId, TaskSpec, Timestamp};

use std::borrow::Cow;
use std::sync::Arc;
use sundial_net::at_rest::{self, StoreCipher};

fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    records::encode(rec)
}

fn decode<T: DeserializeOwned>(table: &'static str, key: impl ToString, bytes: &[u8]) -> Result<T> {
    Ok(records::decode(table, key, bytes)?)
}

fn ts(table: &'static str, key: &str, ms: i64) -> Result<Timestamp> {
    Ok(records::ts(table, key, ms)?)
}

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
const STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("task_state");
const STARTED: TableDefinition<(u64, i64, u32), &[u8]> = TableDefinition::new("started");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const OUTBOX_INDEX: TableDefinition<(u64, i64, u32), u64> = TableDefinition::new("outbox_index");
/// (next due ms, task id) of every task with a next occurrence.
const DUE: TableDefinition<(i64, u64), ()> = TableDefinition::new("due");
/// Pending retries: run key → when it is due (ms). Durable, so a restart of
/// any kind (SIGTERM drain, kill -9, reboot) keeps them.
const RETRIES: TableDefinition<(u64, i64, u32), i64> = TableDefinition::new("retries");
/// The ids of stored triggered tasks (they have no due entry, and are
/// always held).
const TRIGGERED: TableDefinition<u64, ()> = TableDefinition::new("triggered");
/// Fan-in progress: (task id, occurrence ms) → the upstream ends heard
/// (`Vec<(u64, outcome)>`, a record).
const FANIN: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("fanin");
/// Functions' modules by SHA-256 (new in 0.7; code, stored as sent).
const MODULES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("modules");
/// The module each function task names: a module no task names is dropped.
const TASK_MODULES: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("task_modules");

/// Metadata keys.
pub mod meta {
    /// The agent id the coordinator assigned (u64).
    pub const AGENT_ID: &str = "agent_id";
    /// The last assignment revision applied (u64).
    pub const LAST_REVISION: &str = "last_revision";
    /// Estimated offset of the coordinator's clock from ours, ms (i64).
    pub const CLOCK_OFFSET_MS: &str = "clock_offset_ms";
    /// The latest wall-clock instant known to be good, Unix ms (i64).
    pub const LAST_KNOWN_GOOD_MS: &str = "last_known_good_ms";
    /// The last time a session with the coordinator was up, Unix ms (i64).
    pub const LAST_SYNC_MS: &str = "last_sync_ms";
    /// Next outbox sequence number (u64).
    pub const OUTBOX_SEQ: &str = "outbox_seq";
    /// The coordinator's HOST:PORT (String).
    pub const COORDINATOR: &str = "coordinator";
    /// The name in the coordinator's certificate (String).
    pub const SERVER_NAME: &str = "server_name";
    /// `--allow-exec` patterns given at join (`Vec<String>`).
    pub const ALLOW_EXEC: &str = "allow_exec";
    /// `--allow-env` names given at join (`Vec<String>`).
    pub const ALLOW_ENV: &str = "allow_env";
    /// `--allow-wasm` given at join (bool).
    pub const ALLOW_WASM: &str = "allow_wasm";
    /// `--allow-wasm-dir` directories given at join (`Vec<String>`).
    pub const ALLOW_WASM_DIRS: &str = "allow_wasm_dirs";
    /// Functions as the agent last started: (allowed, fuel max, memory
    /// max, module max), for `status`.
    pub const FUNCTIONS: &str = "functions";
    /// Whether firing is held because the clock is untrusted (bool).
    pub const CLOCK_HELD: &str = "clock_held";
    /// (boot id, CLOCK_BOOTTIME ms, trusted Unix ms): the clock guard's
    /// anchor, for a restart within the same boot.
    pub const BOOT_ANCHOR: &str = "boot_anchor";
    /// The boot id the clock offset was measured in (String): after a reboot
    /// the wall clock may have been reset (an RTC, NTP, or none: 2001), so an
    /// offset from another boot is not applied.
    pub const CLOCK_OFFSET_BOOT: &str = "clock_offset_boot";
    /// bool: the coordinator said this agent is revoked; no session is tried.
    pub const REVOKED: &str = "revoked";
    /// u32: the version of the `due` index (absent in stores made before
    /// it: the index is built from the tasks when such a store is opened).
    pub const DUE_INDEX: &str = "due_index";
    /// (key id, check value) of every store key records were written with.
    pub const KEY_CHECKS: &str = "key_checks";
    /// Every task and run record is encrypted (set once migrated).
    pub const ENCRYPTED: &str = "encrypted";
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written; nothing of the
    /// failed operation was stored. The caller may retry or stop.
    #[error("agent store: {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: redb::Error,
    },
    /// A record does not decode. The store is left as it is for inspection.
    #[error("agent store: corrupt record in table `{table}` at key {key}: {reason}")]
    Corrupt {
        table: &'static str,
        key: String,
        reason: String,
    },
    /// A write was attempted on a store opened read-only.
    #[error("agent store: opened read-only")]
    ReadOnly,
    /// The thread that ran a store operation failed (it panicked or the
    /// runtime is stopping); nothing is known to be stored.
    #[error("agent store: {0}")]
    Worker(String),
    /// The store key: missing, wrong, or the random generator failed.
    #[error("agent store: store key: {0}")]
    Key(String),
}

impl StoreError {
    /// Whether the disk failed (full, read-only, I/O error): redb then
    /// refuses every write until the database is reopened.
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                source: redb::Error::Io(_) | redb::Error::PreviousIo,
                ..
            }
        )
    }

    /// Whether another process holds the store open for writing.
    pub fn is_already_open(&self) -> bool {
        matches!(
            self,
            StoreError::Db {
                source: redb::Error::DatabaseAlreadyOpen,
                ..
            }
        )
    }
}

impl From<RecordError> for StoreError {
    fn from(e: RecordError) -> Self {
        StoreError::Corrupt {
            table: e.table,
            key: e.key,
            reason: e.reason,
        }
    }
}

fn db_err<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Db {
        context,
        source: e.into(),
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateRecordV1 {
    next_due_ms: Option<i64>,
}

/// The next due (ms) of a stored state record, if it has one.
fn stored_due_ms(id: TaskId, rec: Option<redb::AccessGuard<'_, &[u8]>>) -> Result<Option<i64>> {
    Ok(match rec {
        Some(v) => decode::<StateRecordV1>("task_state", id.0, v.value())?.next_due_ms,
        None => None,
    })
}

/// What the store knows of a run that was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedInfo {
    pub fired_at: Timestamp,
    pub offline: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartedRecordV1 {
    fired_at_ms: i64,
    offline: bool,
}

fn run_key_tuple(k: &RunKey) -> (u64, i64, u32) {
    (k.task_id.0, k.scheduled_at.as_millis(), k.attempt)
}

// ---- the store -------------------------------------------------------------

/// What one scheduler step writes, in one transaction.
#[derive(Debug, Default, Clone)]
pub struct StepWrite {
    pub states: Vec<(TaskId, Option<Timestamp>)>,
    pub started: Vec<(RunKey, StartedInfo)>,
    pub records: Vec<RunRecord>,
    /// Retries now pending, with their time (and triggered runs).
    pub retries: Vec<(RunKey, Timestamp)>,
    /// Fan-in progress to store (an empty list forgets the occurrence).
    pub fanin: Vec<FanInState>,
}

impl StepWrite {
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
            && self.started.is_empty()
            && self.records.is_empty()
            && self.retries.is_empty()
            && self.fanin.is_empty()
    }
}

/// Everything in the store, for tests and diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreDump {
    pub tasks: BTreeMap<TaskId, TaskSpec>,
    pub states: BTreeMap<TaskId, Option<Timestamp>>,
    pub started: BTreeMap<RunKey, StartedInfo>,
    pub outbox: BTreeMap<RunKey, RunRecord>,
    pub retries: BTreeMap<RunKey, Timestamp>,
}

enum Handle {
    ReadWrite(Database),
    ReadOnly(ReadOnlyDatabase),
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handle::ReadWrite(_) => "ReadWrite",
            Handle::ReadOnly(_) => "ReadOnly",
        })
    }
}

/// The agent's store; see the module doc.
#[derive(Debug)]
pub struct AgentStore {
    db: Handle,
    /// Set for a store whose disk outlives nothing but the process (the
    /// simulator's memory): most commits skip the flush.
    volatile: Option<std::sync::atomic::AtomicU32>,
    /// Its file, when it has one (for its size).
    path: Option<std::path::PathBuf>,
    /// Encrypts task definitions and run records at rest (see
    /// [`AgentStore::encrypt_with`]); `None`: stored as given.
    cipher: Option<Arc<StoreCipher>>,
}

/// A volatile store flushes one commit in this many (so redb frees the
/// pages the others left).
const VOLATILE_FLUSH_EVERY: u32 = 64;

/// Records encrypted per transaction when a plain store is migrated.
const ENCRYPT_BATCH: usize = 10_000;

impl AgentStore {
    /// Opens (creating if needed) the store at `path` for writing. Other
    /// processes may open it read-only at the same time
    /// ([`AgentStore::open_read_only`]), as `sundial-agent status` does.
    ///
    /// A new store is created under a temporary name and renamed into place,
    /// so a crash during creation leaves no half-made database behind.
    ///
    /// A key ring beside it (`store.key`, as the agent makes it by
    /// default) is checked and used to read and write its records as the
    /// agent does; without one, encrypted records do not read (a clear
    /// error says so).
    pub fn open(path: &Path) -> Result<AgentStore> {
        let mut store = AgentStore::open_checked(path, |_| Ok(()))?.0;
        if let Some(key) = path.parent().map(|d| d.join(at_rest::KEY_FILE)) {
            if let Some(c) = StoreCipher::from_file(&key, false).map_err(StoreError::Key)? {
                store.read_with(Arc::new(c), &key)?;
            }
        }
        Ok(store)
    }

    /// [`AgentStore::open`], calling `check` with the store's key checks
    /// (see [`AgentStore::encrypt_with`]) before anything is written: an
    /// error from it is returned ([`StoreError::Key`]) with the store as
    /// it was.
    pub fn open_checked<T>(
        path: &Path,
        check: impl Fn(&[(u32, Vec<u8>)]) -> std::result::Result<T, String>,
    ) -> Result<(AgentStore, T)> {
        if !path.exists() {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(".creating");
            let tmp = std::path::PathBuf::from(tmp);
            // A leftover from a crash during an earlier creation holds nothing.
            let _ = std::fs::remove_file(&tmp);
            drop(AgentStore::init(Handle::ReadWrite(
                Database::builder()
                    .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                    .create(&tmp)
                    .map_err(db_err("create"))?,
            ))?);
            std::fs::rename(&tmp, path).map_err(|e| StoreError::Db {
                context: "create",
                source: redb::Error::Io(e),
            })?;
            if let Some(dir) = path.parent() {
                // Make the rename itself durable.
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
        }
        // Before the first write: the caller's check of the store keys,
        // read-only first so that a refusal leaves the file as it was (an
        // open for writing marks it); a store that needs a repair is read
        // once repaired.
        let early = match Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .open_read_only(path)
        {
            Ok(db) => Some(Self::raw_key_checks(&db)?),
            Err(_) => None,
        };
        let checked = match &early {
            Some(checks) => Some(check(checks).map_err(StoreError::Key)?),
            None => None,
        };
        let repaired = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&repaired);
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .set_repair_callback(move |_| flag.store(true, std::sync::atomic::Ordering::Relaxed))
            .create(path)
            .map_err(db_err("open"))?;
        let checked = match checked {
            Some(c) => c,
            None => check(&Self::raw_key_checks(&db)?).map_err(StoreError::Key)?,
        };
        let mut store = AgentStore::init(Handle::ReadWrite(db))?;
        store.path = Some(path.to_path_buf());
        if repaired.load(std::sync::atomic::Ordering::Relaxed) {
            // After an unclean stop, derived data is checked, not trusted.
            let (stale, missing) = store.check_due_index()?;
            if stale + missing > 0 {
                tracing::warn!(
                    stale,
                    missing,
                    "the store was repaired after an unclean stop and its due index disagreed with the task states: fixed"
                );
            } else {
                tracing::info!("the store was repaired after an unclean stop; its due index agrees with the task states");
            }
        }
        Ok((store, checked))
    }

    /// Checks the due index against the task states, the source of truth,
    /// and fixes it in one transaction: an entry that names no task or not
    /// its stored next due is removed (it would fire at a time that is no
    /// occurrence, or again), a task state without its entry gets one (it
    /// would never fire). Returns (stale entries removed, missing added).
    /// Streams both tables: memory does not grow with the tasks stored.
    pub fn check_due_index(&self) -> Result<(u64, u64)> {
        let txn = self.begin_write()?;
        let (mut stale, mut missing) = (Vec::new(), Vec::new());
        {
            let tasks = txn.open_table(TASKS).map_err(db_err("check due index"))?;
            let state = txn.open_table(STATE).map_err(db_err("check due index"))?;
            let due = txn.open_table(DUE).map_err(db_err("check due index"))?;
            for item in due.iter().map_err(db_err("check due index"))? {
                let (k, _) = item.map_err(db_err("check due index"))?;
                let (ms, id) = k.value();
                let stored = match state.get(id).map_err(db_err("check due index"))? {
                    Some(s) => decode::<StateRecordV1>("task_state", id, s.value())?.next_due_ms,
                    None => None,
                };
                let known = tasks.get(id).map_err(db_err("check due index"))?.is_some();
                if !known || stored != Some(ms) {
                    stale.push((ms, id));
                }
            }
            for item in state.iter().map_err(db_err("check due index"))? {
                let (k, v) = item.map_err(db_err("check due index"))?;
                let id = k.value();
                let rec: StateRecordV1 = decode("task_state", id, v.value())?;
                if let Some(ms) = rec.next_due_ms {
                    if due
                        .get((ms, id))
                        .map_err(db_err("check due index"))?
                        .is_none()
                        && tasks.get(id).map_err(db_err("check due index"))?.is_some()
                    {
                        missing.push((ms, id));
                    }
                }
            }
        }
        if !stale.is_empty() || !missing.is_empty() {
            let mut due = txn.open_table(DUE).map_err(db_err("fix due index"))?;
            for k in &stale {
                due.remove(*k).map_err(db_err("fix due index"))?;
            }
            for k in &missing {
                due.insert(*k, ()).map_err(db_err("fix due index"))?;
            }
        }
        txn.commit().map_err(db_err("commit due index"))?;
        Ok((stale.len() as u64, missing.len() as u64))
    }

    /// The key checks of a store not yet initialized (none if it has no
    /// meta table yet), read without writing.
    fn raw_key_checks(db: &impl redb::ReadableDatabase) -> Result<Vec<(u32, Vec<u8>)>> {
        let txn = db.begin_read().map_err(db_err("read key checks"))?;
        let t = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err("read key checks")(e)),
        };
        match t.get(meta::KEY_CHECKS).map_err(db_err("read key checks"))? {
            Some(v) => decode("meta", meta::KEY_CHECKS, v.value()),
            None => Ok(Vec::new()),
        }
    }

    /// Opens an existing store read-only, beside a running agent (with the
    /// key ring beside it, if there is one, as [`AgentStore::open`]).
    pub fn open_read_only(path: &Path) -> Result<AgentStore> {
        let mut store = AgentStore::open_read_only_sealed(path)?;
        // As `open`: the key ring beside it, if there is one.
        if let Some(key) = path.parent().map(|d| d.join(at_rest::KEY_FILE)) {
            if let Some(c) = StoreCipher::from_file(&key, false).map_err(StoreError::Key)? {
                store.read_with(Arc::new(c), &key)?;
            }
        }
        Ok(store)
    }

    /// Opens the store for reading without its key ring: what needs no
    /// record opened (counting the outbox) reads neither the key file nor
    /// the store's key checks. A sealed record read through it fails.
    pub fn open_read_only_sealed(path: &Path) -> Result<AgentStore> {
        let db = Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .open_read_only(path)
            .map_err(db_err("open read-only"))?;
        Ok(AgentStore {
            db: Handle::ReadOnly(db),
            volatile: None,
            path: Some(path.to_path_buf()),
            cipher: None,
        })
    }

    /// Opens a store on any redb backend (tests use one that crashes).
    pub fn open_with_backend(backend: impl StorageBackend) -> Result<AgentStore> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(db_err("open"))?;
        AgentStore::init(Handle::ReadWrite(db))
    }

    /// A store in memory that outlives the simulated processes using it,
    /// not the program: the simulator's. Commits are atomic and seen by
    /// the next transaction as always; most skip the flush, which guards
    /// only against a crash of the program itself.
    pub fn open_in_memory_volatile() -> Result<AgentStore> {
        let mut store = AgentStore::open_with_backend(redb::backends::InMemoryBackend::new())?;
        store.volatile = Some(std::sync::atomic::AtomicU32::new(0));
        Ok(store)
    }

    fn init(db: Handle) -> Result<AgentStore> {
        let store = AgentStore {
            db,
            volatile: None,
            path: None,
            cipher: None,
        };
        let txn = store.begin_write()?;
        {
            // Creating every table up front lets readers open them unconditionally.
            txn.open_table(META).map_err(db_err("create tables"))?;
            txn.open_table(TASKS).map_err(db_err("create tables"))?;
            txn.open_table(STATE).map_err(db_err("create tables"))?;
            txn.open_table(STARTED).map_err(db_err("create tables"))?;
            txn.open_table(OUTBOX).map_err(db_err("create tables"))?;
            txn.open_table(OUTBOX_INDEX)
                .map_err(db_err("create tables"))?;
            txn.open_table(DUE).map_err(db_err("create tables"))?;
            txn.open_table(RETRIES).map_err(db_err("create tables"))?;
            txn.open_table(TRIGGERED).map_err(db_err("create tables"))?;
            txn.open_table(FANIN).map_err(db_err("create tables"))?;
            txn.open_table(MODULES).map_err(db_err("create tables"))?;
            txn.open_table(TASK_MODULES)
                .map_err(db_err("create tables"))?;
            let mut meta_t = txn.open_table(META).map_err(db_err("create tables"))?;
            if meta_t
                .get(meta::DUE_INDEX)
                .map_err(db_err("create tables"))?
                .is_none()
            {
                Self::build_due_index(&txn)?;
                meta_t
                    .insert(meta::DUE_INDEX, encode(&1u32).as_slice())
                    .map_err(db_err("create tables"))?;
            }
        }
        txn.commit().map_err(db_err("create tables"))?;
        Ok(store)
    }

    /// Gives every task a state (its first occurrence when it had none) and
    /// indexes it by next due: a store from before the index, opened once.
    fn build_due_index(txn: &redb::WriteTransaction) -> Result<()> {
        let tasks = txn.open_table(TASKS).map_err(db_err("build due index"))?;
        let mut state = txn.open_table(STATE).map_err(db_err("build due index"))?;
        let mut due = txn.open_table(DUE).map_err(db_err("build due index"))?;
        for item in tasks.iter().map_err(db_err("build due index"))? {
            let (k, v) = item.map_err(db_err("build due index"))?;
            let id = k.value();
            let stored = match state.get(id).map_err(db_err("build due index"))? {
                Some(s) => Some(decode::<StateRecordV1>("task_state", id, s.value())?.next_due_ms),
                None => None,
            };
            let next_ms = match stored {
                Some(next) => next,
                None => {
                    let spec = records::decode_task("tasks", id, v.value())?;
                    let next =
                        first_occurrence(&spec.schedule, spec.created_at).map(Timestamp::as_millis);
                    state
                        .insert(id, encode(&StateRecordV1 { next_due_ms: next }).as_slice())
                        .map_err(db_err("build due index"))?;
                    next
                }
            };
            if let Some(ms) = next_ms {
                due.insert((ms, id), ())
                    .map_err(db_err("build due index"))?;
            }
        }
        Ok(())
    }

    /// Sets tasks' states and moves them in the due index.
    fn put_states(
        txn: &redb::WriteTransaction,
        states: &[(TaskId, Option<Timestamp>)],
    ) -> Result<()> {
        if states.is_empty() {
            return Ok(());
        }
        let mut state = txn.open_table(STATE).map_err(db_err("write task state"))?;
        let mut due = txn.open_table(DUE).map_err(db_err("write task state"))?;
        for (id, next) in states {
            let rec = StateRecordV1 {
                next_due_ms: next.map(Timestamp::as_millis),
            };
            // The state written and the one it replaces read in one descent.
            let old = state
                .insert(id.0, encode(&rec).as_slice())
                .map_err(db_err("write task state"))?;
            if let Some(ms) = stored_due_ms(*id, old)? {
                due.remove((ms, id.0)).map_err(db_err("write task state"))?;
            }
            if let Some(t) = next {
                due.insert((t.as_millis(), id.0), ())
                    .map_err(db_err("write task state"))?;
            }
        }
        Ok(())
    }

    /// `plain` as stored: encrypted when the store has a cipher.
    fn seal(&self, table: &'static str, plain: Vec<u8>) -> Result<Vec<u8>> {
        match &self.cipher {
            Some(c) => c.seal(table, &plain).map_err(StoreError::Key),
            None => Ok(plain),
        }
    }

    /// A stored value as plain bytes (decrypted if it is encrypted).
    fn unseal<'a>(&self, table: &'static str, stored: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        at_rest::open_plain(self.cipher.as_deref(), table, stored).map_err(|reason| {
            StoreError::Corrupt {
                table,
                key: "?".into(),
                reason,
            }
        })
    }

    fn task(&self, table: &'static str, id: u64, stored: &[u8]) -> Result<TaskSpec> {
        Ok(records::decode_task(
            table,
            id,
            &self.unseal(table, stored)?,
        )?)
    }

    /// From now on, task definitions and run records are encrypted with
    /// `cipher` (its current key). First checks that every key this store
    /// was written with is in the ring and is the same key — otherwise an
    /// error, and nothing is written; then records the current key's check
    /// and encrypts the records stored plain (a store from before
    /// encryption), in batches, each its own transaction: a crash midway
    /// loses nothing, and the next start finishes the work.
    pub fn encrypt_with(&mut self, cipher: Arc<StoreCipher>, key_file: &Path) -> Result<u64> {
        let checks: Vec<(u32, Vec<u8>)> = self.get_meta(meta::KEY_CHECKS)?.unwrap_or_default();
        at_rest::check_ring(&cipher, &checks, key_file).map_err(StoreError::Key)?;
        self.cipher = Some(cipher);
        self.note_current_key()?;
        if self.get_meta::<bool>(meta::ENCRYPTED)?.unwrap_or(false) {
            return Ok(0);
        }
        let mut moved = 0u64;
        for (table, table_name) in [(TASKS, "tasks"), (OUTBOX, "outbox")] {
            let mut from = 0u64;
            loop {
                let txn = self.begin_write()?;
                let scanned = {
                    let mut t = txn.open_table(table).map_err(db_err("encrypt records"))?;
                    let batch: Vec<(u64, Vec<u8>)> = t
                        .range(from..)
                        .map_err(db_err("encrypt records"))?
                        .take(ENCRYPT_BATCH)
                        .map(|item| {
                            item.map(|(k, v)| (k.value(), v.value().to_vec()))
                                .map_err(db_err("encrypt records"))
                        })
                        .collect::<Result<_>>()?;
                    for (k, v) in &batch {
                        if v.first() != Some(&at_rest::RECORD_ENCRYPTED) {
                            let sealed = self.seal(table_name, v.clone())?;
                            t.insert(*k, sealed.as_slice())
                                .map_err(db_err("encrypt records"))?;
                            moved += 1;
                        }
                    }
                    if let Some((k, _)) = batch.last() {
                        from = k.saturating_add(1);
                    }
                    batch.len()
                };
                txn.commit().map_err(db_err("commit encrypted records"))?;
                if scanned < ENCRYPT_BATCH {
                    break;
                }
            }
        }
        self.put_meta(&[(meta::ENCRYPTED, true)])?;
        if moved > 0 {
            // The plain copies are in freed pages now: compaction drops
            // those at the file's end (not a guarantee for all; see the
            // README's "Encrypted stores").
            if let Handle::ReadWrite(db) = &mut self.db {
                if let Err(e) = db.compact() {
                    tracing::warn!(error = %e, "compacting the store after encrypting it failed");
                }
            }
        }
        Ok(moved)
    }

    /// Reads (never writes) with `cipher`, once checked against the keys
    /// the store was written with: for `status`, beside a running agent.
    pub fn read_with(&mut self, cipher: Arc<StoreCipher>, key_file: &Path) -> Result<()> {
        let checks: Vec<(u32, Vec<u8>)> = self.get_meta(meta::KEY_CHECKS)?.unwrap_or_default();
        at_rest::check_ring(&cipher, &checks, key_file).map_err(StoreError::Key)?;
        self.cipher = Some(cipher);
        Ok(())
    }

    /// Records the check of the cipher's current key, if the store lacks
    /// it (after [`AgentStore::encrypt_with`], and after a rotation).
    pub fn note_current_key(&self) -> Result<()> {
        let Some(c) = &self.cipher else {
            return Ok(());
        };
        let mut checks: Vec<(u32, Vec<u8>)> = self.get_meta(meta::KEY_CHECKS)?.unwrap_or_default();
        if checks.iter().any(|(id, _)| *id == c.current()) {
            return Ok(());
        }
        checks.push((
            c.current(),
            c.check_value(c.current()).map_err(StoreError::Key)?,
        ));
        self.put_meta(&[(meta::KEY_CHECKS, checks)])
    }

    /// The key ids this store was written with.
    pub fn key_ids(&self) -> Result<Vec<u32>> {
        let checks: Vec<(u32, Vec<u8>)> = self.get_meta(meta::KEY_CHECKS)?.unwrap_or_default();
        Ok(checks.into_iter().map(|(id, _)| id).collect())
    }

    /// The cipher, to reload its ring after a rotation.
    pub fn cipher(&self) -> Option<&Arc<StoreCipher>> {
        self.cipher.as_ref()
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction> {
        match &self.db {
            Handle::ReadWrite(db) => {
                let mut txn = db.begin_write().map_err(db_err("begin write"))?;
                if let Some(n) = &self.volatile {
                    let k = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if k % VOLATILE_FLUSH_EVERY != 0 {
                        txn.set_durability(redb::Durability::None)
                            .map_err(db_err("set durability"))?;
                    }
                }
                Ok(txn)
            }
            Handle::ReadOnly(_) => Err(StoreError::ReadOnly),
        }
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        match &self.db {
            Handle::ReadWrite(db) => db.begin_read().map_err(db_err("begin read")),
            Handle::ReadOnly(db) => db.begin_read().map_err(db_err("begin read")),
        }
    }

    // ---- metadata

    /// A metadata value, if set.
    pub fn get_meta<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(META).map_err(db_err("read meta"))?;
        let v = table.get(key).map_err(db_err("read meta"))?;
        v.map(|v| decode("meta", key, v.value())).transpose()
    }

    /// Sets metadata values in one transaction.
    pub fn put_meta<T: Serialize>(&self, entries: &[(&'static str, T)]) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(META).map_err(db_err("write meta"))?;
            for (k, v) in entries {
                table
                    .insert(*k, encode(v).as_slice())
                    .map_err(db_err("write meta"))?;
            }
        }
        txn.commit().map_err(db_err("commit meta"))
    }

    // ---- tasks

    /// Stores a task (new or changed) and, when given, the new applied
    /// revision, in one transaction.
    pub fn put_task(&self, task: &TaskSpec, revision: Option<u64>) -> Result<()> {
        self.put_tasks(std::slice::from_ref(task), revision)
    }

    /// Stores many tasks in one transaction (bulk assignment, benchmarks).
    /// A task stored for the first time is due at its first occurrence; a
    /// stored one keeps its state.
    pub fn put_tasks(&self, tasks: &[TaskSpec], revision: Option<u64>) -> Result<()> {
        self.apply_changes(tasks, &[], &[], revision)
    }

    /// Stores a large set of new tasks (each due at its first occurrence)
    /// in transactions of `batch` tasks; a crash keeps a prefix of them.
    /// For building big stores (benchmarks, imports); returns how many.
    pub fn import_tasks(
        &self,
        tasks: impl IntoIterator<Item = TaskSpec>,
        batch: usize,
    ) -> Result<u64> {
        let mut buf = Vec::with_capacity(batch.max(1));
        let mut n = 0u64;
        let flush = |buf: &mut Vec<TaskSpec>| -> Result<()> {
            let txn = self.begin_write()?;
            let mut table = txn.open_table(TASKS).map_err(db_err("import tasks"))?;
            let mut states = Vec::with_capacity(buf.len());
            for task in buf.drain(..) {
                table
                    .insert(
                        task.id.0,
                        self.seal("tasks", records::encode_task(&task))?.as_slice(),
                    )
                    .map_err(db_err("import tasks"))?;
                states.push((task.id, first_occurrence(&task.schedule, task.created_at)));
            }
            drop(table);
            Self::put_states(&txn, &states)?;
            txn.commit().map_err(db_err("commit import"))
        };
        for t in tasks {
            buf.push(t);
            n += 1;
            if buf.len() >= batch.max(1) {
                flush(&mut buf)?;
            }
        }
        flush(&mut buf)?;
        Ok(n)
    }

    /// Removes a task and its state; its runs already in the outbox stay.
    pub fn remove_task(&self, id: TaskId, revision: Option<u64>) -> Result<()> {
        self.apply_changes(&[], &[id], &[], revision)
    }

    /// One page of assignment changes in one transaction: `removed` go
    /// (with their state), `upserts` are stored with their `states` (a task
    /// without one keeps its stored state, or is due at its first
    /// occurrence when new), and `revision` is recorded as applied.
    pub fn apply_changes(
        &self,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        states: &[(TaskId, Option<Timestamp>)],
        revision: Option<u64>,
    ) -> Result<()> {
        if upserts.is_empty() && removed.is_empty() && states.is_empty() && revision.is_none() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        let mut new_states: Vec<(TaskId, Option<Timestamp>)> = Vec::new();
        {
            let mut table = txn.open_table(TASKS).map_err(db_err("write tasks"))?;
            let mut state = txn.open_table(STATE).map_err(db_err("write tasks"))?;
            let mut due = txn.open_table(DUE).map_err(db_err("write tasks"))?;
            let mut retries = txn.open_table(RETRIES).map_err(db_err("write tasks"))?;
            let mut triggered = txn.open_table(TRIGGERED).map_err(db_err("write tasks"))?;
            let mut fanin = txn.open_table(FANIN).map_err(db_err("write tasks"))?;
            for id in removed {
                // Its pending retries (and triggered runs) and fan-in
                // progress go with it.
                retries
                    .retain_in((id.0, i64::MIN, 0)..=(id.0, i64::MAX, u32::MAX), |_, _| {
                        false
                    })
                    .map_err(db_err("remove task"))?;
                fanin
                    .retain_in((id.0, i64::MIN)..=(id.0, i64::MAX), |_, _| false)
                    .map_err(db_err("remove task"))?;
                triggered.remove(id.0).map_err(db_err("remove task"))?;
                table.remove(id.0).map_err(db_err("remove task"))?;
                let old = state.remove(id.0).map_err(db_err("remove task"))?;
                if let Some(ms) = stored_due_ms(*id, old)? {
                    due.remove((ms, id.0)).map_err(db_err("remove task"))?;
                }
            }
            let given: std::collections::HashSet<TaskId> =
                states.iter().map(|(id, _)| *id).collect();
            for task in upserts {
                table
                    .insert(
                        task.id.0,
                        self.seal("tasks", records::encode_task(task))?.as_slice(),
                    )
                    .map_err(db_err("write tasks"))?;
                if task.schedule.triggers().is_empty() {
                    if triggered
                        .remove(task.id.0)
                        .map_err(db_err("write tasks"))?
                        .is_some()
                    {
                        fanin
                            .retain_in((task.id.0, i64::MIN)..=(task.id.0, i64::MAX), |_, _| false)
                            .map_err(db_err("write tasks"))?;
                    }
                } else {
                    triggered
                        .insert(task.id.0, ())
                        .map_err(db_err("write tasks"))?;
                }
                if !given.contains(&task.id)
                    && state
                        .get(task.id.0)
                        .map_err(db_err("write tasks"))?
                        .is_none()
                {
                    new_states.push((task.id, first_occurrence(&task.schedule, task.created_at)));
                }
            }
            if !removed.is_empty() || !upserts.is_empty() {
                Self::keep_modules(&txn, upserts, removed, !removed.is_empty())?;
            }
            if let Some(r) = revision {
                let mut meta = txn.open_table(META).map_err(db_err("write tasks"))?;
                meta.insert(meta::LAST_REVISION, encode(&r).as_slice())
                    .map_err(db_err("write tasks"))?;
            }
        }
        new_states.extend_from_slice(states);
        Self::put_states(&txn, &new_states)?;
        txn.commit().map_err(db_err("commit tasks"))
    }

    /// Up to `max` tasks with their next due, in (next due, id) order, after
    /// `after` (from the first when `None`) and due at or before `until`.
    pub fn due_tasks(
        &self,
        after: Option<(Timestamp, TaskId)>,
        until: Timestamp,
        max: usize,
    ) -> Result<Vec<(TaskSpec, Timestamp)>> {
        let txn = self.begin_read()?;
        let due = txn.open_table(DUE).map_err(db_err("read due index"))?;
        let tasks = txn.open_table(TASKS).map_err(db_err("read due index"))?;
        let end = (until.as_millis(), u64::MAX);
        let range = match after {
            Some((t, id)) => due.range((
                std::ops::Bound::Excluded((t.as_millis(), id.0)),
                std::ops::Bound::Included(end),
            )),
            None => due.range(..=end),
        };
        let mut out = Vec::new();
        for item in range.map_err(db_err("read due index"))? {
            if out.len() >= max {
                break;
            }
            let (k, _) = item.map_err(db_err("read due index"))?;
            let (ms, id) = k.value();
            let key = format!("({ms}, {id})");
            let at = ts("due", &key, ms)?;
            let Some(v) = tasks.get(id).map_err(db_err("read due index"))? else {
                // Derived data pointing nowhere: nothing to fire; the
                // tasks that are stored still load.
                tracing::warn!(entry = %key, "the due index names a task that is not stored; skipped");
                continue;
            };
            out.push((self.task("tasks", id, v.value())?, at));
        }
        Ok(out)
    }

    /// Tasks by id with their stored next due (`None`: not stored).
    pub fn tasks_by_id(&self, ids: &[TaskId]) -> Result<Vec<Option<StoredTask>>> {
        let txn = self.begin_read()?;
        let tasks = txn.open_table(TASKS).map_err(db_err("read tasks"))?;
        let state = txn.open_table(STATE).map_err(db_err("read tasks"))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(v) = tasks.get(id.0).map_err(db_err("read tasks"))? else {
                out.push(None);
                continue;
            };
            let spec = self.task("tasks", id.0, v.value())?;
            let next = match state.get(id.0).map_err(db_err("read task state"))? {
                Some(s) => {
                    let rec: StateRecordV1 = decode("task_state", id.0, s.value())?;
                    let key = id.0.to_string();
                    rec.next_due_ms
                        .map(|ms| ts("task_state", &key, ms))
                        .transpose()?
                }
                None => first_occurrence(&spec.schedule, spec.created_at),
            };
            out.push(Some((spec, next)));
        }
        Ok(out)
    }

    /// Every stored task.
    pub fn tasks(&self) -> Result<Vec<TaskSpec>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(TASKS).map_err(db_err("read tasks"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err("read tasks"))? {
            let (k, v) = item.map_err(db_err("read tasks"))?;
            out.push(self.task("tasks", k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The store file's size, bytes (`None`: in memory, or unreadable).
    pub fn size_bytes(&self) -> Option<u64> {
        std::fs::metadata(self.path.as_ref()?).ok().map(|m| m.len())
    }

    /// Number of stored tasks.
    pub fn task_count(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let table = txn.open_table(TASKS).map_err(db_err("read tasks"))?;
        table.len().map_err(db_err("read tasks"))
    }

    /// Each task's persisted next due occurrence (absent: never stored).
    pub fn task_states(&self) -> Result<HashMap<TaskId, Option<Timestamp>>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(STATE).map_err(db_err("read task state"))?;
        let mut out = HashMap::new();
        for item in table.iter().map_err(db_err("read task state"))? {
            let (k, v) = item.map_err(db_err("read task state"))?;
            let rec: StateRecordV1 = decode("task_state", k.value(), v.value())?;
            let key = k.value().to_string();
            let next = rec
                .next_due_ms
                .map(|ms| ts("task_state", &key, ms))
                .transpose()?;
            out.insert(TaskId(k.value()), next);
        }
        Ok(out)
    }

    // ---- runs

    /// Commits one scheduler step: task states, `started` markers and
    /// records of runs that never started, all or nothing.
    pub fn apply_step(&self, step: &StepWrite) -> Result<()> {
        if step.is_empty() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        self.write_step(&txn, step)?;
        txn.commit().map_err(db_err("commit step"))
    }

    fn write_step(&self, txn: &redb::WriteTransaction, step: &StepWrite) -> Result<()> {
        {
            // A task removed meanwhile gets no state back.
            let tasks = txn.open_table(TASKS).map_err(db_err("write step"))?;
            let mut states = Vec::with_capacity(step.states.len());
            for (id, next) in &step.states {
                if tasks.get(id.0).map_err(db_err("write step"))?.is_some() {
                    states.push((*id, *next));
                }
            }
            Self::put_states(txn, &states)?;
            let mut started = txn.open_table(STARTED).map_err(db_err("write step"))?;
            let mut retries = txn.open_table(RETRIES).map_err(db_err("write step"))?;
            // Pending first: a run the same step starts or records (a
            // triggered run due at once) is pending no more.
            for (key, when) in &step.retries {
                if tasks
                    .get(key.task_id.0)
                    .map_err(db_err("write step"))?
                    .is_some()
                {
                    retries
                        .insert(run_key_tuple(key), when.as_millis())
                        .map_err(db_err("write step"))?;
                }
            }
            for (key, info) in &step.started {
                let rec = StartedRecordV1 {
                    fired_at_ms: info.fired_at.as_millis(),
                    offline: info.offline,
                };
                started
                    .insert(run_key_tuple(key), encode(&rec).as_slice())
                    .map_err(db_err("write step"))?;
                retries
                    .remove(run_key_tuple(key))
                    .map_err(db_err("write step"))?;
            }
            for r in &step.records {
                retries
                    .remove(run_key_tuple(&r.key()))
                    .map_err(db_err("write step"))?;
            }
            let mut fanin = txn.open_table(FANIN).map_err(db_err("write step"))?;
            for (task, at, ended) in &step.fanin {
                let k = (task.0, at.as_millis());
                if ended.is_empty() || tasks.get(task.0).map_err(db_err("write step"))?.is_none() {
                    fanin.remove(k).map_err(db_err("write step"))?;
                } else {
                    let rec: Vec<(u64, String)> = ended
                        .iter()
                        .map(|(u, o)| (u.0, o.as_str().to_owned()))
                        .collect();
                    fanin
                        .insert(k, encode(&rec).as_slice())
                        .map_err(db_err("write step"))?;
                }
            }
        }
        self.outbox_put(txn, &step.records)?;
        Ok(())
    }

    fn outbox_put(&self, txn: &redb::WriteTransaction, records: &[RunRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut meta_t = txn.open_table(META).map_err(db_err("write outbox"))?;
        let mut seq: u64 = match meta_t
            .get(meta::OUTBOX_SEQ)
            .map_err(db_err("write outbox"))?
        {
            Some(v) => decode("meta", meta::OUTBOX_SEQ, v.value())?,
            None => 0,
        };
        let mut outbox = txn.open_table(OUTBOX).map_err(db_err("write outbox"))?;
        let mut index = txn
            .open_table(OUTBOX_INDEX)
            .map_err(db_err("write outbox"))?;
        for r in records {
            let k = run_key_tuple(&r.key());
            // Idempotent by run key: a second record for the same run replaces the first.
            let old = index
                .get(k)
                .map_err(db_err("write outbox"))?
                .map(|v| v.value());
            if let Some(old_seq) = old {
                outbox.remove(old_seq).map_err(db_err("write outbox"))?;
            }
            seq += 1;
            outbox
                .insert(
                    seq,
                    self.seal("outbox", encode(&RunRecordV1::from_run(r)))?
                        .as_slice(),
                )
                .map_err(db_err("write outbox"))?;
            index.insert(k, seq).map_err(db_err("write outbox"))?;
        }
        meta_t
            .insert(meta::OUTBOX_SEQ, encode(&seq).as_slice())
            .map_err(db_err("write outbox"))?;
        Ok(())
    }

    /// A run ended: its record enters the outbox and its `started` marker
    /// goes, with the retry it leads to (if any), in one transaction.
    pub fn finish_run(&self, record: &RunRecord, retry: Option<(RunKey, Timestamp)>) -> Result<()> {
        self.finish_run_then(
            record,
            &StepWrite {
                retries: retry.into_iter().collect(),
                ..StepWrite::default()
            },
        )
    }

    /// A run ended: its record enters the outbox and its `started` marker
    /// goes, with what it leads to (`then`: its retry, the runs it
    /// triggers, fan-in progress, records of tasks it left untriggered),
    /// in one transaction.
    pub fn finish_run_then(&self, record: &RunRecord, then: &StepWrite) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut started = txn.open_table(STARTED).map_err(db_err("finish run"))?;
            started
                .remove(run_key_tuple(&record.key()))
                .map_err(db_err("finish run"))?;
            let mut retries = txn.open_table(RETRIES).map_err(db_err("finish run"))?;
            retries
                .remove(run_key_tuple(&record.key()))
                .map_err(db_err("finish run"))?;
        }
        self.outbox_put(&txn, std::slice::from_ref(record))?;
        self.write_step(&txn, then)?;
        txn.commit().map_err(db_err("commit finished run"))
    }

    /// The stored triggered tasks, with their state.
    pub fn triggered_tasks(&self) -> Result<Vec<StoredTask>> {
        let ids: Vec<TaskId> = {
            let txn = self.begin_read()?;
            let table = match txn.open_table(TRIGGERED) {
                Ok(t) => t,
                // A store from before triggered tasks, opened read-only.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_err("read triggered tasks")(e)),
            };
            let mut ids = Vec::new();
            for item in table.iter().map_err(db_err("read triggered tasks"))? {
                let (k, _) = item.map_err(db_err("read triggered tasks"))?;
                ids.push(TaskId(k.value()));
            }
            ids
        };
        Ok(self.tasks_by_id(&ids)?.into_iter().flatten().collect())
    }

    /// The stored fan-in progress.
    pub fn fanin_pending(&self) -> Result<Vec<FanInState>> {
        let txn = self.begin_read()?;
        let table = match txn.open_table(FANIN) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err("read fan-in progress")(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err("read fan-in progress"))? {
            let (k, v) = item.map_err(db_err("read fan-in progress"))?;
            let (task, at_ms) = k.value();
            let key = format!("({task}, {at_ms})");
            let rec: Vec<(u64, String)> = decode("fanin", &key, v.value())?;
            let mut ended = Vec::with_capacity(rec.len());
            for (u, o) in rec {
                let Some(o) = Outcome::parse(&o) else {
                    return Err(StoreError::Corrupt {
                        table: "fanin",
                        key,
                        reason: format!("unknown outcome `{o}`"),
                    });
                };
                ended.push((TaskId(u), o));
            }
            out.push((TaskId(task), ts("fanin", &key, at_ms)?, ended));
        }
        Ok(out)
    }

    /// Pending retries, with their time.
    pub fn pending_retries(&self) -> Result<Vec<(RunKey, Timestamp)>> {
        let txn = self.begin_read()?;
        let table = match txn.open_table(RETRIES) {
            Ok(t) => t,
            // A store from before durable retries, opened read-only.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(db_err("read retries")(e)),
        };
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err("read retries"))? {
            let (k, v) = item.map_err(db_err("read retries"))?;
            let (task, sched_ms, attempt) = k.value();
            let key_text = format!("({task}, {sched_ms}, {attempt})");
            out.push((
                RunKey {
                    task_id: TaskId(task),
                    scheduled_at: ts("retries", &key_text, sched_ms)?,
                    attempt,
                },
                ts("retries", &key_text, v.value())?,
            ));
        }
        Ok(out)
    }

    /// Runs marked started and not finished.
    pub fn started(&self) -> Result<Vec<(RunKey, StartedInfo)>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(STARTED).map_err(db_err("read started"))?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_err("read started"))? {
            let (k, v) = item.map_err(db_err("read started"))?;
            let (task, sched_ms, attempt) = k.value();
            let key_text = format!("({task}, {sched_ms}, {attempt})");
            let rec: StartedRecordV1 = decode("started", &key_text, v.value())?;
            out.push((
                RunKey {
                    task_id: TaskId(task),
                    scheduled_at: ts("started", &key_text, sched_ms)?,
                    attempt,
                },
                StartedInfo {
                    fired_at: ts("started", &key_text, rec.fired_at_ms)?,
                    offline: rec.offline,
                },
            ));
        }
        Ok(out)
    }

    /// After a crash: every run still marked started becomes an
    /// `interrupted` record in the outbox, in one transaction. Returns them.
    ///
    /// `leftovers` names, by (task, scheduled_at ms, attempt), runs whose
    /// processes outlived the agent and were killed, with what was done. An
    /// interrupted run has no `finished_at`: when it really ended is unknown.
    pub fn recover_interrupted(
        &self,
        agent_id: AgentId,
        leftovers: &std::collections::HashMap<(u64, i64, u32), String>,
    ) -> Result<Vec<RunRecord>> {
        let started = self.started()?;
        if started.is_empty() {
            return Ok(Vec::new());
        }
        let records: Vec<RunRecord> = started
            .iter()
            .map(|(key, info)| RunRecord {
                task_id: key.task_id,
                agent_id,
                scheduled_at: key.scheduled_at,
                attempt: key.attempt,
                fired_at: Some(info.fired_at),
                finished_at: None,
                outcome: Outcome::Interrupted,
                exit_code: None,
                offline: info.offline,
                detail: Some(
                    leftovers
                        .get(&(key.task_id.0, key.scheduled_at.as_millis(), key.attempt))
                        .cloned()
                        .unwrap_or_else(|| "the agent stopped while the run was going".into()),
                ),
                stdout_tail: Vec::new(),
                stderr_tail: Vec::new(),
            })
            .collect();
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(STARTED).map_err(db_err("recover"))?;
            for (key, _) in &started {
                table
                    .remove(run_key_tuple(key))
                    .map_err(db_err("recover"))?;
            }
        }
        self.outbox_put(&txn, &records)?;
        txn.commit().map_err(db_err("commit recovery"))?;
        Ok(records)
    }

    /// Records waiting for the coordinator.
    /// Notes which module each changed task names and, when tasks were
    /// removed (`drop`), drops the modules no task names any more, in the
    /// transaction of the change. Only removals drop modules: the
    /// coordinator takes a module as still held until it sends a removal
    /// (a module replaced by a task update goes at the next removal).
    fn keep_modules(
        txn: &redb::WriteTransaction,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        drop: bool,
    ) -> Result<()> {
        let mut names = txn
            .open_table(TASK_MODULES)
            .map_err(db_err("write modules"))?;
        let mut modules = txn.open_table(MODULES).map_err(db_err("write modules"))?;
        for id in removed {
            names.remove(id.0).map_err(db_err("write modules"))?;
        }
        for t in upserts {
            match t.action.module() {
                Some(m) => names.insert(t.id.0, &m.0),
                None => names.remove(t.id.0),
            }
            .map_err(db_err("write modules"))?;
        }
        if !drop {
            return Ok(());
        }
        let mut named = std::collections::HashSet::new();
        for entry in names.iter().map_err(db_err("read modules"))? {
            let (_, m) = entry.map_err(db_err("read modules"))?;
            named.insert(*m.value());
        }
        let mut unnamed = Vec::new();
        for entry in modules.iter().map_err(db_err("read modules"))? {
            let (m, _) = entry.map_err(db_err("read modules"))?;
            if !named.contains(m.value()) {
                unnamed.push(*m.value());
            }
        }
        for m in unnamed {
            modules.remove(&m).map_err(db_err("drop a module"))?;
        }
        Ok(())
    }

    /// Stores a function's module (its hash checked by the caller).
    pub fn put_module(&self, hash: ModuleHash, bytes: &[u8]) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(MODULES).map_err(db_err("write a module"))?;
            t.insert(&hash.0, bytes).map_err(db_err("write a module"))?;
        }
        txn.commit().map_err(db_err("commit a module"))
    }

    /// A stored module.
    pub fn module(&self, hash: ModuleHash) -> Result<Option<Vec<u8>>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(MODULES).map_err(db_err("read a module"))?;
        let v = t.get(&hash.0).map_err(db_err("read a module"))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Up to `max` stored modules, and how many are stored.
    pub fn modules(&self, max: usize) -> Result<(Vec<ModuleHash>, u64)> {
        let txn = self.begin_read()?;
        let t = match txn.open_table(MODULES) {
            Ok(t) => t,
            // A store from before functions, opened read-only.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), 0)),
            Err(e) => return Err(db_err("read modules")(e)),
        };
        let mut out = Vec::new();
        for entry in t.iter().map_err(db_err("read modules"))?.take(max) {
            let (m, _) = entry.map_err(db_err("read modules"))?;
            out.push(ModuleHash(*m.value()));
        }
        Ok((out, t.len().map_err(db_err("read modules"))?))
    }

    pub fn outbox_len(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let table = txn.open_table(OUTBOX).map_err(db_err("read outbox"))?;
        table.len().map_err(db_err("read outbox"))
    }

    /// The oldest records of the outbox: at most `runs_max` of them, and no
    /// more than `bytes_max` of output tails (at least one record).
    pub fn outbox_batch(&self, runs_max: usize, bytes_max: usize) -> Result<Vec<RunRecord>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(OUTBOX).map_err(db_err("read outbox"))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in table.iter().map_err(db_err("read outbox"))? {
            if out.len() >= runs_max {
                break;
            }
            let (k, v) = item.map_err(db_err("read outbox"))?;
            if !out.is_empty() && bytes + v.value().len() > bytes_max {
                break;
            }
            bytes += v.value().len();
            let rec: RunRecordV1 = decode("outbox", k.value(), &self.unseal("outbox", v.value())?)?;
            out.push(rec.into_run(k.value())?);
        }
        Ok(out)
    }

    /// Up to `runs_max` records with a sequence number after `after_seq`
    /// (and at most `bytes_max` of them, at least one), oldest first, with
    /// their sequence numbers: what a session sends next.
    pub fn outbox_after(
        &self,
        after_seq: u64,
        runs_max: usize,
        bytes_max: usize,
    ) -> Result<Vec<(u64, RunRecord)>> {
        let txn = self.begin_read()?;
        let table = txn.open_table(OUTBOX).map_err(db_err("read outbox"))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in table
            .range(after_seq.saturating_add(1)..)
            .map_err(db_err("read outbox"))?
        {
            if out.len() >= runs_max {
                break;
            }
            let (k, v) = item.map_err(db_err("read outbox"))?;
            if !out.is_empty() && bytes + v.value().len() > bytes_max {
                break;
            }
            bytes += v.value().len();
            let rec: RunRecordV1 = decode("outbox", k.value(), &self.unseal("outbox", v.value())?)?;
            out.push((k.value(), rec.into_run(k.value())?));
        }
        Ok(out)
    }

    /// The coordinator has stored these runs: they leave the outbox.
    /// Unknown keys are ignored (an ack may arrive twice). Returns how many left.
    pub fn outbox_ack(&self, keys: &[RunKey]) -> Result<usize> {
        let txn = self.begin_write()?;
        let mut removed = 0;
        {
            let mut outbox = txn.open_table(OUTBOX).map_err(db_err("ack outbox"))?;
            let mut index = txn.open_table(OUTBOX_INDEX).map_err(db_err("ack outbox"))?;
            for key in keys {
                let seq = index
                    .remove(run_key_tuple(key))
                    .map_err(db_err("ack outbox"))?
                    .map(|v| v.value());
                if let Some(seq) = seq {
                    outbox.remove(seq).map_err(db_err("ack outbox"))?;
                    removed += 1;
                }
            }
        }
        txn.commit().map_err(db_err("commit ack"))?;
        Ok(removed)
    }

    /// The due index holds exactly the tasks' next due occurrences.
    fn verify_due_index(&self, states: &BTreeMap<TaskId, Option<Timestamp>>) -> Result<()> {
        let txn = self.begin_read()?;
        let due = txn.open_table(DUE).map_err(db_err("read due index"))?;
        let mut indexed = std::collections::BTreeSet::new();
        for item in due.iter().map_err(db_err("read due index"))? {
            let (k, _) = item.map_err(db_err("read due index"))?;
            indexed.insert(k.value());
        }
        let want: std::collections::BTreeSet<(i64, u64)> = states
            .iter()
            .filter_map(|(id, next)| next.map(|t| (t.as_millis(), id.0)))
            .collect();
        if indexed != want {
            return Err(StoreError::Corrupt {
                table: "due",
                key: format!("{:?}", indexed.symmetric_difference(&want).next()),
                reason: "the due index disagrees with the tasks' states".into(),
            });
        }
        Ok(())
    }

    /// Everything in the store.
    pub fn dump(&self) -> Result<StoreDump> {
        let mut d = StoreDump::default();
        for t in self.tasks()? {
            d.tasks.insert(t.id, t);
        }
        d.states = self.task_states()?.into_iter().collect();
        self.verify_due_index(&d.states)?;
        d.started = self.started()?.into_iter().collect();
        d.retries = self.pending_retries()?.into_iter().collect();
        for r in self.outbox_batch(usize::MAX, usize::MAX)? {
            d.outbox.insert(r.key(), r);
        }
        Ok(d)
    }
}
