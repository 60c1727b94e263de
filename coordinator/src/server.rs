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
    chunk_by_size, close, AdminRequest, AdminResponse, AgentInfo, AgentMsg, CoordMsg,
    EnrollRequest, EnrollResponse, TaskDraft, TaskInfo, TaskPatch, TokenInfo,
    ADMIN_REQUEST_BYTES_MAX, ALPN, ALPN_ADMIN, ALPN_ENROLL, ENROLL_FRAME_BYTES_MAX,
    HELLO_FRAME_BYTES_MAX, LIST_CHUNK_BYTES_MAX, TASK_SPEC_BYTES_MAX,
};
use sundial_protocol::{
    AgentId, DurationMs, RunKey, RunRecord, ScheduleKind, TaskId, TaskSpec, Timestamp,
};
use tokio::sync::{watch, Semaphore};

use sundial_core::session::coordinator::{CoordEffect, CoordSession, UploadLimits};
use sundial_core::session::{Event, Now};

use crate::cli::now;
use crate::net::{self, FramedRecv, NetError};
use crate::pki::Pki;
use crate::store::{
    AgentRecordV1, CertRole, CoordinatorStore, Page, RunCursor, RunQuery, StoreError, TokenRecordV1,
};

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
}

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
}

/// What the last session of an agent said, kept in memory for `agent list`.
#[derive(Debug, Default, Clone)]
struct Seen {
    version: Option<String>,
    allow_exec: Vec<String>,
    outbox_len: Option<u64>,
    /// The last message received, Unix ms.
    last_contact_ms: Option<i64>,
}

/// Shared state of a running coordinator.
#[derive(Debug)]
struct State {
    store: CoordinatorStore,
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
}

impl State {
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

    /// Notes a store error; an I/O error (disk full, read-only, failing)
    /// stops the server, which exits so that a restart reopens the store.
    fn note_store_error(&self, e: &StoreError) {
        if e.is_io()
            && !self
                .store_broken
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            tracing::error!(error = %e, "the store failed to write (disk full or failing?); stopping so the supervisor restarts the coordinator with the store reopened. Nothing committed is lost; agents keep their records until then");
            self.store_broken_notify.notify_one();
        }
    }

    fn live_sessions(&self) -> usize {
        self.live
            .lock()
            .map(|l| l.values().map(|v| v.conns.len()).sum())
            .unwrap_or(0)
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
    let (_pki, admin_der) = Pki::init(dir, server_name, advertise)?;
    let store = CoordinatorStore::open(&dir.join(STORE_FILE))?;
    store.add_admin_cert(sha256(admin_der.as_ref()))?;
    store.put_meta_str("advertise", advertise)?;
    store.put_meta_str("server_name", server_name)?;
    Ok(dir.join(crate::pki::ADMIN_CREDS))
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
        let store = CoordinatorStore::open(&dir.join(STORE_FILE)).map_err(|e| {
            if e.is_already_open() {
                ServeError::Busy(dir.join(STORE_FILE))
            } else {
                ServeError::Store(e)
            }
        })?;
        let known: KnownCerts = Arc::new(RwLock::new(store.known_certs()?.into_iter().collect()));
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
        config.transport_config(net::transport());
        let endpoint =
            quinn::Endpoint::server(config, listen).map_err(|source| ServeError::Bind {
                addr: listen,
                source,
            })?;
        let (revision, _) = watch::channel(store.revision()?);
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

async fn handle_enroll(state: &Arc<State>, conn: quinn::Connection) -> Result<(), NetError> {
    let (mut send, recv) = tokio::time::timeout(EXCHANGE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| NetError::Eof)??;
    let mut recv = FramedRecv::with_limit(recv, ENROLL_FRAME_BYTES_MAX);
    let req: EnrollRequest = match tokio::time::timeout(EXCHANGE_TIMEOUT, recv.next()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(close_for(&conn, e)),
        Err(_) => {
            conn.close(close::PROTOCOL.into(), b"no enrollment request in time");
            return Err(NetError::Eof);
        }
    };
    let resp = blocking(state, move |s| enroll(s, req))
        .await
        .unwrap_or_else(|| EnrollResponse::Refused {
            reason: "the coordinator could not process the enrollment".into(),
        });
    net::send(&mut send, &resp).await?;
    send.finish()?;
    // Let the agent read the answer and close.
    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, conn.closed()).await;
    Ok(())
}

fn enroll(state: &State, req: EnrollRequest) -> EnrollResponse {
    let refused = |reason: String| EnrollResponse::Refused { reason };
    let secret_hash = sha256(&req.token_secret);
    let outcome = state.store.enroll(
        secret_hash,
        now(),
        req.name.clone(),
        req.labels.clone(),
        |id| state.pki.sign_agent_csr(&req.csr_der, id),
    );
    match outcome {
        Ok(Ok((agent_id, cert_der))) => {
            if let Ok(mut k) = state.known.write() {
                k.insert(sha256(&cert_der), CertRole::Agent(agent_id));
            }
            tracing::info!(agent = %agent_id, name = ?req.name, "agent enrolled");
            EnrollResponse::Enrolled {
                agent_id,
                cert_der,
                ca_der: state.pki.ca_der.to_vec(),
            }
        }
        Ok(Err(refusal)) => {
            tracing::warn!(reason = %refusal, "enrollment refused");
            refused(refusal.to_string())
        }
        Err(StoreError::Refused(why)) => refused(why),
        Err(e) => {
            tracing::error!(error = %e, "enrollment failed");
            state.note_store_error(&e);
            refused("the coordinator could not store the enrollment".into())
        }
    }
}

// ---- sessions -------------------------------------------------------------

async fn handle_session(
    state: &Arc<State>,
    conn: quinn::Connection,
    agent: AgentId,
) -> Result<(), NetError> {
    let remote = conn.remote_address();
    // A connection that says nothing is not kept: Hello comes within the
    // exchange deadline, and is small.
    let opened = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let (send, recv) = conn.accept_bi().await?;
        let mut recv = FramedRecv::with_limit(recv, HELLO_FRAME_BYTES_MAX);
        let hello: AgentMsg = recv.next().await?;
        Ok::<_, NetError>((send, recv, hello))
    })
    .await;
    let (mut send, mut recv, hello) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Err(close_for(&conn, e)),
        Err(_) => {
            tracing::warn!(%agent, %remote, "no Hello within the deadline; closing");
            conn.close(close::PROTOCOL.into(), b"no Hello in time");
            return Ok(());
        }
    };
    recv.set_limit(FRAME_BYTES_MAX);
    let AgentMsg::Hello {
        last_revision,
        outbox_len,
        agent_version,
        allow_exec,
    } = hello
    else {
        conn.close(close::PROTOCOL.into(), b"expected Hello");
        return Ok(());
    };
    let record = match blocking(state, move |s| s.store.agent(agent)).await {
        Some(Ok(Some(r))) if !r.revoked => r,
        Some(Ok(_)) => {
            conn.close(close::REVOKED.into(), b"agent revoked");
            return Ok(());
        }
        _ => {
            conn.close(close::STORE.into(), b"coordinator store failed");
            return Ok(());
        }
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(SESSION_OUTBOX_MAX);
    {
        let Ok(mut live) = state.live.lock() else {
            return Ok(());
        };
        let open: usize = live.values().map(|v| v.conns.len()).sum();
        if open >= state.limits.sessions_max {
            drop(live);
            tracing::warn!(%agent, max = state.limits.sessions_max, "session refused: the coordinator serves its maximum of sessions");
            conn.close(close::BUSY.into(), b"too many sessions; try again");
            return Ok(());
        }
        let l = live.entry(agent).or_default();
        l.conns.push(conn.clone());
        l.outs.push(out_tx);
    }
    if let Ok(mut seen) = state.seen.lock() {
        seen.insert(
            agent,
            Seen {
                version: Some(agent_version),
                allow_exec,
                outbox_len: Some(outbox_len),
                last_contact_ms: Some(now().as_millis()),
            },
        );
    }
    tracing::info!(%agent, last_revision, outbox_len, %remote, sessions = state.live_sessions(), "agent session up");
    let seen = now().as_millis();
    let _ = blocking(state, move |s| {
        s.store.update_agent(agent, |r| r.last_seen_ms = Some(seen))
    })
    .await;
    // Reading runs on its own, so the coordinator never stops reading while
    // it writes a long assignment: an agent blocked writing its result
    // batches (at most BATCHES_IN_FLIGHT_MAX unacknowledged) always gets
    // them through, goes back to reading, and the writes here complete.
    let (msg_tx, msg_rx) = tokio::sync::mpsc::channel(SESSION_INBOX_MAX);
    let reader = tokio::spawn(async move {
        loop {
            let m = recv.next::<AgentMsg>().await;
            let end = m.is_err();
            if msg_tx.send(m).await.is_err() || end {
                return;
            }
        }
    });
    let result = session_loop(
        state,
        &conn,
        &mut send,
        SessionQueues {
            inbox: msg_rx,
            outbox: out_rx,
        },
        agent,
        &record,
        (last_revision, outbox_len),
    )
    .await;
    reader.abort();
    if let Ok(mut live) = state.live.lock() {
        if let Some(l) = live.get_mut(&agent) {
            if let Some(i) = l
                .conns
                .iter()
                .position(|c| c.stable_id() == conn.stable_id())
            {
                l.conns.remove(i);
                l.outs.remove(i);
            }
            if l.conns.is_empty() {
                live.remove(&agent);
            }
        }
    }
    let seen = now().as_millis();
    let _ = blocking(state, move |s| {
        s.store.update_agent(agent, |r| r.last_seen_ms = Some(seen))
    })
    .await;
    tracing::info!(%agent, "agent session down");
    result.map_err(|e| close_for(&conn, e))
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

/// Why an agent's result batch is refused, if it is.
fn check_results(
    state: &State,
    agent: AgentId,
    labels: &[(String, String)],
    assigned: &mut HashMap<TaskId, bool>,
    runs: &[RunRecord],
) -> Result<Option<String>, StoreError> {
    // Size and plausibility are the core's (`refusal`), checked again here
    // because this is what stands before the store.
    if let Some(why) = sundial_core::session::coordinator::refusal(runs) {
        return Ok(Some(why));
    }
    for r in runs {
        if assigned.len() > ASSIGNED_CACHE_MAX {
            assigned.clear();
        }
        let ok = match assigned.get(&r.task_id) {
            Some(ok) => *ok,
            None => {
                let ok = state
                    .store
                    .task(r.task_id)?
                    .is_some_and(|(spec, _)| crate::store::targets(&spec.target, agent, labels));
                assigned.insert(r.task_id, ok);
                ok
            }
        };
        if !ok {
            return Ok(Some(format!(
                "run of task {} which is not assigned to this agent",
                r.task_id
            )));
        }
    }
    Ok(None)
}

/// What a session loop reads besides its stream: the agent's messages (read
/// on their own task) and messages from admin work to send.
struct SessionQueues {
    inbox: tokio::sync::mpsc::Receiver<Result<AgentMsg, NetError>>,
    outbox: tokio::sync::mpsc::Receiver<CoordMsg>,
}

async fn session_loop(
    state: &Arc<State>,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    queues: SessionQueues,
    agent: AgentId,
    record: &AgentRecordV1,
    hello: (u64, u64),
) -> Result<(), NetError> {
    let SessionQueues {
        mut inbox,
        mut outbox,
    } = queues;
    let origin = Instant::now();
    let clock = || Now {
        mono_ms: origin.elapsed().as_millis() as u64,
        wall: now(),
    };
    let mut revisions = state.revision.subscribe();
    let store_failed = |e: StoreError| {
        tracing::error!(error = %e, %agent, "store failed during a session");
        state.note_store_error(&e);
        conn.close(close::STORE.into(), b"coordinator store failed");
        NetError::Eof
    };
    let labels = Arc::new(record.labels.clone());
    let enrolled_at = Timestamp::from_millis_saturating(record.enrolled_at_ms);
    let mut assigned: HashMap<TaskId, bool> = HashMap::new();
    let mut sm = CoordSession::new(
        clock(),
        agent,
        enrolled_at,
        hello.0,
        hello.1,
        UploadLimits {
            runs_per_sec: state.limits.upload_runs_per_sec,
            bytes_per_sec: state.limits.upload_bytes_per_sec,
        },
    );
    loop {
        // Drive the machine until it has nothing more to say.
        loop {
            let mut busy = false;
            while let Some(effect) = sm.poll_effect() {
                busy = true;
                match effect {
                    CoordEffect::LoadChanges { since } => {
                        let labels = labels.clone();
                        let (changes, upto) = blocking(state, move |s| {
                            let upto = s.store.revision()?;
                            Ok((s.store.changes_for(agent, &labels, since)?, upto))
                        })
                        .await
                        .unwrap_or_else(|| Err(StoreError::Refused("store worker failed".into())))
                        .map_err(store_failed)?;
                        sm.handle_changes(changes, upto);
                    }
                    CoordEffect::StoreRuns { batch_id, runs } => {
                        let labels = labels.clone();
                        let cache = std::mem::take(&mut assigned);
                        let checked = blocking(state, move |s| {
                            let mut cache = cache;
                            let verdict = check_results(s, agent, &labels, &mut cache, &runs);
                            let stored = match &verdict {
                                Ok(None) => Some(s.store.put_runs(&runs)),
                                _ => None,
                            };
                            let keys: Vec<RunKey> = runs.iter().map(RunRecord::key).collect();
                            (verdict, stored, cache, keys)
                        })
                        .await;
                        let Some((verdict, stored, cache, keys)) = checked else {
                            return Err(store_failed(StoreError::Refused(
                                "store worker failed".into(),
                            )));
                        };
                        assigned = cache;
                        let verdict = match verdict.map_err(store_failed)? {
                            Some(why) => Err(why),
                            None => Ok(keys),
                        };
                        if let Some(stored) = stored {
                            let conflicts = stored.map_err(store_failed)?;
                            for (task, _, sched, attempt) in conflicts {
                                tracing::warn!(%agent, task = %TaskId(task), scheduled_at = %Timestamp::from_millis_saturating(sched), attempt, "a different record for a run already stored was refused; the first record stands");
                            }
                        }
                        sm.handle_stored(clock(), batch_id, verdict);
                    }
                    CoordEffect::ClockReport { offset_ms, rtt_ms } => {
                        let seen = now().as_millis();
                        let _ = blocking(state, move |s| {
                            s.store.update_agent(agent, |r| {
                                r.clock_offset_ms = Some(offset_ms);
                                r.rtt_ms = Some(rtt_ms);
                                r.last_seen_ms = Some(seen);
                            })
                        })
                        .await;
                    }
                    CoordEffect::Close { code, reason } => {
                        // What was answered before the close still goes out.
                        while let Some(m) = sm.poll_transmit() {
                            let _ = net::send(send, &m).await;
                        }
                        while let Some(event) = sm.poll_event() {
                            log_session_event(&event);
                        }
                        conn.close(code.into(), reason.as_bytes());
                        return Ok(());
                    }
                }
            }
            while let Some(m) = sm.poll_transmit() {
                busy = true;
                net::send(send, &m).await?;
            }
            while let Some(event) = sm.poll_event() {
                log_session_event(&event);
            }
            if !busy {
                break;
            }
        }
        let wake = sm
            .poll_timeout()
            .map(|ms| origin + Duration::from_millis(ms));
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(w.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = inbox.recv() => {
                let Some(msg) = msg else { return Err(NetError::Eof) };
                let msg = msg?;
                if let Ok(mut seen) = state.seen.lock() {
                    seen.entry(agent).or_default().last_contact_ms = Some(now().as_millis());
                }
                sm.handle_message(clock(), msg);
            }
            Some(m) = outbox.recv() => sm.handle_push(m),
            changed = revisions.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let revision = *revisions.borrow_and_update();
                sm.handle_revision(revision);
            }
            _ = sleep => {}
        }
        let t = clock();
        if sm.poll_timeout().is_some_and(|due| t.mono_ms >= due) {
            sm.handle_timeout(t);
        }
    }
}

fn log_session_event(event: &Event) {
    match event {
        Event::ResultsRefused {
            agent,
            batch_id,
            why,
        } => {
            tracing::warn!(%agent, batch_id, reason = %why, "refused a result batch; closing the session")
        }
        Event::UploadThrottled { agent, wait_ms } => {
            tracing::warn!(%agent, wait_ms, "agent uploads faster than its limit; slowing it down")
        }
        Event::AssignmentsSent {
            agent,
            changes,
            messages,
            upto_revision,
        } => tracing::debug!(%agent, changes, messages, upto_revision, "assignments sent"),
        other => tracing::trace!(event = ?other, "session"),
    }
}

// ---- admin ----------------------------------------------------------------

async fn handle_admin(state: &Arc<State>, conn: quinn::Connection) -> Result<(), NetError> {
    loop {
        let (mut send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        let mut recv = FramedRecv::with_limit(recv, ADMIN_REQUEST_BYTES_MAX);
        let req: AdminRequest = match tokio::time::timeout(EXCHANGE_TIMEOUT, recv.next()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(close_for(&conn, e)),
            Err(_) => return Ok(()),
        };
        // Admin work is bounded and runs on the blocking pool: four large
        // `run list`s cannot starve the sessions.
        let Ok(_slot) = state.admin_slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let answers = blocking(state, move |s| match admin(s, req) {
            Ok(a) => a,
            Err(e) => {
                s.note_store_error(&e);
                vec![AdminResponse::Error(e.to_string())]
            }
        })
        .await
        .unwrap_or_else(|| vec![AdminResponse::Error("the request failed".into())]);
        for a in &answers {
            net::send(&mut send, a).await?;
        }
        send.finish()?;
    }
}

fn agent_info(state: &State, id: AgentId, r: AgentRecordV1) -> AgentInfo {
    let online = state
        .live
        .lock()
        .map(|l| l.contains_key(&id))
        .unwrap_or(false);
    let seen = state
        .seen
        .lock()
        .ok()
        .and_then(|s| s.get(&id).cloned())
        .unwrap_or_default();
    let last_seen = match (seen.last_contact_ms, r.last_seen_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    AgentInfo {
        agent_id: id,
        name: r.name,
        labels: r.labels,
        online,
        revoked: r.revoked,
        enrolled_at: Timestamp::from_millis_saturating(r.enrolled_at_ms),
        last_seen: last_seen.map(Timestamp::from_millis_saturating),
        clock_offset_ms: r.clock_offset_ms,
        rtt_ms: r.rtt_ms,
        version: seen.version,
        allow_exec: seen.allow_exec,
        outbox_len: seen.outbox_len,
    }
}

/// A task as the admin sees it: state, next occurrence, latest runs, reach.
fn task_info(
    state: &State,
    spec: TaskSpec,
    cancelled: bool,
    agents: &std::collections::BTreeMap<AgentId, AgentRecordV1>,
    detailed: bool,
    now: Timestamp,
) -> Result<TaskInfo, StoreError> {
    let paused = !cancelled && state.store.is_paused(spec.id)?;
    let mut last_runs = state.store.last_runs(spec.id)?;
    let reached: Vec<AgentId> = agents
        .iter()
        .filter(|(id, r)| !r.revoked && crate::store::targets(&spec.target, **id, &r.labels))
        .map(|(id, _)| *id)
        .collect();
    // Done: a one-shot whose run is recorded, finally, on every agent it reaches.
    let done = match spec.schedule.kind() {
        ScheduleKind::At(at) if !cancelled && !reached.is_empty() => reached.iter().all(|a| {
            last_runs.iter().any(|l| {
                l.agent_id == *a
                    && l.scheduled_at == *at
                    && (!l.outcome.is_retryable() || l.attempt > spec.policies.retry.retries)
            })
        }),
        _ => false,
    };
    let next = if cancelled || paused || done {
        None
    } else {
        spec.schedule.next_after(now)
    };
    if !detailed {
        last_runs.sort_by_key(|l| (l.scheduled_at, l.attempt));
        let latest = last_runs.pop();
        last_runs = latest.into_iter().collect();
    }
    Ok(TaskInfo {
        spec,
        cancelled,
        paused,
        done,
        next,
        last_runs,
        reached: if detailed { reached } else { Vec::new() },
    })
}

/// Why a task may not be created as drafted: the coordinator's own checks,
/// whatever client sent it.
fn draft_refusal(limits: &Limits, draft: &TaskDraft, now: Timestamp) -> Option<String> {
    let Action::Exec(exec) = &draft.action;
    if exec.program.trim().is_empty() {
        return Some("the program is empty".into());
    }
    let p = &draft.policies;
    if p.timeout.is_some_and(|t| t.0 == 0) {
        return Some("--timeout must be longer than 0s".into());
    }
    if p.retry.retries > RETRIES_MAX {
        return Some(format!(
            "--retries {} exceeds the most allowed, {RETRIES_MAX}",
            p.retry.retries
        ));
    }
    if p.retry.retries > 0 && p.retry.backoff_initial < limits.backoff_min {
        return Some(format!(
            "--backoff {} is shorter than this coordinator's minimum of {} (serve --backoff-min)",
            p.retry.backoff_initial, limits.backoff_min
        ));
    }
    if p.retry.backoff_max < p.retry.backoff_initial {
        return Some(format!(
            "--backoff-max {} is shorter than --backoff {}",
            p.retry.backoff_max, p.retry.backoff_initial
        ));
    }
    match draft.schedule.kind() {
        ScheduleKind::Every { period, .. } if *period < limits.period_min => {
            return Some(format!(
                "--every {period} is shorter than this coordinator's minimum period of {} (serve --period-min)",
                limits.period_min
            ));
        }
        ScheduleKind::At(at) if at.millis_since(now) < -PAST_SLACK_MS => {
            return Some(format!(
                "--at {at} is in the past (now is {now}); use --at now to run at once"
            ));
        }
        _ => {}
    }
    if let (_, Some(end)) = draft.schedule.window() {
        if end.millis_since(now) < -PAST_SLACK_MS {
            return Some(format!("--end {end} is in the past (now is {now})"));
        }
    }
    let size = postcard::experimental::serialized_size(draft).unwrap_or(usize::MAX);
    if size > TASK_SPEC_BYTES_MAX {
        return Some(format!(
            "the task is {size} bytes (program, arguments, environment); the most allowed is {TASK_SPEC_BYTES_MAX}: pass large data in a file on the device instead"
        ));
    }
    None
}

/// Applies `task update`'s changes to a task.
fn apply_patch(spec: &mut TaskSpec, p: TaskPatch) -> Result<(), StoreError> {
    if let Some(s) = p.schedule {
        spec.schedule = s;
    }
    let Action::Exec(exec) = &mut spec.action;
    if let Some(Action::Exec(new)) = p.action {
        exec.program = new.program;
        exec.args = new.args;
    }
    if let Some(env) = p.env {
        exec.env = env;
    }
    if let Some(cwd) = p.cwd {
        exec.cwd = cwd;
    }
    let pol = &mut spec.policies;
    if let Some(m) = p.misfire {
        pol.misfire.mode = m;
    }
    if let Some(g) = p.grace {
        pol.misfire.grace = g;
    }
    if let Some(r) = p.retries {
        pol.retry.retries = r;
    }
    if let Some(b) = p.backoff {
        pol.retry.backoff_initial = b;
    }
    if let Some(b) = p.backoff_max {
        pol.retry.backoff_max = b;
    }
    if let Some(t) = p.timeout {
        pol.timeout = t;
    }
    if let Some(o) = p.overlap {
        pol.overlap = o;
    }
    Ok(())
}

/// Answers one admin request: one message, or several for a long list.
fn admin(state: &State, req: AdminRequest) -> Result<Vec<AdminResponse>, StoreError> {
    let one = |r: AdminResponse| Ok(vec![r]);
    match req {
        AdminRequest::TokenCreate {
            ttl_ms,
            uses,
            labels,
        } => {
            if uses == 0 {
                return Err(StoreError::Refused("--uses must be at least 1".into()));
            }
            let rng = ring::rand::SystemRandom::new();
            let mut secret = vec![0u8; sundial_protocol::token::SECRET_BYTES];
            ring::rand::SecureRandom::fill(&rng, &mut secret)
                .map_err(|_| StoreError::Refused("no randomness available".into()))?;
            let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
            state.store.put_token(
                sha256(&secret),
                &TokenRecordV1 {
                    expires_at_ms: now().as_millis().saturating_add(ttl),
                    uses_left: uses,
                    labels,
                },
            )?;
            let server_name = state
                .store
                .get_meta_str("server_name")?
                .unwrap_or_else(|| sundial_net::tls::SERVER_NAME_DEFAULT.into());
            let token = sundial_protocol::token::JoinToken {
                secret,
                ca_sha256: sha256(state.pki.ca_der.as_ref()),
                server_name,
            };
            one(AdminResponse::Token(token.encode()))
        }
        AdminRequest::AgentList => {
            let forgotten = state.store.forgotten()?;
            let agents: Vec<AgentInfo> = state
                .store
                .agents()?
                .into_iter()
                .filter(|(id, _)| !forgotten.contains(id))
                .map(|(id, r)| agent_info(state, id, r))
                .collect();
            // A fleet of agents with long allowlists is megabytes: in pages.
            Ok(chunk_by_size(agents, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Agents)
                .collect())
        }
        AdminRequest::AgentGet(id) => match state.store.agent(id)? {
            Some(r) => one(AdminResponse::Agent(Box::new(agent_info(state, id, r)))),
            None => one(AdminResponse::Error(format!("no agent {id}"))),
        },
        AdminRequest::AgentRevoke(id) => {
            let rec = state
                .store
                .agent(id)?
                .ok_or_else(|| StoreError::Refused(format!("no agent {id}")))?;
            state.store.update_agent(id, |r| r.revoked = true)?;
            if let Ok(mut k) = state.known.write() {
                if let Ok(fp) = <[u8; 32]>::try_from(rec.cert_sha256.as_slice()) {
                    k.remove(&fp);
                }
            }
            // Cut off at once: live sessions end now, not at the next reconnect.
            let closed = state.close_sessions(id, close::REVOKED, b"agent revoked");
            tracing::warn!(agent = %id, sessions_closed = closed, "agent revoked");
            one(AdminResponse::Done)
        }
        AdminRequest::TaskCreate(draft) => {
            let mut draft = *draft;
            let now = now();
            if let Some(why) = draft_refusal(&state.limits, &draft, now) {
                return Err(StoreError::Refused(why));
            }
            let mut warnings = Vec::new();
            match &draft.target {
                Target::Agent(a) => match state.store.agent(*a)? {
                    None => return Err(StoreError::Refused(format!("no agent {a}"))),
                    Some(r) if r.revoked => {
                        return Err(StoreError::Refused(format!(
                            "agent {a} is revoked; it receives no tasks"
                        )))
                    }
                    Some(_) => {}
                },
                Target::Selector(sel) => {
                    let agents = state.store.agents()?;
                    let reached = agents
                        .values()
                        .filter(|r| !r.revoked && sel.iter().all(|p| r.labels.contains(p)))
                        .count();
                    if reached == 0 {
                        warnings.push(format!(
                            "the selector {} matches no agent yet; agents that join with these labels will receive the task",
                            crate::cli::labels_text(sel)
                        ));
                    }
                }
            }
            if draft.anchor_at_creation {
                if let ScheduleKind::Every { period, .. } = draft.schedule.kind() {
                    let (start, end) = draft.schedule.window();
                    draft.schedule = sundial_protocol::Schedule::every(*period, now)
                        .and_then(|s| s.with_window(start, end))
                        .map_err(|e| StoreError::Refused(e.to_string()))?;
                }
            }
            let spec = state.store.create_task(draft, now)?;
            tracing::info!(task = %spec.id, revision = spec.revision, "task created");
            state.revision.send_replace(spec.revision);
            if warnings.is_empty() {
                one(AdminResponse::TaskCreated(spec.id))
            } else {
                one(AdminResponse::TaskCreatedWarn {
                    id: spec.id,
                    warnings,
                })
            }
        }
        AdminRequest::TaskList => {
            let agents = state.store.agents()?;
            let now = now();
            let tasks: Vec<TaskInfo> = state
                .store
                .tasks()?
                .into_iter()
                .map(|(spec, cancelled)| task_info(state, spec, cancelled, &agents, false, now))
                .collect::<Result<_, _>>()?;
            Ok(chunk_by_size(tasks, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Tasks)
                .collect())
        }
        AdminRequest::TaskGet(id) => match state.store.task(id)? {
            Some((spec, cancelled)) => {
                let agents = state.store.agents()?;
                one(AdminResponse::Task(Box::new(task_info(
                    state,
                    spec,
                    cancelled,
                    &agents,
                    true,
                    now(),
                )?)))
            }
            None => one(AdminResponse::Error(format!("no task {id}"))),
        },
        AdminRequest::TaskCancel(id) => {
            let revision = state.store.cancel_task(id)?;
            tracing::info!(task = %id, revision, "task cancelled");
            state.revision.send_replace(revision);
            one(AdminResponse::Done)
        }
        AdminRequest::TaskUpdate { id, patch } => {
            let Some((mut spec, cancelled)) = state.store.task(id)? else {
                return Err(StoreError::Refused(format!("no task {id}")));
            };
            if cancelled {
                return Err(StoreError::Refused(format!("task {id} is cancelled")));
            }
            apply_patch(&mut spec, *patch)?;
            let draft = TaskDraft {
                name: spec.name.clone(),
                target: spec.target.clone(),
                schedule: spec.schedule.clone(),
                action: spec.action.clone(),
                policies: spec.policies,
                anchor_at_creation: false,
            };
            if let Some(why) = draft_refusal(&state.limits, &draft, now()) {
                return Err(StoreError::Refused(why));
            }
            let revision = state.store.update_task(&spec)?;
            tracing::info!(task = %id, revision, "task updated");
            state.revision.send_replace(revision);
            one(AdminResponse::Updated { revision })
        }
        AdminRequest::TaskRunNow(id) => {
            let Some((spec, cancelled)) = state.store.task(id)? else {
                return Err(StoreError::Refused(format!("no task {id}")));
            };
            if cancelled || state.store.is_paused(id)? {
                return Err(StoreError::Refused(format!(
                    "task {id} is {}; resume it first",
                    if cancelled { "cancelled" } else { "paused" }
                )));
            }
            let at = now();
            let mut sent = Vec::new();
            let mut offline = Vec::new();
            let live = state.live.lock().map(|l| {
                l.iter()
                    .map(|(a, v)| (*a, v.outs.clone()))
                    .collect::<HashMap<_, _>>()
            });
            let live = live.unwrap_or_default();
            for (agent, r) in state.store.agents()? {
                if r.revoked || !crate::store::targets(&spec.target, agent, &r.labels) {
                    continue;
                }
                // One session is enough: the run is keyed, the agent runs it once.
                let delivered = live.get(&agent).is_some_and(|outs| {
                    outs.iter()
                        .any(|o| o.try_send(CoordMsg::RunNow { task_id: id, at }).is_ok())
                });
                if delivered {
                    sent.push(agent);
                } else {
                    offline.push(agent);
                }
            }
            tracing::info!(task = %id, %at, sent = sent.len(), offline = offline.len(), "run now");
            one(AdminResponse::RunNowSent { at, sent, offline })
        }
        AdminRequest::TaskPause(id) | AdminRequest::TaskResume(id) => {
            let pause = matches!(req, AdminRequest::TaskPause(_));
            let revision = state.store.set_paused(id, pause, now())?;
            tracing::info!(task = %id, revision, paused = pause, "task pause state changed");
            state.revision.send_replace(revision);
            one(AdminResponse::Done)
        }
        AdminRequest::AgentForget(id) => {
            state.store.forget_agent(id)?;
            tracing::info!(agent = %id, "revoked agent forgotten; its runs stay");
            one(AdminResponse::Done)
        }
        AdminRequest::TokenList => {
            let now = now().as_millis();
            let tokens: Vec<TokenInfo> = state
                .store
                .tokens()?
                .into_iter()
                .filter(|(_, t)| t.expires_at_ms > now && t.uses_left > 0)
                .map(|(hash, t)| TokenInfo {
                    id: sundial_protocol::token::hex(&hash[..4]),
                    expires_at: Timestamp::from_millis_saturating(t.expires_at_ms),
                    uses_left: t.uses_left,
                    labels: t.labels,
                })
                .collect();
            Ok(chunk_by_size(tokens, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Tokens)
                .collect())
        }
        AdminRequest::TokenRevoke(id) => {
            let id = id.to_ascii_lowercase();
            let matching: Vec<[u8; 32]> = state
                .store
                .tokens()?
                .into_iter()
                .map(|(h, _)| h)
                .filter(|h| sundial_protocol::token::hex(&h[..4]) == id)
                .collect();
            match matching.as_slice() {
                [h] => {
                    state.store.delete_token(*h)?;
                    tracing::info!(token = %id, "join token revoked");
                    one(AdminResponse::Done)
                }
                [] => Err(StoreError::Refused(format!(
                    "no token {id} (see sundialctl token list)"
                ))),
                _ => Err(StoreError::Refused(format!(
                    "{id} names several tokens; wait for them to expire or use them up"
                ))),
            }
        }
        AdminRequest::RunList {
            task,
            agent,
            since,
            limit,
            after,
            before,
        } => {
            if limit == 0 {
                return Err(StoreError::Refused("--limit must be at least 1".into()));
            }
            let limit = limit.min(RUN_LIST_MAX) as usize;
            let cursor = |s: Option<String>| {
                s.map(|s| s.parse::<RunCursor>().map_err(StoreError::Refused))
                    .transpose()
            };
            let page = match (cursor(after)?, cursor(before)?) {
                (Some(_), Some(_)) => {
                    return Err(StoreError::Refused(
                        "--after and --before do not go together".into(),
                    ))
                }
                (Some(a), None) => Page::After(a),
                (None, Some(b)) => Page::Before(b),
                (None, None) => Page::Latest,
            };
            let page = state.store.runs(&RunQuery {
                task,
                agent,
                since,
                limit,
                page,
                forward_from_since: false,
            })?;
            if page.unreadable > 0 {
                tracing::warn!(
                    unreadable = page.unreadable,
                    "run list skipped stored records that could not be read"
                );
            }
            let mut out: Vec<AdminResponse> = chunk_by_size(page.runs, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Runs)
                .collect();
            out.push(AdminResponse::RunsSummary {
                matched: page.matched,
                unreadable: page.unreadable,
                more: page.more,
                first: page.first.map(|c| c.to_string()),
                last: page.last.map(|c| c.to_string()),
            });
            Ok(out)
        }
    }
}

/// A default TTL for tokens: one hour.
pub const TOKEN_TTL_DEFAULT: DurationMs = DurationMs(3_600_000);
