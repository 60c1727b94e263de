//! The agent's shell: the core's [`AgentNode`] (clock guard, scheduler and
//! session machine) driven by the real clocks, the redb store, the
//! executor and QUIC.
//!
//! Each turn: hand the node the clocks, a run's end, a frame or a dial
//! result; carry out what it asks (spawn or kill an action, dial, send a
//! frame); then sleep on CLOCK_BOOTTIME until its next wake. Everything
//! that decides — what fires, what time it is, what to send, when to
//! retry — is the node's.
//!
//! Invariants (the node's): a run is spawned only after its `started`
//! marker is durable; a run's record enters the outbox in the same
//! transaction that clears its marker; at start-up, markers left by a crash
//! become `interrupted` records before anything new starts.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sundial_core::node::{
    AgentNode, ClockState, Finished, Horizon, NodeConfig, NodeEffect, NodeStore, SeededBugs, Step,
    StoreFault, StoreResult, StoredTask,
};
use sundial_core::scheduler::DueKey;
use sundial_core::session::agent::Closed;
use sundial_core::session::Event;
use sundial_protocol::task::ExecSpec;
use sundial_protocol::wire::{AgentMsg, CoordMsg};
use sundial_protocol::{AgentId, RunKey, RunRecord, TaskId, TaskSpec, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::clock::{boot_ns, Anchor, BootTimer, ClockNote, SystemClock};
use crate::exec::{self, ExecPolicy, ExecResult};
use crate::session::{self, SessionConfig, SessionError};
use crate::store::{meta, AgentStore, StartedInfo, StepWrite, StoreError};

pub use sundial_core::node::{MANUAL_DETAIL, STOPPED_DETAIL};
/// The store's file name inside the data directory.
pub const STORE_FILE: &str = "agent.redb";
pub use sundial_core::node::{KNOWN_GOOD_PERSIST_MS, WAKE_INTERVAL_MAX_MS};
/// Runs that may end before the driver collects them, without blocking executors.
pub const RUN_COMPLETIONS_QUEUE_MAX: usize = 1_024;

/// The default of `--max-concurrent-runs`.
pub const RUNS_CONCURRENT_MAX_DEFAULT: usize = 64;
/// The folder of the data directory where running actions leave their pid,
/// so that an agent restarted after a crash finds what is still running.
pub const RUNNING_DIR: &str = "running";
/// How long a restarted agent waits for a leftover process group to die.
const LEFTOVER_KILL_WAIT_MS: u64 = 5_000;
/// The default of `--stop-grace`: less than the unit's `TimeoutStopSec`.
pub const STOP_GRACE_DEFAULT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long to wait for killed actions to be reaped and recorded at stop.
const STOP_KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// How often the agent checks that its store file is still the one it opened.
const STORE_CHECK_INTERVAL_MS: i64 = 5_000;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub exec: ExecPolicy,
    /// Runs going at once; an occurrence due while this many run is
    /// recorded `skipped` (reason: concurrency).
    pub runs_concurrent_max: usize,
    /// At stop (SIGTERM), how long running actions may take to finish.
    pub stop_grace: std::time::Duration,
}

impl AgentConfig {
    /// A configuration with the defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            data_dir,
            exec: ExecPolicy::default(),
            runs_concurrent_max: RUNS_CONCURRENT_MAX_DEFAULT,
            stop_grace: STOP_GRACE_DEFAULT,
        }
    }

    pub fn store_path(&self) -> PathBuf {
        store_path(&self.data_dir)
    }
}

/// The store file of a data directory.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STORE_FILE)
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    #[error("{0} is in use by another process: is another sundial-agent running on this data directory?")]
    Busy(PathBuf),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store is gone (or empty) while the agent's certificate says it
    /// was enrolled: its tasks and unsynced run records are lost.
    /// The store failed in a way that is not one of redb's errors (a worker
    /// thread, say).
    #[error("agent store: {0}")]
    StoreFault(String),
    #[error("{store} is {what}, but {dir} holds this agent's certificate: its tasks and the run records not yet synced are gone. Restore {store} from a backup and start again; to enroll this device afresh, move {dir} away and run `sundial-agent join` with a new token")]
    StoreLost {
        store: PathBuf,
        dir: PathBuf,
        what: &'static str,
    },
}

/// Bound of the frames waiting to be written on the live connection (the
/// session's window keeps far fewer in flight).
pub const WRITE_QUEUE_MAX: usize = 256;
/// Bound of the connection events (frames read, ends, dial results).
const CONN_EVENTS_MAX: usize = 64;
/// How often a live connection's packet count is looked at, for link silence.
const HEARD_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Writes that may lag: deleting acknowledged records (a record deleted
/// late is at worst sent again, and the coordinator keeps the first) and
/// the last sync. They run on their own thread, so their fsyncs never
/// delay a firing.
enum LazyWrite {
    Ack(Vec<RunKey>),
    LastSync(i64),
}

/// Bound of the lazy writes waiting; beyond it they are done in place.
const LAZY_WRITES_MAX: usize = 1_024;

type LazyWriter = (
    std::sync::mpsc::SyncSender<LazyWrite>,
    std::thread::JoinHandle<()>,
);

fn lazy_writer(store: Arc<AgentStore>) -> Option<LazyWriter> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<LazyWrite>(LAZY_WRITES_MAX);
    let spawned = std::thread::Builder::new()
        .name("store-lazy".into())
        .spawn(move || {
            while let Ok(w) = rx.recv() {
                let r = match w {
                    LazyWrite::Ack(keys) => store.outbox_ack(&keys).map(drop),
                    LazyWrite::LastSync(ms) => store.put_meta(&[(meta::LAST_SYNC_MS, ms)]),
                };
                if let Err(e) = r {
                    // The records stay and are sent again; the firing path
                    // meets a broken disk on its own next write.
                    tracing::warn!(error = %e, "a lazy store write failed");
                }
            }
        });
    match spawned {
        Ok(handle) => Some((tx, handle)),
        Err(e) => {
            tracing::warn!(error = %e, "no thread for lazy store writes; doing them in place");
            None
        }
    }
}

/// The node's view of the redb store. Each method is one transaction; a
/// failure is kept (so the agent exits with it) and reported to the node.
struct RedbNode {
    store: Arc<AgentStore>,
    lazy: Option<std::sync::mpsc::SyncSender<LazyWrite>>,
    lazy_thread: Option<std::thread::JoinHandle<()>>,
    /// What the previous agent process left running, by run key.
    leftovers: HashMap<(u64, i64, u32), String>,
    /// This boot's id (the kernel's), and its hash as the node knows it.
    boot: Option<String>,
    boot_hash: u64,
    error: Mutex<Option<StoreError>>,
}

fn boot_hash(boot: Option<&str>) -> u64 {
    // FNV-1a: stable across runs (std's hasher is seeded per process).
    boot.map_or(0, |b| {
        b.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

impl Drop for RedbNode {
    /// Lets the lazy writes finish and the store close cleanly (a store
    /// still open in another thread at exit would need a repair).
    fn drop(&mut self) {
        self.lazy.take();
        if let Some(h) = self.lazy_thread.take() {
            let _ = h.join();
        }
    }
}

impl RedbNode {
    fn keep<T>(&self, r: Result<T, StoreError>) -> StoreResult<T> {
        r.map_err(|e| {
            let fault = StoreFault(e.to_string());
            if let Ok(mut slot) = self.error.lock() {
                slot.get_or_insert(e);
            }
            fault
        })
    }

    fn take_error(&self) -> Option<StoreError> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

impl NodeStore for RedbNode {
    fn due_tasks(
        &self,
        after: Option<DueKey>,
        until: Timestamp,
        max: usize,
    ) -> StoreResult<Vec<(TaskSpec, Timestamp)>> {
        self.keep(self.store.due_tasks(after, until, max))
    }
    fn tasks_by_id(&self, ids: &[TaskId]) -> StoreResult<Vec<Option<StoredTask>>> {
        self.keep(self.store.tasks_by_id(ids))
    }
    fn apply_changes(
        &mut self,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        states: &[(TaskId, Option<Timestamp>)],
        revision: Option<u64>,
    ) -> StoreResult<()> {
        self.keep(self.store.apply_changes(upserts, removed, states, revision))
    }
    fn apply_step(&mut self, step: &Step) -> StoreResult<()> {
        let w = StepWrite {
            states: step.states.clone(),
            started: step
                .started
                .iter()
                .map(|(k, s)| {
                    (
                        *k,
                        StartedInfo {
                            fired_at: s.fired_at,
                            offline: s.offline,
                        },
                    )
                })
                .collect(),
            records: step.records.clone(),
            retries: step.retries.clone(),
        };
        self.keep(self.store.apply_step(&w))
    }
    fn finish_run(
        &mut self,
        record: &RunRecord,
        retry: Option<(RunKey, Timestamp)>,
    ) -> StoreResult<()> {
        self.keep(self.store.finish_run(record, retry))
    }
    fn pending_retries(&self) -> StoreResult<Vec<(RunKey, Timestamp)>> {
        self.keep(self.store.pending_retries())
    }
    fn recover_interrupted(&mut self, agent: AgentId) -> StoreResult<Vec<RunRecord>> {
        let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
        let r = self.store.recover_interrupted(agent, now, &self.leftovers);
        self.keep(r)
    }
    fn outbox_after(
        &self,
        after: u64,
        runs_max: usize,
        bytes_max: usize,
    ) -> StoreResult<Vec<(u64, RunRecord)>> {
        self.keep(self.store.outbox_after(after, runs_max, bytes_max))
    }
    fn outbox_ack(&mut self, keys: &[RunKey]) -> StoreResult<usize> {
        if let Some(lazy) = &self.lazy {
            if lazy.try_send(LazyWrite::Ack(keys.to_vec())).is_ok() {
                return Ok(keys.len());
            }
        }
        self.keep(self.store.outbox_ack(keys))
    }
    fn outbox_len(&self) -> StoreResult<u64> {
        self.keep(self.store.outbox_len())
    }
    fn last_revision(&self) -> StoreResult<u64> {
        self.keep(self.store.get_meta::<u64>(meta::LAST_REVISION))
            .map(Option::unwrap_or_default)
    }
    fn set_last_revision(&mut self, revision: u64) -> StoreResult<()> {
        self.keep(self.store.put_meta(&[(meta::LAST_REVISION, revision)]))
    }
    fn clock_state(&self) -> StoreResult<ClockState> {
        let offset_ms = self
            .keep(self.store.get_meta::<i64>(meta::CLOCK_OFFSET_MS))?
            .unwrap_or(0);
        let offset_boot = self
            .keep(self.store.get_meta::<String>(meta::CLOCK_OFFSET_BOOT))?
            .map_or(u64::MAX, |b| boot_hash(Some(&b)));
        let last_known_good = self
            .keep(self.store.get_meta::<i64>(meta::LAST_KNOWN_GOOD_MS))?
            .and_then(|ms| Timestamp::from_millis(ms).ok());
        let anchor = self
            .keep(self.store.get_meta::<(String, i64, i64)>(meta::BOOT_ANCHOR))?
            .map(|(b, boot_ms, time_ms)| (boot_hash(Some(&b)), Anchor { boot_ms, time_ms }));
        Ok(ClockState {
            offset_ms,
            offset_boot,
            last_known_good,
            anchor,
        })
    }
    fn set_clock_state(&mut self, cs: &ClockState) -> StoreResult<()> {
        let mut ints = vec![(meta::CLOCK_OFFSET_MS, cs.offset_ms)];
        if let Some(g) = cs.last_known_good {
            ints.push((meta::LAST_KNOWN_GOOD_MS, g.as_millis()));
        }
        self.keep(self.store.put_meta(&ints))?;
        // After the offset: a crash between the two leaves an older boot's
        // id, and the offset is then not applied (safe).
        if let Some(boot) = self.boot.clone() {
            if cs.offset_boot == self.boot_hash {
                self.keep(
                    self.store
                        .put_meta(&[(meta::CLOCK_OFFSET_BOOT, boot.clone())]),
                )?;
            }
            if let Some((b, a)) = cs.anchor {
                if b == self.boot_hash {
                    self.keep(
                        self.store
                            .put_meta(&[(meta::BOOT_ANCHOR, (boot, a.boot_ms, a.time_ms))]),
                    )?;
                }
            }
        }
        Ok(())
    }
    fn set_clock_held(&mut self, held: bool) -> StoreResult<()> {
        self.keep(self.store.put_meta(&[(meta::CLOCK_HELD, held)]))
    }
    fn set_last_sync(&mut self, wall: Timestamp) -> StoreResult<()> {
        if let Some(lazy) = &self.lazy {
            if lazy.try_send(LazyWrite::LastSync(wall.as_millis())).is_ok() {
                return Ok(());
            }
        }
        self.keep(
            self.store
                .put_meta(&[(meta::LAST_SYNC_MS, wall.as_millis())]),
        )
    }
    fn set_revoked(&mut self) -> StoreResult<()> {
        self.keep(self.store.put_meta(&[(meta::REVOKED, true)]))
    }
}

/// What the connection's tasks report.
enum ConnEvent {
    Dialed(Result<session::Live, (Closed, String)>),
    Frame(u64, CoordMsg),
    Ended(u64, Closed, String),
}

/// A QUIC connection and the endpoint it lives on.
struct LiveConn {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// The live connection: its id, and the queue of its writer task.
struct Conn {
    id: u64,
    live: Arc<LiveConn>,
    writer: mpsc::Sender<AgentMsg>,
    tasks: [tokio::task::JoinHandle<()>; 2],
    rx_datagrams: u64,
}

impl Conn {
    fn close(self) {
        self.live.conn.close(0u32.into(), b"bye");
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Driver {
    node: AgentNode<RedbNode>,
    store: Arc<AgentStore>,
    agent_id: AgentId,
    exec: Arc<ExecPolicy>,
    /// Running actions: how to kill each.
    running: HashMap<RunKey, oneshot::Sender<()>>,
    done_tx: mpsc::Sender<(RunKey, ExecResult)>,
    running_dir: PathBuf,
    session: Option<Arc<SessionConfig>>,
    conn: Option<Conn>,
    next_conn: u64,
    events_tx: mpsc::Sender<ConnEvent>,
    /// What the log last said about reaching the coordinator, so that a
    /// device offline for a week says so once, not every 30 s.
    reported: Option<&'static str>,
}

fn reading() -> crate::clock::Reading {
    SystemClock.read()
}

impl Driver {
    fn fault(&self, f: StoreFault) -> AgentError {
        match self.node.store().take_error() {
            Some(e) => AgentError::Store(e),
            None => AgentError::StoreFault(f.0),
        }
    }

    /// Carries out what the node asks and logs what it says, until it has
    /// nothing more.
    fn pump(&mut self) -> Result<(), AgentError> {
        loop {
            let effect = self.node.poll_effect();
            let event = self.node.poll_event();
            if effect.is_none() && event.is_none() {
                return Ok(());
            }
            if let Some(e) = event {
                log_event(&e);
            }
            if let Some(e) = effect {
                self.effect(e)?;
            }
        }
    }

    fn effect(&mut self, effect: NodeEffect) -> Result<(), AgentError> {
        match effect {
            NodeEffect::Spawn { key, spec } => self.spawn(key, spec),
            NodeEffect::Kill { key } => {
                if let Some(k) = self.running.remove(&key) {
                    tracing::warn!(task = %key.task_id, scheduled_at = %key.scheduled_at, "killing a run's process group (timed out, or the agent stops)");
                    let _ = k.send(());
                }
            }
            NodeEffect::Connect { timeout_ms } => {
                let Some(cfg) = self.session.clone() else {
                    // Not enrolled, or revoked: no coordinator to dial.
                    return Ok(());
                };
                let tx = self.events_tx.clone();
                let timeout = std::time::Duration::from_millis(timeout_ms);
                tokio::spawn(async move {
                    let r = session::dial(&cfg, timeout).await.map_err(|e| {
                        let kind = session::closed_kind(None, &Err(e));
                        (kind, String::new())
                    });
                    let _ = tx.send(ConnEvent::Dialed(r)).await;
                });
            }
            NodeEffect::Transmit(msg) => {
                let Some(c) = self.conn.as_ref() else {
                    return Ok(());
                };
                if let (true, AgentMsg::Results { runs, .. }) =
                    (crate::fault::active("ack-early"), &msg)
                {
                    // A seeded bug for the process simulator's checker:
                    // records deleted before the coordinator stored them.
                    let keys: Vec<RunKey> = runs.iter().map(RunRecord::key).collect();
                    let _ = self.store.outbox_ack(&keys);
                }
                if c.writer.try_send(msg).is_err() {
                    tracing::warn!("the link does not take frames fast enough; reconnecting");
                    self.end_conn(Closed::Lost)?;
                }
            }
            NodeEffect::Disconnect => {
                if let Some(c) = self.conn.take() {
                    c.close();
                }
            }
        }
        Ok(())
    }

    fn end_conn(&mut self, kind: Closed) -> Result<(), AgentError> {
        if let Some(c) = self.conn.take() {
            c.close();
            self.node
                .handle_closed(reading(), kind)
                .map_err(|f| self.fault(f))?;
        }
        Ok(())
    }

    fn spawn(&mut self, key: RunKey, mut spec: ExecSpec) {
        let (kill_tx, kill_rx) = oneshot::channel();
        self.running.insert(key, kill_tx);
        // The action knows which occurrence it is.
        spec.env.extend([
            ("SUNDIAL_TASK_ID".to_owned(), key.task_id.to_string()),
            ("SUNDIAL_AGENT_ID".to_owned(), self.agent_id.to_string()),
            (
                "SUNDIAL_SCHEDULED_AT".to_owned(),
                key.scheduled_at.to_string(),
            ),
            (
                "SUNDIAL_SCHEDULED_AT_MS".to_owned(),
                key.scheduled_at.as_millis().to_string(),
            ),
            ("SUNDIAL_ATTEMPT".to_owned(), key.attempt.to_string()),
        ]);
        let policy = Arc::clone(&self.exec);
        let done = self.done_tx.clone();
        let pid_path = pid_file(&self.running_dir, key);
        tracing::debug!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, "starting run");
        if crate::fault::active("double-fire") {
            let spec = spec.clone();
            let policy = Arc::clone(&policy);
            tokio::spawn(async move {
                let (_keep, never) = oneshot::channel();
                let _ = exec::run(&spec, &policy, never).await;
            });
        }
        tokio::spawn(async move {
            let result = exec::run_with(&spec, &policy, kill_rx, |pid| {
                let ticks = process_start_ticks(pid).unwrap_or(0);
                if let Err(e) = std::fs::write(&pid_path, format!("{pid} {ticks}\n")) {
                    tracing::warn!(error = %e, path = %pid_path.display(), "could not note a run's pid; after a crash it could not be found");
                }
            })
            .await;
            // The driver outlives every executor unless it is stopping.
            let _ = done.send((key, result)).await;
        });
    }

    fn finished(&mut self, key: RunKey, result: ExecResult) -> Result<(), AgentError> {
        self.running.remove(&key);
        let end = Finished {
            outcome: result.outcome,
            exit_code: result.exit_code,
            detail: result.detail,
            stdout_tail: result.stdout_tail,
            stderr_tail: result.stderr_tail,
        };
        self.node
            .handle_finished(reading(), key, end)
            .map_err(|f| self.fault(f))?;
        let _ = std::fs::remove_file(pid_file(&self.running_dir, key));
        Ok(())
    }

    fn conn_event(&mut self, ev: ConnEvent) -> Result<(), AgentError> {
        match ev {
            ConnEvent::Dialed(Ok(live)) => {
                self.reported = None;
                if let Some(c) = self.conn.take() {
                    c.close();
                }
                self.next_conn += 1;
                let id = self.next_conn;
                let session::Live {
                    endpoint,
                    conn,
                    tx: mut send,
                    rx: mut recv,
                } = live;
                let live = Arc::new(LiveConn {
                    _endpoint: endpoint,
                    conn,
                });
                let (writer, mut queue) = mpsc::channel::<AgentMsg>(WRITE_QUEUE_MAX);
                let tx = self.events_tx.clone();
                let w_live = Arc::clone(&live);
                let write_task = tokio::spawn(async move {
                    while let Some(msg) = queue.recv().await {
                        if let Err(e) = session::send(&mut send, &msg).await {
                            let result = Err(e);
                            let kind = session::ended_kind(&w_live.conn, &result).await;
                            let why = result.err().map(|e| e.to_string()).unwrap_or_default();
                            let _ = tx.send(ConnEvent::Ended(id, kind, why)).await;
                            return;
                        }
                    }
                });
                let tx = self.events_tx.clone();
                let r_live = Arc::clone(&live);
                let read_task = tokio::spawn(async move {
                    loop {
                        match recv.next::<CoordMsg>().await {
                            Ok(m) => {
                                if tx.send(ConnEvent::Frame(id, m)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let result: Result<(), SessionError> = Err(e);
                                let kind = session::ended_kind(&r_live.conn, &result).await;
                                let why = result.err().map(|e| e.to_string()).unwrap_or_default();
                                let _ = tx.send(ConnEvent::Ended(id, kind, why)).await;
                                return;
                            }
                        }
                    }
                });
                let rx_datagrams = live.conn.stats().udp_rx.datagrams;
                tracing::info!("connected to the coordinator");
                self.conn = Some(Conn {
                    id,
                    live,
                    writer,
                    tasks: [write_task, read_task],
                    rx_datagrams,
                });
                self.node
                    .handle_connected(reading())
                    .map_err(|f| self.fault(f))?;
            }
            ConnEvent::Dialed(Err((kind, _))) => {
                let coordinator = self.session.as_ref().map(|c| c.coordinator.clone());
                let coordinator = coordinator.unwrap_or_default();
                if kind == Closed::RefusedByTls {
                    if self.reported != Some("refused") {
                        tracing::error!(%coordinator, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                        self.reported = Some("refused");
                    }
                } else if self.reported != Some("unreachable") {
                    tracing::info!(%coordinator, "cannot reach the coordinator; tasks keep firing and runs wait in the outbox");
                    self.reported = Some("unreachable");
                }
                self.node
                    .handle_connect_failed(reading(), kind)
                    .map_err(|f| self.fault(f))?;
            }
            ConnEvent::Frame(id, m) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.node
                        .handle_message(reading(), m)
                        .map_err(|f| self.fault(f))?;
                }
            }
            ConnEvent::Ended(id, kind, why) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    if kind == Closed::RefusedByTls {
                        tracing::error!(error = %why, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                    } else if kind != Closed::Revoked {
                        tracing::warn!(error = %why, "session down");
                    }
                    self.end_conn(kind)?;
                }
            }
        }
        Ok(())
    }

    /// The keep-alives of both ends keep packets coming on a live link: a
    /// silence says it is cut well before the idle timeout does.
    fn heard_poll(&mut self) -> Result<(), AgentError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        let rx = c.live.conn.stats().udp_rx.datagrams;
        if rx != c.rx_datagrams {
            c.rx_datagrams = rx;
            self.node
                .handle_heard(reading())
                .map_err(|f| self.fault(f))?;
        }
        Ok(())
    }
}

fn log_event(event: &Event) {
    match event {
        Event::Clock(n) => log_clock_note(n),
        Event::ClockVouched {
            offset_ms,
            rtt_ms,
            was_ahead_ms,
            moved_ms,
            confirmed,
            rewound_from,
            at,
        } => {
            if let Some(by_ms) = was_ahead_ms {
                tracing::info!(by_ms, offset_ms, %at, "the coordinator vouched for the time: the wall clock's lead is now corrected by the offset");
            }
            if *confirmed {
                tracing::warn!(moved_ms, offset_ms, %at, "a lasting disagreement with the coordinator's clock was confirmed by several samples: trusted time moved to the coordinator's");
            }
            if let Some(from) = rewound_from {
                tracing::warn!(moved_ms, %at, decided_until = %from, "trusted time went back: the clock had been ahead; what was decided up to the old time stays decided, the rest fires at its time");
            } else if moved_ms.abs() > 1_000 {
                tracing::info!(moved_ms, offset_ms, %at, "the coordinator's first clock sample of this boot corrected trusted time");
            }
            tracing::debug!(
                offset_ms,
                rtt_ms,
                "clock offset to the coordinator measured"
            );
        }
        Event::ClockUnvouched {
            waited_ms,
            unreachable,
        } => {
            if *unreachable {
                tracing::warn!(waited_ms, "the coordinator is unreachable at boot: firing goes on by this device's wall clock, unvouched (were it wrong, runs would be early or late)");
            } else {
                tracing::warn!(waited_ms, "no clock sample from the coordinator in time: firing goes on by this device's wall clock, unvouched");
            }
        }
        Event::TaskAssigned { task_id, revision } => {
            tracing::info!(task = %task_id, revision, "task assigned")
        }
        Event::TaskRemoved { task_id } => tracing::info!(task = %task_id, "task cancelled"),
        Event::ConcurrencyCap { max, task_id } => {
            tracing::warn!(max, task = %task_id, "at the cap of concurrent runs; occurrences due now are recorded as skipped")
        }
        Event::RunRecorded { key, outcome } => {
            tracing::info!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, %outcome, "run recorded")
        }
        other => session::log_event(other),
    }
}

fn log_clock_note(n: &ClockNote) {
    match n {
        ClockNote::Jumped { by_ms } => tracing::warn!(
            by_ms,
            "wall clock stepped back against the boot clock; firing follows the earlier time (occurrences already fired do not fire again)"
        ),
        ClockNote::Ahead { by_ms } => tracing::warn!(
            by_ms,
            "wall clock is ahead of trusted time (stepped forward, or found so at start): firing follows the boot clock until the coordinator vouches for the time or the wall clock is back in line; nothing fires early"
        ),
        ClockNote::BackInLine => tracing::info!("wall clock agrees with trusted time again"),
        ClockNote::Untrusted {
            now,
            last_known_good,
        } => tracing::error!(
            %now, %last_known_good,
            "clock is behind the last known-good time: firing is held until the clock is trusted again"
        ),
        ClockNote::TrustRestored => tracing::info!("clock trusted again; firing resumes"),
        ClockNote::Disputed { by_ms, samples } => tracing::error!(
            by_ms,
            samples,
            "the coordinator's clock disagrees with this agent's trusted time by more than a second: not followed until several samples over a span confirm it (is the coordinator's clock wrong?)"
        ),
    }
}

/// Runs the agent until `shutdown` resolves or the store fails.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    create_private_dir(&config.data_dir)?;
    check_store_present(&config.data_dir)?;
    let store = Arc::new(open_store(&config.store_path()).await?);
    restrict_file(&config.store_path());
    let store_identity = file_identity(&config.store_path());
    let running_dir = config.data_dir.join(RUNNING_DIR);
    create_private_dir(&running_dir)?;
    let agent_id = store.get_meta::<u64>(meta::AGENT_ID)?.map(AgentId);
    if agent_id.is_none() {
        tracing::warn!(
            "this agent is not enrolled: it fires the tasks in its store but has no coordinator"
        );
    }
    let agent_id = agent_id.unwrap_or(AgentId(0));
    let mut exec_policy = config.exec.clone();
    for p in store
        .get_meta::<Vec<String>>(meta::ALLOW_EXEC)?
        .unwrap_or_default()
    {
        if !exec_policy.allow.contains(&p) {
            exec_policy.allow.push(p);
        }
    }
    if let Some(why) = sundial_protocol::wire::allowlist_refusal(&exec_policy.allow) {
        // Every Hello would be refused for its size: say so now.
        return Err(AgentError::Config(format!(
            "{why} (the patterns given and those stored at join, together)"
        )));
    }
    for p in store
        .get_meta::<Vec<String>>(meta::ALLOW_ENV)?
        .unwrap_or_default()
    {
        if !exec_policy.allow_env.contains(&p) {
            exec_policy.allow_env.push(p);
        }
    }
    let revoked = store.get_meta::<bool>(meta::REVOKED)?.unwrap_or(false);
    if revoked {
        tracing::error!("this agent was revoked by its coordinator: it makes no session (its local tasks still fire); to use this device again, move its data directory away and join with a new token");
    }
    let session = match SessionConfig::load(&config.data_dir, &store) {
        Ok(Some(_)) if revoked => None,
        Ok(Some(cfg)) => Some(Arc::new(cfg)),
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "enrollment files unreadable; running without a coordinator");
            None
        }
    };

    // Before anything is recorded: actions a crashed agent left running are
    // ended, so a retry never runs beside its predecessor.
    let leftovers = end_leftovers(&running_dir).await;
    let boot = crate::clock::boot_id();
    let (lazy, lazy_thread) = lazy_writer(Arc::clone(&store)).unzip();
    let node_store = RedbNode {
        lazy,
        lazy_thread,
        store: Arc::clone(&store),
        leftovers,
        boot_hash: boot_hash(boot.as_deref()),
        boot,
        error: Mutex::new(None),
    };
    let cfg = NodeConfig {
        agent_id,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        allow_exec: exec_policy.allow.clone(),
        runs_concurrent_max: config.runs_concurrent_max.max(1),
        boot_id: node_store.boot_hash,
        seed: session::jitter_seed(),
        bugs: SeededBugs::default(),
        horizon: Horizon::default(),
        // Without a coordinator nothing will vouch: fire on the wall clock.
        vouch_wait_ms: if session.is_some() {
            sundial_core::node::VOUCH_WAIT_MS
        } else {
            0
        },
    };
    let node = match AgentNode::start(node_store, cfg, reading()) {
        Ok(n) => n,
        Err(f) => return Err(AgentError::StoreFault(f.0)),
    };
    tracing::info!(agent = %agent_id, tasks_held = node.tasks_held(), outbox = store.outbox_len()?, "agent running");

    let (done_tx, mut done_rx) = mpsc::channel(RUN_COMPLETIONS_QUEUE_MAX);
    let (events_tx, mut events_rx) = mpsc::channel(CONN_EVENTS_MAX);
    let mut d = Driver {
        node,
        store,
        agent_id,
        exec: Arc::new(exec_policy),
        running: HashMap::new(),
        done_tx,
        running_dir,
        session,
        conn: None,
        next_conn: 0,
        events_tx,
        reported: None,
    };
    let mut timer = BootTimer::new();
    tokio::pin!(shutdown);
    let mut store_checked_ms = boot_ns() / 1_000_000;
    let mut heard = tokio::time::interval(HEARD_POLL);
    heard.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        d.pump()?;
        // After the starts are handed out: their next occurrences.
        d.node.precompute();
        let boot_ms = boot_ns() / 1_000_000;
        if boot_ms - store_checked_ms >= STORE_CHECK_INTERVAL_MS {
            store_checked_ms = boot_ms;
            let now_identity = file_identity(&config.store_path());
            if now_identity != store_identity {
                let what = if now_identity.is_none() {
                    "missing"
                } else {
                    "replaced"
                };
                tracing::error!(store = %config.store_path().display(), what, "the agent's store was deleted or replaced while it ran; stopping so that nothing more is lost");
                return Err(AgentError::StoreLost {
                    store: config.store_path(),
                    dir: config.data_dir.clone(),
                    what,
                });
            }
        }
        let r = reading();
        let wake_ms = d.node.next_wake(r);
        let deadline = boot_ns() + (wake_ms - r.boot_ms).max(0) * 1_000_000;
        tokio::select! {
            _ = timer.sleep_until(deadline) => {
                d.node.handle_wake(reading()).map_err(|f| d.fault(f))?;
            }
            Some((key, result)) = done_rx.recv() => d.finished(key, result)?,
            Some(ev) = events_rx.recv() => d.conn_event(ev)?,
            _ = heard.tick() => d.heard_poll()?,
            _ = &mut shutdown => break,
        }
    }
    // Stopping (SIGTERM): fire nothing new; give running actions the stop
    // grace to finish and record them as they end; then kill what is left
    // and record it `interrupted`, truthfully, before exiting.
    d.node.begin_stop();
    if d.node.running() > 0 {
        tracing::info!(
            running = d.node.running(),
            grace_ms = config.stop_grace.as_millis() as u64,
            "agent stopping: firing nothing new, letting running actions finish"
        );
        let deadline = tokio::time::Instant::now() + config.stop_grace;
        while d.node.running() > 0 {
            tokio::select! {
                Some((key, result)) = done_rx.recv() => d.finished(key, result)?,
                _ = tokio::time::sleep_until(deadline) => break,
            }
            d.pump()?;
        }
        if d.node.running() > 0 {
            tracing::warn!(
                running = d.node.running(),
                "stop grace over: killing the actions still running"
            );
            d.node.kill_all_for_stop();
            d.pump()?;
            let killed_by = tokio::time::Instant::now() + STOP_KILL_WAIT;
            while d.node.running() > 0 {
                tokio::select! {
                    Some((key, result)) = done_rx.recv() => d.finished(key, result)?,
                    _ = tokio::time::sleep_until(killed_by) => break,
                }
            }
        }
    }
    tracing::info!("agent stopped");
    if let Some(c) = d.conn.take() {
        c.close();
    }
    d.node.persist_clock_now().map_err(|f| d.fault(f))?;
    // The lazy writes end before the store is let go.
    drop(d);
    Ok(())
}

/// Creates `dir` (and its parents) readable by the agent's user only, as it
/// holds the agent's key and the tasks' environments. An existing directory
/// keeps the mode its owner gave it.
fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    sundial_net::private::create_private_dir(dir).map_err(|source| AgentError::DataDir {
        path: dir.to_owned(),
        source,
    })
}

/// Makes a file readable by its owner only (best effort: a read-only
/// filesystem or another owner leaves it as it is).
pub fn restrict_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
}

/// The (device, inode) of a file, to notice it being deleted or replaced.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Refuses to start on a missing or empty store when the agent's
/// certificate says it was enrolled (a fresh store would silently drop its
/// tasks and unsynced records).
fn check_store_present(dir: &Path) -> Result<(), AgentError> {
    if !dir.join(session::CERT_FILE).exists() {
        return Ok(());
    }
    let store = store_path(dir);
    let what = match std::fs::metadata(&store) {
        Ok(m) if m.len() == 0 => "empty",
        Ok(_) => return Ok(()),
        Err(_) => "missing",
    };
    Err(AgentError::StoreLost {
        store,
        dir: dir.to_owned(),
        what,
    })
}

/// The pid file of a running action.
fn pid_file(dir: &Path, key: RunKey) -> PathBuf {
    dir.join(format!(
        "{}-{}-{}",
        key.task_id.0,
        key.scheduled_at.as_millis(),
        key.attempt
    ))
}

/// A process's start time (clock ticks since boot, field 22 of
/// `/proc/PID/stat`): with the pid it names one process, even after the
/// pid is reused.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn group_alive(pgid: u32) -> bool {
    i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process_group(p).is_ok())
}

/// Ends the process groups that runs of a previous (crashed) agent left
/// behind, and says for each run key what was found. Pid files are written
/// as a run's program starts and removed when its record is stored; they
/// need no fsync: a power loss ends the processes too.
async fn end_leftovers(dir: &Path) -> HashMap<(u64, i64, u32), String> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        let key = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(s), Some(a)) => match (t.parse(), s.parse(), a.parse()) {
                (Ok(t), Ok(s), Ok(a)) => Some((t, s, a)),
                _ => None,
            },
            _ => None,
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let Some(key) = key else { continue };
        let mut fields = text.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(ticks))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        // The leader may have exited while others of its group live on;
        // the start time guards against a reused pid when it is there.
        let same = process_start_ticks(pid).is_none_or(|t| t == ticks);
        if !(same && group_alive(pid)) {
            continue;
        }
        tracing::warn!(
            pid,
            "a run of the previous agent process is still going; killing its process group"
        );
        if let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
        }
        let mut waited = 0;
        while group_alive(pid) && waited < LEFTOVER_KILL_WAIT_MS {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            waited += 50;
        }
        found.insert(
            key,
            format!("the agent stopped while this run was going; its processes (group {pid}) were still running when the agent restarted and were killed"),
        );
    }
    found
}

/// How long the agent waits for another process (a `status` reading) to
/// let go of its store before concluding another agent is running.
const STORE_BUSY_WAIT_MS: u64 = 5_000;

async fn open_store(path: &Path) -> Result<AgentStore, AgentError> {
    let mut waited = 0;
    loop {
        match AgentStore::open(path) {
            Err(e) if e.is_already_open() && waited < STORE_BUSY_WAIT_MS => {
                if waited == 0 {
                    tracing::warn!(store = %path.display(), "the store is in use by another process (another sundial-agent on this data directory, or a `status` reading); waiting up to {} s", STORE_BUSY_WAIT_MS / 1000);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                waited += 100;
            }
            Err(e) if e.is_already_open() => return Err(AgentError::Busy(path.to_owned())),
            other => return Ok(other?),
        }
    }
}
