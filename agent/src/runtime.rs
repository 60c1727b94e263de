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

use crate::clock::{boot_ns, Anchor, BootTimer, ClockGuard, ClockNote, SystemClock};
use crate::exec::{self, ExecPolicy, ExecResult};
use crate::scheduler::{Command, SchedTask, Scheduler, SkipReason};
use crate::session::{self, SessionConfig, SessionShared};
use crate::store::{meta, AgentStore, StartedInfo, StepWrite, StoreError};

/// The detail of a run an operator asked for (`sundialctl task run-now`).
pub const MANUAL_DETAIL: &str = "run now, as an operator asked";
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
/// The detail of a run killed because the agent stopped.
pub const STOPPED_DETAIL: &str =
    "the agent was stopped and the run did not finish within the stop grace; killed";
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
    #[error("{store} is {what}, but {dir} holds this agent's certificate: its tasks and the run records not yet synced are gone. Restore {store} from a backup and start again; to enroll this device afresh, move {dir} away and run `sundial-agent join` with a new token")]
    StoreLost {
        store: PathBuf,
        dir: PathBuf,
        what: &'static str,
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
    /// An operator asked for one extra occurrence now, keyed at `at`.
    RunNow { task_id: TaskId, at: Timestamp },
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
    runs_concurrent_max: usize,
    cap_reported: bool,
    running_dir: PathBuf,
    /// Runs an operator asked for (`task run-now`): their records say so.
    manual: std::collections::HashSet<RunKey>,
    /// Runs killed because the agent is stopping.
    stopping: std::collections::HashSet<RunKey>,
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
    // The offset is of this boot's wall clock: after a reboot it is not
    // applied (the clock may have been set anew; an offset measured when it
    // read 2001 would put the agent years ahead). Until the coordinator
    // measures again, the wall clock is trusted as at a first start, and
    // one behind the last known-good instant holds firing.
    let offset_boot = store.get_meta::<String>(meta::CLOCK_OFFSET_BOOT)?;
    let offset = match (offset_boot, crate::clock::boot_id()) {
        (Some(b), Some(now)) if b == now => {
            store.get_meta::<i64>(meta::CLOCK_OFFSET_MS)?.unwrap_or(0)
        }
        (None, _) => store
            .get_meta::<i64>(meta::CLOCK_OFFSET_MS)?
            .unwrap_or(0)
            .min(0),
        _ => 0,
    };
    let known_good = store
        .get_meta::<i64>(meta::LAST_KNOWN_GOOD_MS)?
        .and_then(|ms| Timestamp::from_millis(ms).ok());
    let mut guard = ClockGuard::new(offset, known_good);
    // An anchor from an earlier run in this same boot: a wall clock stepped
    // while the agent was stopped shows against the boot clock.
    let boot = crate::clock::boot_id();
    if let (Some(boot), Some((b, boot_ms, time_ms))) = (
        boot.as_ref(),
        store.get_meta::<(String, i64, i64)>(meta::BOOT_ANCHOR)?,
    ) {
        if *boot == b {
            guard = guard.with_anchor(Anchor { boot_ms, time_ms });
        }
    }
    let clock = SystemClock;
    let reading = clock.read();
    let mut notes = Vec::new();
    let start = guard
        .observe(reading, &mut notes)
        .unwrap_or_else(|| guard.time_of(reading));

    // Before anything is recorded: actions a crashed agent left running are
    // ended, so a retry never runs beside its predecessor.
    let leftovers = end_leftovers(&running_dir).await;
    let interrupted = store.recover_interrupted(agent_id, start, &leftovers)?;
    for r in &interrupted {
        tracing::warn!(task = %r.task_id, scheduled_at = %r.scheduled_at, attempt = r.attempt, detail = ?r.detail, "run interrupted by the agent's stop; recorded as interrupted");
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
    let mut exec_policy = config.exec.clone();
    for p in store
        .get_meta::<Vec<String>>(meta::ALLOW_EXEC)?
        .unwrap_or_default()
    {
        if !exec_policy.allow.contains(&p) {
            exec_policy.allow.push(p);
        }
    }
    for p in store
        .get_meta::<Vec<String>>(meta::ALLOW_ENV)?
        .unwrap_or_default()
    {
        if !exec_policy.allow_env.contains(&p) {
            exec_policy.allow_env.push(p);
        }
    }
    let shared = Arc::new(SessionShared {
        allow_exec: exec_policy.allow.clone(),
        ..SessionShared::default()
    });
    let revoked = store.get_meta::<bool>(meta::REVOKED)?.unwrap_or(false);
    if revoked {
        tracing::error!("this agent was revoked by its coordinator: it makes no session (its local tasks still fire); to use this device again, move its data directory away and join with a new token");
    }
    // Aborted when the agent stops, so nothing holds the store afterwards.
    let session_task = match SessionConfig::load(&config.data_dir, &store) {
        Ok(Some(_)) if revoked => None,
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
        runs_concurrent_max: config.runs_concurrent_max.max(1),
        cap_reported: false,
        running_dir,
        manual: std::collections::HashSet::new(),
        stopping: std::collections::HashSet::new(),
    };
    agent.log_notes(&notes);
    agent.persist_anchor()?;
    let mut timer = BootTimer::new();
    tokio::pin!(shutdown);
    let mut control_open = true;
    let mut store_checked_ms = boot_ns() / 1_000_000;
    loop {
        let boot_ms = boot_ns() / 1_000_000;
        if boot_ms - store_checked_ms >= STORE_CHECK_INTERVAL_MS {
            store_checked_ms = boot_ms;
            let now_identity = file_identity(&config.store_path());
            if now_identity != store_identity {
                let what = if now_identity.is_none() {
                    "gone"
                } else {
                    "a different file"
                };
                tracing::error!(store = %config.store_path().display(), what, "the agent's store was deleted or replaced while it ran; stopping so that nothing more is lost");
                return Err(AgentError::StoreLost {
                    store: config.store_path(),
                    dir: config.data_dir.clone(),
                    what: if now_identity.is_none() {
                        "missing"
                    } else {
                        "replaced"
                    },
                });
            }
        }
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
    // Stopping (SIGTERM): fire nothing new; give running actions the stop
    // grace to finish and record them as they end; then kill what is left
    // and record it `interrupted`, truthfully, before exiting.
    if !agent.running.is_empty() {
        tracing::info!(
            running = agent.running.len(),
            grace_ms = config.stop_grace.as_millis() as u64,
            "agent stopping: firing nothing new, letting running actions finish"
        );
        let deadline = tokio::time::Instant::now() + config.stop_grace;
        while !agent.running.is_empty() {
            tokio::select! {
                Some((key, result)) = done_rx.recv() => agent.finished(key, result)?,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !agent.running.is_empty() {
            tracing::warn!(
                running = agent.running.len(),
                "stop grace over: killing the actions still running"
            );
            agent.kill_all_for_stop();
            let killed_by = tokio::time::Instant::now() + STOP_KILL_WAIT;
            while !agent.running.is_empty() {
                tokio::select! {
                    Some((key, result)) = done_rx.recv() => agent.finished(key, result)?,
                    _ = tokio::time::sleep_until(killed_by) => break,
                }
            }
        }
    }
    tracing::info!("agent stopped");
    if let Some(t) = session_task {
        t.abort();
        let _ = t.await;
    }
    agent.persist_known_good(true)?;
    Ok(())
}

/// Creates `dir` (and its parents) readable by the agent's user only, as it
/// holds the agent's key and the tasks' environments. An existing directory
/// keeps the mode its owner gave it.
fn create_private_dir(dir: &Path) -> Result<(), AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| AgentError::DataDir {
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

/// The record of an occurrence that did not run.
fn skipped_record(key: RunKey, agent_id: AgentId, offline: bool, reason: SkipReason) -> RunRecord {
    RunRecord {
        task_id: key.task_id,
        agent_id,
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
    }
}

impl Agent {
    /// Kills every running action's process group (the agent is stopping).
    fn kill_all_for_stop(&mut self) {
        for (key, run) in self.running.iter_mut() {
            if let Some(k) = run.kill.take() {
                self.stopping.insert(*key);
                let _ = k.send(());
            }
        }
    }

    fn log_notes(&mut self, notes: &[ClockNote]) {
        for n in notes {
            match n {
                ClockNote::Jumped { by_ms } => {
                    tracing::warn!(
                        by_ms,
                        "wall clock stepped back against the boot clock; firing follows the earlier time (occurrences already fired do not fire again)"
                    )
                }
                ClockNote::Ahead { by_ms } => tracing::warn!(
                    by_ms,
                    offset_ms = self.guard.offset_ms(),
                    trusted_time = %self.guard.time_of(self.clock.read()),
                    "wall clock is ahead of trusted time (stepped forward, or found so at start): firing follows the boot clock until the coordinator vouches for the time or the wall clock is back in line; nothing fires early"
                ),
                ClockNote::BackInLine => {
                    tracing::info!("wall clock agrees with trusted time again")
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
            self.apply(now, cmds)?;
        }
        self.persist_known_good(false)?;
        Ok(Some(now))
    }

    fn persist_known_good(&mut self, force: bool) -> Result<(), AgentError> {
        if let Some(g) = self.guard.last_known_good() {
            let ms = g.as_millis();
            if force || ms.saturating_sub(self.last_persisted_good_ms) >= KNOWN_GOOD_PERSIST_MS {
                self.store.put_meta(&[(meta::LAST_KNOWN_GOOD_MS, ms)])?;
                self.persist_anchor()?;
                self.last_persisted_good_ms = ms;
            }
        }
        Ok(())
    }

    /// Persists the guard's anchor with this boot's id (a trusted instant
    /// at a boot-clock reading), for a restart in the same boot.
    fn persist_anchor(&mut self) -> Result<(), AgentError> {
        if let (Some(boot), Some(a)) = (crate::clock::boot_id(), self.guard.anchor()) {
            if self.guard.ahead_ms().is_none() && self.guard.is_trusted() {
                self.store
                    .put_meta(&[(meta::BOOT_ANCHOR, (boot, a.boot_ms, a.time_ms))])?;
            }
        }
        Ok(())
    }

    fn apply(&mut self, now: Timestamp, cmds: Vec<Command>) -> Result<(), AgentError> {
        let offline = !self.shared.online.load(std::sync::atomic::Ordering::SeqCst);
        let mut step = StepWrite::default();
        let mut starts = Vec::new();
        let mut kills = Vec::new();
        let mut capped = Vec::new();
        if self.running.len() < self.runs_concurrent_max {
            self.cap_reported = false;
        }
        for c in cmds {
            match c {
                Command::SaveState { task_id, next_due } => step.states.push((task_id, next_due)),
                Command::Start { key, .. }
                    if self.running.len() + starts.len() >= self.runs_concurrent_max =>
                {
                    if !self.cap_reported {
                        self.cap_reported = true;
                        tracing::warn!(max = self.runs_concurrent_max, task = %key.task_id, "at the cap of concurrent runs; occurrences due now are recorded as skipped");
                    }
                    capped.push(key);
                    step.records.push(skipped_record(
                        key,
                        self.agent_id,
                        offline,
                        SkipReason::ConcurrencyCap,
                    ));
                }
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
                Command::Skip { key, reason } => {
                    step.records
                        .push(skipped_record(key, self.agent_id, offline, reason))
                }
                Command::Kill { key } => kills.push(key),
            }
        }
        if let Err(e) = self.store.apply_step(&step) {
            // Not durable, so not started: at most once wins over on time.
            tracing::error!(error = %e, runs = starts.len(), "could not record runs as started; they are not run");
            if e.is_io() {
                // redb refuses every write after an I/O error until the
                // database is reopened: stop, so the supervisor restarts the
                // agent with its store reopened (and repaired). Everything
                // committed is kept; firing resumes once the disk has room.
                return Err(AgentError::Store(e));
            }
            for key in starts {
                self.sched.run_finished(key, Outcome::Rejected, now);
            }
            for key in capped {
                self.sched.run_finished(key, Outcome::Skipped, now);
            }
        } else {
            for key in capped {
                self.sched.run_finished(key, Outcome::Skipped, now);
            }
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
        Ok(())
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
        let pid_path = pid_file(&self.running_dir, key);
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
                Some(spec) => {
                    exec::run_with(&spec, &policy, kill_rx, |pid| {
                        let ticks = process_start_ticks(pid).unwrap_or(0);
                        if let Err(e) = std::fs::write(&pid_path, format!("{pid} {ticks}\n")) {
                            tracing::warn!(error = %e, path = %pid_path.display(), "could not note a run's pid; after a crash it could not be found");
                        }
                    })
                    .await
                }
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
        let now = self.guard.time_of(self.clock.read());
        let Some(run) = self.running.remove(&key) else {
            return Ok(());
        };
        let mut record = RunRecord {
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
        if self.stopping.remove(&key) {
            record.outcome = Outcome::Interrupted;
            record.exit_code = None;
            record.detail = Some(STOPPED_DETAIL.to_owned());
        }
        if self.manual.remove(&key) {
            record.detail = Some(match record.why() {
                Some(why) => format!("{MANUAL_DETAIL}; {why}"),
                None => MANUAL_DETAIL.to_owned(),
            });
        }
        tracing::info!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, outcome = %record.outcome, "run finished");
        match self.store.finish_run(&record) {
            Ok(()) => {
                let _ = std::fs::remove_file(pid_file(&self.running_dir, key));
                self.shared.outbox.notify_one()
            }
            // The started marker stays: the run will be reported interrupted after a restart.
            Err(e) => {
                tracing::error!(error = %e, task = %key.task_id, "could not store a finished run");
                if e.is_io() {
                    return Err(AgentError::Store(e));
                }
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
            Control::RunNow { task_id, at } => {
                if self.actions.contains_key(&task_id) {
                    let key = RunKey {
                        task_id,
                        scheduled_at: at,
                        attempt: 1,
                    };
                    tracing::info!(task = %task_id, %at, "run now, as an operator asked");
                    self.manual.insert(key);
                    self.sched.run_now(key, &mut cmds);
                } else {
                    tracing::warn!(task = %task_id, "asked to run a task this agent does not have");
                }
            }
            Control::Clock { offset_ms, rtt_ms } => {
                let was_ahead = self.guard.ahead_ms();
                let now = self.guard.set_offset(offset_ms, self.clock.read());
                if let Some(by_ms) = was_ahead {
                    tracing::info!(by_ms, offset_ms, %now, "the coordinator vouched for the time: the wall clock's lead is now corrected by the offset");
                }
                self.store.put_meta(&[
                    (meta::CLOCK_OFFSET_MS, offset_ms),
                    (meta::LAST_KNOWN_GOOD_MS, now.as_millis()),
                ])?;
                // After the offset: a crash between the two leaves an older
                // boot's id, and the offset is then not applied (safe).
                if let Some(boot) = crate::clock::boot_id() {
                    self.store.put_meta(&[(meta::CLOCK_OFFSET_BOOT, boot)])?;
                }
                self.persist_anchor()?;
                tracing::debug!(
                    offset_ms,
                    rtt_ms,
                    "clock offset to the coordinator measured"
                );
            }
        }
        if !cmds.is_empty() {
            // Runs start now: stamp them with the time now, not the
            // scheduler's last turn (up to a wake interval ago).
            let now = self.guard.time_of(self.clock.read()).max(self.sched.now());
            self.apply(now, cmds)?;
        }
        Ok(())
    }
}
