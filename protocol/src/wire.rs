//! Messages of the agent–coordinator session (ALPN `sundial/1`).
//!
//! Session: the agent sends [`AgentMsg::Hello`]; the coordinator answers with
//! [`CoordMsg::Assignments`] (changes since the agent's revision, or a
//! snapshot), then streams further changes as they happen. Results travel up
//! in [`AgentMsg::Results`] batches and are acknowledged by
//! [`CoordMsg::ResultsAck`] only after the coordinator's commit. Clock samples
//! are exchanged NTP-style with [`AgentMsg::ClockProbe`] / [`CoordMsg::ClockReply`].

use serde::{Deserialize, Serialize};

use crate::seal::SealPublicKey;
use crate::task::{AgentId, RunKey, RunRecord, TaskId, TaskSpec};
use crate::time::Timestamp;

/// The version of this message set; a peer with another is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// The QUIC ALPN of the agent session (mutual TLS).
pub const ALPN: &[u8] = b"sundial/1";
/// The ALPN of enrollment: the agent has no certificate yet.
pub const ALPN_ENROLL: &[u8] = b"sundial-enroll/1";
/// The ALPN of the admin API (`sundialctl`, admin certificate).
pub const ALPN_ADMIN: &[u8] = b"sundial-admin/1";

/// QUIC application close codes.
pub mod close {
    /// Normal end.
    pub const DONE: u32 = 0;
    /// The ALPN needs a client certificate and none (or an unknown one) was shown.
    pub const CERT_REQUIRED: u32 = 1;
    /// A frame did not decode, was too large or of an unknown version.
    pub const BAD_FRAME: u32 = 2;
    /// A message broke the session protocol.
    pub const PROTOCOL: u32 = 3;
    /// The coordinator could not store what it received.
    pub const STORE: u32 = 4;
    /// The agent was revoked.
    pub const REVOKED: u32 = 5;
    /// The coordinator is at a limit (sessions, unauthenticated connections);
    /// try again later. The reason may say when: [`super::busy_reason`].
    pub const BUSY: u32 = 6;
    /// A newer session of the same agent took this one's place: one agent
    /// (one certificate) holds one session, so its limits are its own.
    pub const REPLACED: u32 = 7;
    /// The admin credential expired (the reason says when, and how to renew).
    pub const EXPIRED: u32 = 8;
}

/// The reason of a BUSY close that says when to try again.
pub fn busy_reason(retry_after_ms: u64, why: &str) -> String {
    format!("retry-after-ms={retry_after_ms}; {why}")
}

/// The retry-after of a BUSY close's reason, if it says one (at most an hour).
pub fn busy_retry_after_ms(reason: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(reason).ok()?;
    let rest = text.strip_prefix("retry-after-ms=")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse::<u64>().ok().map(|ms| ms.min(3_600_000))
}

/// Whether an agent of this version (its Hello's `agent_version`, `X.Y.Z`)
/// understands [`CoordMsg::Policy`], new in 0.2: an older agent would take
/// the unknown message for a bad frame and never finish its session, so a
/// coordinator upgraded before its fleet does not send it to them.
pub fn agent_knows_policy(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 2))
}

/// Whether `version` (`MAJOR.MINOR…`) is at least `want`; an unreadable
/// version is not.
fn version_at_least(version: &str, want: (u64, u64)) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= want,
        _ => false,
    }
}

/// Whether an agent of this version knows triggered tasks
/// ([`crate::ScheduleKind::After`], new in 0.4): an older one could not
/// decode a page of assignments holding one, so it is not sent them.
pub fn agent_knows_triggers(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 4))
}

/// Whether an agent of this version opens sealed variables (new in 0.5): an
/// older one could not decode a task that has them, so it is not sent them.
pub fn agent_knows_sealed(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 5))
}

/// Whether an agent of this version follows lease windows (placed tasks,
/// new in 0.6): an older one could not decode a placed task, so it is not
/// sent them.
pub fn agent_knows_placement(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 6))
}

/// Whether an agent of this version runs functions ([`crate::task::Action::Wasm`]
/// and [`CoordMsg::Module`], new in 0.7): an older one could not decode
/// either, so it is sent a cancel in place of a function task.
pub fn agent_knows_wasm(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 7))
}

/// Whether an agent of this version follows its coordinator's
/// [`LinkTiming`] (new in 0.8): it sends no keep-alives of its own and
/// dials with a long idle timeout, so the coordinator's applies. An older
/// one pings every second and times out after 5 s.
pub fn agent_follows_link_timing(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 8))
}

/// The idle timeout of peers older than 0.8 (agents and coordinators), ms.
pub const IDLE_MS_BEFORE_0_8: u32 = 5_000;

/// Whether an agent of this version sends [`AgentMsg::Report`] when asked
/// ([`CoordMsg::ReportEvery`], new in 0.3): an older agent would take the
/// unknown message for a bad frame, and an older coordinator the report, so
/// each side sends it only knowing the other understands.
pub fn agent_knows_reports(agent_version: &str) -> bool {
    version_at_least(agent_version, (0, 3))
}

/// How often an agent may be asked to report, at least and at most, ms.
pub const REPORT_EVERY_MS_MIN: u32 = 1_000;
pub const REPORT_EVERY_MS_MAX: u32 = 3_600_000;

/// An agent's own figures, sent in its session when they change (at most
/// as often as the coordinator asked), and at once when it applied
/// assignments. Every field is checked on receipt ([`AgentReport::refusal`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Run records waiting in its outbox.
    pub outbox_len: u64,
    /// When the oldest of them ended (agent's trusted time).
    pub oldest_unsynced: Option<Timestamp>,
    /// The last assignment revision it applied.
    pub applied_revision: u64,
    /// Tasks it holds.
    pub tasks_held: u64,
    /// Runs going now.
    pub running: u32,
    /// Its store's size on disk, bytes (`None`: not known).
    pub store_bytes: Option<u64>,
    /// Its clock: vouched for by a coordinator in this boot, the offset it
    /// applies to its wall clock, and whether firing is held (the clock
    /// went back behind the last known-good instant).
    pub clock_vouched: bool,
    pub clock_offset_ms: i64,
    pub clock_held: bool,
    /// The largest start lateness of the runs started since its last
    /// report, ms (`None`: none started).
    pub late_max_ms: Option<u64>,
}

impl AgentReport {
    /// Why a report cannot be true: figures beyond any real agent.
    pub fn refusal(&self) -> Option<String> {
        const FAR_MS: i64 = 100 * 365 * 86_400_000;
        if self.clock_offset_ms.unsigned_abs() > FAR_MS as u64 {
            return Some(format!("clock offset {} ms", self.clock_offset_ms));
        }
        if self.late_max_ms.is_some_and(|l| l > FAR_MS as u64) {
            return Some("lateness beyond a century".into());
        }
        if self.outbox_len == 0 && self.oldest_unsynced.is_some() {
            return Some("an oldest unsynced run in an empty outbox".into());
        }
        None
    }
}

/// How agents reconnect, as the coordinator asks: sent at the start of
/// every session, followed until the next. An agent that never heard one
/// uses [`ReconnectPolicy::default`]. Every field is clamped on receipt
/// ([`ReconnectPolicy::sanitized`]): a coordinator cannot make agents dial
/// in a tight loop or never again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectPolicy {
    /// How long one connection attempt may last, ms.
    pub attempt_timeout_ms: u32,
    /// The first wait after a failed attempt, ms; it doubles per failure.
    pub backoff_floor_ms: u32,
    /// The longest wait between attempts, ms.
    pub backoff_cap_ms: u32,
    /// Refused for load without a retry-after: wait a random time up to this, ms.
    pub busy_spread_ms: u32,
    /// New sessions the coordinator accepts per second (it refuses the rest).
    pub handshakes_per_sec: u32,
    /// How this session's link is kept alive and judged silent (coordinators
    /// 0.8 and later, which send the keep-alives themselves). Absent: the
    /// coordinator sends none, so the agent must.
    pub link: Trailing<LinkTiming>,
}

/// Keep-alives and silence on one session, chosen by the coordinator from
/// the size of its fleet when it accepted the connection: a small fleet is
/// pinged every second (it costs nothing, and silence is seen in seconds); a
/// large one less often, so that keep-alives stay a bounded load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinkTiming {
    /// The coordinator sends a keep-alive (a QUIC PING, acknowledged by the
    /// agent's QUIC stack) when it sent nothing for this long, ms.
    pub keep_alive_ms: u32,
    /// Nothing heard from the coordinator for this long: the agent takes
    /// the link as cut and marks runs fired from then on `offline`, ms.
    pub silent_ms: u32,
    /// The connection's idle timeout: a peer silent this long is gone
    /// (the coordinator shows the agent offline), ms.
    pub idle_ms: u32,
}

/// The shortest keep-alive interval a coordinator may ask for, ms.
pub const KEEP_ALIVE_MS_MIN: u32 = 1_000;
/// The longest, ms: about what keeps a NAT mapping alive (RFC 9308 §3.2).
pub const KEEP_ALIVE_MS_MAX: u32 = 30_000;
/// The longest idle timeout an agent accepts, ms.
pub const IDLE_MS_MAX: u32 = 120_000;

impl LinkTiming {
    /// Within bounds and consistent: silence comes after a keep-alive is
    /// due, and the idle timeout after silence.
    pub fn sanitized(self) -> LinkTiming {
        let keep = self
            .keep_alive_ms
            .clamp(KEEP_ALIVE_MS_MIN, KEEP_ALIVE_MS_MAX);
        let silent = self.silent_ms.clamp(
            keep.saturating_add(keep / 4).max(2_000),
            2 * KEEP_ALIVE_MS_MAX,
        );
        LinkTiming {
            keep_alive_ms: keep,
            silent_ms: silent,
            idle_ms: self
                .idle_ms
                .clamp(silent.saturating_add(1_000), IDLE_MS_MAX),
        }
    }
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            attempt_timeout_ms: 3_000,
            backoff_floor_ms: 250,
            backoff_cap_ms: 30_000,
            busy_spread_ms: 10_000,
            handshakes_per_sec: 0,
            link: Trailing(None),
        }
    }
}

impl ReconnectPolicy {
    /// Every field within sane bounds.
    pub fn sanitized(self) -> ReconnectPolicy {
        let floor = self.backoff_floor_ms.clamp(100, 60_000);
        ReconnectPolicy {
            attempt_timeout_ms: self.attempt_timeout_ms.clamp(1_000, 60_000),
            backoff_floor_ms: floor,
            backoff_cap_ms: self.backoff_cap_ms.clamp(floor.max(1_000), 600_000),
            busy_spread_ms: self.busy_spread_ms.clamp(1_000, 600_000),
            handshakes_per_sec: self.handshakes_per_sec,
            link: Trailing(self.link.0.map(LinkTiming::sanitized)),
        }
    }
}

/// The most run records in one result batch.
pub const RESULT_BATCH_RUNS_MAX: usize = 512;
/// The largest encoded task (program, arguments, environment, schedule and
/// policies): a bigger one is refused when it is created, so no single task
/// can fill a frame.
pub const TASK_SPEC_BYTES_MAX: usize = 64 * 1024;
/// Bytes of changes in one `Assignments` message, and of tasks or runs in one
/// page of an admin answer: lists are sent as several messages under this.
pub const LIST_CHUNK_BYTES_MAX: usize = 1024 * 1024;
/// The largest frame a peer without a certificate (enrollment) may send.
pub const ENROLL_FRAME_BYTES_MAX: usize = 64 * 1024;
/// The largest frame an agent may send before its Hello was accepted.
pub const HELLO_FRAME_BYTES_MAX: usize = 16 * 1024;
/// The most `--allow-exec` patterns an agent may have: they go in every
/// Hello, which must fit [`HELLO_FRAME_BYTES_MAX`].
pub const ALLOW_EXEC_PATTERNS_MAX: usize = 64;
/// The longest `--allow-exec` pattern, bytes.
pub const ALLOW_EXEC_PATTERN_BYTES_MAX: usize = 200;
/// The longest agent version a Hello carries, bytes.
pub const AGENT_VERSION_BYTES_MAX: usize = 64;
/// The `--allow-exec` patterns a Hello tells (the agent enforces its whole
/// list; a longer one is told in part), and the bytes of each told (a
/// longer one is cut and ends in `…`).
pub const HELLO_PATTERNS_MAX: usize = 32;
pub const HELLO_PATTERN_BYTES_MAX: usize = 200;
/// The same for `--allow-env` patterns.
pub const HELLO_ENV_PATTERNS_MAX: usize = 32;
pub const HELLO_ENV_PATTERN_BYTES_MAX: usize = 64;
/// The largest Hello an agent can send, encoded (postcard: a varint of at
/// most 10 bytes per integer and length).
pub const HELLO_BYTES_MAX: usize = 1
    + 10
    + 10
    + (10 + AGENT_VERSION_BYTES_MAX)
    + 10
    + HELLO_PATTERNS_MAX * (10 + HELLO_PATTERN_BYTES_MAX)
    // the environment patterns: an option tag, a length, the patterns
    + 1
    + 10
    + HELLO_ENV_PATTERNS_MAX * (10 + HELLO_ENV_PATTERN_BYTES_MAX)
    // seal key: an option tag and 32 bytes
    + 1
    + 32
    // functions: option, flag, three numbers, the modules held
    + 1
    + 1
    + 3 * 10
    + 10
    + HELLO_MODULES_MAX * 32;
/// The most modules a Hello lists (an agent holding more lists some; the
/// coordinator then sends it again one it already has, which it ignores).
pub const HELLO_MODULES_MAX: usize = 64;
// The largest Hello, framed, fits the limit before it is accepted: an agent
// within the bounds is never refused at every Hello for the size of its own.
const _: () = assert!(HELLO_BYTES_MAX + 16 <= HELLO_FRAME_BYTES_MAX);

/// Why an allowlist cannot be an agent's (it would not fit its Hello).
pub fn allowlist_refusal(patterns: &[String]) -> Option<String> {
    if patterns.len() > ALLOW_EXEC_PATTERNS_MAX {
        return Some(format!(
            "{} --allow-exec patterns; the most an agent may have is {ALLOW_EXEC_PATTERNS_MAX} (use wildcards: /opt/app/bin/*)",
            patterns.len()
        ));
    }
    patterns
        .iter()
        .find(|p| p.len() > ALLOW_EXEC_PATTERN_BYTES_MAX)
        .map(|p| {
            format!(
                "the --allow-exec pattern `{}…` is {} bytes; the most allowed is {ALLOW_EXEC_PATTERN_BYTES_MAX}",
                p.chars().take(40).collect::<String>(),
                p.len()
            )
        })
}
/// The largest admin request: a task ([`TASK_SPEC_BYTES_MAX`]) with its
/// sealed values ([`crate::seal::SEALED_BYTES_MAX`]) and room to spare.
pub const ADMIN_REQUEST_BYTES_MAX: usize =
    TASK_SPEC_BYTES_MAX + crate::seal::SEALED_BYTES_MAX + 64 * 1024;

/// Agent → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello {
        /// The last assignment revision this agent applied.
        last_revision: u64,
        /// Run records waiting in its outbox.
        outbox_len: u64,
        agent_version: String,
        /// The programs it allows, for operators (`agent list`).
        allow_exec: Vec<String>,
        /// Its public sealing key (agents 0.5 and later; see
        /// [`crate::seal`]). Last, so an older coordinator ignores it.
        seal_key: Trailing<SealPublicKey>,
        /// Whether it runs functions, its ceilings and the modules it holds
        /// (agents 0.7 and later).
        functions: Trailing<FunctionsHello>,
        /// Its `--allow-env` patterns, at most [`HELLO_ENV_PATTERNS_MAX`]
        /// of at most [`HELLO_ENV_PATTERN_BYTES_MAX`] bytes (agents 0.8 and
        /// later), so `task create` can warn of a variable it would refuse.
        allow_env: Trailing<Vec<String>>,
    },
    Results {
        batch_id: u64,
        runs: Vec<RunRecord>,
    },
    ClockProbe {
        /// Agent's clock when sent (NTP t1).
        t1: Timestamp,
    },
    /// The agent's estimate after a clock exchange, for operators.
    ClockReport {
        offset_ms: i64,
        rtt_ms: i64,
    },
    /// The agent's own figures (only after [`CoordMsg::ReportEvery`]).
    Report(AgentReport),
}

/// Coordinator → agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordMsg {
    Assignments {
        /// When set, `changes` is the whole set: tasks not in it are gone.
        snapshot: bool,
        changes: Vec<AssignmentChange>,
        /// The revision the agent has after applying these.
        upto_revision: u64,
    },
    ResultsAck {
        batch_id: u64,
        /// Every run of the batch, now durably stored.
        keys: Vec<RunKey>,
    },
    ClockReply {
        t1: Timestamp,
        /// Coordinator's clock at receipt (t2) and at reply (t3).
        t2: Timestamp,
        t3: Timestamp,
    },
    /// The session is closed for the reason given.
    Refused { reason: String },
    /// Run one extra occurrence of a task now (`sundialctl task run-now`):
    /// its run key has `scheduled_at = at`. Sent only to agents online at
    /// that moment; an agent that does not know the task ignores it.
    RunNow { task_id: TaskId, at: Timestamp },
    /// How to reconnect when this session ends (sent first in a session).
    Policy(ReconnectPolicy),
    /// Send [`AgentMsg::Report`] when the figures change, at most this
    /// often (clamped to [`REPORT_EVERY_MS_MIN`]..=[`REPORT_EVERY_MS_MAX`]),
    /// and at once after applying assignments. Sent only to agents that
    /// know it ([`agent_knows_reports`]).
    ReportEvery { every_ms: u32 },
    /// A piece of a function's module (agents 0.7 and later), sent before
    /// the assignments that name it; pieces of one module come in order.
    Module {
        hash: crate::wasm::ModuleHash,
        size: u64,
        offset: u64,
        chunk: Vec<u8>,
    },
}

/// What an agent tells of functions in its Hello (0.7 and later).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionsHello {
    /// The device owner allows functions (`--allow-wasm`).
    pub allowed: bool,
    /// Its ceilings: the most fuel, memory and module size a task may have.
    pub fuel_max: u64,
    pub memory_max: u64,
    pub module_max: u64,
    /// Modules it holds (at most [`HELLO_MODULES_MAX`]; the
    /// coordinator sends a module it needs and does not see here).
    pub modules: Vec<crate::wasm::ModuleHash>,
}

/// One change to an agent's assignments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AssignmentChange {
    Upsert(Box<TaskSpec>),
    Cancel { task_id: TaskId, revision: u64 },
}

/// Agent → coordinator on the enrollment ALPN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The secret part of the join token.
    pub token_secret: Vec<u8>,
    /// A PKCS#10 request for the agent's own key (DER).
    pub csr_der: Vec<u8>,
    pub name: Option<String>,
    pub labels: Vec<(String, String)>,
    /// The agent's public sealing key, made beside its certificate's key
    /// (agents 0.5 and later). Last, so an older coordinator ignores it.
    pub seal_key: Trailing<SealPublicKey>,
}

/// A field added at the very end of a message: an older peer's encoder
/// stops before it, so it decodes as absent, and an older peer's decoder
/// ignores it (postcard leaves bytes after a message unread). Only for the
/// last field of a message that is not itself inside another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Trailing<T>(pub Option<T>);

impl<T> Default for Trailing<T> {
    fn default() -> Trailing<T> {
        Trailing(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Trailing<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The message ended before this field: an older peer sent it.
        Ok(Trailing(Option::<T>::deserialize(d).ok().flatten()))
    }
}

impl<T> From<Option<T>> for Trailing<T> {
    fn from(v: Option<T>) -> Trailing<T> {
        Trailing(v)
    }
}

/// Coordinator → agent on the enrollment ALPN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EnrollResponse {
    Enrolled {
        agent_id: AgentId,
        /// The agent's certificate (DER), signed by the CA.
        cert_der: Vec<u8>,
        /// The CA certificate (DER).
        ca_der: Vec<u8>,
    },
    Refused {
        reason: String,
    },
}

/// A task as the admin creates it; the coordinator assigns id and revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskDraft {
    pub name: Option<String>,
    pub target: crate::task::Target,
    pub schedule: crate::Schedule,
    pub action: crate::task::Action,
    pub policies: crate::policy::Policies,
    /// An `every` schedule counts from the coordinator's creation time of the
    /// task (its anchor is replaced by it), so the first occurrence does not
    /// depend on the difference between the admin's clock and the coordinator's.
    pub anchor_at_creation: bool,
    /// Placement (new in 0.6): last, so a draft from an older `sundialctl`
    /// decodes as unplaced.
    pub placement: Trailing<crate::placement::PlacementAsk>,
}

/// The parts of a task `task update` changes; `None` keeps a part as it is.
/// Its target cannot change (create a new task for other agents).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskPatch {
    pub schedule: Option<crate::Schedule>,
    pub action: Option<crate::task::Action>,
    pub env: Option<Vec<(String, String)>>,
    pub cwd: Option<Option<String>>,
    pub misfire: Option<crate::policy::MisfireMode>,
    pub grace: Option<crate::time::DurationMs>,
    pub retries: Option<u32>,
    pub backoff: Option<crate::time::DurationMs>,
    pub backoff_max: Option<crate::time::DurationMs>,
    pub timeout: Option<Option<crate::time::DurationMs>>,
    pub overlap: Option<crate::policy::OverlapPolicy>,
}

/// Admin → coordinator, one per stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    TokenCreate {
        ttl_ms: u64,
        uses: u32,
        labels: Vec<(String, String)>,
    },
    AgentList,
    AgentGet(AgentId),
    AgentRevoke(AgentId),
    TaskCreate(Box<TaskDraft>),
    TaskList,
    TaskGet(TaskId),
    TaskCancel(TaskId),
    /// Changes a task: a new revision; runs going finish as they were.
    TaskUpdate {
        id: TaskId,
        patch: Box<TaskPatch>,
    },
    /// One extra occurrence now, on every online agent the task reaches.
    TaskRunNow(TaskId),
    /// Agents hold no occurrences of a paused task; none is recorded.
    TaskPause(TaskId),
    /// Occurrences count again from the resume.
    TaskResume(TaskId),
    /// Removes a revoked agent from the lists; its runs stay.
    AgentForget(AgentId),
    TokenList,
    /// Revokes the token whose id (see [`TokenInfo::id`]) is given.
    TokenRevoke(String),
    RunList {
        task: Option<TaskId>,
        agent: Option<AgentId>,
        since: Option<Timestamp>,
        limit: u32,
        /// A cursor from an earlier page: the runs after it, oldest first.
        after: Option<String>,
        /// A cursor from an earlier page: the latest runs before it.
        before: Option<String>,
    },
    /// A new named admin credential for the public key in `csr_der` (made
    /// where `sundialctl` runs: the key never travels).
    AdminCreate {
        name: String,
        role: Role,
        ttl_ms: u64,
        csr_der: Vec<u8>,
    },
    AdminList,
    /// A new certificate for `name` (same role), replacing its current one.
    AdminRenew {
        name: String,
        ttl_ms: u64,
        csr_der: Vec<u8>,
    },
    /// Revokes `name`'s credential and closes its connections.
    AdminRevoke(String),
    /// A page of the audit log, oldest first.
    AuditList(AuditQuery),
    /// Runs as they are stored through this coordinator, pushed on the
    /// stream ([`AdminResponse::Following`], then `Runs` pages) until the
    /// client closes it.
    RunFollow {
        task: Option<TaskId>,
        agent: Option<AgentId>,
    },
    /// The public sealing keys of the agents `target` reaches now
    /// ([`AdminResponse::SealKeys`]), for sealing secrets to them.
    SealKeys(crate::task::Target),
    /// Replaces the named sealed variables of a task (a new revision);
    /// those not named stay as they are.
    TaskReseal {
        id: TaskId,
        sealed_env: Vec<crate::seal::SealedEnv>,
    },
    /// Whether the coordinator holds a module ([`AdminResponse::Module`]).
    ModuleGet(crate::wasm::ModuleHash),
    /// A piece of a module to store, in order, each at most
    /// [`crate::wasm::MODULE_CHUNK_BYTES`] (on one connection; a new
    /// module restarts). Answered `Done` until the last, which is checked
    /// and stored, and answered [`AdminResponse::Module`].
    ModuleUpload {
        hash: crate::wasm::ModuleHash,
        size: u64,
        offset: u64,
        chunk: Vec<u8>,
    },
}

/// What an admin may do. Each role may do what the one before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads everything except secrets.
    Viewer,
    /// Also manages tasks and join tokens.
    Operator,
    /// Also manages admins and agents (revoke, forget).
    Owner,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Owner];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Owner => "owner",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown role {s:?}: viewer, operator or owner"))
    }
}

/// Most bytes of an admin's name.
pub const ADMIN_NAME_BYTES_MAX: usize = 64;

/// Why `name` cannot name an admin: lower-case letters, digits, `.`, `_`
/// and `-`, starting with a letter or digit, at most 64 bytes.
pub fn admin_name_refusal(name: &str) -> Option<String> {
    let ok_first = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if name.len() > ADMIN_NAME_BYTES_MAX || !ok_first || !ok_rest {
        return Some(format!(
            "{name:?} is not an admin name: use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, at most {ADMIN_NAME_BYTES_MAX} characters"
        ));
    }
    None
}

/// A named admin credential.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminInfo {
    pub name: String,
    pub role: Role,
    /// The SHA-256 of its current certificate.
    pub cert_sha256: [u8; 32],
    pub created_at: Timestamp,
    /// Who created it (`init` for the first owner).
    pub created_by: String,
    /// Its certificate's end of validity.
    pub expires_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
    /// Its latest connection (to the minute).
    pub last_used: Option<Timestamp>,
}

/// A filtered page of the audit log (as `run list` pages runs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Entries of this admin only.
    pub admin: Option<String>,
    /// Entries about this subject only (`task 12`, `agent a3`, `admin bob`).
    pub subject: Option<String>,
    pub since: Option<Timestamp>,
    /// Refused requests only.
    pub refused: bool,
    pub limit: u32,
    /// Entries after this sequence number, oldest first.
    pub after: Option<u64>,
    /// The latest entries before this sequence number.
    pub before: Option<u64>,
}

/// One entry of the audit log: an admin's change, or a refused request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its place in the log (given by the store; 0 before it is stored).
    pub seq: u64,
    pub at: Timestamp,
    /// The admin's name and certificate fingerprint.
    pub admin: String,
    pub cert_sha256: [u8; 32],
    /// The address the request came from.
    pub from: Option<String>,
    /// The request, e.g. `task create` (never a secret value).
    pub action: String,
    /// What it was about or made: `task 12`, `token 1a2b3c4d`, `admin bob`.
    pub subject: Option<String>,
    /// The task revision the change made.
    pub revision: Option<u64>,
    /// Refused, and why; `None`: done.
    pub refused: Option<String>,
}

impl AuditEntry {
    /// This entry as done, with what the change made.
    pub fn made(&self, subject: Option<String>, revision: Option<u64>) -> AuditEntry {
        AuditEntry {
            subject: subject.or_else(|| self.subject.clone()),
            revision: revision.or(self.revision),
            ..self.clone()
        }
    }

    /// This entry as done, having made `revision` of `task`.
    pub fn for_task(&self, task: TaskId, revision: u64) -> AuditEntry {
        self.made(Some(format!("task {task}")), Some(revision))
    }
}

/// A stored module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub hash: crate::wasm::ModuleHash,
    pub size: u64,
    /// What it imports (`module.name`), for operators.
    pub imports: Vec<String>,
}

/// What the coordinator knows of an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub agent_id: AgentId,
    pub name: Option<String>,
    pub labels: Vec<(String, String)>,
    pub online: bool,
    pub revoked: bool,
    pub enrolled_at: Timestamp,
    /// The last message from the agent (while online: its latest one).
    pub last_seen: Option<Timestamp>,
    pub clock_offset_ms: Option<i64>,
    pub rtt_ms: Option<i64>,
    /// As the agent said in its last Hello.
    pub version: Option<String>,
    /// Programs the agent allows (`--allow-exec`), as its last Hello said.
    pub allow_exec: Vec<String>,
    /// Run records in its outbox: as its last report said (agents 0.3 and
    /// later, in session), else at its last Hello.
    pub outbox_len: Option<u64>,
    /// Its last report in its current session, and when it came.
    pub report: Option<AgentReport>,
    pub reported_at: Option<Timestamp>,
    /// Whether it runs functions, as its last Hello said (0.7 and later).
    pub functions: Option<FunctionsHello>,
    /// Its `--allow-env` patterns, as its last Hello said (0.8 and later).
    pub allow_env: Option<Vec<String>>,
}

/// A task, its state, and what its runs say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub spec: TaskSpec,
    pub cancelled: bool,
    /// Paused: agents hold no occurrences of it until it is resumed.
    pub paused: bool,
    /// A one-shot task whose run is recorded, finally, on every agent it reaches.
    pub done: bool,
    /// Its next occurrence after now (the coordinator's clock).
    pub next: Option<Timestamp>,
    /// The latest run on each agent (in a list: only the latest of all).
    pub last_runs: Vec<LastRun>,
    /// The agents it reaches now (filled by `task get`; empty in a list).
    pub reached: Vec<AgentId>,
    /// When it was created (0.8). `spec.created_at` is when its occurrences
    /// count from: the creation, or its latest resume.
    pub created_at: Timestamp,
    /// `task get` (0.8): its latest runs, this many (all it has, up to
    /// [`REJECTED_LOOKBACK`]), were every one rejected: the agents refuse it.
    pub only_rejected: Option<u32>,
}

/// How many of a task's latest runs `task get` looks through to say that
/// every run was rejected.
pub const REJECTED_LOOKBACK: u32 = 1_000;

/// The latest run of a task on one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    pub agent_id: AgentId,
    pub scheduled_at: Timestamp,
    pub attempt: u32,
    pub outcome: crate::task::Outcome,
    pub finished_at: Option<Timestamp>,
    pub detail: Option<String>,
}

/// A join token as listed (never its secret).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The first 8 hex digits of the secret's SHA-256: names it for `token revoke`.
    pub id: String,
    pub expires_at: Timestamp,
    pub uses_left: u32,
    pub labels: Vec<(String, String)>,
}

/// Coordinator → admin. Lists (`Agents`, `Tasks`, `Runs`) may come as several
/// messages on one stream, each under [`LIST_CHUNK_BYTES_MAX`]; the stream's
/// end ends the list. [`AdminResponse::RunsSummary`] follows a run list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AdminResponse {
    Token(String),
    Agents(Vec<AgentInfo>),
    Agent(Box<AgentInfo>),
    TaskCreated(TaskId),
    Tasks(Vec<TaskInfo>),
    Task(Box<TaskInfo>),
    Runs(Vec<RunRecord>),
    Tokens(Vec<TokenInfo>),
    /// `task run-now`: the instant used, the agents it was sent to, and
    /// those it reaches that were offline (they do not run it).
    RunNowSent {
        at: Timestamp,
        sent: Vec<AgentId>,
        offline: Vec<AgentId>,
    },
    /// `task update`: the task's new revision.
    Updated {
        revision: u64,
    },
    Done,
    Error(String),
    /// After the pages of a run list: how many runs matched in all, and how
    /// many stored records could not be read (skipped, and logged).
    RunsSummary {
        /// Runs stored in all, when no filter applies.
        matched: Option<u64>,
        unreadable: u64,
        /// More runs match beyond the page, in the direction it was read.
        more: bool,
        /// Cursors of the page's first and last run (`--before`, `--after`).
        first: Option<String>,
        last: Option<String>,
    },
    /// A task was created; with warnings for the operator (e.g. a selector
    /// that matches no agent yet).
    TaskCreatedWarn {
        id: TaskId,
        warnings: Vec<String>,
    },
    Admins(Vec<AdminInfo>),
    /// `admin create` or `admin renew`: the admin and its new certificate.
    AdminCert {
        admin: AdminInfo,
        cert_der: Vec<u8>,
    },
    /// A page of the audit log (may come in several messages), then
    /// [`AdminResponse::AuditSummary`].
    Audit(Vec<AuditEntry>),
    AuditSummary {
        /// More entries match beyond the page, in the direction it was read.
        more: bool,
    },
    /// A run follow is on: `Runs` follow as they are stored.
    Following,
    /// The agents a target reaches now and their sealing keys; `missing`:
    /// those that have published none (not yet connected since joining
    /// with 0.5 or later).
    SealKeys {
        keys: Vec<(AgentId, SealPublicKey)>,
        missing: Vec<AgentId>,
    },
    /// A module the coordinator holds (`None`: it holds none by that hash).
    Module(Option<ModuleInfo>),
}

/// Splits `items` into pages whose encoded size stays under `bytes_max`
/// (one item per page at least, so an item larger than that is sent alone).
pub fn chunk_by_size<T: Serialize>(items: Vec<T>, bytes_max: usize) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut page = Vec::new();
    let mut bytes = 0usize;
    for item in items {
        let size = postcard::experimental::serialized_size(&item).unwrap_or(bytes_max);
        if !page.is_empty() && bytes.saturating_add(size) > bytes_max {
            pages.push(std::mem::take(&mut page));
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
        page.push(item);
    }
    if !page.is_empty() || pages.is_empty() {
        pages.push(page);
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_allowed_hello_fits_its_frame_and_a_larger_allowlist_is_refused() {
        // Four-byte characters: the bound is in bytes, not characters.
        let pattern: String = "😀".repeat(ALLOW_EXEC_PATTERN_BYTES_MAX / 4);
        assert_eq!(pattern.len(), ALLOW_EXEC_PATTERN_BYTES_MAX);
        let allow = vec![pattern.clone(); ALLOW_EXEC_PATTERNS_MAX];
        assert_eq!(allowlist_refusal(&allow), None);
        // What a Hello tells of them: the first patterns, each at most so
        // long; and as many environment patterns as it tells.
        let told = "😀".repeat(HELLO_PATTERN_BYTES_MAX / 4);
        let env = "E".repeat(HELLO_ENV_PATTERN_BYTES_MAX);
        let hello = AgentMsg::Hello {
            last_revision: u64::MAX,
            outbox_len: u64::MAX,
            agent_version: "9".repeat(AGENT_VERSION_BYTES_MAX),
            allow_exec: vec![told; HELLO_PATTERNS_MAX],
            seal_key: Some(SealPublicKey([0xff; 32])).into(),
            functions: Some(FunctionsHello {
                allowed: true,
                fuel_max: u64::MAX,
                memory_max: u64::MAX,
                module_max: u64::MAX,
                modules: vec![crate::wasm::ModuleHash([0xff; 32]); HELLO_MODULES_MAX],
            })
            .into(),
            allow_env: Some(vec![env; HELLO_ENV_PATTERNS_MAX]).into(),
        };
        let framed = crate::codec::encode(&hello).expect("encodes");
        assert!(framed.len() <= HELLO_BYTES_MAX + 16, "{}", framed.len());
        assert!(framed.len() <= HELLO_FRAME_BYTES_MAX, "{}", framed.len());
        let mut more = allow.clone();
        more.push("/bin/true".into());
        assert!(allowlist_refusal(&more).is_some_and(|w| w.contains("64")));
        let long = vec![format!("{pattern}x")];
        assert!(allowlist_refusal(&long).is_some_and(|w| w.contains("bytes")));
    }

    /// Hello and the enrollment request as agents before 0.5 encode them.
    #[derive(Serialize)]
    enum OldAgentMsg {
        Hello {
            last_revision: u64,
            outbox_len: u64,
            agent_version: String,
            allow_exec: Vec<String>,
        },
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldEnrollRequest {
        token_secret: Vec<u8>,
        csr_der: Vec<u8>,
        name: Option<String>,
        labels: Vec<(String, String)>,
    }

    #[test]
    fn a_sealing_key_added_last_is_absent_from_old_peers_and_ignored_by_them() {
        let old = OldAgentMsg::Hello {
            last_revision: 3,
            outbox_len: 4,
            agent_version: "0.4.0".into(),
            allow_exec: vec!["/bin/*".into()],
        };
        let bytes = postcard::to_allocvec(&old).expect("encodes");
        let new: AgentMsg = postcard::from_bytes(&bytes).expect("an old Hello decodes");
        let AgentMsg::Hello {
            last_revision,
            seal_key,
            allow_exec,
            ..
        } = new
        else {
            panic!("not a Hello: {new:?}");
        };
        assert_eq!(
            (last_revision, seal_key, allow_exec.len()),
            (3, Trailing(None), 1)
        );

        let key = SealPublicKey([9; 32]);
        let req = EnrollRequest {
            token_secret: vec![1, 2],
            csr_der: vec![3],
            name: Some("d".into()),
            labels: vec![("k".into(), "v".into())],
            seal_key: Some(key).into(),
        };
        let bytes = postcard::to_allocvec(&req).expect("encodes");
        // An old coordinator reads what it knows and leaves the key unread.
        let old: OldEnrollRequest = postcard::from_bytes(&bytes).expect("old decode");
        assert_eq!(old.labels, req.labels);
        assert_eq!(
            postcard::from_bytes::<EnrollRequest>(&bytes).expect("new decode"),
            req
        );
        let from_old = postcard::to_allocvec(&old).expect("encodes");
        let read: EnrollRequest = postcard::from_bytes(&from_old).expect("old request decodes");
        assert_eq!(read.seal_key, Trailing(None));
        assert_eq!(read.token_secret, vec![1, 2]);
    }

    #[test]
    fn a_policy_with_link_timing_reads_in_old_agents_and_an_old_policy_in_new_ones() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        enum OldCoordMsg {
            Assignments,
            ResultsAck,
            ClockReply,
            Refused,
            RunNow,
            Policy(OldPolicy),
        }
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct OldPolicy {
            attempt_timeout_ms: u32,
            backoff_floor_ms: u32,
            backoff_cap_ms: u32,
            busy_spread_ms: u32,
            handshakes_per_sec: u32,
        }
        let link = LinkTiming {
            keep_alive_ms: 10_000,
            silent_ms: 15_000,
            idle_ms: 30_000,
        };
        let new = CoordMsg::Policy(ReconnectPolicy {
            link: Some(link).into(),
            ..ReconnectPolicy::default()
        });
        let bytes = postcard::to_allocvec(&new).expect("encodes");
        let OldCoordMsg::Policy(old) = postcard::from_bytes(&bytes).expect("an old agent reads it")
        else {
            panic!("not a policy");
        };
        assert_eq!(old.attempt_timeout_ms, 3_000);
        let from_old = postcard::to_allocvec(&OldCoordMsg::Policy(old)).expect("encodes");
        let CoordMsg::Policy(read) = postcard::from_bytes(&from_old).expect("a new agent reads it")
        else {
            panic!("not a policy");
        };
        assert_eq!(read.link, Trailing(None));
        let CoordMsg::Policy(read) = postcard::from_bytes(&bytes).expect("decodes") else {
            panic!("not a policy");
        };
        assert_eq!(read.link, Trailing(Some(link)));
        assert_eq!(link.sanitized(), link, "a sane timing is kept as it is");
    }

    #[test]
    fn a_hostile_link_timing_is_clamped_to_a_consistent_one() {
        for (keep, silent, idle) in [
            (0, 0, 0),
            (u32::MAX, u32::MAX, u32::MAX),
            (30_000, 1, 2),
            (1_000, 60_000, 0),
        ] {
            let t = LinkTiming {
                keep_alive_ms: keep,
                silent_ms: silent,
                idle_ms: idle,
            }
            .sanitized();
            assert!((KEEP_ALIVE_MS_MIN..=KEEP_ALIVE_MS_MAX).contains(&t.keep_alive_ms));
            assert!(t.silent_ms > t.keep_alive_ms, "{t:?}");
            assert!(t.idle_ms > t.silent_ms && t.idle_ms <= IDLE_MS_MAX, "{t:?}");
        }
    }

    #[test]
    fn only_agents_from_0_2_are_sent_the_policy() {
        assert!(!agent_knows_policy("0.1.0"));
        assert!(agent_knows_policy("0.2.0"));
        assert!(agent_knows_policy("1.0.3"));
        assert!(!agent_knows_policy("bench"));
        assert!(!agent_knows_policy(""));
        assert!(agent_knows_triggers("0.4.0"));
        assert!(!agent_knows_triggers("0.3.9"));
    }

    #[test]
    fn only_agents_from_0_3_are_asked_for_reports_and_a_lying_report_is_refused() {
        assert!(!agent_knows_reports("0.2.0"));
        assert!(agent_knows_reports("0.3.0"));
        assert!(agent_knows_reports("1.0.0"));
        assert!(!agent_knows_reports("x.y"));
        assert_eq!(AgentReport::default().refusal(), None);
        let far = AgentReport {
            clock_offset_ms: i64::MIN,
            ..AgentReport::default()
        };
        assert!(far.refusal().is_some());
        let empty_but_old = AgentReport {
            oldest_unsynced: Some(Timestamp::from_millis_saturating(1)),
            ..AgentReport::default()
        };
        assert!(empty_but_old.refusal().is_some());
    }

    #[test]
    fn a_busy_reason_carries_its_retry_after_and_a_forged_one_is_bounded() {
        let r = busy_reason(1_234, "too many sessions");
        assert_eq!(busy_retry_after_ms(r.as_bytes()), Some(1_234));
        assert_eq!(busy_retry_after_ms(b"too many sessions; try again"), None);
        assert_eq!(busy_retry_after_ms(b"retry-after-ms=; x"), None);
        assert_eq!(busy_retry_after_ms(&[0xff, 0xfe]), None);
        assert_eq!(
            busy_retry_after_ms(b"retry-after-ms=99999999999999999999"),
            None
        );
        assert_eq!(
            busy_retry_after_ms(b"retry-after-ms=86400000"),
            Some(3_600_000)
        );
    }

    #[test]
    fn chunks_stay_under_the_byte_bound_and_keep_order() {
        let items: Vec<String> = (0..1000).map(|i| format!("{i:0>100}")).collect();
        let pages = chunk_by_size(items.clone(), 10_000);
        assert!(pages.len() > 5);
        for p in &pages {
            let size = postcard::to_allocvec(p).expect("encode").len();
            assert!(size <= 10_000 + 16, "page of {size} bytes");
        }
        let flat: Vec<String> = pages.into_iter().flatten().collect();
        assert_eq!(flat, items);
        assert_eq!(chunk_by_size(Vec::<u8>::new(), 10).len(), 1);
    }
}
