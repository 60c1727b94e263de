//! The agent's side of the coordinator session, over QUIC with mutual TLS.
//!
//! While connected it: says Hello (last applied revision, outbox size),
//! applies assignment changes in revision order (through the runtime, which
//! owns the scheduler), streams its outbox up in batches and deletes records
//! only when the coordinator acknowledges them after its commit, and
//! exchanges clock samples every [`CLOCK_PROBE_INTERVAL`]. When the link
//! dies (noticed within the QUIC idle timeout), it reconnects with
//! exponential backoff and full jitter, capped at [`RECONNECT_DELAY_MAX`], so
//! a healed partition of thousands of agents does not stampede.
//!
//! Invariant: a record leaves the outbox only in [`AgentStore::outbox_ack`],
//! on an acknowledgement; after a reconnect everything not acknowledged is
//! sent again (the coordinator stores by run key, so nothing doubles).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sundial_net::tls::{Identity, ServerTrust};
use sundial_net::NetError;
use sundial_protocol::codec::FrameError;
use sundial_protocol::wire::{AgentMsg, AssignmentChange, CoordMsg, ALPN, RESULT_BATCH_RUNS_MAX};
use sundial_protocol::{RunKey, Timestamp};
use tokio::sync::{mpsc, Notify};

use crate::clock::SystemClock;
use crate::runtime::Control;
use crate::store::{meta, AgentStore};

/// How often clock samples are exchanged.
pub const CLOCK_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// The longest wait between reconnect attempts.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(30);
/// The wait between attempts while the coordinator refuses our certificate:
/// retrying harder cannot help, and a fleet of revoked devices must not
/// load the coordinator.
pub const RECONNECT_DELAY_REFUSED: Duration = Duration::from_secs(600);
/// The first wait after a failed connection.
pub const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(250);
pub use sundial_net::{CONNECT_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE};
/// Nothing heard from the coordinator for this long: runs fired from now on
/// are marked `offline`, before the idle timeout closes the connection.
pub const LINK_SILENT_MAX: Duration = Duration::from_millis(2_500);
/// Result batches sent and not yet acknowledged.
pub const BATCHES_IN_FLIGHT_MAX: usize = 8;
/// Bytes of records in one batch (the frame limit is larger).
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;
/// How often a live session records its time as the last sync (a durable
/// write: kept rare so a large in-process fleet does not drown in fsyncs).
const LAST_SYNC_PERSIST: Duration = Duration::from_secs(300);
/// How often the outbox is looked at even without a notification.
const OUTBOX_POLL: Duration = Duration::from_millis(500);

/// Files of an enrolled agent, beside its store.
pub const KEY_FILE: &str = "agent.key";
pub const CERT_FILE: &str = "agent.pem";
pub const CA_FILE: &str = "ca.pem";

/// The allowlist as told in Hello: cut to fit the small frame a Hello may
/// be (it is for operators' eyes; the agent enforces the whole list).
fn hello_allowlist(allow: &[String]) -> Vec<String> {
    const PATTERN_CHARS_MAX: usize = 200;
    const PATTERNS_MAX: usize = 32;
    allow
        .iter()
        .take(PATTERNS_MAX)
        .map(|p| p.chars().take(PATTERN_CHARS_MAX).collect())
        .collect()
}

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
fn revoked(conn: &quinn::Connection, result: &Result<(), SessionError>) -> bool {
    let code = sundial_protocol::wire::close::REVOKED;
    let by_code = |e: &quinn::ConnectionError| matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(code));
    let from_result = match result {
        Err(SessionError::Connection(e)) => by_code(e),
        Err(SessionError::Read(quinn::ReadError::ConnectionLost(e)))
        | Err(SessionError::Write(quinn::WriteError::ConnectionLost(e))) => by_code(e),
        _ => false,
    };
    from_result || conn.close_reason().as_ref().is_some_and(by_code)
}

/// A cheap, well-spread random number for jitter (no cryptographic use).
fn jitter_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// Backoff before reconnect attempt `failures` (1-based): full jitter over
/// `min(max, min * 2^failures)`.
pub fn reconnect_delay(failures: u32, random: u64) -> Duration {
    let cap = RECONNECT_DELAY_MAX.as_millis() as u64;
    let base = (RECONNECT_DELAY_MIN.as_millis() as u64).saturating_mul(1u64 << failures.min(20));
    let ceiling = base.min(cap).max(1);
    Duration::from_millis(ceiling / 2 + random % (ceiling / 2 + 1))
}

/// Runs sessions until `stop` is set, reconnecting as needed.
pub async fn run(
    cfg: SessionConfig,
    store: Arc<AgentStore>,
    control: mpsc::Sender<Control>,
    shared: Arc<SessionShared>,
) {
    let mut failures: u32 = 0;
    // What the log last said about reaching the coordinator, so that a
    // device offline for a week says so once, not every 30 s.
    let mut reported: Option<&'static str> = None;
    loop {
        let started = Instant::now();
        let mut refused = false;
        let identity = Identity {
            chain: vec![cfg.cert.clone()],
            key: cfg.key.clone_key(),
        };
        match connect(
            &cfg.coordinator,
            &cfg.server_name,
            ServerTrust::Ca(cfg.ca.clone()),
            Some(identity),
            ALPN,
        )
        .await
        {
            Ok((_endpoint, conn)) => {
                shared.online.store(true, Ordering::SeqCst);
                tracing::info!(coordinator = %cfg.coordinator, "session up");
                let result = session(&conn, &store, &control, &shared).await;
                shared.online.store(false, Ordering::SeqCst);
                if revoked(&conn, &result) {
                    tracing::error!(coordinator = %cfg.coordinator, "this agent was revoked by its coordinator: no more sessions (local tasks still fire); to use this device again, move its data directory away and join with a new token");
                    if let Err(e) = store.put_meta(&[(meta::REVOKED, true)]) {
                        tracing::error!(error = %e, "could not record the revocation");
                    }
                    return;
                }
                reported = None;
                match result {
                    Err(SessionError::Stopping) => return,
                    Err(e) if refused_by_tls(&e) => {
                        refused = true;
                        tracing::error!(error = %e, coordinator = %cfg.coordinator, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                        reported = Some("refused");
                    }
                    Err(e) => tracing::warn!(error = %e, "session down"),
                    Ok(()) => tracing::info!("session closed"),
                }
                conn.close(0u32.into(), b"bye");
                if started.elapsed() > IDLE_TIMEOUT {
                    failures = 0;
                }
            }
            Err(e) if refused_by_tls(&e) => {
                refused = true;
                if reported != Some("refused") {
                    tracing::error!(error = %e, coordinator = %cfg.coordinator, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                    reported = Some("refused");
                }
            }
            Err(e) => {
                if reported != Some("unreachable") {
                    tracing::info!(error = %e, coordinator = %cfg.coordinator, "cannot reach the coordinator; tasks keep firing and runs wait in the outbox");
                    reported = Some("unreachable");
                } else {
                    tracing::debug!(error = %e, coordinator = %cfg.coordinator, "cannot reach the coordinator");
                }
            }
        }
        if control.is_closed() {
            return;
        }
        failures = failures.saturating_add(1);
        let delay = if refused {
            RECONNECT_DELAY_REFUSED
        } else {
            reconnect_delay(failures, jitter_seed())
        };
        tracing::debug!(?delay, failures, "reconnecting after a pause");
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    conn: &quinn::Connection,
    store: &AgentStore,
    control: &mpsc::Sender<Control>,
    shared: &SessionShared,
) -> Result<(), SessionError> {
    let (mut tx, rx) = conn.open_bi().await?;
    let mut rx = FramedRecv::new(rx);
    let last_revision = store.get_meta::<u64>(meta::LAST_REVISION)?.unwrap_or(0);
    send(
        &mut tx,
        &AgentMsg::Hello {
            last_revision,
            outbox_len: store.outbox_len()?,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            allow_exec: hello_allowlist(&shared.allow_exec),
        },
    )
    .await?;
    let clock = SystemClock;
    let mut in_flight: HashMap<u64, Vec<RunKey>> = HashMap::new();
    let mut cursor: u64 = 0;
    let mut next_batch: u64 = 1;
    let mut probe = tokio::time::interval(CLOCK_PROBE_INTERVAL);
    let mut poll = tokio::time::interval(OUTBOX_POLL);
    let mut last_rx = conn.stats().udp_rx.datagrams;
    let mut heard_at = Instant::now();
    let mut synced_at = Instant::now() - Duration::from_secs(3600);
    loop {
        // Fill the window with the oldest records not yet sent on this connection.
        while in_flight.len() < BATCHES_IN_FLIGHT_MAX {
            let batch = store.outbox_after(cursor, RESULT_BATCH_RUNS_MAX, BATCH_BYTES_MAX)?;
            let Some((last, _)) = batch.last() else { break };
            cursor = *last;
            let keys: Vec<RunKey> = batch.iter().map(|(_, r)| r.key()).collect();
            let runs = batch.into_iter().map(|(_, r)| r).collect();
            send(
                &mut tx,
                &AgentMsg::Results {
                    batch_id: next_batch,
                    runs,
                },
            )
            .await?;
            if crate::fault::active("ack-early") {
                store.outbox_ack(&keys)?;
            }
            in_flight.insert(next_batch, keys);
            next_batch += 1;
        }
        if synced_at.elapsed() > LAST_SYNC_PERSIST {
            synced_at = Instant::now();
            store.put_meta(&[(meta::LAST_SYNC_MS, clock.read().wall_ms)])?;
        }
        tokio::select! {
            msg = rx.next::<CoordMsg>() => match msg? {
                CoordMsg::Assignments { changes, upto_revision, .. } => {
                    for change in changes {
                        let c = match change {
                            AssignmentChange::Upsert(spec) => Control::Upsert(spec),
                            AssignmentChange::Cancel { task_id, revision } => Control::Cancel { task_id, revision },
                        };
                        control.send(c).await.map_err(|_| SessionError::Stopping)?;
                    }
                    control.send(Control::Revision(upto_revision)).await.map_err(|_| SessionError::Stopping)?;
                }
                CoordMsg::ResultsAck { batch_id, keys } => {
                    let removed = store.outbox_ack(&keys)?;
                    in_flight.remove(&batch_id);
                    tracing::debug!(batch_id, removed, "results acknowledged");
                }
                CoordMsg::ClockReply { t1, t2, t3 } => {
                    let t4 = clock.read().wall_ms;
                    let (t1, t2, t3) = (t1.as_millis(), t2.as_millis(), t3.as_millis());
                    let offset_ms = ((t2 - t1) + (t3 - t4)) / 2;
                    let rtt_ms = (t4 - t1) - (t3 - t2);
                    control.send(Control::Clock { offset_ms, rtt_ms }).await.map_err(|_| SessionError::Stopping)?;
                    send(&mut tx, &AgentMsg::ClockReport { offset_ms, rtt_ms }).await?;
                }
                CoordMsg::Refused { reason } => return Err(SessionError::Refused(reason)),
                CoordMsg::RunNow { task_id, at } => {
                    control.send(Control::RunNow { task_id, at }).await.map_err(|_| SessionError::Stopping)?;
                }
            },
            _ = shared.outbox.notified() => {}
            _ = poll.tick() => {
                // The keep-alives of both ends keep packets coming on a live
                // link: a silence says the link is cut well before the idle
                // timeout does, so runs fired meanwhile are marked offline.
                let rx = conn.stats().udp_rx.datagrams;
                if rx != last_rx {
                    last_rx = rx;
                    heard_at = Instant::now();
                    if !shared.online.swap(true, Ordering::SeqCst) {
                        tracing::info!("the coordinator is heard again");
                    }
                } else if heard_at.elapsed() > LINK_SILENT_MAX
                    && shared.online.swap(false, Ordering::SeqCst)
                {
                    tracing::info!(silent_ms = heard_at.elapsed().as_millis() as u64, "nothing heard from the coordinator; runs fired now are marked offline");
                }
            }
            _ = probe.tick() => {
                let t1 = Timestamp::from_millis_saturating(clock.read().wall_ms);
                send(&mut tx, &AgentMsg::ClockProbe { t1 }).await?;
            }
        }
    }
}
