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
use std::time::Duration;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use sundial_protocol::task::Target;
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    close, AdminRequest, AdminResponse, AgentInfo, AgentMsg, AssignmentChange, CoordMsg,
    EnrollRequest, EnrollResponse, TaskInfo, ALPN, ALPN_ADMIN, ALPN_ENROLL, RESULT_BATCH_RUNS_MAX,
};
use sundial_protocol::{AgentId, DurationMs, RunKey, Timestamp};
use tokio::sync::watch;

use crate::cli::now;
use crate::net::{self, FramedRecv, NetError};
use crate::pki::Pki;
use crate::store::{AgentRecordV1, CertRole, CoordinatorStore, StoreError, TokenRecordV1};

/// The store's file name in the data directory.
pub const STORE_FILE: &str = "coordinator.redb";
/// The default UDP port.
pub const PORT_DEFAULT: u16 = 7447;
/// Most runs listed by one `run list`.
pub const RUN_LIST_MAX: u32 = 10_000;
/// How long an enrollment or admin exchange may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Agent telemetry kept in memory between persists.
#[derive(Debug, Default, Clone, Copy)]
struct Live {
    sessions: u32,
}

/// Shared state of a running coordinator.
#[derive(Debug)]
struct State {
    store: CoordinatorStore,
    pki: Pki,
    known: KnownCerts,
    live: Mutex<HashMap<AgentId, Live>>,
    revision: watch::Sender<u64>,
}

/// A bound, ready coordinator.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    state: Arc<State>,
}

/// Whether `dir` holds an initialized coordinator.
pub fn is_initialized(dir: &Path) -> bool {
    dir.join(crate::pki::CA_CERT).exists() && dir.join(STORE_FILE).exists()
}

/// `sundial-coordinator init`: creates CA, server certificate, admin
/// credentials and the store. Returns the credentials' path.
pub fn init(dir: &Path, advertise: &str, server_name: &str) -> Result<PathBuf, ServeError> {
    if is_initialized(dir) {
        return Err(ServeError::Tls(format!(
            "{} already holds a coordinator; refusing to overwrite its CA",
            dir.display()
        )));
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
        if !is_initialized(dir) {
            return Err(ServeError::NotInitialized(dir.to_owned()));
        }
        let pki = Pki::load(dir)?;
        let store = CoordinatorStore::open(&dir.join(STORE_FILE))?;
        let known: KnownCerts = Arc::new(RwLock::new(store.known_certs()?.into_iter().collect()));
        let provider = sundial_protocol::tls::provider();
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
                revision,
            }),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        tracing::info!(addr = ?self.local_addr(), "coordinator serving");
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let state = self.state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(state, incoming).await {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                }
                _ = &mut shutdown => break,
            }
        }
        self.endpoint
            .close(close::DONE.into(), b"coordinator stopping");
        self.endpoint.wait_idle().await;
    }
}

async fn handle(state: Arc<State>, incoming: quinn::Incoming) -> Result<(), NetError> {
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
        (a, _) if a == ALPN_ENROLL => handle_enroll(&state, conn).await,
        (a, Some(CertRole::Agent(id))) if a == ALPN => handle_session(&state, conn, id).await,
        (a, Some(CertRole::Admin)) if a == ALPN_ADMIN => handle_admin(&state, conn).await,
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

async fn handle_enroll(state: &State, conn: quinn::Connection) -> Result<(), NetError> {
    let (mut send, recv) = tokio::time::timeout(EXCHANGE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| NetError::Eof)??;
    let mut recv = FramedRecv::new(recv);
    let req: EnrollRequest = match tokio::time::timeout(EXCHANGE_TIMEOUT, recv.next()).await {
        Ok(r) => r?,
        Err(_) => return Err(NetError::Eof),
    };
    let resp = enroll(state, req);
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
            refused("the coordinator could not store the enrollment".into())
        }
    }
}

// ---- sessions -------------------------------------------------------------

fn changes_since(
    state: &State,
    agent: AgentId,
    labels: &[(String, String)],
    since: u64,
) -> Result<(Vec<AssignmentChange>, u64), StoreError> {
    let upto = state.store.revision()?;
    let changes = state
        .store
        .changes_for(agent, labels, since)?
        .into_iter()
        .map(|(spec, cancelled)| {
            if cancelled {
                AssignmentChange::Cancel {
                    task_id: spec.id,
                    revision: spec.revision,
                }
            } else {
                AssignmentChange::Upsert(Box::new(spec))
            }
        })
        .collect();
    Ok((changes, upto))
}

async fn handle_session(
    state: &State,
    conn: quinn::Connection,
    agent: AgentId,
) -> Result<(), NetError> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let hello: AgentMsg = match recv.next().await {
        Ok(m) => m,
        Err(e) => return Err(close_for(&conn, e)),
    };
    let AgentMsg::Hello {
        last_revision,
        outbox_len,
        ..
    } = hello
    else {
        conn.close(close::PROTOCOL.into(), b"expected Hello");
        return Ok(());
    };
    let record = match state.store.agent(agent) {
        Ok(Some(r)) if !r.revoked => r,
        _ => {
            conn.close(close::REVOKED.into(), b"agent revoked");
            return Ok(());
        }
    };
    tracing::info!(%agent, last_revision, outbox_len, remote = %conn.remote_address(), "agent session up");
    if let Ok(mut live) = state.live.lock() {
        live.entry(agent).or_default().sessions += 1;
    }
    let _ = state
        .store
        .update_agent(agent, |r| r.last_seen_ms = Some(now().as_millis()));
    let result = session_loop(
        state,
        &conn,
        &mut send,
        &mut recv,
        agent,
        &record,
        last_revision,
    )
    .await;
    if let Ok(mut live) = state.live.lock() {
        if let Some(l) = live.get_mut(&agent) {
            l.sessions = l.sessions.saturating_sub(1);
            if l.sessions == 0 {
                live.remove(&agent);
            }
        }
    }
    let _ = state
        .store
        .update_agent(agent, |r| r.last_seen_ms = Some(now().as_millis()));
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

async fn session_loop(
    state: &State,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
    agent: AgentId,
    record: &AgentRecordV1,
    last_revision: u64,
) -> Result<(), NetError> {
    let mut revisions = state.revision.subscribe();
    let mut sent = last_revision;
    let store_failed = |e: StoreError| {
        tracing::error!(error = %e, %agent, "store failed during a session");
        conn.close(close::STORE.into(), b"coordinator store failed");
        NetError::Eof
    };
    let (changes, upto) =
        changes_since(state, agent, &record.labels, sent).map_err(store_failed)?;
    net::send(
        send,
        &CoordMsg::Assignments {
            snapshot: false,
            changes,
            upto_revision: upto,
        },
    )
    .await?;
    sent = upto;
    loop {
        tokio::select! {
            msg = recv.next::<AgentMsg>() => {
                match msg? {
                    AgentMsg::Results { batch_id, mut runs } => {
                        if runs.len() > RESULT_BATCH_RUNS_MAX {
                            conn.close(close::PROTOCOL.into(), b"result batch too large");
                            return Ok(());
                        }
                        // Identity comes from the certificate, never from the record.
                        for r in &mut runs {
                            r.agent_id = agent;
                        }
                        state.store.put_runs(&runs).map_err(store_failed)?;
                        let keys: Vec<RunKey> = runs.iter().map(|r| r.key()).collect();
                        net::send(send, &CoordMsg::ResultsAck { batch_id, keys }).await?;
                    }
                    AgentMsg::ClockProbe { t1 } => {
                        let t2 = now();
                        net::send(send, &CoordMsg::ClockReply { t1, t2, t3: now() }).await?;
                    }
                    AgentMsg::ClockReport { offset_ms, rtt_ms } => {
                        let _ = state.store.update_agent(agent, |r| {
                            r.clock_offset_ms = Some(offset_ms);
                            r.rtt_ms = Some(rtt_ms);
                            r.last_seen_ms = Some(now().as_millis());
                        });
                    }
                    AgentMsg::Hello { .. } => {
                        conn.close(close::PROTOCOL.into(), b"Hello twice");
                        return Ok(());
                    }
                }
            }
            changed = revisions.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let (changes, upto) = changes_since(state, agent, &record.labels, sent).map_err(store_failed)?;
                // Changes for other agents are not news here; the revision
                // catches up with the next change that is.
                if !changes.is_empty() {
                    net::send(send, &CoordMsg::Assignments { snapshot: false, changes, upto_revision: upto }).await?;
                }
                // Seen, whether or not any of it was ours: the next look
                // starts here (a reconnect starts from the agent's own revision).
                sent = upto;
            }
        }
    }
}

// ---- admin ----------------------------------------------------------------

async fn handle_admin(state: &State, conn: quinn::Connection) -> Result<(), NetError> {
    loop {
        let (mut send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        let mut recv = FramedRecv::new(recv);
        let req: AdminRequest = match tokio::time::timeout(EXCHANGE_TIMEOUT, recv.next()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(close_for(&conn, e)),
            Err(_) => return Ok(()),
        };
        let resp = admin(state, req).unwrap_or_else(|e| AdminResponse::Error(e.to_string()));
        net::send(&mut send, &resp).await?;
        send.finish()?;
    }
}

fn agent_info(state: &State, id: AgentId, r: AgentRecordV1) -> AgentInfo {
    let online = state
        .live
        .lock()
        .map(|l| l.contains_key(&id))
        .unwrap_or(false);
    AgentInfo {
        agent_id: id,
        name: r.name,
        labels: r.labels,
        online,
        revoked: r.revoked,
        enrolled_at: Timestamp::from_millis_saturating(r.enrolled_at_ms),
        last_seen: r.last_seen_ms.map(Timestamp::from_millis_saturating),
        clock_offset_ms: r.clock_offset_ms,
        rtt_ms: r.rtt_ms,
    }
}

fn admin(state: &State, req: AdminRequest) -> Result<AdminResponse, StoreError> {
    Ok(match req {
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
                .unwrap_or_else(|| sundial_protocol::tls::SERVER_NAME_DEFAULT.into());
            let token = sundial_protocol::token::JoinToken {
                secret,
                ca_sha256: sha256(state.pki.ca_der.as_ref()),
                server_name,
            };
            AdminResponse::Token(token.encode())
        }
        AdminRequest::AgentList => AdminResponse::Agents(
            state
                .store
                .agents()?
                .into_iter()
                .map(|(id, r)| agent_info(state, id, r))
                .collect(),
        ),
        AdminRequest::AgentGet(id) => match state.store.agent(id)? {
            Some(r) => AdminResponse::Agent(Box::new(agent_info(state, id, r))),
            None => AdminResponse::Error(format!("no agent {id}")),
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
            tracing::warn!(agent = %id, "agent revoked");
            AdminResponse::Done
        }
        AdminRequest::TaskCreate(draft) => {
            if let Target::Agent(a) = &draft.target {
                if state.store.agent(*a)?.is_none() {
                    return Err(StoreError::Refused(format!("no agent {a}")));
                }
            }
            let spec = state.store.create_task(*draft, now())?;
            tracing::info!(task = %spec.id, revision = spec.revision, "task created");
            state.revision.send_replace(spec.revision);
            AdminResponse::TaskCreated(spec.id)
        }
        AdminRequest::TaskList => AdminResponse::Tasks(
            state
                .store
                .tasks()?
                .into_iter()
                .map(|(spec, cancelled)| TaskInfo { spec, cancelled })
                .collect(),
        ),
        AdminRequest::TaskGet(id) => {
            match state.store.tasks()?.into_iter().find(|(t, _)| t.id == id) {
                Some((spec, cancelled)) => {
                    AdminResponse::Task(Box::new(TaskInfo { spec, cancelled }))
                }
                None => AdminResponse::Error(format!("no task {id}")),
            }
        }
        AdminRequest::TaskCancel(id) => {
            let revision = state.store.cancel_task(id)?;
            tracing::info!(task = %id, revision, "task cancelled");
            state.revision.send_replace(revision);
            AdminResponse::Done
        }
        AdminRequest::RunList {
            task,
            agent,
            since,
            limit,
        } => {
            let limit = limit.clamp(1, RUN_LIST_MAX) as usize;
            AdminResponse::Runs(state.store.runs(task, agent, since, limit)?)
        }
    })
}

/// A default TTL for tokens: one hour.
pub const TOKEN_TTL_DEFAULT: DurationMs = DurationMs(3_600_000);
