//! The agent's real-time driver: the thin shell that joins the scheduler to
//! the real clock, the store and the executor.
//!
//! Each turn: read the clocks, let [`ClockGuard`] correct and vet the time,
//! advance the [`Scheduler`], commit its decisions in one store transaction,
//! and only then spawn the runs; then sleep on CLOCK_BOOTTIME until the next
//! wake (at most [`WAKE_INTERVAL_MAX_MS`], so wall-clock steps are seen
//! promptly), a run's end, a control message, or shutdown.
//!
//! Invariants: a run is spawned only after its `started` marker is durable;
//! a run's record enters the outbox in the same transaction that clears its
//! marker; at start-up, markers left by a crash become `interrupted` records
//! before anything new starts.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sundial_protocol::task::{Action, ExecSpec};
use sundial_protocol::{AgentId, Outcome, RunKey, RunRecord, TaskId, TaskSpec, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::clock::{boot_ns, BootTimer, ClockGuard, ClockNote, SystemClock};
use crate::exec::{self, ExecPolicy, ExecResult};
use crate::scheduler::{Command, SchedTask, Scheduler};
use crate::session::{self, SessionConfig, SessionShared};
use crate::store::{meta, AgentStore, StartedInfo, StepWrite, StoreError};

/// The store's file name inside the data directory.
pub const STORE_FILE: &str = "agent.redb";
/// The longest sleep between two readings of the clocks.
pub const WAKE_INTERVAL_MAX_MS: i64 = 1_000;
/// How often the known-good instant is persisted (a clock found behind it by
/// more than [`crate::clock::UNTRUSTED_SLACK_MS`] is held; minutes of
/// staleness do not matter, a write per minute per device would).
pub const KNOWN_GOOD_PERSIST_MS: i64 = 600_000;
/// Runs that may end before the driver collects them, without blocking executors.
pub const RUN_COMPLETIONS_QUEUE_MAX: usize = 1_024;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub exec: ExecPolicy,
}

impl AgentConfig {
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
    #[error("{0} is in use by another process: is another sundial-agent running on this data directory?")]
    Busy(PathBuf),
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Changes pushed into a running agent by its coordinator session.
#[derive(Debug)]
pub enum Control {
    /// A task was created or changed; its revision becomes the applied one.
    Upsert(Box<TaskSpec>),
    /// A task was cancelled at `revision`.
    Cancel { task_id: TaskId, revision: u64 },
    /// Every change up to this revision has been sent.
    Revision(u64),
    /// A clock exchange measured the coordinator's clock against ours.
    Clock { offset_ms: i64, rtt_ms: i64 },
}

/// Bound of the control queue from the session.
pub const CONTROL_QUEUE_MAX: usize = 256;

struct Running {
    fired_at: Timestamp,
    offline: bool,
    kill: Option<oneshot::Sender<()>>,
}

struct Agent {
    store: Arc<AgentStore>,
    shared: Arc<SessionShared>,
    agent_id: AgentId,
    sched: Scheduler,
    guard: ClockGuard,
    clock: SystemClock,
    actions: HashMap<TaskId, ExecSpec>,
    running: HashMap<RunKey, Running>,
    exec: Arc<ExecPolicy>,
    done_tx: mpsc::Sender<(RunKey, ExecResult)>,
    last_persisted_good_ms: i64,
    held_reported: bool,
}

/// Runs the agent until `shutdown` resolves or the store fails.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = Arc::new(open_store(&config.store_path()).await?);
    let agent_id = store.get_meta::<u64>(meta::AGENT_ID)?.map(AgentId);
    if agent_id.is_none() {
        tracing::warn!(
            "this agent is not enrolled: it fires the tasks in its store but has no coordinator"
        );
    }
    let agent_id = agent_id.unwrap_or(AgentId(0));
    let offset = store.get_meta::<i64>(meta::CLOCK_OFFSET_MS)?.unwrap_or(0);
    let known_good = store
        .get_meta::<i64>(meta::LAST_KNOWN_GOOD_MS)?
        .and_then(|ms| Timestamp::from_millis(ms).ok());
    let mut guard = ClockGuard::new(offset, known_good);
    let clock = SystemClock;
    let reading = clock.read();
    let mut notes = Vec::new();
    let start = guard
        .observe(reading, &mut notes)
        .unwrap_or_else(|| Timestamp::from_millis_saturating(reading.wall_ms));

    let interrupted = store.recover_interrupted(agent_id, start)?;
    for r in &interrupted {
        tracing::warn!(task = %r.task_id, scheduled_at = %r.scheduled_at, attempt = r.attempt, "run interrupted by the agent's stop; recorded as interrupted");
    }
    let mut sched = Scheduler::new(start);
    let states = store.task_states()?;
    let mut actions = HashMap::new();
    for task in store.tasks()? {
        sched.restore(SchedTask::from(&task), states.get(&task.id).copied());
        let Action::Exec(spec) = task.action;
        actions.insert(task.id, spec);
    }
    for r in &interrupted {
        sched.run_finished(r.key(), Outcome::Interrupted, start);
    }
    tracing::info!(agent = %agent_id, tasks = actions.len(), outbox = store.outbox_len()?, "agent running");

    let (done_tx, mut done_rx) = mpsc::channel(RUN_COMPLETIONS_QUEUE_MAX);
    let (control_tx, mut control) = mpsc::channel(CONTROL_QUEUE_MAX);
    let shared = Arc::new(SessionShared::default());
    let mut exec_policy = config.exec.clone();
    for p in store
        .get_meta::<Vec<String>>(meta::ALLOW_EXEC)?
        .unwrap_or_default()
    {
        if !exec_policy.allow.contains(&p) {
            exec_policy.allow.push(p);
        }
    }
    // Aborted when the agent stops, so nothing holds the store afterwards.
    let session_task = match SessionConfig::load(&config.data_dir, &store) {
        Ok(Some(cfg)) => Some(tokio::spawn(session::run(
            cfg,
            store.clone(),
            control_tx.clone(),
            shared.clone(),
        ))),
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "enrollment files unreadable; running without a coordinator");
            None
        }
    };
    drop(control_tx);
    if !interrupted.is_empty() {
        shared.outbox.notify_one();
    }
    let mut agent = Agent {
        store,
        shared,
        agent_id,
        sched,
        guard,
        clock,
        actions,
        running: HashMap::new(),
        exec: Arc::new(exec_policy),
        done_tx,
        last_persisted_good_ms: i64::MIN,
        held_reported: false,
    };
    agent.log_notes(&notes);
    let mut timer = BootTimer::new();
    tokio::pin!(shutdown);
    let mut control_open = true;
    loop {
        let now = agent.turn()?;
        let sleep_ms = match (now, agent.sched.next_wake()) {
            (Some(now), Some(wake)) => wake.millis_since(now).clamp(0, WAKE_INTERVAL_MAX_MS),
            _ => WAKE_INTERVAL_MAX_MS,
        };
        let deadline = boot_ns() + sleep_ms * 1_000_000;
        tokio::select! {
            _ = timer.sleep_until(deadline) => {}
            Some((key, result)) = done_rx.recv() => agent.finished(key, result)?,
            msg = control.recv(), if control_open => match msg {
                Some(msg) => agent.control(msg)?,
                None => control_open = false,
            },
            _ = &mut shutdown => break,
        }
    }
    tracing::info!("agent stopping; runs still going will be reported as interrupted");
    if let Some(t) = session_task {
        t.abort();
        let _ = t.await;
    }
    agent.persist_known_good(true)?;
    Ok(())
}

/// How long the agent waits for another process (a `status` reading) to
/// let go of its store before concluding another agent is running.
const STORE_BUSY_WAIT_MS: u64 = 5_000;

async fn open_store(path: &Path) -> Result<AgentStore, AgentError> {
    let mut waited = 0;
    loop {
        match AgentStore::open(path) {
            Err(e) if e.is_already_open() && waited < STORE_BUSY_WAIT_MS => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                waited += 100;
            }
            Err(e) if e.is_already_open() => return Err(AgentError::Busy(path.to_owned())),
            other => return Ok(other?),
        }
    }
}

impl Agent {
    fn log_notes(&mut self, notes: &[ClockNote]) {
        for n in notes {
            match n {
                ClockNote::Jumped { by_ms } => {
                    tracing::warn!(
                        by_ms,
                        "wall clock jumped; firing follows the new time, nothing fires early"
                    )
                }
                ClockNote::Untrusted {
                    now,
                    last_known_good,
                } => tracing::error!(
                    %now, %last_known_good,
                    "clock is behind the last known-good time: firing is held until the clock is trusted again"
                ),
                ClockNote::TrustRestored => tracing::info!("clock trusted again; firing resumes"),
            }
        }
    }

    /// One turn: read the clock, decide, commit, spawn. Returns the corrected
    /// time, or `None` while firing is held.
    fn turn(&mut self) -> Result<Option<Timestamp>, AgentError> {
        let mut notes = Vec::new();
        let now = self.guard.observe(self.clock.read(), &mut notes);
        self.log_notes(&notes);
        let Some(now) = now else {
            if !self.held_reported {
                self.held_reported = true;
                self.store.put_meta(&[(meta::CLOCK_HELD, true)])?;
            }
            return Ok(None);
        };
        if self.held_reported {
            self.held_reported = false;
            self.store.put_meta(&[(meta::CLOCK_HELD, false)])?;
        }
        let mut cmds = Vec::new();
        self.sched.advance(now, &mut cmds);
        if !cmds.is_empty() {
            self.apply(now, cmds);
        }
        self.persist_known_good(false)?;
        Ok(Some(now))
    }

    fn persist_known_good(&mut self, force: bool) -> Result<(), AgentError> {
        if let Some(g) = self.guard.last_known_good() {
            let ms = g.as_millis();
            if force || ms.saturating_sub(self.last_persisted_good_ms) >= KNOWN_GOOD_PERSIST_MS {
                self.store.put_meta(&[(meta::LAST_KNOWN_GOOD_MS, ms)])?;
                self.last_persisted_good_ms = ms;
            }
        }
        Ok(())
    }

    fn apply(&mut self, now: Timestamp, cmds: Vec<Command>) {
        let offline = !self.shared.online.load(std::sync::atomic::Ordering::SeqCst);
        let mut step = StepWrite::default();
        let mut starts = Vec::new();
        let mut kills = Vec::new();
        for c in cmds {
            match c {
                Command::SaveState { task_id, next_due } => step.states.push((task_id, next_due)),
                Command::Start { key, .. } => {
                    step.started.push((
                        key,
                        StartedInfo {
                            fired_at: now,
                            offline,
                        },
                    ));
                    starts.push(key);
                }
                Command::Skip { key, reason } => step.records.push(RunRecord {
                    task_id: key.task_id,
                    agent_id: self.agent_id,
                    scheduled_at: key.scheduled_at,
                    attempt: key.attempt,
                    fired_at: None,
                    finished_at: None,
                    outcome: Outcome::Skipped,
                    exit_code: None,
                    offline,
                    detail: Some(reason.as_str().to_owned()),
                    stdout_tail: Vec::new(),
                    stderr_tail: Vec::new(),
                }),
                Command::Kill { key } => kills.push(key),
            }
        }
        if let Err(e) = self.store.apply_step(&step) {
            // Not durable, so not started: at most once wins over on time.
            tracing::error!(error = %e, runs = starts.len(), "could not record runs as started; they are not run");
            for key in starts {
                self.sched.run_finished(key, Outcome::Rejected, now);
            }
        } else {
            if !step.records.is_empty() {
                self.shared.outbox.notify_one();
            }
            for key in starts {
                self.spawn(key, now, offline);
            }
        }
        for key in kills {
            if let Some(r) = self.running.get_mut(&key) {
                if let Some(k) = r.kill.take() {
                    tracing::warn!(task = %key.task_id, scheduled_at = %key.scheduled_at, "run timed out; killing its process group");
                    let _ = k.send(());
                }
            }
        }
    }

    fn spawn(&mut self, key: RunKey, now: Timestamp, offline: bool) {
        let (kill_tx, kill_rx) = oneshot::channel();
        self.running.insert(
            key,
            Running {
                fired_at: now,
                offline,
                kill: Some(kill_tx),
            },
        );
        let spec = self.actions.get(&key.task_id).cloned().map(|mut spec| {
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
            spec
        });
        let policy = Arc::clone(&self.exec);
        let done = self.done_tx.clone();
        tracing::debug!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, "starting run");
        if crate::fault::active("double-fire") {
            if let Some(spec) = spec.clone() {
                let policy = Arc::clone(&policy);
                tokio::spawn(async move {
                    let (_keep, never) = oneshot::channel();
                    let _ = exec::run(&spec, &policy, never).await;
                });
            }
        }
        tokio::spawn(async move {
            let result = match spec {
                Some(spec) => exec::run(&spec, &policy, kill_rx).await,
                None => ExecResult {
                    outcome: Outcome::Rejected,
                    exit_code: None,
                    detail: Some("the task's action is unknown to this agent".into()),
                    stdout_tail: Vec::new(),
                    stderr_tail: Vec::new(),
                    pid: None,
                },
            };
            // The driver outlives every executor unless it is stopping.
            let _ = done.send((key, result)).await;
        });
    }

    fn finished(&mut self, key: RunKey, result: ExecResult) -> Result<(), AgentError> {
        let reading = self.clock.read();
        let now = Timestamp::from_millis_saturating(reading.wall_ms + self.guard.offset_ms());
        let Some(run) = self.running.remove(&key) else {
            return Ok(());
        };
        let record = RunRecord {
            task_id: key.task_id,
            agent_id: self.agent_id,
            scheduled_at: key.scheduled_at,
            attempt: key.attempt,
            fired_at: Some(run.fired_at),
            finished_at: Some(now),
            outcome: result.outcome,
            exit_code: result.exit_code,
            offline: run.offline,
            detail: result.detail,
            stdout_tail: result.stdout_tail,
            stderr_tail: result.stderr_tail,
        };
        tracing::info!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, outcome = %record.outcome, "run finished");
        match self.store.finish_run(&record) {
            Ok(()) => self.shared.outbox.notify_one(),
            // The started marker stays: the run will be reported interrupted after a restart.
            Err(e) => {
                tracing::error!(error = %e, task = %key.task_id, "could not store a finished run")
            }
        }
        self.sched.run_finished(key, result.outcome, now);
        Ok(())
    }

    fn control(&mut self, msg: Control) -> Result<(), AgentError> {
        let mut cmds = Vec::new();
        match msg {
            Control::Upsert(task) => {
                self.store.put_task(&task, Some(task.revision))?;
                let Action::Exec(spec) = &task.action;
                self.actions.insert(task.id, spec.clone());
                tracing::info!(task = %task.id, revision = task.revision, schedule = %task.schedule, "task assigned");
                self.sched.upsert(SchedTask::from(&*task), &mut cmds);
            }
            Control::Cancel { task_id, revision } => {
                self.store.remove_task(task_id, Some(revision))?;
                self.actions.remove(&task_id);
                self.sched.remove(task_id);
                tracing::info!(task = %task_id, revision, "task cancelled");
            }
            Control::Revision(revision) => {
                let current = self
                    .store
                    .get_meta::<u64>(meta::LAST_REVISION)?
                    .unwrap_or(0);
                if revision > current {
                    self.store.put_meta(&[(meta::LAST_REVISION, revision)])?;
                }
            }
            Control::Clock { offset_ms, rtt_ms } => {
                let now = self.guard.set_offset(offset_ms, self.clock.read());
                self.store.put_meta(&[
                    (meta::CLOCK_OFFSET_MS, offset_ms),
                    (meta::LAST_KNOWN_GOOD_MS, now.as_millis()),
                ])?;
                tracing::debug!(
                    offset_ms,
                    rtt_ms,
                    "clock offset to the coordinator measured"
                );
            }
        }
        if !cmds.is_empty() {
            self.apply(self.sched.now(), cmds);
        }
        Ok(())
    }
}
