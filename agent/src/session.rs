//! The agent's session shell: QUIC with mutual TLS around the core's
//! [`AgentSession`] machine, which decides everything (Hello, the outbox
//! window, acknowledgements, clock probes, link silence, backoff). This
//! file dials, reads and writes frames, reads and acknowledges the outbox
//! in the store, hands assignments to the runtime and logs the machine's
//! events.
//!
//! Invariant (the machine's): a record leaves the outbox only on an
//! acknowledgement; after a reconnect everything not acknowledged is sent
//! again (the coordinator stores by run key, so nothing doubles).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sundial_core::session::agent::{AgentEffect, AgentSession, Closed, HelloInfo};
use sundial_core::session::{Event, Now};
use sundial_net::tls::{Identity, ServerTrust};
use sundial_net::NetError;
use sundial_protocol::codec::FrameError;
use sundial_protocol::wire::{AssignmentChange, CoordMsg, ALPN};
use sundial_protocol::Timestamp;
use tokio::sync::{mpsc, Notify};

use crate::clock::SystemClock;
use crate::runtime::Control;
use crate::store::{meta, AgentStore};

pub use sundial_core::session::agent::{
    BATCHES_IN_FLIGHT_MAX, BATCH_BYTES_MAX, CLOCK_PROBE_INTERVAL_MS, LINK_SILENT_MAX_MS,
    RECONNECT_DELAY_MAX_MS, RECONNECT_DELAY_MIN_MS, RECONNECT_DELAY_REFUSED_MS,
};
pub use sundial_net::{CONNECT_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE};
/// How long a connection whose stream ended is given to say why it closed.
const CLOSE_REASON_WAIT: Duration = Duration::from_millis(500);
/// How often a live connection's packet count is looked at, for link silence.
const HEARD_POLL: Duration = Duration::from_millis(500);

/// Files of an enrolled agent, beside its store.
pub const KEY_FILE: &str = "agent.key";
pub const CERT_FILE: &str = "agent.pem";
pub const CA_FILE: &str = "ca.pem";

/// State shared between the runtime and the session.
#[derive(Debug, Default)]
pub struct SessionShared {
    /// The programs this agent allows, told to the coordinator in Hello.
    pub allow_exec: Vec<String>,
    /// A session is up: runs fired now are not `offline`.
    pub online: AtomicBool,
    /// New records are in the outbox.
    pub outbox: Notify,
}

/// Where and how to reach the coordinator.
#[derive(Debug)]
pub struct SessionConfig {
    pub coordinator: String,
    pub server_name: String,
    pub ca: CertificateDer<'static>,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
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
        Ok(Some(SessionConfig {
            coordinator,
            server_name,
            ca,
            cert,
            key,
        }))
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
fn jitter_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32)
}

/// Backoff before reconnect attempt `failures` (1-based); see the core.
pub fn reconnect_delay(failures: u32, random: u64) -> Duration {
    Duration::from_millis(sundial_core::session::agent::reconnect_delay_ms(
        failures, random,
    ))
}

/// A live connection.
struct Live {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    tx: quinn::SendStream,
    rx: FramedRecv,
    rx_datagrams: u64,
}

/// How a connection or an attempt ended, for the machine.
/// How a live connection ended. A stream can end a moment before the
/// connection's close (with its code) is processed: wait briefly for it, so
/// a revocation is not taken for a lost link.
async fn ended_kind(conn: &quinn::Connection, result: &Result<(), SessionError>) -> Closed {
    if conn.close_reason().is_none() {
        let _ = tokio::time::timeout(CLOSE_REASON_WAIT, conn.closed()).await;
    }
    closed_kind(Some(conn), result)
}

fn closed_kind(conn: Option<&quinn::Connection>, result: &Result<(), SessionError>) -> Closed {
    if revoked(conn, result) {
        Closed::Revoked
    } else if matches!(result, Err(e) if refused_by_tls(e)) {
        Closed::RefusedByTls
    } else {
        Closed::Lost
    }
}

/// Runs sessions until the runtime stops or the agent is revoked.
pub async fn run(
    cfg: SessionConfig,
    store: Arc<AgentStore>,
    control: mpsc::Sender<Control>,
    shared: Arc<SessionShared>,
) {
    let origin = Instant::now();
    let now = || Now {
        mono_ms: origin.elapsed().as_millis() as u64,
        wall: Timestamp::from_millis_saturating(SystemClock.read().wall_ms),
    };
    let mut sm = AgentSession::new(jitter_seed());
    let mut live: Option<Live> = None;
    // What the log last said about reaching the coordinator, so that a
    // device offline for a week says so once, not every 30 s.
    let mut reported: Option<&'static str> = None;
    let mut heard_poll = Instant::now() + HEARD_POLL;
    loop {
        // Drive the machine until it has nothing more to say.
        loop {
            let mut busy = false;
            while let Some(effect) = sm.poll_effect() {
                busy = true;
                if !perform(
                    effect,
                    &cfg,
                    &store,
                    &control,
                    &shared,
                    &mut sm,
                    &mut live,
                    &mut reported,
                    now,
                )
                .await
                {
                    return;
                }
            }
            while let Some(msg) = sm.poll_transmit() {
                busy = true;
                let Some(l) = live.as_mut() else { continue };
                if let (true, sundial_protocol::wire::AgentMsg::Results { runs, .. }) =
                    (crate::fault::active("ack-early"), &msg)
                {
                    // A seeded bug for the simulator's checker: records
                    // deleted before the coordinator stored them.
                    let keys: Vec<_> = runs.iter().map(|r| r.key()).collect();
                    let _ = store.outbox_ack(&keys);
                }
                if let Err(e) = send(&mut l.tx, &msg).await {
                    let result = Err(e);
                    let kind = ended_kind(&l.conn, &result).await;
                    end_connection(&mut live, &result);
                    sm.handle_closed(now(), kind);
                }
            }
            while let Some(event) = sm.poll_event() {
                log_event(&event);
            }
            if !busy {
                break;
            }
        }
        if sm.is_ended() || control.is_closed() {
            if let Some(l) = live.take() {
                l.conn.close(0u32.into(), b"bye");
            }
            return;
        }
        let mut wake = sm
            .poll_timeout()
            .map(|ms| origin + Duration::from_millis(ms));
        if live.is_some() {
            wake = Some(wake.map_or(heard_poll, |w| w.min(heard_poll)));
        }
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(w.into()).await,
                None => std::future::pending().await,
            }
        };
        let recv = async {
            match live.as_mut() {
                Some(l) => Some(l.rx.next::<CoordMsg>().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = recv => match msg {
                Some(Ok(m)) => sm.handle_message(now(), m),
                Some(Err(e)) => {
                    let result = Err(e);
                    let kind = match live.as_ref() {
                        Some(l) => ended_kind(&l.conn, &result).await,
                        None => closed_kind(None, &result),
                    };
                    end_connection(&mut live, &result);
                    sm.handle_closed(now(), kind);
                }
                None => {}
            },
            _ = shared.outbox.notified() => sm.outbox_changed(now()),
            _ = sleep => {}
        }
        // Whatever woke us, timers that are due run now (a busy outbox
        // must not starve them).
        if Instant::now() >= heard_poll {
            heard_poll = Instant::now() + HEARD_POLL;
            if let Some(l) = live.as_mut() {
                // The keep-alives of both ends keep packets coming on a
                // live link: a silence says it is cut well before the
                // idle timeout does.
                let rx = l.conn.stats().udp_rx.datagrams;
                if rx != l.rx_datagrams {
                    l.rx_datagrams = rx;
                    sm.handle_heard(now());
                }
                if let Some(reason) = l.conn.close_reason() {
                    let result = Err(SessionError::Connection(reason));
                    let kind = closed_kind(Some(&l.conn), &result);
                    end_connection(&mut live, &result);
                    sm.handle_closed(now(), kind);
                }
            }
        }
        let t = now();
        if sm.poll_timeout().is_some_and(|due| t.mono_ms >= due) {
            sm.handle_timeout(t);
        }
    }
}

fn end_connection(live: &mut Option<Live>, result: &Result<(), SessionError>) {
    if let Some(l) = live.take() {
        match result {
            Err(e) if refused_by_tls(e) => {
                tracing::error!(error = %e, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely")
            }
            Err(e) => tracing::warn!(error = %e, "session down"),
            Ok(()) => tracing::info!("session closed"),
        }
        l.conn.close(0u32.into(), b"bye");
    }
}

fn log_event(event: &Event) {
    match event {
        Event::SessionUp {
            last_revision,
            outbox_len,
        } => tracing::info!(last_revision, outbox_len, "session up"),
        Event::LinkSilent { silent_ms } => tracing::info!(
            silent_ms,
            "nothing heard from the coordinator; runs fired now are marked offline"
        ),
        Event::LinkHeard => tracing::info!("the coordinator is heard again"),
        Event::Revoked => tracing::error!("this agent was revoked by its coordinator: no more sessions (local tasks still fire); to use this device again, move its data directory away and join with a new token"),
        Event::HandshakeRefused { why } => tracing::warn!(reason = %why, "the coordinator refused the session"),
        Event::ResultsAcked { batch_id, runs } => tracing::debug!(batch_id, runs, "results acknowledged"),
        other => tracing::trace!(event = ?other, "session"),
    }
}

/// Carries out one effect of the machine; false when the agent stops.
#[allow(clippy::too_many_arguments)]
async fn perform(
    effect: AgentEffect,
    cfg: &SessionConfig,
    store: &Arc<AgentStore>,
    control: &mpsc::Sender<Control>,
    shared: &SessionShared,
    sm: &mut AgentSession,
    live: &mut Option<Live>,
    reported: &mut Option<&'static str>,
    now: impl Fn() -> Now,
) -> bool {
    let to_runtime = |c: Control| async move { control.send(c).await.is_ok() };
    match effect {
        AgentEffect::Connect => match dial(cfg, store, shared).await {
            Ok((l, hello)) => {
                *reported = None;
                tracing::info!(coordinator = %cfg.coordinator, "connected");
                *live = Some(l);
                sm.handle_connected(now(), hello);
            }
            Err(e) => {
                let result = Err(e);
                let kind = closed_kind(None, &result);
                if let Err(e) = &result {
                    if kind == Closed::RefusedByTls {
                        if *reported != Some("refused") {
                            tracing::error!(error = %e, coordinator = %cfg.coordinator, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                            *reported = Some("refused");
                        }
                    } else if *reported != Some("unreachable") {
                        tracing::info!(error = %e, coordinator = %cfg.coordinator, "cannot reach the coordinator; tasks keep firing and runs wait in the outbox");
                        *reported = Some("unreachable");
                    } else {
                        tracing::debug!(error = %e, coordinator = %cfg.coordinator, "cannot reach the coordinator");
                    }
                }
                sm.handle_connect_failed(now(), kind);
            }
        },
        AgentEffect::ReadOutbox {
            after,
            runs_max,
            bytes_max,
        } => match off_thread(store, move |s| s.outbox_after(after, runs_max, bytes_max)).await {
            Ok(batch) => sm.handle_outbox(now(), batch),
            Err(e) => {
                tracing::error!(error = %e, "could not read the outbox; closing the session");
                end_connection(live, &Err(SessionError::Store(e)));
                sm.handle_closed(now(), Closed::Lost);
            }
        },
        AgentEffect::Apply {
            changes,
            upto_revision,
        } => {
            for change in changes {
                let c = match change {
                    AssignmentChange::Upsert(spec) => Control::Upsert(spec),
                    AssignmentChange::Cancel { task_id, revision } => {
                        Control::Cancel { task_id, revision }
                    }
                };
                if !to_runtime(c).await {
                    return false;
                }
            }
            if !to_runtime(Control::Revision(upto_revision)).await {
                return false;
            }
        }
        AgentEffect::Ack { keys } => {
            if let Err(e) = off_thread(store, move |s| s.outbox_ack(&keys)).await {
                tracing::error!(error = %e, "could not delete acknowledged records; closing the session (they are sent again)");
                end_connection(live, &Err(SessionError::Store(e)));
                sm.handle_closed(now(), Closed::Lost);
            }
        }
        AgentEffect::Clock { offset_ms, rtt_ms } => {
            if !to_runtime(Control::Clock { offset_ms, rtt_ms }).await {
                return false;
            }
        }
        AgentEffect::RunNow { task_id, at } => {
            if !to_runtime(Control::RunNow { task_id, at }).await {
                return false;
            }
        }
        AgentEffect::Online(online) => shared.online.store(online, Ordering::SeqCst),
        AgentEffect::PersistLastSync { wall } => {
            let ms = wall.as_millis();
            if let Err(e) =
                off_thread(store, move |s| s.put_meta(&[(meta::LAST_SYNC_MS, ms)])).await
            {
                tracing::warn!(error = %e, "could not record the last sync");
            }
        }
        AgentEffect::Revoked => {
            if let Err(e) = store.put_meta(&[(meta::REVOKED, true)]) {
                tracing::error!(error = %e, "could not record the revocation");
            }
        }
        AgentEffect::Disconnect => {
            end_connection(live, &Ok(()));
            sm.handle_closed(now(), Closed::Lost);
        }
    }
    true
}

/// Runs a store transaction on the blocking pool: the agent's one async
/// thread also runs its firing loop, which must not wait for an fsync of
/// the session's.
async fn off_thread<T: Send + 'static>(
    store: &Arc<AgentStore>,
    f: impl FnOnce(&AgentStore) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(r) => r,
        Err(e) => Err(crate::store::StoreError::Worker(format!(
            "store worker failed: {e}"
        ))),
    }
}

/// Dials the coordinator and opens the session stream; what Hello says.
async fn dial(
    cfg: &SessionConfig,
    store: &AgentStore,
    shared: &SessionShared,
) -> Result<(Live, HelloInfo), SessionError> {
    let identity = Identity {
        chain: vec![cfg.cert.clone()],
        key: cfg.key.clone_key(),
    };
    let (endpoint, conn) = connect(
        &cfg.coordinator,
        &cfg.server_name,
        ServerTrust::Ca(cfg.ca.clone()),
        Some(identity),
        ALPN,
    )
    .await?;
    let opened = async {
        let (tx, rx) = conn.open_bi().await?;
        Ok::<_, SessionError>((tx, rx))
    }
    .await;
    let (tx, rx) = match opened {
        Ok(x) => x,
        Err(e) => {
            // Revoked shows here: the coordinator closes with its code.
            if let Some(reason) = conn.close_reason() {
                return Err(SessionError::Connection(reason));
            }
            return Err(e);
        }
    };
    let hello = HelloInfo {
        last_revision: store.get_meta::<u64>(meta::LAST_REVISION)?.unwrap_or(0),
        outbox_len: store.outbox_len()?,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        allow_exec: shared.allow_exec.clone(),
    };
    let rx_datagrams = conn.stats().udp_rx.datagrams;
    Ok((
        Live {
            _endpoint: endpoint,
            conn,
            tx,
            rx: FramedRecv::new(rx),
            rx_datagrams,
        },
        hello,
    ))
}
