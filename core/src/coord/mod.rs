//! The coordinator as a value: [`CoordNode`] decides everything a
//! coordinator decides — which connections are admitted (handshake budget,
//! per-address pending limit, enrollment slots, session cap), what each
//! connection is for (by ALPN and certificate), Hello and its deadline, one
//! session per agent, the reconnect policy, the agents' sessions
//! ([`CoordSession`]s) with the ownership of their runs, fan-out of task
//! changes to the sessions they target, run-now, revocation closing live
//! sessions, admin requests and enrollment, and retention — in the shape
//! of [`crate::node::AgentNode`]: `handle_*(now, …)` in; effects, per
//! session messages ([`CoordNode::poll_transmit`]), events and the next
//! timeout out. It reads no clock and does no I/O.
//!
//! Store work leaves the node as [`StoreJob`]s: values whose rules live here
//! ([`jobs`], [`admin`]) and which the shell runs against its
//! [`crate::coord_store::CoordStore`] — the coordinator on its blocking pool,
//! many at once, the simulator inline — handing back a [`StoreDone`]. So a
//! large admin listing never holds the node, and the node never waits.
//!
//! Bounds: connections are bounded by the shell's admission through
//! [`CoordNode::handle_incoming`]; per connection, messages not yet pulled
//! by the shell's writer at [`TRANSMIT_BACKLOG_MAX`] (over it, the agent is
//! not reading: closed), frames before the Hello is checked at
//! [`SESSION_INBOX_MAX`], admin requests queued at [`ADMIN_QUEUE_MAX`];
//! `seen` at [`SEEN_MAX`] agents; events at [`EVENTS_MAX`] (the oldest go,
//! counted, when the shell does not drain them).

pub mod admin;
pub mod jobs;
pub mod placement;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::Range;
use std::sync::{Arc, Weak};

use sundial_protocol::wasm::ModuleHash;

use sundial_protocol::codec::FRAME_BYTES_MAX;
use sundial_protocol::task::Target;
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    busy_reason, close, AdminRequest, AdminResponse, AgentMsg, AgentReport, AuditEntry, CoordMsg,
    EnrollRequest, EnrollResponse, LinkTiming, ReconnectPolicy, HELLO_FRAME_BYTES_MAX,
    KEEP_ALIVE_MS_MAX, KEEP_ALIVE_MS_MIN,
};
use sundial_protocol::{AgentId, DurationMs, TaskId, Timestamp};

use crate::admission::{Admit, HandshakeBudget};
use crate::coord_store::{
    targets, AgentSeen, CertRole, Enrollment, QueuedRunNow, SessionMark, StoreError, TokenRefusal,
};
use crate::session::coordinator::{
    CoordEffect, CoordSession, Told, UploadAllowance, UploadLimits, CHANGES_PAGE_MAX,
};
use crate::session::{Event, Now};

pub use admin::{
    AdminAnswer, AdminChange, AdminContext, FollowUp, SeenView, Signed, ENTROPY_BYTES,
};
pub use jobs::{Assigned, FeedPage, RunFacts, RunNowAudited, RunsVerdict, StoreDone, StoreJob};

/// A connection, as the node names it.
pub type ConnId = u64;

/// A coordinator is behind when this many connections admitted over
/// [`BEHIND_MS`] ago are still starting (handshaking, or before their
/// Hello is checked): it refuses new ones until they are served.
pub const STARTING_MIN: usize = 64;
/// See [`STARTING_MIN`], ms.
pub const BEHIND_MS: u64 = 1_000;
/// How long an enrollment or admin exchange may take, how long a new agent
/// connection may take to say Hello, and how long an admin connection may
/// sit idle, ms.
pub const EXCHANGE_TIMEOUT_MS: u64 = 10_000;
/// Messages for one session that the shell's writer has not pulled yet;
/// beyond, the agent is not reading what it is sent and the session closes.
/// An honest session holds a page of assignments, the acks of its batches
/// in flight and a few clock replies.
pub const TRANSMIT_BACKLOG_MAX: usize = 256;
/// Frames an agent may send after its Hello and before the Hello is checked
/// (more than the result batches it keeps in flight).
pub const SESSION_INBOX_MAX: usize = 16;
/// Admin requests waiting for one of the admin slots; beyond, refused.
pub const ADMIN_QUEUE_MAX: usize = 64;
/// Agents whose last session's details (version, allowlist, upload
/// allowance) are remembered; when full, those of offline agents go.
pub const SEEN_MAX: usize = 1 << 20;
/// Events not yet drained; beyond, the oldest go (and are counted).
pub const EVENTS_MAX: usize = 4_096;
/// Run records deleted per store job by retention.
pub const PURGE_BATCH_RUNS_MAX: usize = 10_000;
/// How often retention looks for old runs, ms.
pub const PURGE_INTERVAL_MS: u64 = 60_000;
/// Retention first looks this soon after the start, ms (a coordinator
/// restarted with a shorter retention applies it at once, not a minute on).
pub const PURGE_FIRST_MS: u64 = 10_000;
/// Connections from one address still handshaking or enrolling, by default.
pub const PENDING_PER_ADDRESS_MAX: usize = 32;
/// The handshake budget per core, by default.
pub const HANDSHAKES_PER_SEC_PER_CORE: u32 = 250;
/// How long agents are asked to let one connection attempt last, ms.
pub const ATTEMPT_TIMEOUT_MS: u32 = 3_000;
/// The first backoff agents are asked to use, ms.
pub const BACKOFF_FLOOR_MS: u32 = 250;
/// The backoff cap agents are asked to use at least / at most, ms: between,
/// the time the whole fleet needs to reconnect at the handshake budget.
pub const BACKOFF_CAP_MIN_MS: u32 = 1_000;
pub const BACKOFF_CAP_MAX_MS: u32 = 60_000;
/// Keep-alives the coordinator sends per second across its fleet, at most
/// (one way; each is answered by one acknowledgement): a fleet of up to
/// this many agents is pinged every second, a larger one less often, up
/// to [`KEEP_ALIVE_MS_MAX`] apart. Measured: 10,000 agents pinged every
/// second cost the coordinator 28% of a core, every 10 s 15–29%, so
/// keep-alives are cheap at this rate; what a longer interval costs is
/// time — agents take a restarted coordinator for gone only after the
/// idle timeout.
pub const KEEP_ALIVES_PER_SEC: u64 = 5_000;
/// How often the fleet's size is counted again for [`link_for_fleet`], ms.
const FLEET_COUNT_EVERY_MS: u64 = 1_000;
/// How long agents' clock reports are gathered before they are stored in
/// one job, at most, ms: `agent list` shows a clock that much later.
pub const CLOCKS_STORE_EVERY_MS: u64 = 1_000;

/// How a session is kept alive in a fleet of `fleet` agents: keep-alives
/// [`KEEP_ALIVES_PER_SEC`] a second across the fleet (whole seconds, 1 to
/// 30 s apart); silence after one and a half intervals (at least 2.5 s);
/// the idle timeout after three (at least 5 s). A fleet of up to 5,000
/// agents gets 1 s / 2.5 s / 5 s; 10,000 get 2 s / 3.5 s / 6 s; 50,000
/// get 10 s / 15 s / 30 s; 150,000 and more 30 s / 45 s / 90 s.
pub fn link_for_fleet(fleet: u64) -> LinkTiming {
    let secs = fleet.div_ceil(KEEP_ALIVES_PER_SEC).max(1);
    let keep = secs
        .saturating_mul(1_000)
        .clamp(u64::from(KEEP_ALIVE_MS_MIN), u64::from(KEEP_ALIVE_MS_MAX));
    let silent = keep + (keep / 2).max(1_500);
    let idle = (3 * keep).max(5_000);
    let as_u32 = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    LinkTiming {
        keep_alive_ms: as_u32(keep),
        silent_ms: as_u32(silent),
        idle_ms: as_u32(idle),
    }
    .sanitized()
}
/// How often a coordinator whose store other coordinators share reads what
/// they changed (tasks, certificates, run-nows), ms: a change made through
/// one reaches the sessions another holds within about this.
pub const FEED_INTERVAL_MS: u64 = 500;
/// Items one feed read takes of each feed; when there were more, the next
/// read follows at once.
pub const FEED_PAGE_MAX: usize = 1_000;

// The largest Hello must fit the frame limit before the Hello (checked by
// the agent's allowlist bounds), and that limit must be below the session's.
const _: () = assert!(HELLO_FRAME_BYTES_MAX < FRAME_BYTES_MAX);
const _: () = assert!(SESSION_INBOX_MAX >= crate::session::agent::BATCHES_IN_FLIGHT_MAX);
const _: () = assert!(TRANSMIT_BACKLOG_MAX > 2 * crate::session::agent::BATCHES_IN_FLIGHT_MAX);

/// The coordinator's limits; each is documented in the README and set by
/// `serve` flags or the configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Run records one agent may upload per second (sustained; a burst of
    /// one second's worth is allowed). Above it, the coordinator reads the
    /// agent's uploads more slowly: back-pressure, nothing is lost.
    pub upload_runs_per_sec: u32,
    /// Bytes of run records one agent may upload per second (as above).
    pub upload_bytes_per_sec: u64,
    /// The shortest `every` period a task may have.
    pub period_min: DurationMs,
    /// The shortest first retry delay a task with retries may have.
    pub backoff_min: DurationMs,
    /// Runs scheduled longer ago than this are deleted; `None` keeps all.
    pub run_retention: Option<DurationMs>,
    /// Audit entries older than this are deleted; `None` keeps all.
    pub audit_retention: Option<DurationMs>,
    /// Agent sessions served at once.
    pub sessions_max: usize,
    /// Connections without a client certificate (enrollment) served at once.
    pub unauthenticated_max: usize,
    /// Admin requests served at once (each a store job of its own).
    pub admin_concurrent_max: usize,
    /// Connections from one address still handshaking or enrolling.
    pub pending_per_address_max: usize,
    /// New connections accepted per second (handshakes are the costly part
    /// of a reconnect storm); the rest are refused at once, before any
    /// cryptography, and agents come back spread over the time the
    /// coordinator's reconnect policy says the fleet needs.
    pub handshakes_per_sec: u32,
    /// Agents (0.3 and later) report their own figures (backlog, clock,
    /// tasks, store size) when they change, at most this often.
    pub agent_report_every: DurationMs,
    /// The largest function module an operator may upload, bytes.
    pub wasm_module_max: u64,
}

/// How often agents report their figures by default.
pub const AGENT_REPORT_EVERY_DEFAULT_MS: u64 = 15_000;
/// Revisions whose announcement time the node remembers, to measure how
/// long a change took to reach the agents (the assignment lag).
pub const REVISION_TIMES_MAX: usize = 4_096;

impl Limits {
    /// The defaults on a machine with `cores` cores.
    pub fn for_cores(cores: usize) -> Limits {
        let cores = u32::try_from(cores.max(1)).unwrap_or(u32::MAX);
        Limits {
            upload_runs_per_sec: 2_000,
            upload_bytes_per_sec: 8 * 1024 * 1024,
            period_min: DurationMs(100),
            backoff_min: DurationMs(100),
            run_retention: None,
            audit_retention: Some(DurationMs(AUDIT_RETENTION_DEFAULT_MS)),
            sessions_max: 10_000,
            unauthenticated_max: 64,
            admin_concurrent_max: 4,
            pending_per_address_max: PENDING_PER_ADDRESS_MAX,
            handshakes_per_sec: HANDSHAKES_PER_SEC_PER_CORE.saturating_mul(cores),
            agent_report_every: DurationMs(AGENT_REPORT_EVERY_DEFAULT_MS),
            wasm_module_max: sundial_protocol::wasm::MODULE_BYTES_DEFAULT,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::for_cores(1)
    }
}

/// Run follows (`run list --follow`) served at once.
pub const FOLLOWERS_MAX: usize = 64;

/// How long audit entries are kept unless configured: two years.
pub const AUDIT_RETENTION_DEFAULT_MS: u64 = 2 * 365 * 24 * 60 * 60 * 1000;
/// How often an admin's last use is written (per admin).
pub const ADMIN_USED_WRITE_MS: u64 = 60_000;

/// An admin, by its certificate's fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AdminId(pub [u8; 32]);

impl std::fmt::Display for AdminId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "admin:{}", sundial_protocol::token::hex(&self.0[..4]))
    }
}

/// What a connection asked for in its handshake (its ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    Session,
    Enroll,
    Admin,
    Other,
}

/// What a handshaken connection is, for the shell's reading of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Read one enrollment request (at most `ENROLL_FRAME_BYTES_MAX`).
    Enroll,
    /// Read the agent's messages ([`CoordNode::frame_limit`] before each).
    Session(AgentId),
    /// Read admin requests, one per stream.
    Admin(AdminId),
    /// Refused: an [`Effect::Close`] says how.
    Refused,
}

/// Why a new connection was refused before any cryptography.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its address has its maximum of connections not yet known.
    PendingPerAddress,
    /// The handshake budget (or the address's share of it) is spent.
    Budget(Admit),
    /// [`STARTING_MIN`] connections admitted over [`BEHIND_MS`] ago are
    /// still starting (handshaking, or not yet past Hello): the coordinator
    /// is behind (its CPU is busy), and one more would only wait, time out
    /// at the agent and be dialed again.
    Behind,
}

/// Why a connection was refused after its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnRefusal {
    /// The ALPN needs a known certificate and none was shown.
    CertRequired,
    /// Enrollment slots are full.
    EnrollBusy,
    /// An admin credential past its end of validity.
    CertExpired,
}

/// What an admin whose credential expired is told.
fn expired_reason(cert: &crate::coord_store::AdminCert) -> String {
    format!(
        "the credential of admin {:?} expired at {}; an owner can renew it with `sundialctl admin renew {}`",
        cert.name, cert.expires_at, cert.name
    )
}

/// Why an enrollment was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnrollRefusal {
    Token(TokenRefusal),
    Name(String),
    /// The certificate request could not be signed.
    Csr(String),
    /// The store failed.
    Store,
}

/// Why a connection is being closed by the node, for events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseWhy {
    NoHelloInTime,
    NotHello,
    NoRequestInTime,
    Idle,
    /// The agent does not read what it is sent.
    NotReading,
    /// Frames before the Hello was checked, over [`SESSION_INBOX_MAX`].
    TooEarly,
    StoreFailed,
    Revoked,
    Replaced,
    Busy,
    /// An admin's credential expired, or was revoked or replaced.
    AdminCredential,
    /// The session machine closed it (a refused batch, Hello twice, …).
    Protocol,
}

/// What the coordinator node decided, for observers; the shells log these
/// and the simulator checks them.
#[derive(Clone, Debug, PartialEq)]
pub enum CoordEvent {
    /// A placed task's lease windows were planned ahead: `windows` new ones
    /// under `revision`, seating `members`.
    LeasesPlanned {
        task: TaskId,
        revision: u64,
        windows: usize,
        members: usize,
    },
    /// A new connection refused before any cryptography.
    Shed {
        ip: IpAddr,
        why: Refusal,
    },
    ConnRefused {
        ip: IpAddr,
        why: ConnRefusal,
    },
    Closing {
        conn: ConnId,
        agent: Option<AgentId>,
        why: CloseWhy,
    },
    /// Refused for the session cap: the agent comes back after this.
    SessionBusy {
        agent: AgentId,
        retry_after_ms: u64,
    },
    SessionReplaced {
        agent: AgentId,
    },
    AgentSessionDown {
        agent: AgentId,
    },
    /// An agent ahead of the store: it was restored from an older backup.
    StoreBehind {
        agent: AgentId,
        agent_revision: u64,
        lost: Range<u64>,
        revision: u64,
    },
    /// Records of tasks the store does not know, acknowledged and dropped.
    RunsOfUnknownTask {
        agent: AgentId,
        task: sundial_protocol::TaskId,
    },
    /// A different record for a run already stored: the first stands.
    RunConflict {
        agent: AgentId,
        key: crate::coord_store::RunKeyOf,
    },
    ChangeAnnounced {
        revision: u64,
        sessions: usize,
    },
    AdminChanged {
        by: AdminId,
        change: AdminChange,
    },
    AdminRefused {
        by: AdminId,
        why: String,
    },
    /// An entry written to the audit log (its `seq` is the store's, 0 here).
    Audited(AuditEntry),
    /// An agent reported it applied the change of `revision` (the oldest
    /// it had not), `lag_ms` after this node announced it.
    AssignmentApplied {
        agent: AgentId,
        revision: u64,
        lag_ms: u64,
    },
    /// Run records stored for the first time (a resend is not among them):
    /// what metrics count and alerts watch.
    RunsRecorded {
        runs: Vec<RunFacts>,
    },
    AgentRevoked {
        agent: AgentId,
        by: AdminId,
        sessions_closed: usize,
    },
    Enrolled {
        agent: AgentId,
        name: Option<String>,
    },
    EnrollRefused {
        why: EnrollRefusal,
    },
    RunsPurged {
        deleted: usize,
        before: Timestamp,
    },
    /// Audit entries before `before` were deleted (audit retention).
    AuditPurged {
        before: Timestamp,
    },
    /// A store operation failed; `unavailable` ones stop the coordinator
    /// (unless its store reconnects by itself: [`CoordConfig::shared`]).
    StoreFailed {
        error: StoreError,
    },
    /// An agent revoked through another coordinator (read from the store's
    /// certificate feed): its sessions here are closed.
    AgentRevokedElsewhere {
        agent: AgentId,
        sessions_closed: usize,
    },
    /// What the shared store's feeds brought: task changes announced,
    /// certificates added and revoked, run-nows delivered here.
    FeedApplied {
        tasks: usize,
        certs_added: usize,
        certs_revoked: usize,
        run_nows: usize,
    },
    /// Run-nows for agents not in session here, left in the shared store
    /// for the coordinator that holds their session.
    RunNowQueued {
        agents: usize,
    },
    /// Events were dropped because nobody drained them.
    EventsDropped {
        count: u64,
    },
    /// One of the session machines' events.
    Session(Event),
}

/// What the shell must do.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Run this against the store; hand the result to `handle_store_done`.
    Store(StoreJob),
    /// Sign a CSR with the CA; answer `handle_signed`.
    Sign {
        conn: ConnId,
        signee: Signee,
        csr_der: Vec<u8>,
    },
    /// This session has messages: pull them with `poll_transmit`.
    Transmit(ConnId),
    /// Close the connection now.
    Close {
        conn: ConnId,
        code: u32,
        reason: String,
    },
    /// The answers to an admin request; then finish its stream.
    AdminReply {
        conn: ConnId,
        req: u64,
        answers: Vec<AdminResponse>,
    },
    /// More answers on a followed request's stream (which stays open); if
    /// the shell cannot pass them on, it ends the follow
    /// (`handle_follow_end`).
    AdminPush {
        conn: ConnId,
        req: u64,
        answers: Vec<AdminResponse>,
    },
    /// The answer to an enrollment; then finish its stream.
    EnrollReply {
        conn: ConnId,
        response: EnrollResponse,
    },
    /// The store failed to write: stop, so that a restart reopens it.
    Stop,
}

/// Whom a certificate is signed for ([`Effect::Sign`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signee {
    /// An enrolling agent.
    Agent(AgentId),
    /// An admin (`admin create` or `admin renew`, request `req` on the
    /// connection), valid until `expires_at`.
    Admin {
        req: u64,
        name: String,
        expires_at: Timestamp,
    },
}

/// What a session's writer pulls.
#[derive(Clone, Debug, PartialEq)]
pub enum Outgoing {
    Msg(CoordMsg),
    /// Everything before was sent: close with this.
    Close {
        code: u32,
        reason: String,
    },
}

/// Bugs the simulator seeds into the node to prove its checks catch them.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoordBugs {
    /// Acknowledge a result batch before the store has committed it.
    pub ack_before_commit: bool,
    /// Fan-out forgets agents that enrolled while the node ran (later
    /// joiners learn of changes only at their next Hello).
    pub miss_later_joiners: bool,
    /// A revocation closes no live session.
    pub revoke_leaves_open: bool,
    /// On a shared store, task changes read from the feed wake no session
    /// (agents in session here learn of other coordinators' changes only
    /// at their next Hello).
    pub deaf_to_feed: bool,
    /// Placement plans a lease window again before it ended, with whoever
    /// is in session then (a member cut off still fires its old share).
    pub replan_leases: bool,
    /// A session takes the modules it sent as still held after it sent a
    /// removal (after which the agent may have dropped them).
    pub trust_dropped_modules: bool,
}

/// What the node needs to start.
#[derive(Clone, Debug)]
pub struct CoordConfig {
    pub limits: Limits,
    /// The CA certificate (DER), sent to enrolled agents.
    pub ca_der: Vec<u8>,
    /// The store's revision at start.
    pub revision: u64,
    /// Every known certificate (from the store's pages).
    pub known_certs: Vec<([u8; 32], CertRole)>,
    /// Other coordinators share the store: follow its feeds.
    pub shared: Option<Shared>,
    pub bugs: CoordBugs,
    /// The placed tasks of the store ([`placement::placed_tasks`]).
    pub placed: Vec<TaskId>,
}

/// A store shared by several coordinators (see [`CoordConfig::shared`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shared {
    /// The store's certificate sequence, read before `known_certs`.
    pub cert_seq: u64,
    /// How often the feeds are read, ms ([`FEED_INTERVAL_MS`]).
    pub feed_interval_ms: u64,
    /// This coordinator, among those sharing the store (drawn at start):
    /// the store marks the sessions it holds with it.
    pub holder: u64,
}

/// Where this node is in a shared store's feeds.
#[derive(Debug)]
struct Feed {
    holder: u64,
    interval_ms: u64,
    revision: u64,
    cert_seq: u64,
    next_ms: u64,
    reading: bool,
}

/// What the last session of an agent said, kept for `agent list`.
#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<String>,
    allow_exec: Vec<String>,
    allow_env: Option<Vec<String>>,
    outbox_len: Option<u64>,
    last_contact: Option<Timestamp>,
    /// What its last session left of its upload limits.
    uploads: Option<UploadAllowance>,
    /// Its last report, and when it came.
    report: Option<(AgentReport, Timestamp)>,
    /// The revision it said it applied (at Hello, then in reports).
    applied: Option<u64>,
    /// What its last Hello said of functions (0.7 and later).
    functions: Option<sundial_protocol::wire::FunctionsHello>,
}

/// The figures the agents in session with one coordinator reported,
/// summed (see [`CoordNode::fleet_figures`]). Each coordinator sums its own
/// sessions: across coordinators, sum them (maxima: take the largest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetFigures {
    /// Agents in session that reported (0.3 and later).
    pub reporting: u64,
    /// Run records waiting in the agents' outboxes (an agent that does not
    /// report counts with its Hello's figure).
    pub outbox_runs: u64,
    pub outbox_max_runs: u64,
    /// How long ago the oldest unsynced run among them ended, ms.
    pub oldest_unsynced_age_ms: Option<u64>,
    /// Tasks the agents store, summed.
    pub tasks_stored: u64,
    /// Runs going now.
    pub running: u64,
    /// The agents' stores on disk, bytes.
    pub store_bytes: u64,
    /// Agents whose clock no coordinator vouched for in this boot.
    pub clock_unvouched: u64,
    /// Agents holding their firing (the clock went back).
    pub clock_held: u64,
}

#[derive(Debug)]
struct Hello {
    last_revision: u64,
    outbox_len: u64,
    knows_policy: bool,
    knows_reports: bool,
    knows_triggers: bool,
    knows_sealed: bool,
    knows_placement: bool,
    knows_wasm: bool,
    functions: Option<sundial_protocol::wire::FunctionsHello>,
}

#[derive(Debug)]
struct LiveSession {
    sm: CoordSession,
    labels: Vec<(String, String)>,
    cache: Option<Assigned>,
    lost: Option<(Range<u64>, u64)>,
    /// Closing after its messages are pulled.
    closing: Option<(u32, String)>,
    /// An [`Effect::Transmit`] is out and not yet pulled dry.
    notified: bool,
    /// Came up after the node started (for a seeded bug).
    later: bool,
    /// Its agent follows lease windows (0.6 and later): a member of placed tasks.
    placement: bool,
}

#[derive(Debug)]
enum Phase {
    AwaitHello,
    Checking(Hello, VecDeque<AgentMsg>),
    Live(Box<LiveSession>),
    Closed,
}

#[derive(Debug)]
enum Kind {
    Handshaking,
    Enroll {
        request: Option<Box<EnrollRequest>>,
        answered: bool,
    },
    Admin {
        who: AdminId,
        busy: usize,
        /// A module being uploaded on this connection, piece by piece.
        upload: Option<Box<sundial_protocol::wasm::Assembly>>,
    },
    Session {
        agent: AgentId,
        phase: Phase,
    },
}

#[derive(Debug)]
struct Conn {
    ip: IpAddr,
    /// Counted against its address.
    pending: bool,
    /// Admitted then (boot clock, ms), not yet in session: counted in
    /// [`CoordNode::starting`].
    starting: Option<u64>,
    /// Counted against the enrollment slots.
    unauthenticated: bool,
    deadline: Option<u64>,
    /// The instant this connection is registered at in the timers.
    armed: Option<u64>,
    closed: bool,
    kind: Kind,
    /// Its keep-alives and idle timeout, chosen when it was admitted.
    link: LinkTiming,
}

/// The coordinator node (see the module docs).
#[derive(Debug)]
pub struct CoordNode {
    limits: Limits,
    ca_der: Vec<u8>,
    ca_sha256: [u8; 32],
    bugs: CoordBugs,
    known: HashMap<[u8; 32], CertRole>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    live: BTreeMap<AgentId, ConnId>,
    seen: HashMap<AgentId, Seen>,
    /// Recent revisions and when this node announced them (monotonic ms).
    revision_times: VecDeque<(u64, u64)>,
    pending: HashMap<IpAddr, usize>,
    unauthenticated: usize,
    sessions_open: usize,
    /// Agents enrolled (certificates of agents known), counted at most
    /// every [`FLEET_COUNT_EVERY_MS`], and when (monotonic ms).
    fleet_counted: Option<(u64, usize)>,
    /// Clock reports not yet stored, the latest per agent: stored together
    /// every [`CLOCKS_STORE_EVERY_MS`] (100,000 agents report 3,300 times
    /// a second; one store commit each took the coordinator's CPU).
    clocks: BTreeMap<AgentId, AgentSeen>,
    /// When the reports waiting are stored (monotonic ms), and whether a
    /// store job has them now.
    clocks_next_ms: Option<u64>,
    clocks_storing: bool,
    budget: HandshakeBudget,
    /// Connections admitted and not yet in session (handshaking, or before
    /// their Hello was checked), by when they were admitted
    /// ([`Conn::starting`]).
    starting: std::collections::BTreeSet<(u64, ConnId)>,
    revision: u64,
    timers: BTreeSet<(u64, ConnId)>,
    admin_running: usize,
    admin_waiting: VecDeque<StoreJob>,
    /// Admin creates and renews waiting for their certificate.
    signing: HashMap<(ConnId, u64), StoreJob>,
    /// Run follows: (connection, request) → (task, agent) filter.
    followers: BTreeMap<(ConnId, u64), (Option<TaskId>, Option<AgentId>)>,
    /// When each admin's last use was last written (monotonic ms).
    admin_used: HashMap<[u8; 32], u64>,
    next_purge_ms: Option<u64>,
    purging: bool,
    purging_audit: bool,
    purged: usize,
    broken: bool,
    feed: Option<Feed>,
    effects: VecDeque<Effect>,
    events: VecDeque<CoordEvent>,
    events_dropped: u64,
    /// Agents enrolled through this node 10 s after it started or later,
    /// kept only for a seeded bug.
    joined: BTreeSet<AgentId>,
    started_ms: u64,
    /// Placed tasks and when each is next planned (wall ms; 0: at once).
    placed: BTreeMap<TaskId, i64>,
    /// Modules queued to sessions, shared (see `share_modules`).
    module_copies: HashMap<ModuleHash, Weak<Vec<u8>>>,
    /// The next look for placed tasks due (monotonic ms); `None`: none
    /// is placed.
    next_plan_ms: Option<u64>,
    /// A planning job is out.
    planning: bool,
    plan_clock: placement::PlanClock,
}

impl CoordNode {
    pub fn new(now: Now, config: CoordConfig) -> CoordNode {
        let ca_sha256 = sha256(&config.ca_der);
        CoordNode {
            budget: HandshakeBudget::new(config.limits.handshakes_per_sec, now.mono_ms),
            starting: std::collections::BTreeSet::new(),
            next_purge_ms: (config.limits.run_retention.is_some()
                || config.limits.audit_retention.is_some())
            .then_some(now.mono_ms + PURGE_FIRST_MS),
            limits: config.limits,
            ca_der: config.ca_der,
            ca_sha256,
            bugs: config.bugs,
            known: config.known_certs.into_iter().collect(),
            conns: BTreeMap::new(),
            next_conn: 0,
            live: BTreeMap::new(),
            seen: HashMap::new(),
            revision_times: VecDeque::new(),
            pending: HashMap::new(),
            unauthenticated: 0,
            sessions_open: 0,
            fleet_counted: None,
            clocks: BTreeMap::new(),
            clocks_next_ms: None,
            clocks_storing: false,
            revision: config.revision,
            feed: config.shared.map(|s| Feed {
                holder: s.holder,
                interval_ms: s.feed_interval_ms.max(1),
                revision: config.revision,
                cert_seq: s.cert_seq,
                next_ms: now.mono_ms + s.feed_interval_ms.max(1),
                reading: false,
            }),
            timers: BTreeSet::new(),
            admin_running: 0,
            admin_waiting: VecDeque::new(),
            signing: HashMap::new(),
            followers: BTreeMap::new(),
            admin_used: HashMap::new(),
            purging: false,
            purging_audit: false,
            purged: 0,
            broken: false,
            effects: VecDeque::new(),
            events: VecDeque::new(),
            events_dropped: 0,
            joined: BTreeSet::new(),
            started_ms: now.mono_ms,
            next_plan_ms: (!config.placed.is_empty()).then_some(now.mono_ms),
            placed: config.placed.into_iter().map(|t| (t, 0)).collect(),
            module_copies: HashMap::new(),
            planning: false,
            plan_clock: placement::PlanClock::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Who a client certificate belongs to, for the TLS layer: unknown and
    /// revoked certificates fail the handshake.
    pub fn cert_role(&self, fingerprint: &[u8; 32]) -> Option<CertRole> {
        self.known.get(fingerprint).cloned()
    }

    /// Agent sessions open.
    pub fn sessions_open(&self) -> usize {
        self.sessions_open
    }

    /// Whether the node stopped for a failed embedded store.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Whether `agent` has a live session.
    pub fn is_online(&self, agent: AgentId) -> bool {
        self.live.contains_key(&agent)
    }

    /// The newest revision announced.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Connections the node tracks.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// What agents are asked to follow when reconnecting: the time the
    /// fleet needs to come back at the handshake budget sets the backoff
    /// cap and the spread of refused agents.
    pub fn reconnect_policy(&self) -> ReconnectPolicy {
        self.reconnect_policy_with(None)
    }

    /// The reconnect policy, with the link timing of the session it is
    /// sent in.
    fn reconnect_policy_with(&self, link: Option<LinkTiming>) -> ReconnectPolicy {
        let budget = u64::from(self.limits.handshakes_per_sec.max(1));
        // The fleet as last counted: refused agents come back over the time
        // all of it needs, not only those in session now (none, after a
        // cut).
        let counted = self.fleet_counted.map_or(0, |(_, n)| n);
        let fleet = counted.max(self.sessions_open) as u64 + 1;
        let need_ms = (fleet * 1_000 / budget).min(u64::from(u32::MAX)) as u32;
        ReconnectPolicy {
            attempt_timeout_ms: ATTEMPT_TIMEOUT_MS,
            backoff_floor_ms: BACKOFF_FLOOR_MS,
            backoff_cap_ms: need_ms.clamp(BACKOFF_CAP_MIN_MS, BACKOFF_CAP_MAX_MS),
            busy_spread_ms: need_ms.clamp(1_000, BACKOFF_CAP_MAX_MS),
            handshakes_per_sec: self.limits.handshakes_per_sec,
            link: link.into(),
        }
    }

    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<CoordEvent> {
        if self.events_dropped > 0 {
            let count = std::mem::take(&mut self.events_dropped);
            return Some(CoordEvent::EventsDropped { count });
        }
        self.events.pop_front()
    }

    /// When `handle_timeout` is next due (monotonic ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        let feed = self.feed.as_ref().filter(|f| !f.reading).map(|f| f.next_ms);
        [
            self.timers.first().map(|(t, _)| *t),
            self.next_purge_ms.filter(|_| !self.purging),
            feed,
            self.next_plan_ms.filter(|_| !self.broken && !self.planning),
            self.clocks_next_ms.filter(|_| !self.clocks_storing),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether other coordinators share this node's store.
    pub fn is_shared(&self) -> bool {
        self.feed.is_some()
    }

    /// The largest frame the connection may send next.
    pub fn frame_limit(&self, conn: ConnId) -> usize {
        match self.conns.get(&conn).map(|c| &c.kind) {
            Some(Kind::Session {
                phase: Phase::AwaitHello,
                ..
            }) => HELLO_FRAME_BYTES_MAX,
            Some(Kind::Session { .. }) => FRAME_BYTES_MAX,
            Some(Kind::Enroll { .. }) => sundial_protocol::wire::ENROLL_FRAME_BYTES_MAX,
            Some(Kind::Admin { .. }) => sundial_protocol::wire::ADMIN_REQUEST_BYTES_MAX,
            _ => HELLO_FRAME_BYTES_MAX,
        }
    }

    fn event(&mut self, e: CoordEvent) {
        if self.events.len() >= EVENTS_MAX {
            self.events.pop_front();
            self.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    fn store_failed(&mut self, error: StoreError) {
        // A shared store is a server the store reconnects to by itself:
        // what failed is refused (sessions closed, admins told) and tried
        // again, without a restart. An embedded store that failed to write
        // is reopened by a restart.
        let stop = error.is_unavailable() && !self.broken && self.feed.is_none();
        self.event(CoordEvent::StoreFailed { error });
        if stop {
            self.broken = true;
            self.effects.push_back(Effect::Stop);
        }
    }

    // ---- connections

    /// A new connection from `ip`, before any cryptography: admitted (its
    /// id) or refused (the shell refuses it at once).
    pub fn handle_incoming(&mut self, now: Now, ip: IpAddr) -> Result<ConnId, Refusal> {
        let n = self.pending.get(&ip).copied().unwrap_or(0);
        if n >= self.limits.pending_per_address_max {
            self.event(CoordEvent::Shed {
                ip,
                why: Refusal::PendingPerAddress,
            });
            return Err(Refusal::PendingPerAddress);
        }
        if self.behind(now) {
            self.event(CoordEvent::Shed {
                ip,
                why: Refusal::Behind,
            });
            return Err(Refusal::Behind);
        }
        let admit = self.budget.take(now.mono_ms, ip);
        if admit != Admit::Yes {
            self.event(CoordEvent::Shed {
                ip,
                why: Refusal::Budget(admit),
            });
            return Err(Refusal::Budget(admit));
        }
        *self.pending.entry(ip).or_insert(0) += 1;
        self.next_conn += 1;
        let conn = self.next_conn;
        self.starting.insert((now.mono_ms, conn));
        let link = link_for_fleet(self.fleet_size(now) as u64);
        self.conns.insert(
            conn,
            Conn {
                link,
                ip,
                pending: true,
                starting: Some(now.mono_ms),
                unauthenticated: false,
                deadline: None,
                armed: None,
                closed: false,
                kind: Kind::Handshaking,
            },
        );
        Ok(conn)
    }

    /// The agents this coordinator serves: those enrolled, or those in
    /// session if more (a store shared with other coordinators).
    fn fleet_size(&mut self, now: Now) -> usize {
        let fresh = self
            .fleet_counted
            .filter(|(at, _)| now.mono_ms < at + FLEET_COUNT_EVERY_MS);
        let enrolled = match fresh {
            Some((_, n)) => n,
            None => {
                let n = self
                    .known
                    .values()
                    .filter(|r| matches!(r, CertRole::Agent(_)))
                    .count();
                self.fleet_counted = Some((now.mono_ms, n));
                n
            }
        };
        enrolled.max(self.sessions_open)
    }

    /// The keep-alive interval and idle timeout of an admitted connection:
    /// its QUIC transport is set from them (`None`: not a connection of
    /// this node).
    pub fn link_timing(&self, conn: ConnId) -> Option<LinkTiming> {
        self.conns.get(&conn).map(|c| c.link)
    }

    /// Behind: [`STARTING_MIN`] connections admitted over [`BEHIND_MS`]
    /// ago are still starting. New ones are refused until they are served,
    /// so that what is admitted is served in about a second however busy
    /// the CPU is, instead of timing out at the agent and being dialed
    /// again (a few slow peers alone do not stop admission).
    ///
    /// Only connections admitted within an agent's attempt timeout count:
    /// older ones wait for a Hello their agent gave up sending (it dialed
    /// again, or went), and cost nothing until their deadline closes them.
    /// Counting them held a coordinator behind for the whole deadline after
    /// a burst, refusing every arrival while its CPU idled, and the
    /// refused arrivals came back as a storm of their own.
    fn behind(&self, now: Now) -> bool {
        let given_up = now.mono_ms.saturating_sub(u64::from(ATTEMPT_TIMEOUT_MS));
        self.starting
            .range((given_up, 0)..)
            .take_while(|(t, _)| t.saturating_add(BEHIND_MS) <= now.mono_ms)
            .take(STARTING_MIN)
            .count()
            >= STARTING_MIN
    }

    /// The connection is no longer starting.
    fn end_starting(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(t) = c.starting.take() {
            self.starting.remove(&(t, conn));
        }
    }

    fn release_pending(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !std::mem::take(&mut c.pending) {
            return;
        }
        let ip = c.ip;
        if let Some(n) = self.pending.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&ip);
            }
        }
    }

    /// The TLS handshake finished: what the connection is for.
    pub fn handle_handshaken(
        &mut self,
        now: Now,
        conn: ConnId,
        alpn: Alpn,
        cert_sha256: Option<[u8; 32]>,
    ) -> Route {
        let role = cert_sha256.and_then(|fp| self.known.get(&fp).cloned().map(|r| (fp, r)));
        let Some(c) = self.conns.get(&conn) else {
            return Route::Refused;
        };
        let ip = c.ip;
        let (route, kind) = match (alpn, role) {
            (Alpn::Enroll, _) => {
                // Peers without a certificate are bounded: a few at a time,
                // small frames, short deadlines.
                if self.unauthenticated >= self.limits.unauthenticated_max {
                    self.event(CoordEvent::ConnRefused {
                        ip,
                        why: ConnRefusal::EnrollBusy,
                    });
                    self.close(
                        conn,
                        close::BUSY,
                        "too many enrollments at once; try again",
                        None,
                    );
                    return Route::Refused;
                }
                self.unauthenticated += 1;
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.unauthenticated = true;
                }
                (
                    Route::Enroll,
                    Kind::Enroll {
                        request: None,
                        answered: false,
                    },
                )
            }
            (Alpn::Session, Some((_, CertRole::Agent(agent)))) => (
                Route::Session(agent),
                Kind::Session {
                    agent,
                    phase: Phase::AwaitHello,
                },
            ),
            (Alpn::Admin, Some((fp, CertRole::Admin(cert)))) => {
                if cert.expires_at <= now.wall {
                    self.event(CoordEvent::ConnRefused {
                        ip,
                        why: ConnRefusal::CertExpired,
                    });
                    let reason = expired_reason(&cert);
                    self.close(
                        conn,
                        close::EXPIRED,
                        &reason,
                        Some(CloseWhy::AdminCredential),
                    );
                    return Route::Refused;
                }
                let due = self
                    .admin_used
                    .get(&fp)
                    .is_none_or(|t| now.mono_ms >= t + ADMIN_USED_WRITE_MS);
                if due {
                    self.admin_used.insert(fp, now.mono_ms);
                    self.effects.push_back(Effect::Store(StoreJob::AdminUsed {
                        cert_sha256: fp,
                        at: now.wall,
                    }));
                }
                let who = AdminId(fp);
                (
                    Route::Admin(who),
                    Kind::Admin {
                        who,
                        busy: 0,
                        upload: None,
                    },
                )
            }
            _ => {
                self.event(CoordEvent::ConnRefused {
                    ip,
                    why: ConnRefusal::CertRequired,
                });
                self.close(
                    conn,
                    close::CERT_REQUIRED,
                    "a known client certificate is required",
                    None,
                );
                return Route::Refused;
            }
        };
        if matches!(route, Route::Session(_) | Route::Admin(_)) {
            // Known by its certificate: no longer counted against its
            // address (many agents may share one behind a NAT).
            self.release_pending(conn);
        }
        if !matches!(route, Route::Session(_)) {
            // Enrollments and admins have bounds of their own.
            self.end_starting(conn);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.kind = kind;
            c.deadline = Some(now.mono_ms + EXCHANGE_TIMEOUT_MS);
        }
        self.rearm(conn);
        route
    }

    /// The connection is gone (closed by either side, or lost).
    pub fn handle_closed(&mut self, now: Now, conn: ConnId) {
        self.handle_closed_quiet(now, conn, 0);
    }

    /// [`CoordNode::handle_closed`] for a connection that ended because the
    /// peer was silent for `quiet_ms` (the transport's idle timeout): its
    /// agent was last heard that long ago, which is when it is recorded
    /// last seen — not the moment its silence was noticed.
    pub fn handle_closed_quiet(&mut self, now: Now, conn: ConnId, quiet_ms: i64) {
        // An agent older than 0.8 timed out after its own 5 s.
        let older = match self.conns.get(&conn).map(|c| &c.kind) {
            Some(Kind::Session { agent, .. }) => self
                .seen
                .get(agent)
                .and_then(|s| s.version.as_deref())
                .is_some_and(|v| !sundial_protocol::wire::agent_follows_link_timing(v)),
            _ => false,
        };
        let quiet_ms = match older {
            true => quiet_ms.min(i64::from(sundial_protocol::wire::IDLE_MS_BEFORE_0_8)),
            false => quiet_ms,
        };
        self.retire(now, conn, quiet_ms.max(0));
        self.release_pending(conn);
        self.end_starting(conn);
        self.signing.retain(|(c, _), _| *c != conn);
        self.followers.retain(|(c, _), _| *c != conn);
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if c.unauthenticated {
            self.unauthenticated = self.unauthenticated.saturating_sub(1);
        }
        if let Some(t) = c.armed {
            self.timers.remove(&(t, conn));
        }
    }

    /// Closes a connection at once (an [`Effect::Close`]).
    fn close(&mut self, conn: ConnId, code: u32, reason: &str, why: Option<CloseWhy>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closed {
            return;
        }
        c.closed = true;
        let agent = match &c.kind {
            Kind::Session { agent, .. } => Some(*agent),
            _ => None,
        };
        if let Some(why) = why {
            self.event(CoordEvent::Closing { conn, agent, why });
        }
        self.effects.push_back(Effect::Close {
            conn,
            code,
            reason: reason.to_string(),
        });
    }

    /// A session ends for the fleet: no longer live, counted or fanned out
    /// to; its agent last heard `quiet_ms` before now.
    fn retire(&mut self, now: Now, conn: ConnId, quiet_ms: i64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Kind::Session { agent, phase } = &mut c.kind else {
            return;
        };
        let agent = *agent;
        let was = std::mem::replace(phase, Phase::Closed);
        let Phase::Live(live) = was else {
            return;
        };
        self.sessions_open = self.sessions_open.saturating_sub(1);
        if self.live.get(&agent) == Some(&conn) {
            self.live.remove(&agent);
        }
        if let Some(s) = self.seen.get_mut(&agent) {
            s.uploads = Some(live.sm.upload_allowance());
        }
        self.event(CoordEvent::AgentSessionDown { agent });
        let session = self
            .feed
            .as_ref()
            .map(|f| SessionMark::Down { holder: f.holder });
        self.effects.push_back(Effect::Store(StoreJob::Seen {
            agent,
            seen: AgentSeen {
                at: now.wall.saturating_add_ms(-quiet_ms),
                clock: None,
                session,
            },
        }));
    }

    fn rearm(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let sm_due = match &c.kind {
            Kind::Session {
                phase: Phase::Live(l),
                ..
            } => l.sm.poll_timeout(),
            _ => None,
        };
        let want = match (c.deadline, sm_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if want == c.armed {
            return;
        }
        if let Some(t) = c.armed.take() {
            self.timers.remove(&(t, conn));
        }
        if let Some(t) = want {
            self.timers.insert((t, conn));
        }
        c.armed = want;
    }

    // ---- timers

    pub fn handle_timeout(&mut self, now: Now) {
        while let Some(&(t, conn)) = self.timers.first() {
            if t > now.mono_ms {
                break;
            }
            self.timers.remove(&(t, conn));
            if let Some(c) = self.conns.get_mut(&conn) {
                c.armed = None;
            }
            self.conn_timeout(now, conn);
            self.rearm(conn);
        }
        if !self.purging && self.next_purge_ms.is_some_and(|t| t <= now.mono_ms) {
            self.purge(now);
        }
        self.read_feed(now);
        if !self.broken && !self.planning && self.next_plan_ms.is_some_and(|t| t <= now.mono_ms) {
            self.plan(now);
        }
        if !self.clocks_storing && self.clocks_next_ms.is_some_and(|t| t <= now.mono_ms) {
            self.clocks_next_ms = None;
            self.clocks_storing = true;
            let seen = std::mem::take(&mut self.clocks).into_iter().collect();
            self.effects
                .push_back(Effect::Store(StoreJob::Clocks { seen }));
        }
    }

    /// An agent's clock report: stored with the others of its second.
    fn clock_reported(&mut self, now: Now, agent: AgentId, offset_ms: i64, rtt_ms: i64) {
        self.clocks.insert(
            agent,
            AgentSeen {
                at: now.wall,
                clock: Some((offset_ms, rtt_ms)),
                session: None,
            },
        );
        if self.clocks_next_ms.is_none() {
            self.clocks_next_ms = Some(now.mono_ms + CLOCKS_STORE_EVERY_MS);
        }
    }

    /// Plans the placed tasks that are due with the agents in session here
    /// that follow lease windows.
    fn plan(&mut self, now: Now) {
        let at = self.plan_clock.time(now.wall, now.mono_ms);
        let wall = at.as_millis();
        let due: Vec<TaskId> = self
            .placed
            .iter()
            .filter(|(_, at)| **at <= wall)
            .map(|(id, _)| *id)
            .take(placement::PLAN_BATCH_MAX)
            .collect();
        if due.is_empty() {
            self.schedule_plan(now, at);
            return;
        }
        let members: Vec<placement::Member> = self
            .conns
            .values()
            .filter_map(|c| match &c.kind {
                Kind::Session {
                    agent,
                    phase: Phase::Live(l),
                } if l.placement && l.closing.is_none() && !c.closed => {
                    Some((*agent, l.labels.clone()))
                }
                _ => None,
            })
            .collect();
        self.planning = true;
        self.effects.push_back(Effect::Store(StoreJob::Plan {
            tasks: due,
            members,
            // Bounded by the session cap.
            here: self.live.keys().copied().collect(),
            shared: self.feed.is_some(),
            at,
            replan_bug: self.bugs.replan_leases,
        }));
    }

    /// When to look for placed tasks due next: the earliest, at least
    /// [`placement::PLAN_INTERVAL_MS`] and at most a minute from now;
    /// never while none is placed.
    fn schedule_plan(&mut self, now: Now, at: Timestamp) {
        self.next_plan_ms = self.placed.values().min().map(|due| {
            let wait = due.saturating_sub(at.as_millis()).clamp(
                placement::PLAN_INTERVAL_MS as i64,
                placement::PLAN_WAIT_MAX_MS as i64,
            );
            now.mono_ms + wait as u64
        });
    }

    fn plan_done(&mut self, now: Now, result: Result<Vec<placement::Planned>, StoreError>) {
        self.planning = false;
        let at = self.plan_clock.time(now.wall, now.mono_ms);
        let planned = match result {
            Ok(p) => p,
            Err(e) => {
                self.schedule_plan(now, at);
                self.store_failed(e);
                return;
            }
        };
        for p in planned {
            match p.next_at {
                Some(at) => {
                    self.placed.insert(p.task, at.as_millis());
                }
                None => {
                    self.placed.remove(&p.task);
                }
            }
            if let Some((target, revision)) = p.announce {
                self.event(CoordEvent::LeasesPlanned {
                    task: p.task,
                    revision,
                    windows: p.windows,
                    members: p.members,
                });
                self.announce(now, &target, revision);
            }
        }
        self.schedule_plan(now, at);
    }

    /// A placed task changed (created, resumed, planned elsewhere): look at
    /// its plan at the next planning.
    fn placed_changed(&mut self, task: TaskId) {
        self.placed.insert(task, 0);
        self.next_plan_ms = Some(0);
    }

    /// Reads the shared store's feeds when due.
    fn read_feed(&mut self, now: Now) {
        let Some(f) = self.feed.as_mut() else {
            return;
        };
        if f.reading || f.next_ms > now.mono_ms {
            return;
        }
        f.reading = true;
        let job = StoreJob::Feed {
            revision: f.revision,
            cert_seq: f.cert_seq,
            limit: FEED_PAGE_MAX,
            // Bounded by the session cap.
            agents: self.live.keys().copied().collect(),
            at: now.wall,
        };
        self.effects.push_back(Effect::Store(job));
    }

    fn feed_done(&mut self, now: Now, result: Result<FeedPage, StoreError>) {
        let page = match result {
            Ok(p) => p,
            Err(e) => {
                self.store_failed(e);
                if let Some(f) = self.feed.as_mut() {
                    f.reading = false;
                    f.next_ms = now.mono_ms + f.interval_ms;
                }
                return;
            }
        };
        let tasks = page.tasks.changes.len();
        // Every change, ours included (announcing twice wakes a session
        // that then finds nothing new): the feed alone moves its position,
        // so a change another coordinator committed before one of ours is
        // never skipped.
        for (spec, removed) in &page.tasks.changes {
            if !self.bugs.deaf_to_feed {
                self.announce(now, &spec.target, spec.revision);
            }
            if spec.placement.is_some() && !removed {
                self.placed_changed(spec.id);
            }
        }
        let (mut added, mut revoked) = (0, 0);
        for (fp, role) in &page.certs.changes {
            match role {
                Some(role) => {
                    if self.known.insert(*fp, role.clone()).is_none() {
                        added += 1;
                    }
                }
                None => {
                    if let Some(old) = self.known.remove(fp) {
                        revoked += 1;
                        match old {
                            CertRole::Agent(agent) => {
                                let closed = self.close_agent(now, agent);
                                self.event(CoordEvent::AgentRevokedElsewhere {
                                    agent,
                                    sessions_closed: closed,
                                });
                            }
                            CertRole::Admin(cert) => {
                                self.close_admin(
                                    *fp,
                                    &format!(
                                        "the credential of admin {:?} was revoked or renewed",
                                        cert.name
                                    ),
                                    None,
                                );
                            }
                        }
                    }
                }
            }
        }
        let mut run_nows = 0;
        for q in &page.run_now {
            let msg = CoordMsg::RunNow {
                task_id: q.task,
                at: q.at,
            };
            if self.push(now, q.agent, msg) {
                run_nows += 1;
            }
        }
        if tasks + added + revoked + run_nows > 0 {
            self.event(CoordEvent::FeedApplied {
                tasks,
                certs_added: added,
                certs_revoked: revoked,
                run_nows,
            });
        }
        let more = page.tasks.more || page.certs.more;
        if let Some(f) = self.feed.as_mut() {
            f.revision = f.revision.max(page.tasks.upto);
            f.cert_seq = f.cert_seq.max(page.certs.upto);
            f.reading = false;
            f.next_ms = if more {
                now.mono_ms
            } else {
                now.mono_ms + f.interval_ms
            };
        }
    }

    fn conn_timeout(&mut self, now: Now, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closed {
            return;
        }
        if c.deadline.is_some_and(|d| d <= now.mono_ms) {
            c.deadline = None;
            let (code, reason, why) = match &c.kind {
                Kind::Session {
                    phase: Phase::AwaitHello,
                    ..
                } => (close::PROTOCOL, "no Hello in time", CloseWhy::NoHelloInTime),
                Kind::Enroll {
                    answered: false, ..
                } => (
                    close::PROTOCOL,
                    "no enrollment request in time",
                    CloseWhy::NoRequestInTime,
                ),
                Kind::Enroll { .. } => (close::DONE, "", CloseWhy::Idle),
                Kind::Admin { busy: 0, .. } => (close::DONE, "idle", CloseWhy::Idle),
                _ => return,
            };
            self.close(conn, code, reason, Some(why));
            return;
        }
        if let Kind::Session {
            phase: Phase::Live(l),
            ..
        } = &mut c.kind
        {
            if l.sm.poll_timeout().is_some_and(|t| t <= now.mono_ms) {
                l.sm.handle_timeout(now);
                self.drain_session(now, conn);
            }
        }
    }

    fn purge(&mut self, now: Now) {
        if let Some(keep) = self.limits.audit_retention {
            if !self.purging_audit {
                self.purging_audit = true;
                self.effects.push_back(Effect::Store(StoreJob::PurgeAudit {
                    before: now.wall.saturating_add_ms(-keep.as_millis_i64()),
                    max: PURGE_BATCH_RUNS_MAX,
                }));
            }
        }
        let Some(keep) = self.limits.run_retention else {
            self.next_purge_ms = Some(now.mono_ms + PURGE_INTERVAL_MS);
            return;
        };
        self.purging = true;
        self.purged = 0;
        self.effects.push_back(Effect::Store(StoreJob::Purge {
            before: now.wall.saturating_add_ms(-keep.as_millis_i64()),
            max: PURGE_BATCH_RUNS_MAX,
        }));
    }

    // ---- sessions

    /// A message from an agent's session (its first must be Hello).
    pub fn handle_agent_msg(&mut self, now: Now, conn: ConnId, msg: AgentMsg) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closed {
            return;
        }
        let Kind::Session { agent, phase } = &mut c.kind else {
            return;
        };
        let agent = *agent;
        match phase {
            Phase::AwaitHello => {
                let AgentMsg::Hello {
                    last_revision,
                    outbox_len,
                    agent_version,
                    allow_exec,
                    seal_key,
                    functions,
                    allow_env,
                } = msg
                else {
                    self.close(
                        conn,
                        close::PROTOCOL,
                        "expected Hello",
                        Some(CloseWhy::NotHello),
                    );
                    return;
                };
                let knows_policy = sundial_protocol::wire::agent_knows_policy(&agent_version);
                let knows_reports = sundial_protocol::wire::agent_knows_reports(&agent_version);
                let knows_triggers = sundial_protocol::wire::agent_knows_triggers(&agent_version);
                let knows_sealed = sundial_protocol::wire::agent_knows_sealed(&agent_version);
                let knows_placement = sundial_protocol::wire::agent_knows_placement(&agent_version);
                let knows_wasm = sundial_protocol::wire::agent_knows_wasm(&agent_version);
                // Bounded as the Hello's frame is; a longer list is cut (a
                // module not listed is sent again, and ignored).
                let functions = functions.0.map(|mut f| {
                    f.modules
                        .truncate(sundial_protocol::wire::HELLO_MODULES_MAX);
                    f
                });
                *phase = Phase::Checking(
                    Hello {
                        last_revision,
                        outbox_len,
                        knows_policy,
                        knows_reports,
                        knows_triggers,
                        knows_sealed,
                        knows_placement,
                        knows_wasm,
                        functions: functions.clone(),
                    },
                    VecDeque::new(),
                );
                c.deadline = None;
                self.rearm(conn);
                let seen = self.seen_entry(agent);
                if let Some(s) = seen {
                    s.version = Some(agent_version);
                    s.allow_exec = allow_exec;
                    s.allow_env = allow_env.0.map(|mut l| {
                        l.truncate(sundial_protocol::wire::HELLO_ENV_PATTERNS_MAX);
                        l
                    });
                    s.functions = functions;
                    s.outbox_len = Some(outbox_len);
                    s.last_contact = Some(now.wall);
                    // A report of an earlier session no longer holds.
                    s.report = None;
                    s.applied = Some(last_revision);
                }
                let holder = self.feed.as_ref().map(|f| f.holder);
                self.effects.push_back(Effect::Store(StoreJob::Hello {
                    conn,
                    agent,
                    last_revision,
                    at: now.wall,
                    holder,
                    seal_key: seal_key.0,
                }));
            }
            Phase::Checking(_, early) => {
                if early.len() >= SESSION_INBOX_MAX {
                    self.close(
                        conn,
                        close::PROTOCOL,
                        "too many messages before the Hello was answered",
                        Some(CloseWhy::TooEarly),
                    );
                    return;
                }
                early.push_back(msg);
            }
            Phase::Live(l) => {
                let results = matches!(msg, AgentMsg::Results { .. });
                l.sm.handle_message(now, msg);
                let allowance = results.then(|| l.sm.upload_allowance());
                if let Some(s) = self.seen.get_mut(&agent) {
                    s.last_contact = Some(now.wall);
                    if allowance.is_some() {
                        s.uploads = allowance;
                    }
                }
                self.drain_session(now, conn);
            }
            Phase::Closed => {}
        }
    }

    /// The seen entry of `agent`, made if there is room.
    fn seen_entry(&mut self, agent: AgentId) -> Option<&mut Seen> {
        if !self.seen.contains_key(&agent) && self.seen.len() >= SEEN_MAX {
            let live = &self.live;
            self.seen.retain(|a, _| live.contains_key(a));
        }
        if !self.seen.contains_key(&agent) && self.seen.len() >= SEEN_MAX {
            return None;
        }
        Some(self.seen.entry(agent).or_default())
    }

    /// A frame that did not decode or was too large.
    pub fn handle_bad_frame(&mut self, _now: Now, conn: ConnId, why: &str) {
        self.close(conn, close::BAD_FRAME, why, Some(CloseWhy::Protocol));
    }

    fn hello_done(
        &mut self,
        now: Now,
        conn: ConnId,
        agent: AgentId,
        result: Result<jobs::HelloAnswer, StoreError>,
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closed {
            return;
        }
        let Kind::Session { phase, .. } = &mut c.kind else {
            return;
        };
        let Phase::Checking(..) = phase else {
            return;
        };
        let Phase::Checking(hello, early) = std::mem::replace(phase, Phase::Closed) else {
            return;
        };
        let (record, restored) = match result {
            Err(e) => {
                self.store_failed(e);
                self.close(
                    conn,
                    close::STORE,
                    "coordinator store failed",
                    Some(CloseWhy::StoreFailed),
                );
                return;
            }
            Ok(None) => {
                self.close(
                    conn,
                    close::REVOKED,
                    "agent revoked",
                    Some(CloseWhy::Revoked),
                );
                return;
            }
            Ok(Some(x)) => x,
        };
        if self.sessions_open >= self.limits.sessions_max {
            let after = u64::from(self.reconnect_policy().busy_spread_ms);
            self.event(CoordEvent::SessionBusy {
                agent,
                retry_after_ms: after,
            });
            self.close(
                conn,
                close::BUSY,
                &busy_reason(after, "too many sessions"),
                Some(CloseWhy::Busy),
            );
            return;
        }
        // One agent, one session: an older one (a connection the agent gave
        // up on, or a second process with the same certificate) ends here,
        // so per-agent limits cannot be multiplied by sessions.
        if let Some(old) = self.live.insert(agent, conn) {
            if old != conn {
                self.event(CoordEvent::SessionReplaced { agent });
                self.close(
                    old,
                    close::REPLACED,
                    "replaced by a newer session of this agent",
                    Some(CloseWhy::Replaced),
                );
                self.retire(now, old, 0);
            }
        }
        self.sessions_open += 1;
        let start_revision = match &restored {
            Some((lost, revision)) => {
                self.event(CoordEvent::StoreBehind {
                    agent,
                    agent_revision: hello.last_revision,
                    lost: lost.clone(),
                    revision: *revision,
                });
                0
            }
            None => hello.last_revision,
        };
        let link = self.link_timing(conn);
        let policy = hello.knows_policy.then(|| self.reconnect_policy_with(link));
        let report_every = hello
            .knows_reports
            .then(|| u32::try_from(self.limits.agent_report_every.0).unwrap_or(u32::MAX));
        let mut sm = CoordSession::new(
            now,
            agent,
            record.enrolled_at,
            start_revision,
            hello.outbox_len,
            UploadLimits {
                runs_per_sec: self.limits.upload_runs_per_sec,
                bytes_per_sec: self.limits.upload_bytes_per_sec,
            },
            Told {
                policy,
                report_every_ms: report_every,
                triggers: hello.knows_triggers,
                sealed: hello.knows_sealed,
                placement: hello.knows_placement,
                wasm: hello.knows_wasm,
                functions: hello.functions.clone(),
                modules_bug: self.bugs.trust_dropped_modules,
            },
        );
        // The upload limits are the agent's, not the session's: carried on
        // from its last session.
        if let Some(left) = self.seen.get(&agent).and_then(|s| s.uploads.clone()) {
            sm.carry_allowance(left);
        }
        let later = self.joined.contains(&agent);
        self.end_starting(conn);
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Kind::Session { phase, .. } = &mut c.kind {
                *phase = Phase::Live(Box::new(LiveSession {
                    sm,
                    labels: record.labels,
                    cache: Some(Assigned::new()),
                    lost: restored,
                    closing: None,
                    notified: false,
                    later,
                    placement: hello.knows_placement,
                }));
            }
        }
        self.drain_session(now, conn);
        for msg in early {
            self.handle_agent_msg(now, conn, msg);
        }
    }

    /// Turns what a session's machine asks for into the node's effects.
    fn drain_session(&mut self, now: Now, conn: ConnId) {
        let bugs = self.bugs;
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Kind::Session {
            agent,
            phase: Phase::Live(l),
        } = &mut c.kind
        else {
            return;
        };
        let agent = *agent;
        let mut jobs = Vec::new();
        let mut events = Vec::new();
        let mut reports = Vec::new();
        let mut clocks = Vec::new();
        while let Some(effect) = l.sm.poll_effect() {
            match effect {
                CoordEffect::LoadChanges {
                    since,
                    modules_held,
                } => jobs.push(StoreJob::Changes {
                    conn,
                    agent,
                    labels: l.labels.clone(),
                    since,
                    modules_held,
                    limit: CHANGES_PAGE_MAX,
                    lost: l.lost.take(),
                }),
                CoordEffect::StoreRuns { batch_id, runs } => {
                    if bugs.ack_before_commit {
                        let keys = runs.iter().map(|r| r.key()).collect();
                        l.sm.handle_stored(now, batch_id, Ok(keys));
                    }
                    jobs.push(StoreJob::Runs {
                        conn,
                        agent,
                        labels: l.labels.clone(),
                        batch_id,
                        runs,
                        cache: l.cache.take().unwrap_or_default(),
                    })
                }
                CoordEffect::ClockReport { offset_ms, rtt_ms } => clocks.push((offset_ms, rtt_ms)),
                CoordEffect::Report(report) => reports.push(report),
                CoordEffect::Close { code, reason } => {
                    if l.closing.is_none() {
                        l.closing = Some((code, reason));
                    }
                }
            }
        }
        while let Some(e) = l.sm.poll_event() {
            events.push(CoordEvent::Session(e));
        }
        let backlog = l.sm.transmit_len();
        let wants = (backlog > 0 || l.closing.is_some()) && !l.notified;
        if wants {
            l.notified = true;
        }
        for j in jobs {
            self.effects.push_back(Effect::Store(j));
        }
        for e in events {
            self.event(e);
        }
        for report in reports {
            self.agent_reported(now, agent, report);
        }
        for (offset_ms, rtt_ms) in clocks {
            self.clock_reported(now, agent, offset_ms, rtt_ms);
        }
        if backlog > TRANSMIT_BACKLOG_MAX {
            self.close(
                conn,
                close::PROTOCOL,
                "the agent does not read what it is sent",
                Some(CloseWhy::NotReading),
            );
            self.retire(now, conn, 0);
            return;
        }
        if wants {
            self.effects.push_back(Effect::Transmit(conn));
        }
        self.rearm(conn);
    }

    /// The next message for a session's writer to send; `None` when there
    /// is none for now (a later [`Effect::Transmit`] says when there is).
    pub fn poll_transmit(&mut self, now: Now, conn: ConnId) -> Option<Outgoing> {
        let c = self.conns.get_mut(&conn)?;
        if c.closed {
            return None;
        }
        let Kind::Session {
            phase: Phase::Live(l),
            ..
        } = &mut c.kind
        else {
            return None;
        };
        if let Some(m) = l.sm.poll_transmit() {
            // Sending may let the next page load.
            self.drain_session(now, conn);
            return Some(Outgoing::Msg(m));
        }
        l.notified = false;
        if let Some((code, reason)) = l.closing.take() {
            c.closed = true;
            let agent = self.agent_of(conn);
            self.event(CoordEvent::Closing {
                conn,
                agent,
                why: CloseWhy::Protocol,
            });
            self.retire(now, conn, 0);
            return Some(Outgoing::Close { code, reason });
        }
        None
    }

    /// An agent's report: kept for `agent list`, the dashboard and
    /// metrics; an advance of its applied revision measures the lag of the
    /// oldest change it brought (when this node saw that change announced).
    fn agent_reported(&mut self, now: Now, agent: AgentId, report: AgentReport) {
        let before = self.seen.get(&agent).and_then(|s| s.applied);
        let applied = report.applied_revision;
        if let Some(before) = before.filter(|b| applied > *b) {
            // The first change after `before` this node announced.
            let i = self
                .revision_times
                .partition_point(|(rev, _)| *rev <= before);
            if let Some((rev, at_ms)) = self.revision_times.get(i).copied() {
                if rev <= applied {
                    self.event(CoordEvent::AssignmentApplied {
                        agent,
                        revision: rev,
                        lag_ms: now.mono_ms.saturating_sub(at_ms),
                    });
                }
            }
        }
        if let Some(s) = self.seen_entry(agent) {
            s.outbox_len = Some(report.outbox_len);
            s.last_contact = Some(now.wall);
            s.applied = Some(s.applied.map_or(applied, |a| a.max(applied)));
            s.report = Some((report, now.wall));
        }
    }

    /// What the agents in session here last reported, summed.
    pub fn fleet_figures(&self, now: Timestamp) -> FleetFigures {
        let mut f = FleetFigures::default();
        for agent in self.live.keys() {
            let Some(seen) = self.seen.get(agent) else {
                continue;
            };
            let Some((r, _)) = &seen.report else {
                // An agent from before reports: its Hello's backlog.
                if let Some(n) = seen.outbox_len {
                    f.outbox_runs = f.outbox_runs.saturating_add(n);
                    f.outbox_max_runs = f.outbox_max_runs.max(n);
                }
                continue;
            };
            f.reporting += 1;
            f.outbox_runs = f.outbox_runs.saturating_add(r.outbox_len);
            f.outbox_max_runs = f.outbox_max_runs.max(r.outbox_len);
            if let Some(t) = r.oldest_unsynced {
                let age = u64::try_from(now.millis_since(t)).unwrap_or(0);
                f.oldest_unsynced_age_ms =
                    Some(f.oldest_unsynced_age_ms.map_or(age, |a| a.max(age)));
            }
            f.tasks_stored = f.tasks_stored.saturating_add(r.tasks_held);
            f.running = f.running.saturating_add(u64::from(r.running));
            f.store_bytes = f.store_bytes.saturating_add(r.store_bytes.unwrap_or(0));
            if !r.clock_vouched {
                f.clock_unvouched += 1;
            }
            if r.clock_held {
                f.clock_held += 1;
            }
        }
        f
    }

    /// What this node knows of `agent` that the store does not.
    pub fn seen(&self, agent: AgentId) -> Option<admin::SeenView> {
        self.seen.get(&agent).map(|s| self.seen_view(agent, s))
    }

    /// What `agent` last reported in its current session, and when.
    pub fn agent_report(&self, agent: AgentId) -> Option<(AgentReport, Timestamp)> {
        self.seen.get(&agent).and_then(|s| s.report.clone())
    }

    /// A task targeting `target` changed at `revision`: wakes the sessions
    /// of the agents it reaches, and no other.
    fn announce(&mut self, now: Now, target: &Target, revision: u64) {
        if self
            .revision_times
            .back()
            .is_none_or(|(r, _)| *r < revision)
        {
            if self.revision_times.len() >= REVISION_TIMES_MAX {
                self.revision_times.pop_front();
            }
            self.revision_times.push_back((revision, now.mono_ms));
        }
        self.revision = self.revision.max(revision);
        let conns: Vec<ConnId> = match target {
            Target::Agent(a) => self.live.get(a).copied().into_iter().collect(),
            Target::Selector(_) => self.live.values().copied().collect(),
        };
        let mut woken = 0;
        for conn in conns {
            let Some(c) = self.conns.get_mut(&conn) else {
                continue;
            };
            let Kind::Session {
                agent,
                phase: Phase::Live(l),
            } = &mut c.kind
            else {
                continue;
            };
            if self.bugs.miss_later_joiners && l.later {
                continue;
            }
            if targets(target, *agent, &l.labels) {
                l.sm.handle_revision(revision);
                woken += 1;
                self.drain_session(now, conn);
            }
        }
        self.event(CoordEvent::ChangeAnnounced {
            revision,
            sessions: woken,
        });
    }

    // ---- admin

    /// An admin request on `conn`, with the shell's id for its answer and
    /// fresh randomness (for a join token's secret).
    pub fn handle_admin(
        &mut self,
        now: Now,
        conn: ConnId,
        req: u64,
        request: AdminRequest,
        entropy: [u8; ENTROPY_BYTES],
    ) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closed {
            return;
        }
        let Kind::Admin { who, busy, upload } = &mut c.kind else {
            return;
        };
        let who = *who;
        // A module's pieces are put together here; only a whole one, and
        // only after the permission check below, becomes a store job.
        let mut piece = None;
        if let AdminRequest::ModuleUpload {
            hash,
            size,
            offset,
            chunk,
        } = &request
        {
            let limit = self.limits.wasm_module_max;
            if *size > limit {
                *upload = None;
                piece = Some(Err(format!(
                    "the module is {size} bytes; the most this coordinator takes is {limit} (its --wasm-module-max setting)"
                )));
            } else if *offset == 0
                || upload
                    .as_ref()
                    .is_none_or(|u| u.hash != *hash || u.size != *size)
            {
                *upload = None;
                piece = Some(
                    sundial_protocol::wasm::Assembly::start(*hash, *size, limit)
                        .map(|a| upload.insert(Box::new(a)))
                        .and_then(|a| a.add(*offset, chunk)),
                );
            } else if let Some(a) = upload.as_mut() {
                piece = Some(a.add(*offset, chunk));
            }
            if matches!(piece, Some(Err(_)) | Some(Ok(Some(_)))) {
                *upload = None;
            }
        }
        let ip = c.ip;
        *busy += 1;
        c.deadline = None;
        self.rearm(conn);
        // Checked on every request: a credential revoked, replaced or
        // expired since the connection was made stops working at once.
        let cert = match self.known.get(&who.0) {
            Some(CertRole::Admin(cert)) => cert.clone(),
            _ => {
                let why = "this admin credential was revoked or replaced".to_string();
                self.admin_answered(now, conn, req, vec![AdminResponse::Error(why.clone())]);
                self.close(conn, close::REVOKED, &why, Some(CloseWhy::AdminCredential));
                return;
            }
        };
        if cert.expires_at <= now.wall {
            let why = expired_reason(&cert);
            self.admin_answered(now, conn, req, vec![AdminResponse::Error(why.clone())]);
            self.close(conn, close::EXPIRED, &why, Some(CloseWhy::AdminCredential));
            return;
        }
        let audit = AuditEntry {
            seq: 0,
            at: now.wall,
            admin: cert.name.clone(),
            cert_sha256: who.0,
            from: Some(ip.to_string()),
            action: admin::action(&request).to_string(),
            subject: admin::subject(&request),
            revision: None,
            refused: None,
        };
        let refusal = admin::permitted(&request, &cert)
            .err()
            .or_else(|| match &request {
                AdminRequest::AdminCreate { .. } | AdminRequest::AdminRenew { .. } => {
                    admin::credential_refusal(&request, now.wall).err()
                }
                _ => None,
            });
        if let Some(why) = refusal {
            self.admin_refused(now, conn, req, who, audit, why);
            return;
        }
        let request = match (request, piece) {
            (_, Some(Err(why))) => {
                self.admin_refused(now, conn, req, who, audit, why);
                return;
            }
            (_, Some(Ok(None))) => {
                self.admin_answered(now, conn, req, vec![AdminResponse::Done]);
                return;
            }
            (AdminRequest::ModuleUpload { hash, size, .. }, Some(Ok(Some(bytes)))) => {
                AdminRequest::ModuleUpload {
                    hash,
                    size,
                    offset: 0,
                    chunk: bytes,
                }
            }
            (request, _) => request,
        };
        if let AdminRequest::RunFollow { task, agent } = request {
            if self.followers.len() >= FOLLOWERS_MAX {
                self.admin_answered(
                    now,
                    conn,
                    req,
                    vec![AdminResponse::Error(format!(
                        "this coordinator serves at most {FOLLOWERS_MAX} run follows at once; try again later"
                    ))],
                );
                return;
            }
            // Busy until it ends: a follow is never idle.
            self.followers.insert((conn, req), (task, agent));
            self.effects.push_back(Effect::AdminPush {
                conn,
                req,
                answers: vec![AdminResponse::Following],
            });
            return;
        }
        let seen = match &request {
            // A task create warns of agents that are offline or will refuse
            // its program: it needs what the node knows of every agent.
            AdminRequest::AgentList | AdminRequest::TaskCreate(_) => self
                .seen
                .iter()
                .map(|(a, s)| (*a, self.seen_view(*a, s)))
                .collect(),
            AdminRequest::AgentGet(id) => self
                .seen
                .get(id)
                .map(|s| (*id, self.seen_view(*id, s)))
                .into_iter()
                .collect(),
            _ => HashMap::new(),
        };
        let sign = match &request {
            AdminRequest::AdminCreate { name, csr_der, .. }
            | AdminRequest::AdminRenew { name, csr_der, .. } => {
                admin::credential_refusal(&request, now.wall)
                    .ok()
                    .map(|expires_at| (name.clone(), csr_der.clone(), expires_at))
            }
            _ => None,
        };
        let job = StoreJob::Admin {
            conn,
            req,
            request,
            ctx: Box::new(AdminContext {
                who,
                now: now.wall,
                limits: self.limits.clone(),
                ca_sha256: self.ca_sha256,
                entropy,
                seen,
                shared: self.feed.is_some(),
                audit,
                signed: None,
                role: cert.role,
            }),
        };
        if let Some((name, csr_der, expires_at)) = sign {
            // The CA signs first; the store then records the admin.
            self.signing.insert((conn, req), job);
            self.effects.push_back(Effect::Sign {
                conn,
                signee: Signee::Admin {
                    req,
                    name,
                    expires_at,
                },
                csr_der,
            });
            return;
        }
        self.admin_job(now, conn, req, job);
    }

    /// The shell could not pass a follow's runs on (its client reads too
    /// slowly, or is gone): the follow ends.
    pub fn handle_follow_end(&mut self, now: Now, conn: ConnId, req: u64) {
        if self.followers.remove(&(conn, req)).is_some() {
            if let Some(c) = self.conns.get_mut(&conn) {
                if let Kind::Admin { busy, .. } = &mut c.kind {
                    *busy = busy.saturating_sub(1);
                    if *busy == 0 {
                        c.deadline = Some(now.mono_ms + EXCHANGE_TIMEOUT_MS);
                    }
                }
            }
            self.rearm(conn);
        }
    }

    /// Pushes newly stored runs to the follows they match.
    fn follow_runs(&mut self, runs: &[sundial_protocol::RunRecord]) {
        for (&(conn, req), &(task, agent)) in &self.followers {
            let matching: Vec<sundial_protocol::RunRecord> = runs
                .iter()
                .filter(|r| task.is_none_or(|t| t == r.task_id))
                .filter(|r| agent.is_none_or(|a| a == r.agent_id))
                .cloned()
                .collect();
            if matching.is_empty() {
                continue;
            }
            self.effects.push_back(Effect::AdminPush {
                conn,
                req,
                answers: sundial_protocol::wire::chunk_by_size(
                    matching,
                    sundial_protocol::wire::LIST_CHUNK_BYTES_MAX,
                )
                .into_iter()
                .map(AdminResponse::Runs)
                .collect(),
            });
        }
    }

    /// A request refused before the store: answered, and written to the
    /// audit log.
    fn admin_refused(
        &mut self,
        now: Now,
        conn: ConnId,
        req: u64,
        by: AdminId,
        audit: AuditEntry,
        why: String,
    ) {
        self.event(CoordEvent::AdminRefused {
            by,
            why: why.clone(),
        });
        self.audit_refused(now, conn, req, audit, why);
    }

    /// Logs a refused request, then answers it with the refusal (see
    /// [`StoreJob::AuditRefused`]); it takes an admin slot as requests do.
    fn audit_refused(
        &mut self,
        now: Now,
        conn: ConnId,
        req: u64,
        mut audit: AuditEntry,
        why: String,
    ) {
        audit.refused = Some(why);
        self.event(CoordEvent::Audited(audit.clone()));
        self.admin_job(
            now,
            conn,
            req,
            StoreJob::AuditRefused {
                conn,
                req,
                entry: audit,
            },
        );
    }

    /// A refused request's audit entry is committed (or could not be):
    /// the refusal is answered.
    fn audit_refused_done(
        &mut self,
        now: Now,
        conn: ConnId,
        req: u64,
        why: String,
        result: Result<(), StoreError>,
    ) {
        self.admin_slot_freed();
        if let Err(e) = result {
            self.store_failed(e);
        }
        self.admin_answered(now, conn, req, vec![AdminResponse::Error(why)]);
    }

    /// An admin job ended: the next waiting one takes its slot.
    fn admin_slot_freed(&mut self) {
        self.admin_running = self.admin_running.saturating_sub(1);
        if let Some(next) = self.admin_waiting.pop_front() {
            self.admin_running += 1;
            self.effects.push_back(Effect::Store(next));
        }
    }

    /// Runs an admin request's store job now, or queues it for a slot.
    fn admin_job(&mut self, now: Now, conn: ConnId, req: u64, job: StoreJob) {
        if self.admin_running < self.limits.admin_concurrent_max.max(1) {
            self.admin_running += 1;
            self.effects.push_back(Effect::Store(job));
        } else if self.admin_waiting.len() < ADMIN_QUEUE_MAX {
            self.admin_waiting.push_back(job);
        } else {
            self.admin_answered(
                now,
                conn,
                req,
                vec![AdminResponse::Error(
                    "the coordinator is busy with other admin requests; try again".into(),
                )],
            );
        }
    }

    /// One copy of each module in memory however many sessions send it:
    /// a module loaded again while another copy is queued is replaced by it.
    fn share_modules(
        &mut self,
        modules: Vec<(ModuleHash, Vec<u8>)>,
    ) -> Vec<(ModuleHash, Arc<Vec<u8>>)> {
        if modules.is_empty() {
            return Vec::new();
        }
        self.module_copies.retain(|_, w| w.strong_count() > 0);
        modules
            .into_iter()
            .map(|(hash, bytes)| {
                let shared = match self.module_copies.get(&hash).and_then(Weak::upgrade) {
                    Some(a) => a,
                    None => {
                        let a = Arc::new(bytes);
                        self.module_copies.insert(hash, Arc::downgrade(&a));
                        a
                    }
                };
                (hash, shared)
            })
            .collect()
    }

    fn seen_view(&self, agent: AgentId, s: &Seen) -> SeenView {
        SeenView {
            online: self.live.contains_key(&agent),
            version: s.version.clone(),
            allow_exec: s.allow_exec.clone(),
            allow_env: s.allow_env.clone(),
            outbox_len: s.outbox_len,
            functions: s.functions.clone(),
            last_contact: s.last_contact,
            // Only a report of the session going now.
            report: s.report.clone().filter(|_| self.live.contains_key(&agent)),
        }
    }

    fn admin_answered(&mut self, now: Now, conn: ConnId, req: u64, answers: Vec<AdminResponse>) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Kind::Admin { busy, .. } = &mut c.kind {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                c.deadline = Some(now.mono_ms + EXCHANGE_TIMEOUT_MS);
            }
        }
        self.rearm(conn);
        self.effects
            .push_back(Effect::AdminReply { conn, req, answers });
    }

    fn admin_done(
        &mut self,
        now: Now,
        conn: ConnId,
        req: u64,
        result: Result<AdminAnswer, StoreError>,
        audit: Option<Box<AuditEntry>>,
    ) {
        self.admin_slot_freed();
        let who = match self.conns.get(&conn).map(|c| &c.kind) {
            Some(Kind::Admin { who, .. }) => Some(*who),
            _ => None,
        };
        let by = who.unwrap_or(AdminId([0; 32]));
        let answer = match result {
            Ok(a) => a,
            Err(e) => {
                let why = e.to_string();
                self.event(CoordEvent::AdminRefused {
                    by,
                    why: why.clone(),
                });
                match audit {
                    // A change refused by the store's rules (no such task,
                    // a conflict): nothing changed, the attempt is logged
                    // and then answered.
                    Some(audit) if e.is_refusal() => {
                        self.audit_refused(now, conn, req, *audit, why);
                    }
                    _ => {
                        if !e.is_refusal() {
                            self.store_failed(e);
                        }
                        self.admin_answered(now, conn, req, vec![AdminResponse::Error(why)]);
                    }
                }
                return;
            }
        };
        let mut answers = answer.answers;
        let mut deferred = None;
        for f in answer.follow {
            match f {
                FollowUp::Announce { target, revision } => self.announce(now, &target, revision),
                FollowUp::Revoked { agent, cert_sha256 } => {
                    self.known.remove(&cert_sha256);
                    let closed = if self.bugs.revoke_leaves_open {
                        0
                    } else {
                        self.close_agent(now, agent)
                    };
                    self.event(CoordEvent::AgentRevoked {
                        agent,
                        by,
                        sessions_closed: closed,
                    });
                }
                FollowUp::Audited(entry) => self.event(CoordEvent::Audited(entry)),
                FollowUp::AdminCert {
                    removed,
                    added,
                    why,
                } => {
                    if let Some(fp) = removed {
                        self.known.remove(&fp);
                        // Not the connection that asked (an admin renewing
                        // itself must get its new certificate): its next
                        // request is refused.
                        self.close_admin(fp, &why, Some(conn));
                    }
                    if let Some((fp, cert)) = added {
                        self.known.insert(fp, CertRole::Admin(cert));
                    }
                }
                FollowUp::RunNow { task, at, agents } => match &audit {
                    // Sent once its entry is in the log.
                    Some(entry) => {
                        deferred = Some(RunNowAudited {
                            entry: (**entry).clone(),
                            task,
                            at,
                            agents,
                            answers: Vec::new(),
                        })
                    }
                    None => answers.push(self.run_now_send(now, by, task, at, agents)),
                },
                FollowUp::Changed(change) => {
                    if let AdminChange::AgentForgotten { agent } = &change {
                        self.seen.remove(agent);
                    }
                    // The planner reads the task and forgets it at once if
                    // it is not placed.
                    if let AdminChange::TaskCreated { task, .. }
                    | AdminChange::TaskUpdated { task, .. }
                    | AdminChange::TaskPaused {
                        task,
                        paused: false,
                        ..
                    } = &change
                    {
                        self.placed_changed(*task);
                    }
                    self.event(CoordEvent::AdminChanged { by, change });
                }
            }
        }
        match deferred {
            Some(mut run) => {
                run.answers = answers;
                self.event(CoordEvent::Audited(run.entry.clone()));
                self.admin_job(now, conn, req, StoreJob::AuditRunNow { conn, req, run });
            }
            None => self.admin_answered(now, conn, req, answers),
        }
    }

    /// A run-now's audit entry is committed (or could not be): the run is
    /// sent and the admin answered, or told it was not started.
    fn audit_run_now_done(
        &mut self,
        now: Now,
        conn: ConnId,
        req: u64,
        run: RunNowAudited,
        result: Result<(), StoreError>,
    ) {
        self.admin_slot_freed();
        if let Err(e) = result {
            let why = format!("the run was not started: its audit entry could not be written: {e}");
            self.store_failed(e);
            self.admin_answered(now, conn, req, vec![AdminResponse::Error(why)]);
            return;
        }
        // The entry names the admin by its certificate, as `who` does.
        let by = AdminId(run.entry.cert_sha256);
        let mut answers = run.answers;
        answers.push(self.run_now_send(now, by, run.task, run.at, run.agents));
        self.admin_answered(now, conn, req, answers);
    }

    /// Sends a run-now to the agents in session here (and queues it for the
    /// others when coordinators share the store); what the admin is told.
    fn run_now_send(
        &mut self,
        now: Now,
        by: AdminId,
        task: TaskId,
        at: Timestamp,
        agents: Vec<AgentId>,
    ) -> AdminResponse {
        let mut sent = Vec::new();
        let mut offline = Vec::new();
        for agent in agents {
            // One session is enough: the run is keyed, the agent
            // runs it once.
            if self.push(now, agent, CoordMsg::RunNow { task_id: task, at }) {
                sent.push(agent);
            } else {
                offline.push(agent);
            }
        }
        if self.feed.is_some() && !offline.is_empty() {
            // Another coordinator may hold their sessions.
            self.event(CoordEvent::RunNowQueued {
                agents: offline.len(),
            });
            self.effects.push_back(Effect::Store(StoreJob::QueueRunNow {
                runs: offline
                    .iter()
                    .map(|&agent| QueuedRunNow { agent, task, at })
                    .collect(),
                at: now.wall,
            }));
        }
        self.event(CoordEvent::AdminChanged {
            by,
            change: AdminChange::RunNow {
                task,
                sent: sent.len(),
                offline: offline.len(),
            },
        });
        AdminResponse::RunNowSent { at, sent, offline }
    }

    /// Sends `msg` on `agent`'s live session; whether it had one.
    fn push(&mut self, now: Now, agent: AgentId, msg: CoordMsg) -> bool {
        let Some(&conn) = self.live.get(&agent) else {
            return false;
        };
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let Kind::Session {
            phase: Phase::Live(l),
            ..
        } = &mut c.kind
        else {
            return false;
        };
        if c.closed || l.closing.is_some() {
            return false;
        }
        l.sm.handle_push(msg);
        self.drain_session(now, conn);
        true
    }

    /// Closes every connection of `agent` (revoked): at once, not at its
    /// next reconnect. Returns how many sessions were live.
    /// Closes the connections of the admin certificate `fp`, saying `why`.
    fn close_admin(&mut self, fp: [u8; 32], why: &str, except: Option<ConnId>) -> usize {
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, _)| Some(**id) != except)
            .filter(|(_, c)| matches!(&c.kind, Kind::Admin { who, .. } if who.0 == fp))
            .map(|(id, _)| *id)
            .collect();
        for conn in &conns {
            self.close(*conn, close::REVOKED, why, Some(CloseWhy::AdminCredential));
        }
        conns.len()
    }

    fn close_agent(&mut self, now: Now, agent: AgentId) -> usize {
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(&c.kind, Kind::Session { agent: a, .. } if *a == agent))
            .map(|(id, _)| *id)
            .collect();
        let mut live = 0;
        for conn in conns {
            if self.live.get(&agent) == Some(&conn) {
                live += 1;
            }
            self.close(
                conn,
                close::REVOKED,
                "agent revoked",
                Some(CloseWhy::Revoked),
            );
            self.retire(now, conn, 0);
        }
        live
    }

    // ---- enrollment

    /// An enrollment request on `conn` (one per connection).
    pub fn handle_enroll(&mut self, now: Now, conn: ConnId, request: EnrollRequest) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closed {
            return;
        }
        let Kind::Enroll {
            request: held,
            answered,
        } = &mut c.kind
        else {
            return;
        };
        if held.is_some() || *answered {
            self.close(
                conn,
                close::PROTOCOL,
                "one enrollment per connection",
                Some(CloseWhy::Protocol),
            );
            return;
        }
        c.deadline = None;
        self.rearm(conn);
        if let Some(why) = request.name.as_deref().and_then(name_refusal) {
            self.enroll_refused(now, conn, EnrollRefusal::Name(why));
            return;
        }
        self.effects.push_back(Effect::Store(StoreJob::EnrollCheck {
            conn,
            token_sha256: sha256(&request.token_secret),
            at: now.wall,
            request: Box::new(request),
        }));
    }

    fn enroll_answered(&mut self, now: Now, conn: ConnId, response: EnrollResponse) {
        if let Some(c) = self.conns.get_mut(&conn) {
            if let Kind::Enroll { answered, request } = &mut c.kind {
                *answered = true;
                *request = None;
            }
            // Let the agent read the answer and close; then it is closed here.
            c.deadline = Some(now.mono_ms + EXCHANGE_TIMEOUT_MS);
        }
        self.rearm(conn);
        self.effects
            .push_back(Effect::EnrollReply { conn, response });
    }

    fn enroll_refused(&mut self, now: Now, conn: ConnId, why: EnrollRefusal) {
        let reason = match &why {
            EnrollRefusal::Token(t) => t.to_string(),
            EnrollRefusal::Name(n) | EnrollRefusal::Csr(n) => n.clone(),
            EnrollRefusal::Store => "the coordinator could not store the enrollment".into(),
        };
        self.event(CoordEvent::EnrollRefused { why });
        self.enroll_answered(now, conn, EnrollResponse::Refused { reason });
    }

    /// The shell signed (or could not sign) the CSR of `conn`'s enrollment.
    pub fn handle_signed(
        &mut self,
        now: Now,
        conn: ConnId,
        signee: Signee,
        signed: Result<Vec<u8>, String>,
    ) {
        let agent = match signee {
            Signee::Agent(agent) => agent,
            Signee::Admin {
                req, expires_at, ..
            } => {
                let Some(mut job) = self.signing.remove(&(conn, req)) else {
                    return;
                };
                match signed {
                    Ok(cert_der) => {
                        if let StoreJob::Admin { ctx, .. } = &mut job {
                            ctx.signed = Some(Signed {
                                cert_der,
                                expires_at,
                            });
                        }
                        self.admin_job(now, conn, req, job);
                    }
                    Err(why) => {
                        let why = format!("the certificate could not be signed: {why}");
                        if let StoreJob::Admin { ctx, .. } = job {
                            let ctx = *ctx;
                            self.admin_refused(now, conn, req, ctx.who, ctx.audit, why);
                        }
                    }
                }
                return;
            }
        };
        let request = match self.conns.get_mut(&conn).map(|c| &mut c.kind) {
            Some(Kind::Enroll { request, .. }) => request.take(),
            _ => None,
        };
        let Some(request) = request else {
            return;
        };
        let cert_der = match signed {
            Ok(c) => c,
            Err(why) => {
                self.enroll_refused(now, conn, EnrollRefusal::Csr(why));
                return;
            }
        };
        let enrollment = Enrollment {
            token_sha256: sha256(&request.token_secret),
            agent,
            name: request.name.clone(),
            labels: request.labels.clone(),
            cert_sha256: sha256(&cert_der),
            now: now.wall,
        };
        let seal_key = request.seal_key.0;
        self.effects.push_back(Effect::Store(StoreJob::Enroll {
            conn,
            enrollment,
            cert_der,
            seal_key,
        }));
    }

    // ---- store completions

    pub fn handle_store_done(&mut self, now: Now, done: StoreDone) {
        match done {
            StoreDone::Hello {
                conn,
                agent,
                result,
            } => self.hello_done(now, conn, agent, result),
            StoreDone::Plan { result } => self.plan_done(now, result),
            StoreDone::Changes { conn, result } => match result {
                Ok((changes, upto, more, modules)) => {
                    let modules = self.share_modules(modules);
                    if let Some(l) = self.live_mut(conn) {
                        l.sm.handle_changes(changes, upto, more, modules);
                        self.drain_session(now, conn);
                    }
                }
                Err(e) => self.session_store_failed(now, conn, e),
            },
            StoreDone::Runs {
                conn,
                batch_id,
                result,
                cache,
            } => {
                let agent = self.agent_of(conn);
                let verdict = match result {
                    Err(e) => {
                        self.session_store_failed(now, conn, e);
                        return;
                    }
                    Ok(RunsVerdict::NotAssigned(task)) => Err(format!(
                        "run of task {task} which is not assigned to this agent"
                    )),
                    Ok(RunsVerdict::Stored {
                        keys,
                        unknown,
                        conflicts,
                        recorded,
                    }) => {
                        if !recorded.is_empty() {
                            self.follow_runs(&recorded);
                            self.event(CoordEvent::RunsRecorded {
                                runs: recorded.iter().map(RunFacts::of).collect(),
                            });
                        }
                        if let Some(agent) = agent {
                            for task in unknown {
                                self.event(CoordEvent::RunsOfUnknownTask { agent, task });
                            }
                            for key in conflicts {
                                self.event(CoordEvent::RunConflict { agent, key });
                            }
                        }
                        Ok(keys)
                    }
                };
                if self.bugs.ack_before_commit {
                    // Acknowledged already, before the commit.
                    if let Some(l) = self.live_mut(conn) {
                        l.cache = Some(cache);
                    }
                    return;
                }
                if let Some(l) = self.live_mut(conn) {
                    l.cache = Some(cache);
                    l.sm.handle_stored(now, batch_id, verdict);
                    let left = l.sm.upload_allowance();
                    if let Some(s) = agent.and_then(|a| self.seen.get_mut(&a)) {
                        s.uploads = Some(left);
                    }
                    self.drain_session(now, conn);
                }
            }
            StoreDone::Clocks { result } => {
                self.clocks_storing = false;
                if !self.clocks.is_empty() {
                    self.clocks_next_ms = Some(now.mono_ms + CLOCKS_STORE_EVERY_MS);
                }
                if let Err(e) = result {
                    self.store_failed(e);
                }
            }
            StoreDone::Seen { result } | StoreDone::Queued { result } => {
                if let Err(e) = result {
                    self.store_failed(e);
                }
            }
            StoreDone::AuditRefused {
                conn,
                req,
                why,
                result,
            } => self.audit_refused_done(now, conn, req, why, result),
            StoreDone::AuditRunNow {
                conn,
                req,
                run,
                result,
            } => self.audit_run_now_done(now, conn, req, run, result),
            StoreDone::Feed { result } => self.feed_done(now, result),
            StoreDone::Admin {
                conn,
                req,
                result,
                audit,
            } => self.admin_done(now, conn, req, result, audit),
            StoreDone::PurgeAudit {
                before,
                max,
                result,
            } => match result {
                Ok(n) if n >= max => {
                    self.effects
                        .push_back(Effect::Store(StoreJob::PurgeAudit { before, max }));
                }
                Ok(n) => {
                    self.purging_audit = false;
                    if n > 0 {
                        self.event(CoordEvent::AuditPurged { before });
                    }
                }
                Err(e) => {
                    self.purging_audit = false;
                    self.store_failed(e);
                }
            },
            StoreDone::EnrollCheck {
                conn,
                result,
                request,
            } => match result {
                Ok(Ok(agent)) => {
                    let csr_der = request.csr_der.clone();
                    if let Some(Kind::Enroll { request: held, .. }) =
                        self.conns.get_mut(&conn).map(|c| &mut c.kind)
                    {
                        *held = Some(request);
                        self.effects.push_back(Effect::Sign {
                            conn,
                            signee: Signee::Agent(agent),
                            csr_der,
                        });
                    }
                }
                Ok(Err(refusal)) => self.enroll_refused(now, conn, EnrollRefusal::Token(refusal)),
                Err(e) => self.enroll_store_failed(now, conn, e),
            },
            StoreDone::Enroll {
                conn,
                result,
                cert_der,
            } => match result {
                Ok(Ok(agent)) => {
                    self.known
                        .insert(agent.cert_sha256, CertRole::Agent(agent.id));
                    if self.bugs.miss_later_joiners && now.mono_ms > self.started_ms + 10_000 {
                        self.joined.insert(agent.id);
                    }
                    self.event(CoordEvent::Enrolled {
                        agent: agent.id,
                        name: agent.name.clone(),
                    });
                    let response = EnrollResponse::Enrolled {
                        agent_id: agent.id,
                        cert_der,
                        ca_der: self.ca_der.clone(),
                    };
                    self.enroll_answered(now, conn, response);
                }
                Ok(Err(refusal)) => self.enroll_refused(now, conn, EnrollRefusal::Token(refusal)),
                Err(e) => self.enroll_store_failed(now, conn, e),
            },
            StoreDone::Purge {
                before,
                max,
                result,
            } => match result {
                Ok(n) => {
                    self.purged += n;
                    if n >= max {
                        self.effects
                            .push_back(Effect::Store(StoreJob::Purge { before, max }));
                        return;
                    }
                    if self.purged > 0 {
                        self.event(CoordEvent::RunsPurged {
                            deleted: self.purged,
                            before,
                        });
                    }
                    self.purging = false;
                    self.next_purge_ms = Some(now.mono_ms + PURGE_INTERVAL_MS);
                }
                Err(e) => {
                    self.store_failed(e);
                    self.purging = false;
                    self.next_purge_ms = Some(now.mono_ms + PURGE_INTERVAL_MS);
                }
            },
        }
    }

    fn enroll_store_failed(&mut self, now: Now, conn: ConnId, e: StoreError) {
        if e.is_refusal() {
            let reason = e.to_string();
            self.event(CoordEvent::EnrollRefused {
                why: EnrollRefusal::Csr(reason.clone()),
            });
            self.enroll_answered(now, conn, EnrollResponse::Refused { reason });
            return;
        }
        self.store_failed(e);
        self.enroll_refused(now, conn, EnrollRefusal::Store);
    }

    fn session_store_failed(&mut self, now: Now, conn: ConnId, e: StoreError) {
        self.store_failed(e);
        self.close(
            conn,
            close::STORE,
            "coordinator store failed",
            Some(CloseWhy::StoreFailed),
        );
        self.retire(now, conn, 0);
    }

    fn agent_of(&self, conn: ConnId) -> Option<AgentId> {
        match self.conns.get(&conn).map(|c| &c.kind) {
            Some(Kind::Session { agent, .. }) => Some(*agent),
            _ => None,
        }
    }

    fn live_mut(&mut self, conn: ConnId) -> Option<&mut LiveSession> {
        let c = self.conns.get_mut(&conn)?;
        if c.closed {
            return None;
        }
        match &mut c.kind {
            Kind::Session {
                phase: Phase::Live(l),
                ..
            } => Some(l),
            _ => None,
        }
    }
}

/// Why an agent may not take this name: one that reads as an agent id
/// (`a1`, `7`) would shadow that agent wherever names and ids are accepted.
pub fn name_refusal(name: &str) -> Option<String> {
    name.parse::<AgentId>().is_ok().then(|| {
        format!("the name `{name}` reads as an agent id (ids are a1, a2, ...): choose a name that does not")
    })
}

#[cfg(test)]
mod tests;
