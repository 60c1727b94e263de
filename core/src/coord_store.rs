//! The coordinator's durable state behind a trait: what any store of it
//! (redb embedded, PostgreSQL shared by several coordinators, memory for
//! the simulator) must keep, in domain types.
//!
//! # The contract
//!
//! Every implementation passes the same conformance suite
//! ([`conformance`]), and keeps these rules, which are what lets several
//! coordinators share one store:
//!
//! - **One method, one transaction.** A method either did all it says or
//!   nothing (an `Err` of any kind leaves the store as it was). A result
//!   batch ([`CoordStore::put_runs`]) is acknowledged to its agent only
//!   after the method returned `Ok`, so `Ok` means durable.
//! - **Revisions.** Every change of a task (create, update, cancel, pause,
//!   resume) takes the next global revision, one greater than the last, and
//!   a task carries the revision of its last change. A cancelled task stays
//!   as a tombstone, so "changes since R" is always answerable. *Readers
//!   never see a gap:* when [`CoordStore::changes_for`] or
//!   [`CoordStore::revision`] answers R, every change with a revision up to
//!   R is committed and visible — a store where writers commit out of order
//!   (PostgreSQL sequences) must hand out revisions under a lock held to
//!   the commit, or hide revisions above the lowest one not yet committed.
//!   Revisions and task ids are never used twice, also after a restore from
//!   a backup ([`CoordStore::catch_up_restored`]).
//! - **Compare-and-set.** [`CoordStore::update_task`] takes the revision
//!   the caller read; when the task has moved on since, nothing is written
//!   and the answer is [`StoreError::Conflict`]. Two admins patching one
//!   task through two coordinators cannot lose either's change unseen.
//! - **First record wins.** Runs are keyed by (task, agent, scheduled_at,
//!   attempt); a resend of the same record is a no-op, a different record
//!   under a stored key is not written and is returned as a conflict.
//! - **Bounded answers.** Every listing is paged by a cursor and a limit,
//!   and [`CoordStore::changes_for`] looks at most `limit` revisions; no
//!   method reads a whole table for one answer (except the explicitly
//!   unbounded checkers' helpers, which are not part of the trait).
//! - **What is not in the store** is each coordinator's own: live sessions,
//!   the certificate cache, the revision feed. A store shared by several
//!   coordinators must let each learn of (a) new revisions (a feed:
//!   PostgreSQL `LISTEN/NOTIFY`, or polling [`CoordStore::revision`]), (b)
//!   certificates added and revoked ([`CoordStore::known_certs`] reread on
//!   that feed; until then a coordinator may accept a revoked certificate
//!   for at most its polling interval), and (c) run-now requests and
//!   revocations for an agent whose session another coordinator holds (the
//!   revocation is in the store and closes the session at the next feed
//!   event; run-now is delivered by the coordinator that holds it).
//! - **Audited changes.** A change an admin makes (`audit: Some(entry)`)
//!   writes its audit entry in the same transaction, completed with what
//!   it made ([`AuditEntry::made`]: the task, the revision): the log never
//!   misses a committed change nor names one that did not commit.
//! - **Neutral errors.** [`StoreError`] says what the caller can do, not
//!   which database failed: retry later, stop, or tell the operator.

use std::fmt;
use std::ops::Range;

use sundial_protocol::task::Target;
use sundial_protocol::wire::{AdminInfo, AuditEntry, AuditQuery, LastRun, Role, TaskDraft};
use sundial_protocol::{AgentId, RunRecord, TaskId, TaskSpec, Timestamp};

#[cfg(feature = "conformance")]
pub mod conformance;

/// Why a store operation failed. Nothing of the failed operation was stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The store could not be read or written (disk full, I/O error,
    /// connection lost). The embedded store refuses every write from then
    /// on, so a coordinator stops and its supervisor restarts it.
    Unavailable { context: String, detail: String },
    /// Another process holds the store (the embedded store is one process's).
    Locked(String),
    /// Stored data does not decode: repair or restore.
    Corrupt(String),
    /// What the operation read changed under it (compare-and-set).
    Conflict(String),
    /// The named agent, task or token does not exist.
    NotFound(String),
    /// The request may not be done (a name taken, a task cancelled).
    Refused(String),
}

impl StoreError {
    pub fn unavailable(context: impl Into<String>, detail: impl fmt::Display) -> StoreError {
        StoreError::Unavailable {
            context: context.into(),
            detail: detail.to_string(),
        }
    }

    /// Whether the store itself failed (rather than the request): the
    /// coordinator should stop and be restarted.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Whether the request was at fault: the message is for the operator.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict(_) | StoreError::NotFound(_) | StoreError::Refused(_)
        )
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable { context, detail } => {
                write!(f, "coordinator store: {context}: {detail}")
            }
            StoreError::Locked(why) => write!(f, "coordinator store: {why}"),
            StoreError::Corrupt(why) => write!(f, "coordinator store: {why}"),
            StoreError::Conflict(why) | StoreError::NotFound(why) | StoreError::Refused(why) => {
                f.write_str(why)
            }
        }
    }
}

impl std::error::Error for StoreError {}

impl From<sundial_protocol::records::RecordError> for StoreError {
    fn from(e: sundial_protocol::records::RecordError) -> StoreError {
        StoreError::Corrupt(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Who a client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertRole {
    Admin(AdminCert),
    Agent(AgentId),
}

/// A named admin's certificate: who it is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCert {
    pub name: String,
    pub role: Role,
    pub expires_at: Timestamp,
}

impl AdminCert {
    /// An admin certificate of a store from before named admins: the
    /// owner `init` made, valid until the year 4000 (rotate it: README).
    pub fn legacy() -> AdminCert {
        AdminCert {
            name: "owner".into(),
            role: Role::Owner,
            expires_at: Timestamp::from_millis_saturating(LEGACY_ADMIN_EXPIRES_MS),
        }
    }
}

/// 4000-01-01T00:00:00Z, the end of the certificates `init` wrote before
/// named admins.
pub const LEGACY_ADMIN_EXPIRES_MS: i64 = 64_060_588_800_000;

/// Admins a store keeps (live and revoked); beyond, `admin create` is
/// refused.
pub const ADMINS_MAX: usize = 1_000;

/// What [`CoordStore::store_runs`] did with a batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredRuns {
    /// Keys under which a different record was stored first (refused).
    pub conflicts: Vec<RunKeyOf>,
    /// Keys stored by this call (not before): what metrics count.
    pub fresh: Vec<RunKeyOf>,
}

/// One bounded answer of [`CoordStore::audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// Oldest first.
    pub entries: Vec<AuditEntry>,
    /// More entries match beyond the page, in the direction it was read.
    pub more: bool,
}

/// The admin a renew or revoke is about, if live: a missing one is
/// `NotFound`, a revoked one refused (saying `if_revoked`).
pub fn live_admin(
    found: Option<AdminInfo>,
    name: &str,
    if_revoked: &str,
) -> StoreResult<AdminInfo> {
    match found {
        None => Err(StoreError::NotFound(format!("no admin {name:?}"))),
        Some(a) if a.revoked_at.is_some() => Err(StoreError::Refused(format!(
            "admin {name:?} is revoked{if_revoked}"
        ))),
        Some(a) => Ok(a),
    }
}

/// What a renew of a revoked admin is told.
pub const RENEW_REVOKED: &str = "; create it again instead";
/// What a second revoke is told.
pub const REVOKE_REVOKED: &str = " already";

/// Whether `e` is one `q` asks for (its filters; not its paging).
pub fn audit_matches(q: &AuditQuery, e: &AuditEntry) -> bool {
    q.admin.as_ref().is_none_or(|a| *a == e.admin)
        && q.subject
            .as_ref()
            .is_none_or(|s| e.subject.as_ref() == Some(s))
        && q.since.is_none_or(|t| e.at >= t)
        && (!q.refused || e.refused.is_some())
}

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub name: Option<String>,
    pub labels: Vec<(String, String)>,
    pub cert_sha256: [u8; 32],
    pub revoked: bool,
    /// Revoked and removed from the lists by an operator (its runs stay).
    pub forgotten: bool,
    pub enrolled_at: Timestamp,
    pub last_seen: Option<Timestamp>,
    pub clock_offset_ms: Option<i64>,
    pub rtt_ms: Option<i64>,
    /// A coordinator holds its session (as the last [`SessionMark`] said).
    /// Kept by stores several coordinators share; the embedded store, whose
    /// one coordinator knows its sessions itself, keeps it `false`.
    pub in_session: bool,
}

/// What a session saw of an agent ([`CoordStore::agent_seen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentSeen {
    pub at: Timestamp,
    /// The agent's clock estimate: (offset, round trip), ms.
    pub clock: Option<(i64, i64)>,
    /// A session began or ended at coordinator `holder`.
    pub session: Option<SessionMark>,
}

/// A session's beginning or end, by the coordinator that holds it (a
/// number it drew at start): an end clears the mark only when that
/// coordinator still holds it, so a newer session elsewhere stays marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMark {
    Up { holder: u64 },
    Down { holder: u64 },
}

/// A join token, by the SHA-256 of its secret (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret_sha256: [u8; 32],
    pub expires_at: Timestamp,
    pub uses_left: u32,
    pub labels: Vec<(String, String)>,
}

/// Why a token was refused; the agent shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired(Timestamp),
    UsedUp,
}

impl fmt::Display for TokenRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenRefusal::Unknown => f.write_str("unknown join token"),
            TokenRefusal::Expired(at) => write!(f, "join token expired at {at}"),
            TokenRefusal::UsedUp => f.write_str("join token already used up"),
        }
    }
}

/// An enrollment, after the certificate was issued for `agent` (an id from
/// [`CoordStore::reserve_agent_id`]): spends one use of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub token_sha256: [u8; 32],
    pub agent: AgentId,
    pub name: Option<String>,
    /// The agent's own labels; they win over the token's on a conflict.
    pub labels: Vec<(String, String)>,
    pub cert_sha256: [u8; 32],
    pub now: Timestamp,
}

/// A stored task.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTask {
    pub spec: TaskSpec,
    pub cancelled: bool,
    pub paused: bool,
    /// When the task was created. `spec.created_at` is when its
    /// occurrences count from, which a resume moves; this never moves.
    pub created_at: Timestamp,
}

impl StoredTask {
    /// Whether agents should drop it (cancelled, or paused until resumed).
    pub fn removed(&self) -> bool {
        self.cancelled || self.paused
    }
}

/// One bounded answer of [`CoordStore::changes_for`].
#[derive(Debug, Clone, PartialEq)]
pub struct ChangePage {
    /// `(task, removed)` in revision order; removed: cancelled or paused.
    pub changes: Vec<(TaskSpec, bool)>,
    /// Every revision up to this one was looked at: the next page starts
    /// after it.
    pub upto: u64,
    /// Revisions after `upto` exist (as of the read).
    pub more: bool,
}

/// One bounded answer of [`CoordStore::cert_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPage {
    /// `(fingerprint, role)` in sequence order; `None`: revoked.
    pub changes: Vec<([u8; 32], Option<CertRole>)>,
    /// Every change up to this sequence number was looked at.
    pub upto: u64,
    /// Changes after `upto` exist (as of the read).
    pub more: bool,
}

/// A run-now for an agent whose session may be held by another
/// coordinator ([`CoordStore::queue_run_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedRunNow {
    pub agent: AgentId,
    pub task: TaskId,
    pub at: Timestamp,
}

/// How long a queued run-now waits for a coordinator holding its agent's
/// session before it expires (the agent was offline everywhere).
pub const RUN_NOW_QUEUE_TTL_MS: i64 = 60_000;

/// The stored key of a run: (task, agent, scheduled_at ms, attempt).
pub type RunKeyOf = (u64, u64, i64, u32);

/// A position in time order: a run's (scheduled_at, task, agent, attempt).
/// Written `SCHEDULED_MS.TASK.AGENT.ATTEMPT` for `--after`/`--before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunCursor {
    pub scheduled_at_ms: i64,
    pub task: u64,
    pub agent: u64,
    pub attempt: u32,
}

impl fmt::Display for RunCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{}",
            self.scheduled_at_ms, self.task, self.agent, self.attempt
        )
    }
}

impl std::str::FromStr for RunCursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a run cursor (as printed after a page of `run list`)");
        let mut it = s.split('.');
        let c = RunCursor {
            scheduled_at_ms: it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            task: it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            agent: it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
            attempt: it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(c)
    }
}

/// A position in arrival order: runs in the order the store took them, so
/// that a reader following it meets every run once, late ones (an offline
/// agent's backlog) included. `epoch` orders first, then `seq`: on
/// PostgreSQL the epoch is the storing transaction's id, and a reader is
/// never shown a run past a transaction that may still commit; the embedded
/// store has one writer and epoch 0. Written `arrival.EPOCH.SEQ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct ArrivalCursor {
    pub epoch: u64,
    pub seq: u64,
}

/// What an arrival cursor's text starts with.
pub const ARRIVAL_PREFIX: &str = "arrival.";

impl ArrivalCursor {
    /// Before every run: `--after arrival.0.0` reads from the first.
    pub const START: ArrivalCursor = ArrivalCursor { epoch: 0, seq: 0 };
}

impl fmt::Display for ArrivalCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ARRIVAL_PREFIX}{}.{}", self.epoch, self.seq)
    }
}

impl std::str::FromStr for ArrivalCursor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!("`{s}` is not an arrival cursor (arrival.EPOCH.SEQ, as printed after a page of `run list --arrival`)")
        };
        let rest = s.strip_prefix(ARRIVAL_PREFIX).ok_or_else(bad)?;
        let (epoch, seq) = rest.split_once('.').ok_or_else(bad)?;
        Ok(ArrivalCursor {
            epoch: epoch.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// A `run list --arrival` query.
#[derive(Debug, Clone, Copy)]
pub struct ArrivalQuery {
    pub task: Option<TaskId>,
    pub agent: Option<AgentId>,
    pub limit: usize,
    /// The runs stored after this position, in arrival order; `None`: the
    /// latest `limit` to arrive.
    pub after: Option<ArrivalCursor>,
}

/// One answer of [`CoordStore::runs_arrived`].
#[derive(Debug, Clone, Default)]
pub struct ArrivedRuns {
    /// In arrival order.
    pub runs: Vec<RunRecord>,
    /// The position of the page's first run.
    pub first: Option<ArrivalCursor>,
    /// Where the next page starts (`--after`): past everything this page
    /// looked at, matching or not, so a filtered reader moves on.
    pub next: ArrivalCursor,
    /// More runs are stored past `next` (that this reader may see now).
    pub more: bool,
    /// Stored records that matched but could not be decoded.
    pub unreadable: u64,
}

/// The most index entries one page in arrival order looks at: a filter
/// that matches little ends the page there, with `more` and a cursor past
/// them, rather than scanning the whole store.
pub const ARRIVAL_SCAN_MAX: usize = 100_000;

/// Which page of runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The latest runs (or, with `since` and `forward_from_since`, the first ones from `since`).
    Latest,
    /// Runs after this position, oldest first.
    After(RunCursor),
    /// Runs before this position (the latest of them).
    Before(RunCursor),
}

/// A `run list` query.
#[derive(Debug, Clone, Copy)]
pub struct RunQuery {
    pub task: Option<TaskId>,
    pub agent: Option<AgentId>,
    pub since: Option<Timestamp>,
    pub limit: usize,
    pub page: Page,
    /// With `since`: page forward from it rather than show the latest.
    pub forward_from_since: bool,
}

/// One answer of [`CoordStore::runs`].
#[derive(Debug, Clone)]
pub struct RunPage {
    /// Oldest first.
    pub runs: Vec<RunRecord>,
    /// The positions of the first and last run of the page.
    pub first: Option<RunCursor>,
    pub last: Option<RunCursor>,
    /// More runs match beyond this page, in the direction it was read.
    pub more: bool,
    /// How many runs are stored, when no filter applies (O(1)); else unknown.
    pub matched: Option<u64>,
    /// Stored records that matched but could not be decoded.
    pub unreadable: u64,
}

/// The most bytes of stored records one `run list` answer reads (output
/// tails included): a page ends there, and says there is more, so one
/// listing's memory is bounded on both sides whatever `--limit` says.
pub const RUN_LIST_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The most revisions an agent may be ahead of the store for the store to
/// believe it was restored from a backup (and catch up); also the most
/// cancels of possibly lost ids one resynchronisation sends.
pub const RESTORE_GAP_MAX: u64 = 100_000;

/// The most items one page of a listing holds, whatever the caller asks.
pub const PAGE_MAX: usize = 10_000;

/// Whether a task's target includes an agent.
pub fn targets(target: &Target, agent: AgentId, labels: &[(String, String)]) -> bool {
    match target {
        Target::Agent(a) => *a == agent,
        Target::Selector(sel) => sel.iter().all(|pair| labels.contains(pair)),
    }
}

/// The instant a new task's occurrences count from: its creation, or for a
/// one-shot accepted a little in the past (`--at now` resolved on the
/// operator's clock, a few ms before the coordinator's) its instant, so
/// that it fires once instead of never.
pub fn counts_from(schedule: &sundial_protocol::Schedule, now: Timestamp) -> Timestamp {
    match schedule.kind() {
        sundial_protocol::ScheduleKind::At(at) => now.min(*at),
        _ => now,
    }
}

/// Token labels first, then the agent's own, which win on a conflict.
/// The setting that holds an agent's public sealing key (hex).
fn seal_key_setting(agent: AgentId) -> String {
    format!("seal_key/{agent}")
}

/// Stores `agent`'s public sealing key, unless it is the one stored.
pub fn put_seal_key(
    store: &dyn CoordStore,
    agent: AgentId,
    key: sundial_protocol::seal::SealPublicKey,
) -> StoreResult<()> {
    let hex: String = key.0.iter().map(|b| format!("{b:02x}")).collect();
    let setting = seal_key_setting(agent);
    if store.setting(&setting)?.as_deref() != Some(hex.as_str()) {
        store.put_setting(&setting, &hex)?;
    }
    Ok(())
}

/// `agent`'s public sealing key, if it has published one (a stored value
/// that does not read as a key counts as none).
pub fn seal_key(
    store: &dyn CoordStore,
    agent: AgentId,
) -> StoreResult<Option<sundial_protocol::seal::SealPublicKey>> {
    let Some(hex) = store.setting(&seal_key_setting(agent))? else {
        return Ok(None);
    };
    let bytes = sundial_protocol::token::unhex(&hex);
    Ok(bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(sundial_protocol::seal::SealPublicKey))
}

pub fn merge_labels(token: &[(String, String)], own: &[(String, String)]) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = token
        .iter()
        .filter(|(k, _)| !own.iter().any(|(k2, _)| k2 == k))
        .cloned()
        .collect();
    all.extend(own.iter().cloned());
    all
}

/// The coordinator's store. See the module docs for the contract.
pub trait CoordStore: Send + Sync + fmt::Debug {
    // ---- counters and settings

    /// The current global revision (0 before the first change).
    fn revision(&self) -> StoreResult<u64>;

    /// A setting written at `init` (advertised address, server name).
    fn setting(&self, key: &str) -> StoreResult<Option<String>>;
    fn put_setting(&self, key: &str, value: &str) -> StoreResult<()>;

    /// An agent says it applied `agent_revision`, beyond the store's: the
    /// store was restored from an older backup. The revision jumps past the
    /// agent's and the next task id by the gap, so neither is used twice.
    /// Returns the task ids that may have been lost (at most
    /// [`RESTORE_GAP_MAX`]) and the revision of that news; `None` when the
    /// agent is not ahead, or claims more than [`RESTORE_GAP_MAX`] ahead
    /// (not believed: a peer could push the counters).
    fn catch_up_restored(&self, agent_revision: u64) -> StoreResult<Option<(Range<u64>, u64)>>;

    // ---- certificates, tokens, agents

    /// Known certificate fingerprints after `after`, in fingerprint order,
    /// at most `limit` (revoked agents' excluded).
    fn known_certs(
        &self,
        after: Option<[u8; 32]>,
        limit: usize,
    ) -> StoreResult<Vec<([u8; 32], CertRole)>>;

    // ---- admins and the audit log

    /// Admins after `after` in name order, at most `limit` (revoked ones
    /// included).
    fn admins(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<AdminInfo>>;
    /// Adds a named admin and its certificate. Refused while a live
    /// (unrevoked) admin has the name, or at [`ADMINS_MAX`]; a revoked
    /// one's name is taken over (its entries stay in the audit log).
    fn create_admin(&self, admin: &AdminInfo, audit: Option<&AuditEntry>) -> StoreResult<()>;
    /// Gives a live admin a new certificate (its old one stops working);
    /// returns the admin as it was.
    fn renew_admin(
        &self,
        name: &str,
        cert_sha256: [u8; 32],
        expires_at: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<AdminInfo>;
    /// Revokes a live admin's certificate. The last owner whose
    /// credential has not expired cannot be revoked (nobody could manage
    /// admins any more).
    fn revoke_admin(
        &self,
        name: &str,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<AdminInfo>;
    /// The admin of this certificate connected at `at`.
    fn admin_used(&self, cert_sha256: [u8; 32], at: Timestamp) -> StoreResult<()>;
    /// Appends an entry that goes with no change (a refusal, a run-now).
    /// Changes write theirs in their own transaction (their `audit`).
    fn append_audit(&self, entry: &AuditEntry) -> StoreResult<()>;
    /// A page of the audit log: at most `q.limit` entries, oldest first.
    fn audit(&self, q: &AuditQuery) -> StoreResult<AuditPage>;
    /// Deletes audit entries before `before`, at most `max`; how many went.
    fn purge_audit_before(&self, before: Timestamp, max: usize) -> StoreResult<usize>;

    fn put_token(&self, token: &JoinToken, audit: Option<&AuditEntry>) -> StoreResult<()>;
    /// Tokens after `after` in hash order, at most `limit`.
    fn tokens(&self, after: Option<[u8; 32]>, limit: usize) -> StoreResult<Vec<JoinToken>>;
    /// `NotFound` when there is no such token.
    fn delete_token(&self, secret_sha256: [u8; 32], audit: Option<&AuditEntry>) -> StoreResult<()>;

    /// Checks a token without spending it (before a certificate is issued).
    fn check_token(
        &self,
        secret_sha256: [u8; 32],
        now: Timestamp,
    ) -> StoreResult<Result<JoinToken, TokenRefusal>>;
    /// The next agent id, never handed out again (an enrollment refused
    /// after it leaves a gap).
    fn reserve_agent_id(&self) -> StoreResult<AgentId>;
    /// Spends one use of the token and stores the agent with its
    /// certificate and merged labels ([`merge_labels`]). The token is
    /// checked again in the same transaction (another enrollment may have
    /// used it up since [`CoordStore::check_token`]).
    fn enroll(&self, e: &Enrollment) -> StoreResult<Result<Agent, TokenRefusal>>;

    fn agent(&self, id: AgentId) -> StoreResult<Option<Agent>>;
    /// Agents after `after` in id order, at most `limit` (forgotten ones
    /// included, flagged).
    fn agents(&self, after: Option<AgentId>, limit: usize) -> StoreResult<Vec<Agent>>;
    /// Records what a session saw; `NotFound` for an unknown agent.
    fn agent_seen(&self, id: AgentId, seen: AgentSeen) -> StoreResult<()>;
    /// Records what sessions saw of many agents at once (their clock
    /// reports, gathered for a second); agents no longer stored are
    /// skipped. A store may do it in one transaction.
    fn agents_seen(&self, seen: &[(AgentId, AgentSeen)]) -> StoreResult<()> {
        for (id, s) in seen {
            match self.agent_seen(*id, *s) {
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    /// Revokes an agent: its certificate is no longer known. Revoking a
    /// revoked agent is a no-op. Returns the agent as stored after.
    fn revoke_agent(&self, id: AgentId, audit: Option<&AuditEntry>) -> StoreResult<Agent>;
    /// Removes a revoked agent from the lists; its runs stay. `Refused`
    /// when it is not revoked.
    fn forget_agent(&self, id: AgentId, audit: Option<&AuditEntry>) -> StoreResult<()>;

    // ---- tasks

    /// Creates a task with the next id and revision; `Refused` when its
    /// name is taken by a live task. It counts from [`counts_from`].
    fn create_task(
        &self,
        draft: TaskDraft,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<TaskSpec>;
    /// Replaces a live task's spec under the next revision, if its revision
    /// is still `expected_revision` (else `Conflict`). Returns the revision.
    fn update_task(
        &self,
        spec: &TaskSpec,
        expected_revision: u64,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<u64>;
    /// Cancels a task: a tombstone under the next revision.
    fn cancel_task(&self, id: TaskId, audit: Option<&AuditEntry>) -> StoreResult<u64>;
    /// Pauses or resumes a task under the next revision; a resumed task
    /// counts from `now` (occurrences while paused are nobody's): its
    /// `spec.created_at` moves, its [`StoredTask::created_at`] does not.
    fn set_paused(
        &self,
        id: TaskId,
        paused: bool,
        now: Timestamp,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<u64>;
    fn task(&self, id: TaskId) -> StoreResult<Option<StoredTask>>;
    /// Tasks after `after` in id order, at most `limit`.
    fn tasks(&self, after: Option<TaskId>, limit: usize) -> StoreResult<Vec<StoredTask>>;
    /// Changes for an agent with `labels` after revision `since`, looking
    /// at most `limit` tasks (so at most `limit` changes). A first sync
    /// (`since == 0`) leaves out removed tasks.
    fn changes_for(
        &self,
        agent: AgentId,
        labels: &[(String, String)],
        since: u64,
        limit: usize,
    ) -> StoreResult<ChangePage>;

    // ---- runs

    /// Stores run records in one transaction, first record wins; returns
    /// the keys of different records refused, and of the records stored
    /// now for the first time (a resend of a stored record is neither).
    fn store_runs(&self, runs: &[RunRecord]) -> StoreResult<StoredRuns>;
    /// [`CoordStore::store_runs`], for callers that want only the refused.
    fn put_runs(&self, runs: &[RunRecord]) -> StoreResult<Vec<RunKeyOf>> {
        self.store_runs(runs).map(|s| s.conflicts)
    }
    /// One page of runs, read from an index by time: O(page) whatever is
    /// stored, at most [`RUN_LIST_BYTES_MAX`] of records.
    fn runs(&self, q: &RunQuery) -> StoreResult<RunPage>;
    /// One page of runs in the order they were stored (see
    /// [`ArrivalCursor`]): O(page), at most [`RUN_LIST_BYTES_MAX`] of
    /// records and [`ARRIVAL_SCAN_MAX`] entries looked at.
    fn runs_arrived(&self, q: &ArrivalQuery) -> StoreResult<ArrivedRuns>;
    /// The latest run of `task` on each agent, at most `limit` agents.
    fn last_runs(&self, task: TaskId, limit: usize) -> StoreResult<Vec<LastRun>>;
    /// Deletes runs scheduled before `before`, at most `max`, oldest first;
    /// returns how many went (call again while it is `max`).
    fn purge_runs_before(&self, before: Timestamp, max: usize) -> StoreResult<usize>;
    fn run_count(&self) -> StoreResult<u64>;

    // ---- feeds: what several coordinators on one store learn of each other

    /// The certificate sequence: every certificate added (enrollment,
    /// admin) or revoked takes the next number, committed in order (as
    /// revisions are). Read it before [`CoordStore::known_certs`] at start.
    fn cert_seq(&self) -> StoreResult<u64>;
    /// Certificates added or revoked after `since`, at most `limit`, in
    /// sequence order. A certificate changed more than once since `since`
    /// may be reported once, in its latest state.
    fn cert_changes(&self, since: u64, limit: usize) -> StoreResult<CertPage>;
    /// Changes of every task after revision `since`, at most `limit`
    /// (removed ones included): what another coordinator changed, so a
    /// coordinator can wake the sessions the changes target.
    fn task_changes(&self, since: u64, limit: usize) -> StoreResult<ChangePage>;
    /// Leaves run-now requests for the coordinator that holds each agent's
    /// session; they expire after [`RUN_NOW_QUEUE_TTL_MS`].
    fn queue_run_now(&self, runs: &[QueuedRunNow], now: Timestamp) -> StoreResult<()>;
    /// Takes (deletes and returns) the queued run-nows of these agents,
    /// and drops the expired ones of any agent.
    fn take_run_now(&self, agents: &[AgentId], now: Timestamp) -> StoreResult<Vec<QueuedRunNow>>;

    /// Stores a function's module under its SHA-256 (content-addressed: a
    /// second put of the same module changes nothing). The caller checked
    /// that `hash` is the hash of `bytes`.
    fn put_module(&self, hash: sundial_protocol::wasm::ModuleHash, bytes: &[u8])
        -> StoreResult<()>;

    /// A module's bytes, if stored.
    fn module(&self, hash: sundial_protocol::wasm::ModuleHash) -> StoreResult<Option<Vec<u8>>>;
}
