//! The agent's QUIC plumbing for the core's session machine (which the
//! runtime drives inside the agent node and which decides everything:
//! Hello, the outbox window, acknowledgements, clock probes, link silence,
//! backoff): the enrolled agent's credentials, dialing with mutual TLS,
//! frames, and telling how a connection ended.
//!
//! Invariant (the machine's): a record leaves the outbox only on an
//! acknowledgement; after a reconnect everything not acknowledged is sent
//! again (the coordinator stores by run key, so nothing doubles).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sundial_core::session::agent::Closed;
use sundial_core::session::Event;
use sundial_net::tls::{Identity, ServerTrust};
use sundial_net::NetError;
use sundial_protocol::codec::FrameError;
use sundial_protocol::wire::ALPN;

use crate::store::{meta, AgentStore};

pub use sundial_net::{CONNECT_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE};
/// How long a connection whose stream ended is given to say why it closed.
const CLOSE_REASON_WAIT: Duration = Duration::from_millis(500);

/// Files of an enrolled agent, beside its store.
pub const KEY_FILE: &str = "agent.key";
pub const CERT_FILE: &str = "agent.pem";
pub const CA_FILE: &str = "ca.pem";

/// Where and how to reach the coordinator.
#[derive(Debug)]
pub struct SessionConfig {
    /// The coordinators' `HOST:PORT`s (several share one store; a name
    /// with several addresses counts as several): a dial tries one, and
    /// the next dial after a failed attempt or a lost session the next,
    /// so an agent whose coordinator died is soon in session with another.
    pub coordinators: Vec<String>,
    pub server_name: String,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// The address the next dial tries (an index into the resolved list).
    next: AtomicUsize,
}

impl SessionConfig {
    /// Loads an enrolled agent's session settings; `None` if not enrolled.
    pub fn load(data_dir: &Path, store: &AgentStore) -> Result<Option<SessionConfig>, String> {
        let (Some(coordinator), Some(server_name)) = (
            store
                .get_meta::<String>(meta::COORDINATOR)
                .map_err(|e| e.to_string())?,
            store
                .get_meta::<String>(meta::SERVER_NAME)
                .map_err(|e| e.to_string())?,
        ) else {
            return Ok(None);
        };
        let read = |name: &str| {
            std::fs::read(data_dir.join(name))
                .map_err(|e| format!("{}: {e}", data_dir.join(name).display()))
        };
        let ca = CertificateDer::from_pem_slice(&read(CA_FILE)?)
            .map_err(|e| format!("{CA_FILE}: {e}"))?;
        let cert = CertificateDer::from_pem_slice(&read(CERT_FILE)?)
            .map_err(|e| format!("{CERT_FILE}: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&read(KEY_FILE)?)
            .map_err(|e| format!("{KEY_FILE}: {e}"))?;
        let coordinators = sundial_protocol::token::coordinator_list(&coordinator)
            .unwrap_or_else(|_| vec![coordinator]);
        Ok(Some(SessionConfig {
            coordinators,
            server_name,
            ca,
            cert,
            key,
            // Each agent starts at its own place in the list (its number),
            // so that a fleet spreads over several coordinators.
            next: AtomicUsize::new(
                store
                    .get_meta::<u64>(meta::AGENT_ID)
                    .ok()
                    .flatten()
                    .map_or(0, |id| id as usize),
            ),
        }))
    }

    /// The coordinators as one text, for the log.
    pub fn coordinators_text(&self) -> String {
        self.coordinators.join(",")
    }

    /// The next dial tries the next address (the last attempt failed, or
    /// its session was lost).
    pub fn move_on(&self) {
        self.next.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Setup(String),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the coordinator closed the stream")]
    Eof,
    #[error("the coordinator refused the session: {0}")]
    Refused(String),
    #[error("timed out")]
    Timeout,
    #[error("the agent is stopping")]
    Stopping,
}

impl From<NetError> for SessionError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Connection(e) => SessionError::Connection(e),
            NetError::Read(e) => SessionError::Read(e),
            NetError::Write(e) => SessionError::Write(e),
            NetError::Closed(e) => SessionError::Setup(e.to_string()),
            NetError::Frame(e) => SessionError::Frame(e),
            NetError::Eof => SessionError::Eof,
            NetError::Connect(e) => SessionError::Connect(e),
            NetError::Setup(s) => SessionError::Setup(s),
            NetError::Timeout => SessionError::Timeout,
        }
    }
}

/// Reads framed messages from a QUIC stream (cancel-safe), with the
/// agent's errors.
#[derive(Debug)]
pub struct FramedRecv(sundial_net::FramedRecv);

impl FramedRecv {
    pub fn new(recv: quinn::RecvStream) -> FramedRecv {
        FramedRecv(sundial_net::FramedRecv::new(recv))
    }

    pub async fn next<M: DeserializeOwned>(&mut self) -> Result<M, SessionError> {
        Ok(self.0.next().await?)
    }
}

/// Writes one framed message.
pub async fn send<M: Serialize>(s: &mut quinn::SendStream, msg: &M) -> Result<(), SessionError> {
    Ok(sundial_net::send(s, msg).await?)
}

/// Connects to the coordinator at `addr` (see [`sundial_net::connect`]).
pub async fn connect(
    addr: &str,
    server_name: &str,
    trust: ServerTrust,
    identity: Option<Identity>,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, quinn::Connection), SessionError> {
    Ok(sundial_net::connect(addr, server_name, trust, identity, alpn).await?)
}

/// Whether TLS refused the connection (an alert in the handshake: our
/// certificate is revoked or unknown there, or theirs is not our CA's).
fn refused_by_tls(e: &SessionError) -> bool {
    format!("{e:?}").contains("Code::crypto")
}

/// Whether the coordinator ended the session because this agent is revoked.
fn revoked(conn: Option<&quinn::Connection>, result: &Result<(), SessionError>) -> bool {
    let code = sundial_protocol::wire::close::REVOKED;
    let by_code = |e: &quinn::ConnectionError| matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(code));
    let from_result = match result {
        Err(SessionError::Connection(e)) => by_code(e),
        Err(SessionError::Read(quinn::ReadError::ConnectionLost(e)))
        | Err(SessionError::Write(quinn::WriteError::ConnectionLost(e))) => by_code(e),
        _ => false,
    };
    from_result
        || conn
            .and_then(quinn::Connection::close_reason)
            .as_ref()
            .is_some_and(by_code)
}

/// A cheap, well-spread seed for the jitter (no cryptographic use).
pub fn jitter_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// A connection with its session stream open.
#[derive(Debug)]
pub struct Live {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub tx: quinn::SendStream,
    pub rx: FramedRecv,
}

/// How a live connection ended. A stream can end a moment before the
/// connection's close (with its code) is processed: wait briefly for it, so
/// a revocation is not taken for a lost link.
pub async fn ended_kind(conn: &quinn::Connection, result: &Result<(), SessionError>) -> Closed {
    if conn.close_reason().is_none() {
        let _ = tokio::time::timeout(CLOSE_REASON_WAIT, conn.closed()).await;
    }
    closed_kind(Some(conn), result)
}

/// How a connection or an attempt ended, for the session machine.
pub fn closed_kind(conn: Option<&quinn::Connection>, result: &Result<(), SessionError>) -> Closed {
    if revoked(conn, result) {
        Closed::Revoked
    } else if matches!(result, Err(e) if refused_by_tls(e)) {
        Closed::RefusedByTls
    } else if let Some(retry_after_ms) = busy(conn, result) {
        Closed::Busy { retry_after_ms }
    } else {
        Closed::Lost
    }
}

/// Whether the coordinator is at a limit: it refused the handshake
/// (CONNECTION_REFUSED, before any cryptography) or closed with BUSY; with
/// the retry-after it gave, if any.
fn busy(
    conn: Option<&quinn::Connection>,
    result: &Result<(), SessionError>,
) -> Option<Option<u64>> {
    let code = sundial_protocol::wire::close::BUSY;
    let of = |e: &quinn::ConnectionError| match e {
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Some(None)
        }
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(code) =>
        {
            Some(sundial_protocol::wire::busy_retry_after_ms(&c.reason))
        }
        _ => None,
    };
    let from_result = match result {
        Err(SessionError::Connection(e)) => of(e),
        Err(SessionError::Read(quinn::ReadError::ConnectionLost(e)))
        | Err(SessionError::Write(quinn::WriteError::ConnectionLost(e))) => of(e),
        _ => None,
    };
    from_result.or_else(|| {
        conn.and_then(quinn::Connection::close_reason)
            .as_ref()
            .and_then(of)
    })
}

/// Logs what the session machine says.
pub fn log_event(event: &Event) {
    match event {
        Event::SessionUp {
            last_revision,
            outbox_len,
        } => tracing::info!(last_revision, outbox_len, "session up"),
        Event::SessionDown { closed } => tracing::debug!(?closed, "session ended"),
        Event::LinkSilent { silent_ms } => tracing::info!(
            silent_ms,
            "nothing heard from the coordinator; runs fired now are marked offline"
        ),
        Event::LinkIdle { silent_ms } => tracing::warn!(
            silent_ms,
            "nothing heard from the coordinator for the session's idle timeout; dialling again"
        ),
        Event::LinkHeard => tracing::info!("the coordinator is heard again"),
        Event::ReconnectPolicy(p) => tracing::debug!(
            attempt_timeout_ms = p.attempt_timeout_ms,
            backoff_floor_ms = p.backoff_floor_ms,
            backoff_cap_ms = p.backoff_cap_ms,
            busy_spread_ms = p.busy_spread_ms,
            handshakes_per_sec = p.handshakes_per_sec,
            "the coordinator's reconnect policy"
        ),
        Event::Revoked => tracing::error!("this agent was revoked by its coordinator: no more sessions, and nothing fires from now on (its outbox could never be sent); to use this device again, move its data directory away and join with a new token"),
        Event::HandshakeRefused { why } => tracing::warn!(reason = %why, "the coordinator refused the session"),
        Event::ResultsAcked { batch_id, runs } => tracing::debug!(batch_id, runs, "results acknowledged"),
        Event::ModuleReceived { hash, size } => {
            tracing::info!(module = %hash, size, "a function's module received; stored before its tasks")
        }
        Event::ModuleRefused { why } => tracing::warn!(reason = %why, "a function's module was not taken; its tasks' runs will be recorded rejected"),
        other => tracing::trace!(event = ?other, "agent"),
    }
}

/// Dials the coordinator and opens the session stream.
pub async fn dial(cfg: &SessionConfig, timeout: Duration) -> Result<Live, SessionError> {
    let r = dial_one(cfg, timeout).await;
    if r.is_err() {
        cfg.move_on();
    }
    r
}

async fn dial_one(cfg: &SessionConfig, timeout: Duration) -> Result<Live, SessionError> {
    let identity = Identity {
        chain: vec![cfg.cert.clone()],
        key: cfg.key.clone_key(),
    };
    // Resolved at every dial: a DNS name may move or gain addresses.
    let (peers, failed) = sundial_net::resolve_all(&cfg.coordinators).await;
    if peers.is_empty() {
        return Err(SessionError::Setup(if failed.is_empty() {
            "no coordinator address".into()
        } else {
            failed.join("; ")
        }));
    }
    let peer = peers[cfg.next.load(Ordering::Relaxed) % peers.len()];
    let (endpoint, conn) = sundial_net::connect_peer(
        peer,
        &cfg.server_name,
        ServerTrust::Ca(cfg.ca.clone()),
        Some(identity),
        ALPN,
        timeout,
    )
    .await?;
    match conn.open_bi().await {
        Ok((tx, rx)) => Ok(Live {
            endpoint,
            conn,
            tx,
            rx: FramedRecv::new(rx),
        }),
        // Revoked shows here: the coordinator closes with its code.
        Err(e) => Err(match conn.close_reason() {
            Some(reason) => SessionError::Connection(reason),
            None => SessionError::Connection(e),
        }),
    }
}
