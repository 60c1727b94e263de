//! The coordinator's QUIC server: a thin driver of the core's
//! [`CoordNode`]. It owns the UDP socket, TLS, the connection tasks, one
//! timer and the blocking pool; the node decides everything else
//! (admission, routing, Hello, sessions, fan-out, admin, enrollment,
//! retention). Every call into the node goes through [`Shared::drive`],
//! which passes the one clock ([`Shared::now`]) and carries out the effects
//! the call produced: store jobs on the blocking pool (their results fed
//! back), CSR signing, closes, replies, and waking a session's writer.
//!
//! Trust: the TLS layer accepts only client certificates that chain to our
//! CA *and* that the node knows (an enrolled, unrevoked agent, or the
//! admin); anything else fails the handshake. A connection without a
//! certificate completes TLS only so it can enroll. An agent's identity is
//! its certificate's fingerprint, never a claim in a message.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    close, AdminInfo, AdminResponse, AuditEntry, EnrollResponse, Role, ALPN, ALPN_ADMIN,
    ALPN_ENROLL,
};
use sundial_protocol::{DurationMs, Timestamp};
use tokio::sync::{oneshot, Notify};

use sundial_core::coord::{
    ConnId, CoordConfig, CoordNode, Effect, RunsVerdict, Signee, StoreDone, StoreJob,
    FEED_INTERVAL_MS,
};
use sundial_core::session::Now;

use crate::cli::now;
use crate::net;
use crate::pg::{PgOptions, PgStore};
use crate::pki::Pki;
use crate::store::{CertRole, CoordStore, CoordinatorStore, StoreError, PAGE_MAX};

mod conn;
mod http;
mod log;
pub mod metrics;
pub mod notify;

pub use sundial_core::coord::admin::RUN_LIST_MAX;
pub use sundial_core::coord::{
    name_refusal, Limits, ATTEMPT_TIMEOUT_MS, BACKOFF_CAP_MAX_MS, BACKOFF_CAP_MIN_MS,
    BACKOFF_FLOOR_MS, HANDSHAKES_PER_SEC_PER_CORE, PENDING_PER_ADDRESS_MAX,
};

/// A default TTL for tokens: one hour.
pub const TOKEN_TTL_DEFAULT: DurationMs = DurationMs(3_600_000);
/// The store's file name in the data directory.
pub const STORE_FILE: &str = "coordinator.redb";
/// The default UDP port.
pub const PORT_DEFAULT: u16 = 7447;
/// The file in the data directory naming a PostgreSQL store (its
/// connection string, without the password); without it, the store is
/// [`STORE_FILE`]. Copied with the directory to every coordinator.
pub const STORE_URL_FILE: &str = "store.url";
/// The environment variable a PostgreSQL store's password may come from.
pub const PG_PASSWORD_ENV: &str = "SUNDIAL_PG_PASSWORD";
/// The store setting holding the CA certificate's SHA-256 (hex): a
/// coordinator with another CA refuses to serve a shared store.
pub(crate) const CA_SETTING: &str = "ca_sha256";

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, Default)]
pub enum StoreChoice {
    /// What the data directory says: PostgreSQL when it holds
    /// [`STORE_URL_FILE`] (the password from [`PG_PASSWORD_ENV`]), else
    /// the embedded store.
    #[default]
    FromDataDir,
    /// The embedded redb store in the data directory: one coordinator.
    Embedded,
    /// PostgreSQL, which several coordinators may share.
    Postgres(PgOptions),
}

impl StoreChoice {
    /// The choice `dir` makes (see [`StoreChoice::FromDataDir`]).
    fn resolve(self, dir: &Path) -> Result<StoreChoice, ServeError> {
        match self {
            StoreChoice::FromDataDir => match std::fs::read_to_string(dir.join(STORE_URL_FILE)) {
                Ok(url) => Ok(StoreChoice::Postgres(PgOptions {
                    url: url.trim().to_owned(),
                    password: std::env::var(PG_PASSWORD_ENV).ok(),
                    pool_size: crate::pg::POOL_SIZE_DEFAULT,
                })),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreChoice::Embedded),
                Err(e) => Err(ServeError::Tls(format!(
                    "cannot read {}: {e}",
                    dir.join(STORE_URL_FILE).display()
                ))),
            },
            other => Ok(other),
        }
    }
}

/// The default handshake budget: per core, what one core does with room
/// to spare for the sessions themselves.
pub fn handshakes_per_sec_default() -> u32 {
    default_limits().handshakes_per_sec
}

/// The limits by default on this machine.
pub fn default_limits() -> Limits {
    Limits::for_cores(std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How often the store's key file is read again (after `rotate-key`).
const KEY_RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// This process's mark on the sessions it holds in a shared store: random,
/// positive (a bigint column), drawn at every start.
fn session_holder() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    (u64::from_le_bytes(b) >> 1).max(1)
}

/// Every known certificate, a page (one transaction) at a time.
fn all_certs(store: &dyn CoordStore) -> Result<Vec<([u8; 32], CertRole)>, StoreError> {
    sundial_core::coord::admin::all_pages(
        |c: &([u8; 32], CertRole)| c.0,
        |after| store.known_certs(after, PAGE_MAX),
    )
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Pki(#[from] crate::pki::PkiError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("the store key: {0}")]
    Key(String),
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

/// The TLS layer's check of client certificates: ours, and known to the node.
#[derive(Debug)]
struct KnownCertVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    node: Arc<Mutex<CoordNode>>,
    /// The HTTPS listener: a certificate is required and must be an
    /// admin's, valid now (no leniency for an expired one).
    admins_only: bool,
}

impl ClientCertVerifier for KnownCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Enrollment comes without a certificate; see the module doc.
        self.admins_only
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
        let fp = sha256(end_entity.as_ref());
        let role = self.node.lock().ok().and_then(|n| n.cert_role(&fp));
        if self.admins_only {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)?;
            return match role {
                Some(CertRole::Admin(_)) => Ok(ClientCertVerified::assertion()),
                _ => Err(rustls::Error::General(
                    "not a live admin credential of this coordinator".into(),
                )),
            };
        }
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            )) if matches!(role, Some(CertRole::Admin(_))) => {
                // A known admin whose certificate ended: the chain is
                // checked as of its last valid second, and the node
                // closes the connection saying it expired and how to
                // renew it (a TLS alert could only say "expired").
                let Some(CertRole::Admin(cert)) = &role else {
                    return Err(rustls::Error::General("unknown certificate".into()));
                };
                let last_ms =
                    u64::try_from(cert.expires_at.as_millis().saturating_sub(1_000)).unwrap_or(0);
                self.inner.verify_client_cert(
                    end_entity,
                    intermediates,
                    UnixTime::since_unix_epoch(Duration::from_millis(last_ms)),
                )?;
            }
            Err(e) => return Err(e),
        }
        if role.is_some() {
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

/// TLS 1.3 with the coordinator's certificate and `KnownCertVerifier`:
/// for the QUIC listener (certificates optional: enrollment comes without
/// one), or with `admins_only` for `--https` (a live admin's required).
fn tls_server_config(
    pki: &Pki,
    node: Arc<Mutex<CoordNode>>,
    admins_only: bool,
) -> Result<rustls::ServerConfig, ServeError> {
    let provider = sundial_net::tls::provider();
    let mut roots = RootCertStore::empty();
    roots
        .add(pki.ca_der.clone())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if admins_only {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let inner = builder
        .build()
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let verifier = Arc::new(KnownCertVerifier {
        inner,
        node,
        admins_only,
    });
    let id = pki.server_identity()?;
    rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain, id.key)
        .map_err(|e| ServeError::Tls(e.to_string()))
}

/// What the shell keeps of one connection: the way to close it, to wake its
/// writer, and to hand answers to the task waiting for them.
#[derive(Debug)]
struct Handle {
    conn: quinn::Connection,
    writer: Arc<Notify>,
    admin: HashMap<u64, oneshot::Sender<Vec<AdminResponse>>>,
    /// Followed requests' streams (`run list --follow`), bounded.
    follow: HashMap<u64, tokio::sync::mpsc::Sender<Vec<AdminResponse>>>,
    enroll: Option<oneshot::Sender<EnrollResponse>>,
}

/// The running coordinator: the node, the store, and the connections' handles.
#[derive(Debug)]
struct Shared {
    node: Arc<Mutex<CoordNode>>,
    store: Arc<dyn CoordStore>,
    pki: Arc<Pki>,
    /// The monotonic origin of the node's clock.
    started: Instant,
    handles: Mutex<HashMap<ConnId, Handle>>,
    /// Wakes the timer task when the node's next timeout may have moved.
    timer: Notify,
    /// The timeout the timer task sleeps to (monotonic ms; `u64::MAX`: none).
    timer_at: AtomicU64,
    stop: Notify,
    stopped: AtomicBool,
    next_req: AtomicU64,
    log: Mutex<log::LogState>,
    /// Other coordinators may share the store (PostgreSQL): its outages
    /// are waited out, not a reason to stop.
    shared_store: bool,
    /// Set when the HTTP listener is served (`--http`): counting costs
    /// nothing until then.
    metrics: std::sync::OnceLock<Arc<metrics::Metrics>>,
    /// Set when notifications are on (`--notify`).
    notifier: std::sync::OnceLock<Arc<notify::Notifier>>,
}

impl Shared {
    /// The one clock the node is given.
    fn now(&self) -> Now {
        Now {
            mono_ms: self.started.elapsed().as_millis() as u64,
            wall: now(),
        }
    }

    /// Calls into the node, then carries out what the call produced.
    fn drive<R>(self: &Arc<Self>, f: impl FnOnce(&mut CoordNode, Now) -> R) -> R {
        let mut effects = Vec::new();
        let mut events = Vec::new();
        let (r, next) = {
            let mut node = self.node.lock().unwrap_or_else(|poisoned| {
                // A panic while the node was held: what it holds may be
                // half-changed, so the coordinator stops (and restarts).
                self.halt();
                poisoned.into_inner()
            });
            let r = f(&mut node, self.now());
            while let Some(e) = node.poll_effect() {
                effects.push(e);
            }
            while let Some(e) = node.poll_event() {
                events.push(e);
            }
            (r, node.poll_timeout())
        };
        for e in events {
            if let Some(m) = self.metrics.get() {
                m.observe(&e);
            }
            log::event(self, e);
        }
        for e in effects {
            self.carry_out(e);
        }
        if next.is_some_and(|t| t < self.timer_at.load(Ordering::Relaxed)) {
            self.timer.notify_one();
        }
        r
    }

    fn halt(&self) {
        if !self.stopped.swap(true, Ordering::SeqCst) {
            self.stop.notify_one();
        }
    }

    fn carry_out(self: &Arc<Self>, effect: Effect) {
        match effect {
            Effect::Store(job) => {
                let shared = self.clone();
                tokio::spawn(async move {
                    let store = shared.store.clone();
                    let metrics = shared.metrics.get().cloned();
                    let notifier = shared.notifier.get().cloned();
                    let run = move || {
                        let kind = job.kind();
                        let started = Instant::now();
                        // Notable runs are queued before their batch is
                        // stored, and settled after (see `notify`).
                        let noted = match (&notifier, &job) {
                            (Some(n), StoreJob::Runs { runs, .. }) => match n.before_store(runs) {
                                Ok(written) => Some((runs.clone(), written)),
                                Err(e) => {
                                    tracing::warn!(error = %e, "notifications: cannot queue");
                                    None
                                }
                            },
                            _ => None,
                        };
                        let done = job.run(store.as_ref());
                        if let (Some(n), Some((runs, written))) = (&notifier, noted) {
                            let fresh: Option<Vec<_>> = match &done {
                                StoreDone::Runs {
                                    result: Ok(RunsVerdict::Stored { recorded, .. }),
                                    ..
                                } => Some(
                                    recorded
                                        .iter()
                                        .map(|r| {
                                            (
                                                r.task_id.0,
                                                r.agent_id.0,
                                                r.scheduled_at.as_millis(),
                                                r.attempt,
                                            )
                                        })
                                        .collect(),
                                ),
                                _ => None,
                            };
                            if let Err(e) = n.after_store(&runs, &written, fresh.as_deref()) {
                                tracing::warn!(error = %e, "notifications: cannot settle");
                            }
                        }
                        if let Some(m) = metrics {
                            m.store_job(kind, started.elapsed());
                        }
                        done
                    };
                    match tokio::task::spawn_blocking(run).await {
                        Ok(done) => shared.drive(|n, now| n.handle_store_done(now, done)),
                        Err(e) => {
                            tracing::error!(error = %e, "a store job failed; stopping");
                            shared.halt();
                        }
                    }
                });
            }
            Effect::Sign {
                conn,
                signee,
                csr_der,
            } => {
                let shared = self.clone();
                tokio::spawn(async move {
                    let pki = shared.pki.clone();
                    let who = signee.clone();
                    let signed = tokio::task::spawn_blocking(move || match &who {
                        Signee::Agent(agent) => pki.sign_agent_csr(&csr_der, *agent),
                        Signee::Admin {
                            name, expires_at, ..
                        } => pki.sign_admin_csr(&csr_der, name, *expires_at),
                    })
                    .await
                    .unwrap_or_else(|_| Err("the certificate could not be signed".into()));
                    shared.drive(|n, now| n.handle_signed(now, conn, signee, signed));
                });
            }
            Effect::Transmit(conn) => {
                if let Some(h) = self
                    .handles
                    .lock()
                    .ok()
                    .and_then(|h| h.get(&conn).map(|h| h.writer.clone()))
                {
                    h.notify_one();
                }
            }
            Effect::Close { conn, code, reason } => {
                if let Some(c) = self
                    .handles
                    .lock()
                    .ok()
                    .and_then(|h| h.get(&conn).map(|h| h.conn.clone()))
                {
                    c.close(code.into(), reason.as_bytes());
                }
            }
            Effect::AdminReply { conn, req, answers } => {
                let tx = self
                    .handles
                    .lock()
                    .ok()
                    .and_then(|mut h| h.get_mut(&conn).and_then(|h| h.admin.remove(&req)));
                if let Some(tx) = tx {
                    let _ = tx.send(answers);
                }
            }
            Effect::AdminPush { conn, req, answers } => {
                let tx = self
                    .handles
                    .lock()
                    .ok()
                    .and_then(|h| h.get(&conn).and_then(|h| h.follow.get(&req).cloned()));
                let passed = tx.is_some_and(|tx| tx.try_send(answers).is_ok());
                if !passed {
                    // Gone, or reading too slowly: the follow ends (its
                    // stream says so when the client is still there).
                    if let Ok(mut h) = self.handles.lock() {
                        if let Some(h) = h.get_mut(&conn) {
                            h.follow.remove(&req);
                        }
                    }
                    let shared = self.clone();
                    tokio::spawn(async move {
                        shared.drive(|n, now| n.handle_follow_end(now, conn, req));
                    });
                }
            }
            Effect::EnrollReply { conn, response } => {
                let tx = self
                    .handles
                    .lock()
                    .ok()
                    .and_then(|mut h| h.get_mut(&conn).and_then(|h| h.enroll.take()));
                if let Some(tx) = tx {
                    let _ = tx.send(response);
                }
            }
            Effect::Stop => self.halt(),
        }
    }

    /// Sleeps to the node's next timeout and hands it over, for ever.
    async fn timers(self: Arc<Self>) {
        loop {
            let due = self.node.lock().ok().and_then(|n| n.poll_timeout());
            self.timer_at
                .store(due.unwrap_or(u64::MAX), Ordering::Relaxed);
            let sleep = async {
                match due {
                    Some(ms) => {
                        tokio::time::sleep_until((self.started + Duration::from_millis(ms)).into())
                            .await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => self.drive(|n, now| n.handle_timeout(now)),
                _ = self.timer.notified() => {}
            }
        }
    }
}

/// A bound, ready coordinator.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    /// The endpoint's configuration, and one per link timing connections
    /// were accepted with (a handful: the timing moves in whole seconds
    /// with the fleet's size).
    config: quinn::ServerConfig,
    configs: HashMap<sundial_protocol::wire::LinkTiming, Arc<quinn::ServerConfig>>,
    shared: Arc<Shared>,
    /// The store's cipher and its key file, reloaded after `rotate-key`.
    key: Option<(Arc<sundial_net::at_rest::StoreCipher>, PathBuf)>,
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
    dir.join(crate::pki::CA_CERT).exists()
        && (dir.join(STORE_FILE).exists() || dir.join(STORE_URL_FILE).exists())
}

/// Opens a PostgreSQL store (migrations applied), saying where it failed.
fn open_pg(opts: &PgOptions) -> Result<PgStore, ServeError> {
    PgStore::open(opts).map_err(|e| match e {
        StoreError::Unavailable { context, detail } => ServeError::Store(StoreError::Unavailable {
            context: format!("{context} at {}", crate::pg::redact(&opts.url)),
            detail,
        }),
        other => ServeError::Store(other),
    })
}

/// `sundial-coordinator init`: creates CA, server certificate, admin
/// credentials and the store. Returns the credentials' path.
pub fn init(dir: &Path, advertise: &str, server_name: &str) -> Result<PathBuf, ServeError> {
    init_with(dir, advertise, server_name, false)
}

/// `init` on a store of choice. For PostgreSQL, the database must not
/// serve another coordinator set yet (more coordinators are added by
/// copying the data directory, not by another `init`); the data directory
/// gets [`STORE_URL_FILE`] so that `serve` finds the database.
pub fn init_on(
    dir: &Path,
    advertise: &str,
    server_name: &str,
    force: bool,
    store: StoreChoice,
) -> Result<PathBuf, ServeError> {
    let opts = match store.resolve(dir)? {
        StoreChoice::Postgres(o) => o,
        _ => return init_with(dir, advertise, server_name, force),
    };
    if dir.join(crate::pki::CA_CERT).exists() && !force {
        return Err(ServeError::Tls(format!(
            "{} already holds a coordinator's CA; refusing to replace it, which would lock out every enrolled agent. Pass --force to start over with a new CA",
            dir.display()
        )));
    }
    let pg = open_pg(&opts)?;
    if pg.setting(CA_SETTING)?.is_some() {
        return Err(ServeError::Tls(format!(
            "the database at {} already serves coordinators (another init made it). To add a coordinator, copy the data directory of one of them to the new host and run `serve` there; to start over, drop the database and create it again",
            crate::pg::redact(&opts.url)
        )));
    }
    sundial_net::private::create_private_dir(dir)
        .map_err(|e| ServeError::Tls(format!("cannot create {}: {e}", dir.display())))?;
    let _ = std::fs::remove_file(dir.join(STORE_FILE));
    let expires_at = owner_expires_at();
    let (pki, admin_der) = Pki::init(dir, server_name, advertise, expires_at)?;
    add_owner(&pg, &admin_der, expires_at)?;
    pg.put_setting("advertise", advertise)?;
    pg.put_setting("server_name", server_name)?;
    pg.put_setting(
        CA_SETTING,
        &sundial_protocol::token::hex(&sha256(pki.ca_der.as_ref())),
    )?;
    // The store key ring, made now so that the copies of this directory
    // (more coordinators on the database) hold the same one.
    crate::store_key::make_ring(&crate::store_key::key_file(dir, None)).map_err(ServeError::Key)?;
    std::fs::write(dir.join(STORE_URL_FILE), format!("{}\n", opts.url))
        .map_err(|e| ServeError::Tls(format!("cannot write {STORE_URL_FILE}: {e}")))?;
    restrict_data_dir(dir);
    Ok(dir.join(crate::pki::ADMIN_CREDS))
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
    let expires_at = owner_expires_at();
    let (_pki, admin_der) = Pki::init(dir, server_name, advertise, expires_at)?;
    let store = CoordinatorStore::open(&dir.join(STORE_FILE))?;
    crate::store_key::make_ring(&crate::store_key::key_file(dir, None)).map_err(ServeError::Key)?;
    restrict_data_dir(dir);
    add_owner(&store, &admin_der, expires_at)?;
    store.put_setting("advertise", advertise)?;
    store.put_setting("server_name", server_name)?;
    Ok(dir.join(crate::pki::ADMIN_CREDS))
}

/// The end of the first owner's credential: a year from now.
fn owner_expires_at() -> Timestamp {
    now().saturating_add_ms(
        i64::try_from(sundial_core::coord::admin::ADMIN_TTL_DEFAULT_MS).unwrap_or(i64::MAX),
    )
}

/// Records `init`'s owner (and says so in the audit log).
fn add_owner(
    store: &dyn CoordStore,
    cert_der: &[u8],
    expires_at: Timestamp,
) -> Result<(), ServeError> {
    let now = now();
    let cert_sha256 = sha256(cert_der);
    let audit = AuditEntry {
        seq: 0,
        at: now,
        admin: "init".into(),
        cert_sha256,
        from: None,
        action: "admin create".into(),
        subject: Some(format!("admin {}", crate::pki::OWNER)),
        revision: None,
        refused: None,
    };
    store.create_admin(
        &AdminInfo {
            name: crate::pki::OWNER.into(),
            role: Role::Owner,
            cert_sha256,
            created_at: now,
            created_by: "init".into(),
            expires_at,
            revoked_at: None,
            last_used: None,
        },
        Some(&audit),
    )?;
    Ok(())
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
    /// The configuration that accepts a connection with `link`'s
    /// keep-alives and idle timeout.
    fn config_for(&mut self, link: sundial_protocol::wire::LinkTiming) -> Arc<quinn::ServerConfig> {
        let base = &self.config;
        self.configs
            .entry(link)
            .or_insert_with(|| {
                let mut c = base.clone();
                c.transport_config(net::server_transport(link));
                Arc::new(c)
            })
            .clone()
    }

    /// Opens the data directory and binds the UDP socket.
    pub fn bind(dir: &Path, listen: SocketAddr) -> Result<Server, ServeError> {
        Server::bind_with(dir, listen, default_limits())
    }

    /// Opens the data directory and binds, with these limits.
    pub fn bind_with(dir: &Path, listen: SocketAddr, limits: Limits) -> Result<Server, ServeError> {
        Server::bind_on(dir, listen, limits, StoreChoice::FromDataDir)
    }

    /// Opens the data directory and the store of choice, and binds.
    pub fn bind_on(
        dir: &Path,
        listen: SocketAddr,
        limits: Limits,
        store: StoreChoice,
    ) -> Result<Server, ServeError> {
        Server::bind_keyed(dir, listen, limits, store, None)
    }

    /// [`Server::bind_on`] with the store's key ring at `store_key`
    /// (default: the systemd credential, else `store.key` in `dir`).
    pub fn bind_keyed(
        dir: &Path,
        listen: SocketAddr,
        limits: Limits,
        store: StoreChoice,
        store_key: Option<&Path>,
    ) -> Result<Server, ServeError> {
        let key_file = crate::store_key::key_file(dir, store_key);
        let store = store.resolve(dir)?;
        if matches!(store, StoreChoice::Embedded) {
            check_store_present(dir)?;
        }
        if !dir.join(crate::pki::CA_CERT).exists()
            || (matches!(store, StoreChoice::Embedded) && !is_initialized(dir))
        {
            return Err(ServeError::NotInitialized(dir.to_owned()));
        }
        let pki = Pki::load(dir)?;
        let (store, shared, cipher): (Arc<dyn CoordStore>, bool, _) = match store {
            StoreChoice::Postgres(opts) => {
                let pg = open_pg(&opts)?;
                let ours = sundial_protocol::token::hex(&sha256(pki.ca_der.as_ref()));
                match pg.setting(CA_SETTING)? {
                    Some(theirs) if theirs == ours => {}
                    Some(_) => return Err(ServeError::Tls(format!(
                        "the database at {} serves coordinators with another CA than {}'s: copy the data directory of one of its coordinators instead",
                        crate::pg::redact(&opts.url),
                        dir.display()
                    ))),
                    None => return Err(ServeError::Tls(format!(
                        "the database at {} holds no coordinator yet: run `sundial-coordinator init --store …` first",
                        crate::pg::redact(&opts.url)
                    ))),
                }
                let mut pg = pg;
                let cipher =
                    crate::store_key::encrypt(&mut pg, &key_file).map_err(ServeError::Key)?;
                (Arc::new(pg), true, cipher)
            }
            _ => match CoordinatorStore::open_checked(
                &dir.join(STORE_FILE),
                crate::store_key::CHECKS_KEY,
                |checks| crate::store_key::prepare(checks, &key_file),
            ) {
                Ok((mut s, cipher)) => {
                    if let Some(cipher) = &cipher {
                        crate::store_key::apply(&mut s, cipher, &key_file)
                            .map_err(ServeError::Key)?;
                    }
                    (Arc::new(s), false, cipher)
                }
                Err(StoreError::Locked(_)) => return Err(ServeError::Busy(dir.join(STORE_FILE))),
                Err(StoreError::Refused(why)) => return Err(ServeError::Key(why)),
                Err(e) => return Err(ServeError::Store(e)),
            },
        };
        let key = cipher.map(|c| (c, key_file));
        // Read before the certificates, so that none added meanwhile is missed.
        let cert_seq = if shared {
            Some(store.cert_seq()?)
        } else {
            None
        };
        // The store holds task environments and run output, the directory
        // the CA key: the owner's only, whatever the umask was.
        restrict_data_dir(dir);
        let started = Instant::now();
        let node = CoordNode::new(
            Now {
                mono_ms: 0,
                wall: now(),
            },
            CoordConfig {
                limits,
                ca_der: pki.ca_der.to_vec(),
                revision: store.revision()?,
                known_certs: all_certs(store.as_ref())?,
                shared: cert_seq.map(|cert_seq| sundial_core::coord::Shared {
                    cert_seq,
                    feed_interval_ms: FEED_INTERVAL_MS,
                    holder: session_holder(),
                }),
                bugs: Default::default(),
                placed: sundial_core::coord::placement::placed_tasks(store.as_ref())?,
            },
        );
        let node = Arc::new(Mutex::new(node));
        let mut tls = tls_server_config(&pki, node.clone(), false)?;
        tls.alpn_protocols = vec![ALPN.to_vec(), ALPN_ENROLL.to_vec(), ALPN_ADMIN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(net::server_transport(sundial_core::coord::link_for_fleet(
            0,
        )));
        let endpoint =
            quinn::Endpoint::server(config.clone(), listen).map_err(|source| ServeError::Bind {
                addr: listen,
                source,
            })?;
        Ok(Server {
            endpoint,
            config,
            configs: HashMap::new(),
            shared: Arc::new(Shared {
                node,
                store,
                pki: Arc::new(pki),
                started,
                handles: Mutex::new(HashMap::new()),
                timer: Notify::new(),
                timer_at: AtomicU64::new(u64::MAX),
                stop: Notify::new(),
                stopped: AtomicBool::new(false),
                next_req: AtomicU64::new(0),
                log: Mutex::new(log::LogState::default()),
                shared_store: shared,
                metrics: std::sync::OnceLock::new(),
                notifier: std::sync::OnceLock::new(),
            }),
            key,
        })
    }

    /// Turns the webhook on: its queue in `dir`, pending entries settled
    /// against the store, delivery and the offline watch started.
    pub async fn notify(&self, dir: &Path, config: notify::NotifyConfig) -> Result<(), ServeError> {
        let url = config.url.clone();
        let n = Arc::new(notify::Notifier::open(dir, config).map_err(ServeError::Tls)?);
        let store = self.shared.store.clone();
        let recovering = n.clone();
        tokio::task::spawn_blocking(move || recovering.recover(store.as_ref()))
            .await
            .map_err(|e| ServeError::Tls(format!("notifications: {e}")))?
            .map_err(ServeError::Tls)?;
        let _ = self.shared.notifier.set(n.clone());
        tokio::spawn(n.clone().deliver());
        tokio::spawn(n.watch_offline(self.shared.store.clone(), self.shared.node.clone()));
        tracing::info!(%url, "notifying failed, skipped and offline");
        Ok(())
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` (TCP); the
    /// address bound. Metrics count from now on.
    pub async fn serve_http(
        &self,
        addr: SocketAddr,
        task_series_max: usize,
    ) -> Result<SocketAddr, ServeError> {
        http::serve(self.shared.clone(), addr, task_series_max).await
    }

    /// Serves the same as [`Server::serve_http`] over TLS (the
    /// coordinator's certificate) to clients showing a live admin
    /// credential (`--https`); the address bound.
    pub async fn serve_https(
        &self,
        addr: SocketAddr,
        task_series_max: usize,
    ) -> Result<SocketAddr, ServeError> {
        let mut tls = tls_server_config(&self.shared.pki, self.shared.node.clone(), true)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No resumption: a resumed session skips the certificate check, and
        // every connection must show a credential that is live now.
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        http::serve_tls(self.shared.clone(), addr, task_series_max, tls).await
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Serves until `shutdown` resolves, or until the store fails to write
    /// (then the error says so and the process should exit non-zero).
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tokio::pin!(shutdown);
        if let Ok(l) = self.shared.node.lock().map(|n| n.limits().clone()) {
            tracing::info!(
                addr = %self.local_addr().map_or_else(|| "?".into(), |a| a.to_string()),
                sessions_max = l.sessions_max,
                handshakes_per_sec = l.handshakes_per_sec,
                upload_runs_per_sec = l.upload_runs_per_sec,
                period_min = %l.period_min,
                run_retention = %l.run_retention.map_or_else(|| "keep".into(), |d| d.to_string()),
                audit_retention = %l.audit_retention.map_or_else(|| "keep".into(), |d| d.to_string()),
                agent_report_every = %l.agent_report_every,
                shared_store = self.shared.shared_store,
                "coordinator serving"
            );
        }
        let timers = tokio::spawn(self.shared.clone().timers());
        if let Some((cipher, key_file)) = self.key.clone() {
            let store = self.shared.store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(KEY_RELOAD_EVERY);
                loop {
                    tick.tick().await;
                    let (store, cipher, key_file) =
                        (store.clone(), cipher.clone(), key_file.clone());
                    let _ = tokio::task::spawn_blocking(move || {
                        crate::store_key::reload(store.as_ref(), &cipher, &key_file)
                    })
                    .await;
                }
            });
        }
        let failed = loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break false };
                    let ip = incoming.remote_address().ip();
                    let admitted = self.shared.drive(|n, now| {
                        n.handle_incoming(now, ip).map(|id| (id, n.link_timing(id)))
                    });
                    match admitted {
                        Ok((id, link)) => {
                            let link = link.unwrap_or_else(|| sundial_core::coord::link_for_fleet(0));
                            let config = self.config_for(link);
                            tokio::spawn(conn::serve(self.shared.clone(), id, incoming, config, link));
                        }
                        Err(_) => incoming.refuse(),
                    }
                }
                _ = &mut shutdown => break false,
                _ = self.shared.stop.notified() => break true,
            }
        };
        timers.abort();
        self.endpoint
            .close(close::DONE.into(), b"coordinator stopping");
        self.endpoint.wait_idle().await;
        if failed {
            return Err(ServeError::StoreBroken);
        }
        tracing::info!(
            sessions_at_stop = self
                .shared
                .node
                .lock()
                .map(|n| n.sessions_open())
                .unwrap_or(0),
            "coordinator stopped"
        );
        Ok(())
    }
}
