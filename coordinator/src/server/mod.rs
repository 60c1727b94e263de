//! The coordinator's QUIC server: enrollment, agent sessions and the admin
//! API on one UDP port, told apart by ALPN.
//!
//! Trust: the TLS layer accepts only client certificates that chain to our
//! CA *and* are known (an enrolled, unrevoked agent, or the admin); anything
//! else — a self-signed certificate, another CA's, a revoked agent's — fails
//! the handshake. A connection without a certificate completes TLS only so it
//! can enroll: on the session and admin ALPNs it is closed at once with
//! `CERT_REQUIRED`. An agent's identity is its certificate's fingerprint,
//! never a claim in a message: run records are stored under the session's
//! agent id whatever they say.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sundial_protocol::codec::FRAME_BYTES_MAX;
use sundial_protocol::policy::RETRIES_MAX;
use sundial_protocol::task::{Action, Target};
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    busy_reason, chunk_by_size, close, AdminRequest, AdminResponse, AgentInfo, AgentMsg, CoordMsg,
    EnrollRequest, EnrollResponse, ReconnectPolicy, TaskDraft, TaskInfo, TaskPatch, TokenInfo,
    ADMIN_REQUEST_BYTES_MAX, ALPN, ALPN_ADMIN, ALPN_ENROLL, ENROLL_FRAME_BYTES_MAX,
    HELLO_FRAME_BYTES_MAX, LIST_CHUNK_BYTES_MAX, TASK_SPEC_BYTES_MAX,
};
use sundial_protocol::{
    AgentId, DurationMs, RunKey, RunRecord, ScheduleKind, TaskId, TaskSpec, Timestamp,
};
use tokio::sync::{watch, Semaphore};

use sundial_core::admission::{Admit, HandshakeBudget};
use sundial_core::session::coordinator::{
    CoordEffect, CoordSession, UploadAllowance, UploadLimits, CHANGES_PAGE_MAX,
};
use sundial_core::session::{Event, Now};

use crate::cli::now;
use crate::net::{self, FramedRecv, NetError};
use crate::pki::Pki;
use crate::store::{
    Agent, AgentSeen, CertRole, CoordStore, CoordinatorStore, Enrollment, JoinToken, Page,
    RunCursor, RunQuery, StoreError, StoredTask, TokenRefusal, PAGE_MAX,
};

/// Every agent, read a page (one transaction) at a time.
fn all_agents(store: &dyn CoordStore) -> Result<Vec<Agent>, StoreError> {
    let mut out: Vec<Agent> = Vec::new();
    loop {
        let page = store.agents(out.last().map(|a| a.id), PAGE_MAX)?;
        let full = page.len() >= PAGE_MAX;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Every task, a page at a time.
fn all_tasks(store: &dyn CoordStore) -> Result<Vec<StoredTask>, StoreError> {
    let mut out: Vec<StoredTask> = Vec::new();
    loop {
        let page = store.tasks(out.last().map(|t| t.spec.id), PAGE_MAX)?;
        let full = page.len() >= PAGE_MAX;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Every join token, a page at a time.
fn all_tokens(store: &dyn CoordStore) -> Result<Vec<JoinToken>, StoreError> {
    let mut out: Vec<JoinToken> = Vec::new();
    loop {
        let page = store.tokens(out.last().map(|t| t.secret_sha256), PAGE_MAX)?;
        let full = page.len() >= PAGE_MAX;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

/// Every known certificate, a page at a time.
fn all_certs(store: &dyn CoordStore) -> Result<Vec<([u8; 32], CertRole)>, StoreError> {
    let mut out: Vec<([u8; 32], CertRole)> = Vec::new();
    loop {
        let page = store.known_certs(out.last().map(|c| c.0), PAGE_MAX)?;
        let full = page.len() >= PAGE_MAX;
        out.extend(page);
        if !full {
            return Ok(out);
        }
    }
}

mod admin;
mod enroll;
pub use enroll::name_refusal;
mod session;

use admin::handle_admin;
use enroll::handle_enroll;
use session::handle_session;

/// A default TTL for tokens: one hour.
pub const TOKEN_TTL_DEFAULT: DurationMs = DurationMs(3_600_000);

/// The store's file name in the data directory.
pub const STORE_FILE: &str = "coordinator.redb";
/// The default UDP port.
pub const PORT_DEFAULT: u16 = 7447;
/// Most runs listed by one `run list`.
pub const RUN_LIST_MAX: u32 = 10_000;
/// How long an enrollment or admin exchange may take, and how long a new
/// agent connection may take to say Hello.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How far in the past an `at` instant or a window's end may lie when a task
/// is created (clock differences between admin and coordinator).
const PAST_SLACK_MS: i64 = 10_000;
/// Run records deleted per transaction by retention.
const PURGE_BATCH_RUNS_MAX: usize = 10_000;
/// How often retention looks for old runs.
const PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// Messages read from an agent and not yet handled: more than the result
/// batches an agent keeps in flight, so its writes never wait on ours.
const SESSION_INBOX_MAX: usize = 16;
/// Connections from one address still handshaking or enrolling, by default:
/// an address cannot hold more of the coordinator than this before it is
/// known (`serve --pending-per-address`).
pub const PENDING_PER_ADDRESS_MAX: usize = 32;
/// The refusals at [`PENDING_PER_ADDRESS_MAX`] are logged at most this often.
const PENDING_WARN_INTERVAL: Duration = Duration::from_secs(10);
/// Messages from admin work waiting for one session to send (run-now).
const SESSION_OUTBOX_MAX: usize = 64;
/// Tasks whose assignment to a session's agent is remembered (a cache; cleared when full).
const ASSIGNED_CACHE_MAX: usize = 100_000;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Pki(#[from] crate::pki::PkiError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no coordinator (run `sundial-coordinator init` first)")]
    NotInitialized(PathBuf),
    /// Another process holds the store.
    #[error("{0} is in use by another process: is another sundial-coordinator serving this data directory?")]
    Busy(PathBuf),
    /// The store could not write (see the log); restart to reopen it.
    #[error(
        "the store failed to write (disk full or failing?); stopped so that a restart reopens it"
    )]
    StoreBroken,
    /// The CA exists but the store does not (or is empty): the coordinator's
    /// agents, tasks and runs are gone. Serving an empty store would refuse
    /// every agent and admin; restore the file from a backup instead.
    #[error("{store} is {what}, but {dir} holds this coordinator's CA: its agents, tasks and runs would be lost. Restore {store} from a backup and start again; to start over with a new CA (every agent must then join again), move {dir} away and run `sundial-coordinator init`")]
    StoreLost {
        store: PathBuf,
        dir: PathBuf,
        what: &'static str,
    },
}

/// The coordinator's limits; each is documented in the README and set by
/// `serve` flags or the configuration file.
#[derive(Debug, Clone)]
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
    /// Agent sessions served at once.
    pub sessions_max: usize,
    /// Connections without a client certificate (enrollment) served at once.
    pub unauthenticated_max: usize,
    /// Admin requests served at once (each on the blocking pool, never on
    /// the workers that serve agent sessions).
    pub admin_concurrent_max: usize,
    /// Connections from one address still handshaking or enrolling.
    pub pending_per_address_max: usize,
    /// New connections accepted per second (handshakes are the costly part
    /// of a reconnect storm); the rest are refused at once, before any
    /// cryptography, and agents come back spread over the time the
    /// coordinator's reconnect policy says the fleet needs.
    pub handshakes_per_sec: u32,
}

/// The default handshake budget: per core, what one core does with room
/// to spare for the sessions themselves.
pub fn handshakes_per_sec_default() -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (HANDSHAKES_PER_SEC_PER_CORE * cores as u32).max(HANDSHAKES_PER_SEC_PER_CORE)
}

/// See [`handshakes_per_sec_default`].
pub const HANDSHAKES_PER_SEC_PER_CORE: u32 = 250;
/// How long agents are asked to let one connection attempt last, ms.
pub const ATTEMPT_TIMEOUT_MS: u32 = 3_000;
/// The first backoff agents are asked to use, ms.
pub const BACKOFF_FLOOR_MS: u32 = 250;
/// The backoff cap agents are asked to use at least / at most, ms: between,
/// the time the whole fleet needs to reconnect at the handshake budget.
pub const BACKOFF_CAP_MIN_MS: u32 = 2_000;
pub const BACKOFF_CAP_MAX_MS: u32 = 60_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            upload_runs_per_sec: 2_000,
            upload_bytes_per_sec: 8 * 1024 * 1024,
            period_min: DurationMs(100),
            backoff_min: DurationMs(100),
            run_retention: None,
            sessions_max: 10_000,
            unauthenticated_max: 64,
            admin_concurrent_max: 4,
            pending_per_address_max: PENDING_PER_ADDRESS_MAX,
            handshakes_per_sec: handshakes_per_sec_default(),
        }
    }
}

type KnownCerts = Arc<RwLock<HashMap<[u8; 32], CertRole>>>;

#[derive(Debug)]
struct KnownCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    known: KnownCerts,
}

impl ClientCertVerifier for KnownCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Enrollment comes without a certificate; see the module doc.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let fp = sha256(end_entity.as_ref());
        let known = self
            .known
            .read()
            .map(|k| k.contains_key(&fp))
            .unwrap_or(false);
        if known {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "certificate revoked or unknown to this coordinator".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The live sessions of one agent (a reconnecting agent may briefly have two).
#[derive(Debug, Default)]
struct Live {
    conns: Vec<quinn::Connection>,
    /// Messages for each session to send (same order as `conns`).
    outs: Vec<tokio::sync::mpsc::Sender<CoordMsg>>,
    /// Each session's revision feed (same order): a change reaches only the
    /// sessions of the agents it targets.
    kicks: Vec<watch::Sender<u64>>,
    /// The agent's labels, for selector targets.
    labels: Vec<(String, String)>,
}

/// What the last session of an agent said, kept in memory for `agent list`.
#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<String>,
    allow_exec: Vec<String>,
    outbox_len: Option<u64>,
    /// The last message received, Unix ms.
    last_contact_ms: Option<i64>,
    /// What its last session left of its upload limits.
    uploads: Option<UploadAllowance>,
}

/// Shared state of a running coordinator.
#[derive(Debug)]
struct State {
    store: Box<dyn CoordStore>,
    pki: Pki,
    known: KnownCerts,
    live: Mutex<HashMap<AgentId, Live>>,
    seen: Mutex<HashMap<AgentId, Seen>>,
    revision: watch::Sender<u64>,
    limits: Limits,
    unauthenticated: Arc<Semaphore>,
    admin_slots: Arc<Semaphore>,
    /// Set when the store hit an I/O error: redb refuses every write from
    /// then on, so the coordinator stops and its supervisor restarts it.
    store_broken: std::sync::atomic::AtomicBool,
    store_broken_notify: tokio::sync::Notify,
    /// Connections per address not yet known ([`Pending`]).
    pending: Mutex<HashMap<std::net::IpAddr, usize>>,
    pending_warned: Mutex<Option<Instant>>,
    /// Agent sessions open (the sum over `live`, kept as it changes).
    sessions_open: std::sync::atomic::AtomicUsize,
    /// The handshake budget, fair per address.
    handshakes: Mutex<HandshakeBudget>,
    /// The monotonic origin of the budget's clock.
    started: Instant,
    /// Handshakes refused for the budget since the last warning (of them,
    /// from an address over its share), and when it was.
    shed: Mutex<(u64, u64, Option<Instant>)>,
}

impl State {
    /// Decides one new connection from `ip` by the handshake budget, fair
    /// per address (`sundial_core::admission`).
    fn take_handshake(&self, ip: std::net::IpAddr) -> Admit {
        let Ok(mut b) = self.handshakes.lock() else {
            return Admit::Yes;
        };
        let now_ms = self.started.elapsed().as_millis() as u64;
        b.take(now_ms, ip)
    }

    /// A handshake was refused for the budget: says so at most every few seconds.
    fn note_shed(&self, why: Admit, ip: std::net::IpAddr) {
        if let Ok(mut s) = self.shed.lock() {
            s.0 += 1;
            if why == Admit::OverShare {
                s.1 += 1;
            }
            if s.2.is_none_or(|t| t.elapsed() >= PENDING_WARN_INTERVAL) {
                tracing::warn!(
                    refused = s.0,
                    over_address_share = s.1,
                    last_address = %ip,
                    budget_per_sec = self.limits.handshakes_per_sec,
                    sessions = self.sessions_open.load(std::sync::atomic::Ordering::Relaxed),
                    "reconnect storm: refusing handshakes over the budget; agents come back spread out"
                );
                *s = (0, 0, Some(Instant::now()));
            }
        }
    }

    /// What agents are asked to follow when reconnecting: the time the
    /// fleet needs to come back at the handshake budget sets the backoff
    /// cap and the spread of refused agents.
    fn reconnect_policy(&self) -> ReconnectPolicy {
        let budget = u64::from(self.limits.handshakes_per_sec.max(1));
        let fleet = self
            .sessions_open
            .load(std::sync::atomic::Ordering::Relaxed) as u64
            + 1;
        let need_ms = (fleet * 1_000 / budget).min(u64::from(u32::MAX)) as u32;
        ReconnectPolicy {
            attempt_timeout_ms: ATTEMPT_TIMEOUT_MS,
            backoff_floor_ms: BACKOFF_FLOOR_MS,
            backoff_cap_ms: need_ms.clamp(BACKOFF_CAP_MIN_MS, BACKOFF_CAP_MAX_MS),
            busy_spread_ms: need_ms.clamp(1_000, BACKOFF_CAP_MAX_MS),
            handshakes_per_sec: self.limits.handshakes_per_sec,
        }
    }

    /// Says (at most every [`PENDING_WARN_INTERVAL`]) that an address hit
    /// [`PENDING_PER_ADDRESS_MAX`].
    fn warn_pending_cap(&self, ip: std::net::IpAddr) {
        if let Ok(mut last) = self.pending_warned.lock() {
            if last.is_none_or(|t| t.elapsed() >= PENDING_WARN_INTERVAL) {
                *last = Some(Instant::now());
                tracing::warn!(%ip, max = self.limits.pending_per_address_max, "refusing connections from an address with too many unauthenticated ones (handshaking or enrolling)");
            }
        }
    }

    /// A task targeting `target` changed at `revision`: wakes the sessions
    /// of the agents it reaches, and no other (the index is the live-session
    /// table with its labels; no session re-reads the store for a change
    /// that is not its own).
    fn announce(&self, target: &sundial_protocol::task::Target, revision: u64) {
        self.revision.send_replace(revision);
        let Ok(live) = self.live.lock() else {
            return;
        };
        let mut woken = 0usize;
        for (agent, l) in live.iter() {
            if crate::store::targets(target, *agent, &l.labels) {
                for k in &l.kicks {
                    k.send_replace(revision);
                    woken += 1;
                }
            }
        }
        tracing::debug!(revision, sessions = woken, "change announced");
    }

    /// Notes a store error; an I/O error (disk full, read-only, failing)
    /// stops the server, which exits so that a restart reopens the store.
    fn note_store_error(&self, e: &StoreError) {
        if e.is_unavailable()
            && !self
                .store_broken
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!(error = %e, "the store failed to write (disk full or failing?); stopping so the supervisor restarts the coordinator with the store reopened. Nothing committed is lost; agents keep their records until then");
            self.store_broken_notify.notify_one();
        }
    }

    fn live_sessions(&self) -> usize {
        self.sessions_open
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Closes every live session of `agent` with `code`.
    fn close_sessions(&self, agent: AgentId, code: u32, reason: &[u8]) -> usize {
        let conns = self
            .live
            .lock()
            .map(|mut l| l.remove(&agent).map(|v| v.conns).unwrap_or_default())
            .unwrap_or_default();
        for c in &conns {
            c.close(code.into(), reason);
        }
        conns.len()
    }
}

/// A bound, ready coordinator.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    state: Arc<State>,
}

/// Refuses to serve a store that is gone while the CA says one existed.
fn check_store_present(dir: &Path) -> Result<(), ServeError> {
    if !dir.join(crate::pki::CA_CERT).exists() {
        return Ok(());
    }
    let store = dir.join(STORE_FILE);
    let what = match std::fs::metadata(&store) {
        Ok(m) if m.len() == 0 => "empty",
        Ok(_) => return Ok(()),
        Err(_) => "missing",
    };
    Err(ServeError::StoreLost {
        store,
        dir: dir.to_owned(),
        what,
    })
}

/// Whether `dir` holds an initialized coordinator.
pub fn is_initialized(dir: &Path) -> bool {
    dir.join(crate::pki::CA_CERT).exists() && dir.join(STORE_FILE).exists()
}

/// `sundial-coordinator init`: creates CA, server certificate, admin
/// credentials and the store. Returns the credentials' path.
pub fn init(dir: &Path, advertise: &str, server_name: &str) -> Result<PathBuf, ServeError> {
    init_with(dir, advertise, server_name, false)
}

/// `init`; with `force`, a CA already in `dir` is replaced (every agent
/// enrolled with it is locked out and must join again).
pub fn init_with(
    dir: &Path,
    advertise: &str,
    server_name: &str,
    force: bool,
) -> Result<PathBuf, ServeError> {
    if dir.join(crate::pki::CA_CERT).exists() && !force {
        let store = if dir.join(STORE_FILE).exists() {
            "its store is there too"
        } else {
            "its store is missing: restore it from a backup rather than starting over"
        };
        return Err(ServeError::Tls(format!(
            "{} already holds a coordinator's CA ({store}); refusing to replace it, which would lock out every enrolled agent. Pass --force to start over with a new CA",
            dir.display()
        )));
    }
    if force {
        let _ = std::fs::remove_file(dir.join(STORE_FILE));
    }
    sundial_net::private::create_private_dir(dir)
        .map_err(|e| ServeError::Tls(format!("cannot create {}: {e}", dir.display())))?;
    let (_pki, admin_der) = Pki::init(dir, server_name, advertise)?;
    let store = CoordinatorStore::open(&dir.join(STORE_FILE))?;
    restrict_data_dir(dir);
    store.add_admin_cert(sha256(admin_der.as_ref()))?;
    store.put_setting("advertise", advertise)?;
    store.put_setting("server_name", server_name)?;
    Ok(dir.join(crate::pki::ADMIN_CREDS))
}

/// Takes group and other access away from the data directory (0700) and
/// every file in it (0600); logs what it cannot change.
fn restrict_data_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let restrict = |path: &Path, mode: u32| {
        let Ok(m) = std::fs::metadata(path) else {
            return;
        };
        if m.permissions().mode() & 0o077 != 0 {
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
                tracing::warn!(path = %path.display(), error = %e, "cannot make this private to its owner");
            }
        }
    };
    restrict(dir, 0o700);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_file()) {
                restrict(&e.path(), 0o600);
            }
        }
    }
}

impl Server {
    /// Opens the data directory and binds the UDP socket.
    pub fn bind(dir: &Path, listen: SocketAddr) -> Result<Server, ServeError> {
        Server::bind_with(dir, listen, Limits::default())
    }

    /// Opens the data directory and binds, with these limits.
    pub fn bind_with(dir: &Path, listen: SocketAddr, limits: Limits) -> Result<Server, ServeError> {
        check_store_present(dir)?;
        if !is_initialized(dir) {
            return Err(ServeError::NotInitialized(dir.to_owned()));
        }
        let pki = Pki::load(dir)?;
        let store: Box<dyn CoordStore> = match CoordinatorStore::open(&dir.join(STORE_FILE)) {
            Ok(s) => Box::new(s),
            Err(StoreError::Locked(_)) => return Err(ServeError::Busy(dir.join(STORE_FILE))),
            Err(e) => return Err(ServeError::Store(e)),
        };
        // The store holds task environments and run output, the directory
        // the CA key: the owner's only, whatever the umask was.
        restrict_data_dir(dir);
        let known: KnownCerts = Arc::new(RwLock::new(
            all_certs(store.as_ref())?.into_iter().collect(),
        ));
        let provider = sundial_net::tls::provider();
        let mut roots = RootCertStore::empty();
        roots
            .add(pki.ca_der.clone())
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let verifier = Arc::new(KnownCertVerifier {
            inner,
            known: known.clone(),
        });
        let id = pki.server_identity()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ServeError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(id.chain, id.key)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec(), ALPN_ENROLL.to_vec(), ALPN_ADMIN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(net::server_transport());
        let endpoint =
            quinn::Endpoint::server(config, listen).map_err(|source| ServeError::Bind {
                addr: listen,
                source,
            })?;
        let (revision, _) = watch::channel(store.revision()?);
        let limits_rate = limits.handshakes_per_sec;
        Ok(Server {
            endpoint,
            state: Arc::new(State {
                store,
                pki,
                known,
                live: Mutex::new(HashMap::new()),
                seen: Mutex::new(HashMap::new()),
                revision,
                unauthenticated: Arc::new(Semaphore::new(limits.unauthenticated_max)),
                admin_slots: Arc::new(Semaphore::new(limits.admin_concurrent_max)),
                limits,
                store_broken: std::sync::atomic::AtomicBool::new(false),
                store_broken_notify: tokio::sync::Notify::new(),
                pending: Mutex::new(HashMap::new()),
                pending_warned: Mutex::new(None),
                sessions_open: std::sync::atomic::AtomicUsize::new(0),
                handshakes: Mutex::new(HandshakeBudget::new(limits_rate, 0)),
                started: Instant::now(),
                shed: Mutex::new((0, 0, None)),
            }),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, or until the store fails to write
    /// (then the error says so and the process should exit non-zero).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let mut failed = false;
        tokio::pin!(shutdown);
        tracing::info!(addr = ?self.local_addr(), limits = ?self.state.limits, "coordinator serving");
        let retention = self
            .state
            .limits
            .run_retention
            .map(|keep| tokio::spawn(retain_runs(self.state.clone(), keep)));
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let ip = incoming.remote_address().ip();
                    let Some(pending) = Pending::take(&self.state, ip) else {
                        self.state.warn_pending_cap(ip);
                        incoming.refuse();
                        continue;
                    };
                    let admit = self.state.take_handshake(ip);
                    if admit != Admit::Yes {
                        self.state.note_shed(admit, ip);
                        incoming.refuse();
                        continue;
                    }
                    let state = self.state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(state, incoming, pending).await {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                }
                _ = &mut shutdown => break,
                _ = self.state.store_broken_notify.notified() => {
                    failed = true;
                    break;
                }
            }
        }
        if let Some(r) = retention {
            r.abort();
        }
        self.endpoint
            .close(close::DONE.into(), b"coordinator stopping");
        self.endpoint.wait_idle().await;
        if failed {
            return Err(ServeError::StoreBroken);
        }
        Ok(())
    }
}

/// Runs blocking store work on the blocking pool, never on the async
/// workers that serve sessions.
async fn blocking<T: Send + 'static>(
    state: &Arc<State>,
    f: impl FnOnce(&State) -> T + Send + 'static,
) -> Option<T> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state)).await.ok()
}

/// Deletes runs older than the retention, in bounded batches.
async fn retain_runs(state: Arc<State>, keep: DurationMs) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tick.tick().await;
        let before = now().saturating_add_ms(-keep.as_millis_i64());
        let mut total = 0usize;
        loop {
            match blocking(&state, move |s| {
                s.store.purge_runs_before(before, PURGE_BATCH_RUNS_MAX)
            })
            .await
            {
                Some(Ok(n)) => {
                    total += n;
                    if n < PURGE_BATCH_RUNS_MAX {
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "run retention: could not delete old runs");
                    state.note_store_error(&e);
                    break;
                }
                None => break,
            }
        }
        if total > 0 {
            tracing::info!(deleted = total, %before, "run retention: deleted runs scheduled before the retention");
        }
    }
}

/// A connection from `ip` not yet known to be an enrolled agent or the
/// admin (handshaking, or enrolling); counted per address while it lives.
struct Pending {
    state: Arc<State>,
    ip: std::net::IpAddr,
}

impl Pending {
    /// Counts one more, unless the address already has its maximum.
    fn take(state: &Arc<State>, ip: std::net::IpAddr) -> Option<Pending> {
        let mut p = state.pending.lock().ok()?;
        let n = p.entry(ip).or_insert(0);
        if *n >= state.limits.pending_per_address_max {
            return None;
        }
        *n += 1;
        Some(Pending {
            state: state.clone(),
            ip,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut p) = self.state.pending.lock() {
            if let Some(n) = p.get_mut(&self.ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    p.remove(&self.ip);
                }
            }
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pending({})", self.ip)
    }
}

async fn handle(
    state: Arc<State>,
    incoming: quinn::Incoming,
    pending: Pending,
) -> Result<(), NetError> {
    let remote = incoming.remote_address();
    let conn = incoming.await?;
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default();
    let role = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| sha256(c.as_ref())))
        .and_then(|fp| state.known.read().ok().and_then(|k| k.get(&fp).copied()));
    match (alpn.as_slice(), role) {
        (a, _) if a == ALPN_ENROLL => {
            // Peers without a certificate are bounded: a few at a time, small
            // frames, short deadlines.
            let Ok(_slot) = state.unauthenticated.clone().try_acquire_owned() else {
                tracing::warn!(%remote, max = state.limits.unauthenticated_max, "enrollment refused: too many unauthenticated connections at once");
                conn.close(
                    close::BUSY.into(),
                    b"too many enrollments at once; try again",
                );
                return Ok(());
            };
            handle_enroll(&state, conn).await
        }
        (a, Some(CertRole::Agent(id))) if a == ALPN => {
            // Known by its certificate: no longer counted against its address
            // (many agents may share one behind a NAT).
            drop(pending);
            handle_session(&state, conn, id).await
        }
        (a, Some(CertRole::Admin)) if a == ALPN_ADMIN => {
            drop(pending);
            handle_admin(&state, conn).await
        }
        _ => {
            tracing::warn!(%remote, "refused a connection without the certificate its ALPN requires");
            conn.close(
                close::CERT_REQUIRED.into(),
                b"a known client certificate is required",
            );
            Ok(())
        }
    }
}

fn close_for(conn: &quinn::Connection, e: NetError) -> NetError {
    match &e {
        NetError::Frame(f) => {
            tracing::warn!(error = %f, remote = %conn.remote_address(), "bad frame; closing the connection");
            conn.close(close::BAD_FRAME.into(), f.to_string().as_bytes());
        }
        NetError::Eof => conn.close(close::DONE.into(), b""),
        _ => {}
    }
    e
}
