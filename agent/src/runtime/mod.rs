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
use sundial_protocol::task::Action;
use sundial_protocol::wire::{AgentMsg, CoordMsg};
use sundial_protocol::{AgentId, RunKey, RunRecord, TaskId, TaskSpec, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::clock::{boot_ns, Anchor, BootTimer, ClockNote, Reading, SystemClock};
use crate::exec::{self, ExecPolicy, ExecResult};
use crate::session::{self, SessionConfig, SessionError};
use crate::store::{meta, AgentStore, StartedInfo, StepWrite, StoreError};

mod driver;
mod files;
mod leftovers;
mod log;
mod redb_node;

pub use driver::WRITE_QUEUE_MAX;
use driver::*;
pub use files::restrict_file;
use files::*;
use leftovers::*;
use log::*;
pub use redb_node::RedbNode;
use redb_node::*;

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
/// How long a stopping agent waits for its last records to be
/// acknowledged.
const STOP_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
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
    /// Coordinator addresses that replace the ones stored at `join`
    /// (`coordinators` in agent.toml); empty: the stored ones.
    pub coordinators: Vec<String>,
    /// Serve the agent's own metrics here (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// The store key ring (`--store-key`); `None`: the systemd credential
    /// when given, else `store.key` in the data directory.
    pub store_key: Option<PathBuf>,
    /// How starts are decided: ahead of their instant (the default), or
    /// when due.
    pub start_lead: StartLead,
}

/// When the agent decides an instant's starts and commits their `started`
/// marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartLead {
    /// Ahead of the instant by twice what the last such decision took, at
    /// least [`START_LEAD_MIN_MS`] and at most [`START_LEAD_MAX_MS`]; the
    /// spawns wait for the instant. A crash in between leaves marks that
    /// read as `interrupted`.
    #[default]
    Ahead,
    /// At the instant: every start waits for the commit of its batch's marks.
    WhenDue,
}

/// The least lead the agent decides starts with, ms.
pub const START_LEAD_MIN_MS: i64 = 20;
/// The most: a store slower than this per batch starts late instead.
pub const START_LEAD_MAX_MS: i64 = 500;

impl AgentConfig {
    /// A configuration with the defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> AgentConfig {
        AgentConfig {
            data_dir,
            exec: ExecPolicy::default(),
            runs_concurrent_max: RUNS_CONCURRENT_MAX_DEFAULT,
            stop_grace: STOP_GRACE_DEFAULT,
            coordinators: Vec::new(),
            metrics: None,
            store_key: None,
            start_lead: StartLead::Ahead,
        }
    }

    pub fn store_path(&self) -> PathBuf {
        store_path(&self.data_dir)
    }
}

/// `sundial-agent rotate-key`: adds a key to the ring in `path` and makes
/// it current; returns (old, new) ids. A running agent reloads the ring
/// within [`STORE_CHECK_INTERVAL_MS`].
pub fn rotate_store_key(path: &Path) -> Result<(u32, u32), String> {
    let mut ring = sundial_net::at_rest::load(path)?.ok_or_else(|| {
        format!(
            "{}: no key ring here (the agent makes it at its first start; give --store-key FILE if it is elsewhere)",
            path.display()
        )
    })?;
    let old = ring.current();
    let new = ring.add(false)?;
    sundial_net::at_rest::save(path, &ring)?;
    Ok((old, new))
}

/// Reads the key ring again if it changed (after `rotate-key`): new
/// records use its current key; a ring that lost a key in use is refused.
fn reload_store_key(store: &AgentStore, key_file: &Path) {
    let Some(cipher) = store.cipher() else {
        return;
    };
    let in_use = match store.key_ids() {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "reading the store's key ids failed");
            return;
        }
    };
    match cipher.reload(&in_use) {
        Ok(false) => {}
        Ok(true) => match store.note_current_key() {
            Ok(()) => {
                tracing::info!(key = cipher.current(), key_file = %key_file.display(), "store key ring reloaded: new records use key {}", cipher.current())
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording the new store key's check failed; it is retried at the next change")
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "the store key ring could not be reloaded; the old one stays in use")
        }
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

/// Runs the agent until `shutdown` resolves or the store fails.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    create_private_dir(&config.data_dir)?;
    check_store_present(&config.data_dir)?;
    let key_file = sundial_net::at_rest::key_path(&config.data_dir, config.store_key.as_deref());
    let (mut store, cipher) = open_store(&config.store_path(), |checks| {
        sundial_net::at_rest::cipher_for(checks, &key_file)
    })
    .await?;
    if let Some(cipher) = cipher {
        let moved = store.encrypt_with(Arc::new(cipher), &key_file)?;
        if moved > 0 {
            tracing::info!(records = moved, key_file = %key_file.display(), "encrypted the records stored before encryption");
        }
    }
    let store = Arc::new(store);
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
    if store.get_meta::<bool>(meta::ALLOW_WASM)?.unwrap_or(false) {
        exec_policy.functions.allowed = true;
    }
    for d in store
        .get_meta::<Vec<String>>(meta::ALLOW_WASM_DIRS)?
        .unwrap_or_default()
    {
        if !exec_policy.functions.dirs.contains(&d) {
            exec_policy.functions.dirs.push(d);
        }
    }
    {
        let f = &exec_policy.functions;
        store.put_meta(&[(
            meta::FUNCTIONS,
            (f.allowed, f.fuel_max, f.memory_max, f.module_max),
        )])?;
    }
    if exec_policy.functions.allowed {
        tracing::info!(dirs = ?exec_policy.functions.dirs, fuel_max = exec_policy.functions.fuel_max, memory_max = exec_policy.functions.memory_max, "functions allowed");
    }
    // The sealing key, for secrets sealed to this agent (enrolled agents).
    let seal = if agent_id == AgentId(0) {
        None
    } else {
        let pair = crate::sealing::load_or_create(&config.data_dir).map_err(AgentError::Config)?;
        exec_policy.sealing = Some((agent_id, Arc::new(pair.clone())));
        Some(pair.public())
    };
    let revoked = store.get_meta::<bool>(meta::REVOKED)?.unwrap_or(false);
    if revoked {
        tracing::error!("this agent was revoked by its coordinator: it makes no session and fires nothing (its outbox could never be sent); to use this device again, move its data directory away and join with a new token");
    }
    let session = match SessionConfig::load(&config.data_dir, &store) {
        Ok(Some(_)) if revoked => None,
        Ok(Some(mut cfg)) => {
            if !config.coordinators.is_empty() {
                cfg.coordinators = config.coordinators.clone();
            }
            tracing::info!(coordinators = %cfg.coordinators_text(), "coordinators");
            Some(Arc::new(cfg))
        }
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
        allow_env: exec_policy.allow_env.clone(),
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
        coordinators: session.as_ref().map_or(1, |s| s.coordinators.len()),
        seal_key: seal,
        functions: exec_policy.functions.hello(),
    };
    let node = match AgentNode::start(node_store, cfg, reading()) {
        Ok(n) => n,
        Err(f) => return Err(AgentError::StoreFault(f.0)),
    };
    let mut node = node;
    if revoked {
        node.begin_stop();
    }
    tracing::info!(agent = %agent_id, tasks_held = node.tasks_held(), outbox = store.outbox_len()?, "agent running");

    let metrics = match config.metrics {
        Some(addr) => {
            let listener = crate::metrics::bind(addr)
                .await
                .map_err(|e| AgentError::Config(format!("cannot serve metrics on {addr}: {e}")))?;
            let m = Arc::new(crate::metrics::AgentMetrics::new());
            crate::metrics::serve(listener, m.clone(), Arc::clone(&store), || {
                sundial_protocol::Timestamp::from_millis_saturating(reading().wall_ms)
            });
            Some(m)
        }
        None => None,
    };
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
        metrics,
    };
    let mut lead_ms = START_LEAD_MIN_MS;
    if config.start_lead == StartLead::Ahead {
        d.node.set_start_lead(lead_ms);
    }
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
            reload_store_key(&d.store, &key_file);
        }
        let r = reading();
        let wake_ms = d.node.next_wake(r);
        let mut deadline = boot_ns() + (wake_ms - r.boot_ms).max(0) * 1_000_000;
        let release = d.node.held_until().map(|at| (at, release_ns(&d.node, at)));
        if let Some((_, ns)) = release {
            deadline = deadline.min(ns);
        }
        tokio::select! {
            _ = timer.sleep_until(deadline) => {
                // A batch decided ahead goes out first, at its instant
                // (never before trusted time reached it).
                if let Some((at, ns)) = release {
                    if boot_ns() >= ns && d.node.time_of(reading()) >= at {
                        d.node.release_starts();
                        d.pump()?;
                    }
                }
                let held = d.node.held_until();
                let t0 = boot_ns();
                d.node.handle_wake(reading()).map_err(|f| d.fault(f))?;
                if config.start_lead == StartLead::Ahead && held.is_none() && d.node.held_until().is_some() {
                    // The lead follows what deciding a batch takes.
                    let took_ms = (boot_ns() - t0) / 1_000_000;
                    lead_ms = (2 * took_ms).clamp(START_LEAD_MIN_MS, START_LEAD_MAX_MS);
                    d.node.set_start_lead(lead_ms);
                }
            }
            Some((key, result)) = done_rx.recv() => d.finished(key, result)?,
            Some(ev) = events_rx.recv() => d.conn_event(ev)?,
            _ = heard.tick() => d.heard_poll()?,
            _ = &mut shutdown => break,
        }
    }
    // A batch decided ahead was started (its marks are committed): it goes
    // out at its instant, at most the lead from now, and then stops as
    // any running action does.
    if let Some(at) = d.node.held_until() {
        timer.sleep_until(release_ns(&d.node, at)).await;
        while d.node.time_of(reading()) < at {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        d.node.release_starts();
        d.pump()?;
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
    // The records of the runs that just ended reach the coordinator if it
    // is there: a short, bounded wait for their acknowledgement (what is
    // left goes at the next start).
    let flush_by = tokio::time::Instant::now() + STOP_FLUSH_WAIT;
    while d.conn.is_some() && d.node.store().outbox_len().unwrap_or(0) > 0 {
        tokio::select! {
            Some(ev) = events_rx.recv() => d.conn_event(ev)?,
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = tokio::time::sleep_until(flush_by) => break,
        }
        d.pump()?;
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

/// The boot-clock instant (ns) at which trusted time reaches `at`: the wall
/// clock read in ns beside the boot clock, shifted by how far trusted time
/// is from the wall clock (ms).
fn release_ns(node: &AgentNode<RedbNode>, at: Timestamp) -> i64 {
    let wall_ns = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    };
    let boot = boot_ns();
    let r = Reading {
        wall_ms: wall_ns.div_euclid(1_000_000),
        boot_ms: boot / 1_000_000,
    };
    let offset_ms = node.time_of(r).as_millis() - r.wall_ms;
    let target_wall_ns = at
        .as_millis()
        .saturating_sub(offset_ms)
        .saturating_mul(1_000_000);
    boot.saturating_add(target_wall_ns.saturating_sub(wall_ns))
}
