//! A whole agent as a value: the clock guard, the scheduler and the session
//! machine composed over a [`NodeStore`], stepped by the caller with clock
//! readings. What the agent must do outside (spawn or kill an action, dial,
//! send a message) comes out of [`AgentNode::poll_effect`].
//!
//! The deterministic simulator (`sundial-sim virtual`) runs fleets of these
//! on virtual time; the agent binary runs the same node in its async shell
//! (`agent/src/runtime.rs`).
//!
//! Near horizon: the node holds in memory only the tasks due within
//! [`HORIZON_MS`] (at most [`HELD_MAX`] of them), loading them from the
//! store's due index in `(next due, id)` order as time moves on; a task's
//! action is read from the store when it fires. Memory and start-up do not
//! grow with the number of tasks stored.
//!
//! Invariants kept here, as in the binary: a run is durably marked started
//! before it is spawned (at most once); its record enters the outbox in the
//! same transaction that clears the mark; a record leaves the outbox only
//! when the coordinator acknowledged it.
//!
//! Starts decided ahead ([`AgentNode::set_start_lead`]): the node may decide
//! the next instant's batch up to the lead before it, committing its
//! `started` marks then, and holds the batch's spawns (and every spawn or
//! kill after them) until the instant, so the durable write is not between
//! the instant and the start. A crash in between leaves marks for starts
//! that never happened: they read as `interrupted` at the next start, as
//! any mark does, so at most once holds.

use std::collections::{HashMap, HashSet, VecDeque};

use sundial_protocol::placement::Decision;
use sundial_protocol::task::Action;
use sundial_protocol::wasm::ModuleHash;
use sundial_protocol::wire::{AgentMsg, AgentReport, AssignmentChange, CoordMsg};
use sundial_protocol::{AgentId, Outcome, RunKey, RunRecord, TaskId, TaskSpec, Timestamp};

use crate::clock::{Anchor, ClockGuard, ClockNote, Reading, Vouch, JUMP_THRESHOLD_MS};
use crate::scheduler::{Command, DueKey, SchedTask, Scheduler, SkipReason};
use crate::session::agent::{AgentEffect, AgentSession, Closed, HelloInfo};
use crate::session::{Event, Now};

/// The longest the node sleeps without looking at its clocks, in ms.
pub const WAKE_INTERVAL_MAX_MS: i64 = 1_000;
/// How often the last known-good instant is persisted, in ms of it (a clock
/// found behind it by more than the guard's slack is held; minutes of
/// staleness do not matter, a write per minute per device would).
pub const KNOWN_GOOD_PERSIST_MS: i64 = 600_000;
/// Tasks due within this much of now are held in memory, ms.
pub const HORIZON_MS: i64 = 60_000;
/// The most tasks held in memory for the horizon (runs and retries in
/// progress hold theirs besides); with more due within it, the horizon
/// shortens to what fits.
pub const HELD_MAX: usize = 16_384;
/// Tasks loaded from the store per read.
pub const LOAD_BATCH: usize = 1_024;
/// Rounds of loading and firing one wake may take after a long stop; the
/// rest waits for the next wake, which is then due at once (the horizon's
/// end is behind the present), so sessions and finishing runs are served
/// between rounds.
pub const WAKE_ROUNDS_MAX: usize = 16;
/// In a boot whose time no coordinator has vouched for yet, firing waits
/// this long (ms of boot time) for the first clock sample, unless the
/// coordinator is found unreachable first: a fresh boot's wall clock may be
/// hours off (an RTC keeping local time), and occurrences fired on it could
/// not be taken back. Late by at most this, once per boot.
pub const VOUCH_WAIT_MS: i64 = 10_000;
/// The longest lead a node takes to decide starts ahead of their instant, ms.
pub const START_LEAD_MAX_MS: i64 = 1_000;
/// The detail of a run an operator asked for (`sundialctl task run-now`).
pub const MANUAL_DETAIL: &str = "run now, as an operator asked";
/// The detail of a run killed because the agent stopped.
pub const STOPPED_DETAIL: &str =
    "the agent was stopped and the run did not finish within the stop grace; killed";

/// A store operation failed; the node must stop (its shell restarts it
/// with the store reopened, as the binary does on an I/O error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreFault(pub String);

pub type StoreResult<T> = Result<T, StoreFault>;

/// A stored task with its stored next due.
pub type StoredTask = (TaskSpec, Option<Timestamp>);

/// A run marked started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Started {
    pub fired_at: Timestamp,
    pub offline: bool,
}

/// One atomic write of a scheduler step. A run key that is started or
/// recorded here is no longer a pending retry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub states: Vec<(TaskId, Option<Timestamp>)>,
    pub started: Vec<(RunKey, Started)>,
    pub records: Vec<RunRecord>,
    /// Retries now pending, each with its time (and triggered runs, which
    /// are stored and restored as retries are).
    pub retries: Vec<(RunKey, Timestamp)>,
    /// What fan-in tasks heard of an occurrence: (task, occurrence, the
    /// upstreams that ended and how); an empty list forgets it.
    pub fanin: Vec<FanInState>,
}

/// A fan-in task's occurrence and the upstream ends heard of it.
pub type FanInState = (TaskId, Timestamp, Vec<(TaskId, Outcome)>);

/// The clock state that outlives a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockState {
    pub offset_ms: i64,
    /// The boot the offset was measured in: not applied in another. Time
    /// was vouched for by the coordinator in this boot iff it is the
    /// current one.
    pub offset_boot: u64,
    pub last_known_good: Option<Timestamp>,
    /// The clock guard's base (a trusted instant at a boot-clock reading),
    /// and the boot it is of.
    pub anchor: Option<(u64, Anchor)>,
}

/// What the node needs of its store. Every method is one transaction:
/// done entirely or not at all.
///
/// The store keeps an index of tasks by `(next due, id)`: every task it
/// holds has a state (its next due, or none), written with the task in
/// [`apply_changes`](Self::apply_changes) and moved by [`apply_step`](Self::apply_step).
pub trait NodeStore {
    /// Up to `max` tasks with their next due, in `(next due, id)` order,
    /// after `after` (from the first when `None`) and due at or before `until`.
    fn due_tasks(
        &self,
        after: Option<DueKey>,
        until: Timestamp,
        max: usize,
    ) -> StoreResult<Vec<(TaskSpec, Timestamp)>>;
    /// Tasks by id, each with its stored next due (`None`: unknown task).
    fn tasks_by_id(&self, ids: &[TaskId]) -> StoreResult<Vec<Option<StoredTask>>>;
    fn apply_step(&mut self, step: &Step) -> StoreResult<()>;
    /// Clears the run's started mark and puts its record in the outbox,
    /// with what it leads to in `then` (its retry, pending until started or
    /// recorded and dropped with its task; the runs it triggers, stored as
    /// retries; fan-in progress; records of tasks it left untriggered), in
    /// one transaction. `then` holds no starts.
    fn finish_run(&mut self, record: &RunRecord, then: &Step) -> StoreResult<()>;
    /// Every pending retry (and triggered run), with its time.
    fn pending_retries(&self) -> StoreResult<Vec<(RunKey, Timestamp)>>;
    /// Every stored triggered task (they are always held: their
    /// occurrences come from other tasks, not the due index).
    fn triggered_tasks(&self) -> StoreResult<Vec<StoredTask>>;
    /// Every stored fan-in progress (see [`Step::fanin`]).
    fn fanin_pending(&self) -> StoreResult<Vec<FanInState>>;
    /// Every run still marked started becomes an `interrupted` record in
    /// the outbox; returns them.
    fn recover_interrupted(&mut self, agent: AgentId) -> StoreResult<Vec<RunRecord>>;
    fn outbox_after(
        &self,
        after: u64,
        runs_max: usize,
        bytes_max: usize,
    ) -> StoreResult<Vec<(u64, RunRecord)>>;
    fn outbox_ack(&mut self, keys: &[RunKey]) -> StoreResult<usize>;
    fn outbox_len(&self) -> StoreResult<u64>;
    /// Tasks stored.
    fn task_count(&self) -> StoreResult<u64>;
    /// When the oldest record in the outbox ended (or was decided).
    fn outbox_oldest(&self) -> StoreResult<Option<Timestamp>> {
        Ok(self
            .outbox_after(0, 1, usize::MAX)?
            .first()
            .map(|(_, r)| r.finished_at.unwrap_or(r.key().scheduled_at)))
    }
    /// The store's size on disk, bytes, where it has one.
    fn size_bytes(&self) -> Option<u64> {
        None
    }
    fn last_revision(&self) -> StoreResult<u64>;
    fn set_last_revision(&mut self, revision: u64) -> StoreResult<()>;
    fn clock_state(&self) -> StoreResult<ClockState>;
    fn set_clock_state(&mut self, state: &ClockState) -> StoreResult<()>;
    /// One page of assignment changes, in one transaction: `removed` gone
    /// (with their state), `upserts` stored with their `states`, and
    /// `revision` (if any) recorded as applied.
    fn apply_changes(
        &mut self,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        states: &[(TaskId, Option<Timestamp>)],
        revision: Option<u64>,
    ) -> StoreResult<()>;
    /// Firing is held (the clock is behind the last known-good instant), for
    /// `status`.
    fn set_clock_held(&mut self, _held: bool) -> StoreResult<()> {
        Ok(())
    }
    /// The session's last sync, for `status`.
    fn set_last_sync(&mut self, _wall: Timestamp) -> StoreResult<()> {
        Ok(())
    }
    /// The coordinator revoked this agent.
    fn set_revoked(&mut self) -> StoreResult<()> {
        Ok(())
    }
    /// Stores a function's module (its hash checked by the caller). A
    /// module no stored task names is dropped at the next
    /// [`apply_changes`](Self::apply_changes).
    fn put_module(&mut self, hash: ModuleHash, bytes: &[u8]) -> StoreResult<()>;
    /// A stored module's bytes.
    fn module(&self, hash: ModuleHash) -> StoreResult<Option<Vec<u8>>>;
    /// Up to `max` stored modules.
    fn module_hashes(&self, max: usize) -> StoreResult<Vec<ModuleHash>>;
}

/// See [`AgentNode::clock_view`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockView {
    pub vouched: bool,
    pub offset_ms: i64,
    pub held: bool,
}

/// How an action ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    pub detail: Option<String>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

impl Finished {
    pub fn of(outcome: Outcome, exit_code: Option<i32>) -> Finished {
        Finished {
            outcome,
            exit_code,
            detail: None,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
        }
    }
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEffect {
    /// Start the action; report its end with `handle_finished`.
    Spawn { key: RunKey, spec: Action },
    /// Kill the action (its timeout passed); its end is still reported.
    Kill { key: RunKey },
    /// Dial the coordinator, giving up after `timeout_ms`; report with
    /// `handle_connected` / `handle_connect_failed`.
    Connect { timeout_ms: u64 },
    /// Send on the session.
    Transmit(AgentMsg),
    /// End the connection.
    Disconnect,
}

/// Bugs to switch on, to show that the simulator's checks catch them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeededBugs {
    /// Every run is spawned twice.
    pub double_fire: bool,
    /// Records leave the outbox when sent, before the coordinator stored them.
    pub early_ack: bool,
    /// The first task of every load from the store is not held (so it never
    /// fires again).
    pub lose_loaded: bool,
    /// A new boot fires at once on its wall clock, without waiting for the
    /// coordinator to vouch for it (and a vouched correction back does not
    /// rewind the scheduler).
    pub no_vouch_wait: bool,
    /// Every clock sample is applied as it comes, however far it moves time.
    pub trust_every_sample: bool,
    /// Pending retries are kept in memory only.
    pub volatile_retries: bool,
    /// A triggered run is held in memory only, not stored with the end
    /// that triggered it.
    pub lost_trigger: bool,
}

/// The node's settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub agent_id: AgentId,
    pub agent_version: String,
    /// The programs this agent allows, told in Hello (for operators).
    pub allow_exec: Vec<String>,
    /// The environment variables it allows beyond the defaults
    /// (`--allow-env`), told in Hello.
    pub allow_env: Vec<String>,
    pub runs_concurrent_max: usize,
    /// The boot this node starts in (an anchor of another boot is ignored).
    pub boot_id: u64,
    /// Drives the session's jitter.
    pub seed: u64,
    pub bugs: SeededBugs,
    pub horizon: Horizon,
    /// How long firing waits for the coordinator to vouch for the time in
    /// a new boot, ms ([`VOUCH_WAIT_MS`]; 0: not at all).
    pub vouch_wait_ms: i64,
    /// Coordinators the agent dials in turn (several on one store).
    pub coordinators: usize,
    /// Its public sealing key, told in Hello.
    pub seal_key: Option<sundial_protocol::seal::SealPublicKey>,
    /// Whether it runs functions and its ceilings, told in Hello (with the
    /// modules its store holds).
    pub functions: sundial_protocol::wire::FunctionsHello,
}

/// How much of the schedule the node holds in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizon {
    /// Tasks due within this much of now are held, ms.
    pub ms: i64,
    /// At most this many (with more due within `ms`, the horizon shortens).
    pub held_max: usize,
    /// Tasks loaded per store read.
    pub batch: usize,
}

impl Default for Horizon {
    fn default() -> Self {
        Horizon {
            ms: HORIZON_MS,
            held_max: HELD_MAX,
            batch: LOAD_BATCH,
        }
    }
}

/// A whole agent, stepped by its caller.
#[derive(Debug)]
pub struct AgentNode<S: NodeStore> {
    store: S,
    cfg: NodeConfig,
    guard: ClockGuard,
    sched: Scheduler,
    /// Every stored task due at or before this is held by the scheduler.
    loaded: DueKey,
    session: AgentSession,
    running: HashMap<RunKey, Started>,
    manual: HashSet<RunKey>,
    online: bool,
    held: bool,
    cap_told: bool,
    /// Stopping: nothing new fires.
    stopping: bool,
    /// Runs killed because the agent stops.
    killed_for_stop: HashSet<RunKey>,
    last_persisted_good_ms: i64,
    /// Firing waits for a first vouching until this boot-clock reading.
    vouch_wait_until: Option<i64>,
    /// Every occurrence up to this was decided by this node.
    decided_until: Timestamp,
    /// The largest start lateness since the last report, ms.
    late_max_ms: Option<u64>,
    /// How far ahead of an instant its starts may be decided, ms (0: when due).
    start_lead_ms: i64,
    /// A batch decided ahead: spawns and kills held until its instant.
    held_starts: Option<HeldStarts>,
    effects: VecDeque<NodeEffect>,
    events: VecDeque<Event>,
}

/// Starts decided ahead of their instant, with every spawn or kill decided
/// after them (in order), handed out at `at`.
#[derive(Debug)]
struct HeldStarts {
    at: Timestamp,
    effects: Vec<NodeEffect>,
}

/// The session's time: the boot clock, and the raw wall clock (clock
/// samples measure the offset of the wall clock, not of trusted time).
fn now_of(r: Reading) -> Now {
    Now {
        mono_ms: r.boot_ms.max(0) as u64,
        wall: Timestamp::from_millis_saturating(r.wall_ms),
    }
}

impl<S: NodeStore> AgentNode<S> {
    /// Starts an agent on `store` (a restart after a crash included):
    /// runs left marked started are recorded `interrupted`.
    pub fn start(mut store: S, cfg: NodeConfig, r: Reading) -> StoreResult<AgentNode<S>> {
        let cs = store.clock_state()?;
        // The offset is of one boot's wall clock (a reboot may set it anew).
        let vouched = cs.offset_boot == cfg.boot_id;
        let offset = if vouched { cs.offset_ms } else { 0 };
        let mut guard = ClockGuard::new(offset, cs.last_known_good);
        if let Some((boot, anchor)) = cs.anchor {
            if boot == cfg.boot_id {
                guard = guard.with_base(anchor, vouched);
            }
        }
        if cfg.bugs.trust_every_sample {
            guard = guard.trusting_every_sample();
        }
        let vouch_wait_until = (!vouched && cfg.vouch_wait_ms > 0 && !cfg.bugs.no_vouch_wait)
            .then(|| r.boot_ms.saturating_add(cfg.vouch_wait_ms));
        let mut notes = Vec::new();
        let start = guard
            .observe(r, &mut notes)
            .unwrap_or_else(|| guard.time_of(r));
        let interrupted = store.recover_interrupted(cfg.agent_id)?;
        let mut sched = Scheduler::new(start);
        // Nothing held yet: the first wake loads the horizon.
        let loaded = (Timestamp::MIN, TaskId(0));
        sched.set_horizon(loaded);
        // Pending retries are durable, and an interrupted run may be
        // retried: their tasks are held for that.
        let pending = if cfg.bugs.volatile_retries {
            Vec::new()
        } else {
            store.pending_retries()?
        };
        // Triggered tasks are always held, with what fan-ins had heard.
        for (task, due) in store.triggered_tasks()? {
            sched.restore(SchedTask::from(&task), Some(due));
        }
        for (task_id, at, ended) in store.fanin_pending()? {
            sched.restore_fanin(task_id, at, ended);
        }
        let mut ids: Vec<TaskId> = interrupted.iter().map(|r| r.task_id).collect();
        ids.extend(pending.iter().map(|(k, _)| k.task_id));
        ids.sort_unstable();
        ids.dedup();
        let found: std::collections::BTreeMap<TaskId, (SchedTask, Option<Timestamp>)> = store
            .tasks_by_id(&ids)?
            .into_iter()
            .flatten()
            .map(|(t, due)| (t.id, (SchedTask::from(&t), due)))
            .collect();
        for (task, due) in found.values() {
            sched.restore(task.clone(), Some(*due));
        }
        for (key, when) in pending {
            sched.restore_retry(key, when);
        }
        let mut retries = Step::default();
        let mut cmds = Vec::new();
        for rec in &interrupted {
            // A run that is not retried lets its task go from memory if it
            // is beyond the horizon: hold it again for the next one.
            if let Some((task, due)) = found.get(&rec.task_id) {
                sched.restore(task.clone(), Some(*due));
            }
            retries.retries.extend(sched.run_finished(
                rec.key(),
                Outcome::Interrupted,
                start,
                &mut cmds,
            ));
        }
        follow_ups(&mut retries, cmds, cfg.agent_id, false, cfg.bugs);
        if retries != Step::default() {
            store.apply_step(&retries)?;
        }
        let mut session = AgentSession::new(cfg.seed);
        session.set_coordinators(cfg.coordinators);
        session.set_place(cfg.agent_id.0);
        let mut node = AgentNode {
            store,
            cfg,
            guard,
            sched,
            loaded,
            session,
            running: HashMap::new(),
            manual: HashSet::new(),
            online: false,
            held: false,
            cap_told: false,
            stopping: false,
            killed_for_stop: HashSet::new(),
            last_persisted_good_ms: i64::MIN,
            vouch_wait_until,
            decided_until: Timestamp::MIN,
            late_max_ms: None,
            start_lead_ms: 0,
            held_starts: None,
            effects: VecDeque::new(),
            events: VecDeque::new(),
        };
        for n in notes {
            node.events.push_back(Event::Clock(n));
        }
        for rec in interrupted {
            node.events.push_back(Event::RunRecorded {
                key: rec.key(),
                outcome: Outcome::Interrupted,
            });
        }
        node.persist_clock(true)?;
        // The tasks due soon are loaded as part of starting.
        node.refill(start)?;
        node.pump(r)?;
        Ok(node)
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Gives the store back (the node stops, or crashes).
    pub fn into_store(self) -> S {
        self.store
    }

    pub fn poll_effect(&mut self) -> Option<NodeEffect> {
        self.effects.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// The time up to which this node has decided every occurrence
    /// (started, skipped or refused); before its first step, the start of time.
    pub fn decided_until(&self) -> Timestamp {
        self.decided_until
    }

    /// The clock as the node holds it: vouched for by a coordinator in this
    /// boot, the offset it applies to the wall clock, and whether firing is
    /// held (the clock went back behind the last known-good instant).
    pub fn clock_view(&self) -> ClockView {
        ClockView {
            vouched: self.guard.is_vouched(),
            offset_ms: self.guard.offset_ms(),
            held: self.held,
        }
    }

    /// Tasks held in memory (those due within the horizon, and those with
    /// a run or a retry in progress).
    pub fn tasks_held(&self) -> usize {
        self.sched.task_count()
    }

    /// Computes the following occurrences of the tasks just started; call
    /// it after carrying out the effects of a wake (it only saves time at
    /// the next start, so it may be skipped).
    pub fn precompute(&mut self) {
        self.sched.precompute();
    }

    /// Loads the tasks due within the horizon that are not held yet.
    fn refill(&mut self, now: Timestamp) -> StoreResult<()> {
        let h = self.cfg.horizon;
        let until = now.saturating_add_ms(h.ms.max(1));
        while self.loaded.0 < now.saturating_add_ms(h.ms / 2) {
            let room = h.held_max.saturating_sub(self.sched.task_count());
            // Full: wait for held tasks to fire, unless some are due by now.
            if room == 0 && self.loaded.0 > now {
                return Ok(());
            }
            let want = room.clamp(1, h.batch.max(1));
            let batch = self.store.due_tasks(Some(self.loaded), until, want)?;
            let full = batch.len() == want;
            self.loaded = match batch.last() {
                Some((t, due)) if full => (*due, t.id),
                _ => (until, TaskId(u64::MAX)),
            };
            self.sched.set_horizon(self.loaded);
            let lost = usize::from(self.cfg.bugs.lose_loaded);
            for (task, due) in batch.iter().skip(lost) {
                self.sched.restore(SchedTask::from(task), Some(Some(*due)));
            }
            if !full || room <= want {
                return Ok(());
            }
        }
        Ok(())
    }

    /// The trusted time at reading `r`.
    pub fn time_of(&self, r: Reading) -> Timestamp {
        self.guard.time_of(r)
    }

    /// When to call [`handle_wake`](Self::handle_wake) next, on the boot clock (ms).
    pub fn next_wake(&self, r: Reading) -> i64 {
        let now = self.guard.time_of(r);
        // The horizon's end, when it is short (many tasks due soon).
        let due = match self.sched.next_wake() {
            Some(w) => w.min(self.loaded.0),
            None => self.loaded.0,
        };
        // A stopping (or revoked) node fires nothing: what is due would
        // stay due, and waking for it would spin.
        let sched = if self.stopping {
            WAKE_INTERVAL_MAX_MS
        } else {
            let until = due.millis_since(now);
            // Starts decided ahead: woken the lead before them, though not
            // before a batch already held is handed out.
            let until = match &self.held_starts {
                Some(h) => (until - self.start_lead_ms).max(h.at.millis_since(now)),
                None => until - self.start_lead_ms,
            };
            until.clamp(0, WAKE_INTERVAL_MAX_MS)
        };
        let mut wake = r.boot_ms + sched;
        if let Some(h) = &self.held_starts {
            wake = wake.min(r.boot_ms + h.at.millis_since(now).max(0));
        }
        if let Some(t) = self.vouch_wait_until {
            wake = wake.min(t);
        }
        if let Some(t) = self.session.poll_timeout() {
            wake = wake.min(t as i64);
        }
        wake.max(r.boot_ms)
    }

    /// One turn: read the clocks, fire what is due, run the session's timers.
    pub fn handle_wake(&mut self, r: Reading) -> StoreResult<()> {
        let mut notes = Vec::new();
        let now = self.guard.observe(r, &mut notes);
        for n in notes {
            self.events.push_back(Event::Clock(n));
        }
        if now.is_none() != self.held {
            self.held = now.is_none();
            self.store.set_clock_held(self.held)?;
        }
        if self.vouch_wait_until.is_some_and(|t| r.boot_ms >= t) {
            self.end_vouch_wait(r, false);
        }
        if let Some(now) = now {
            if !self.stopping && self.vouch_wait_until.is_none() {
                // Load and fire until every task due by now was held (more
                // than the horizon holds may be due after a long stop), at
                // most WAKE_ROUNDS_MAX rounds a wake: `next_wake` is then
                // now, and the next wake goes on.
                for _ in 0..WAKE_ROUNDS_MAX {
                    self.refill(now)?;
                    let mut cmds = Vec::new();
                    self.sched.advance(now, &mut cmds);
                    self.decided_until = self.sched.now();
                    self.apply(now, cmds)?;
                    if self.loaded.0 > now {
                        break;
                    }
                }
            }
            if self.held_starts.as_ref().is_some_and(|h| h.at <= now) {
                self.release_starts();
            }
            if !self.stopping && self.vouch_wait_until.is_none() {
                self.decide_ahead(now)?;
            }
            self.persist_clock(false)?;
        }
        self.session.handle_timeout(now_of(r));
        self.pump(r)
    }

    /// Lets the node decide an instant's starts up to `ms` before it (0,
    /// the default: when due). The shell hands a held batch out at its
    /// instant with [`release_starts`](Self::release_starts) (or at the
    /// first [`handle_wake`](Self::handle_wake) at or after it).
    pub fn set_start_lead(&mut self, ms: i64) {
        self.start_lead_ms = ms.clamp(0, START_LEAD_MAX_MS);
    }

    /// The instant a batch decided ahead waits for, if one does.
    pub fn held_until(&self) -> Option<Timestamp> {
        self.held_starts.as_ref().map(|h| h.at)
    }

    /// Hands the batch decided ahead out (its instant came): its spawns and
    /// kills, in order, come out of [`poll_effect`](Self::poll_effect).
    pub fn release_starts(&mut self) {
        if let Some(h) = self.held_starts.take() {
            self.effects.extend(h.effects);
        }
    }

    /// Decides the next instant's starts if it is within the lead: their
    /// marks are committed now, their spawns held until the instant.
    fn decide_ahead(&mut self, now: Timestamp) -> StoreResult<()> {
        if self.start_lead_ms == 0 || self.held_starts.is_some() {
            return Ok(());
        }
        let Some(at) = self.sched.next_wake() else {
            return Ok(());
        };
        if at <= now || at.millis_since(now) > self.start_lead_ms {
            return Ok(());
        }
        self.refill(at)?;
        if self.loaded.0 < at {
            // More is due by then than the horizon holds: decide when due.
            return Ok(());
        }
        self.held_starts = Some(HeldStarts {
            at,
            effects: Vec::new(),
        });
        let mut cmds = Vec::new();
        self.sched.advance(at, &mut cmds);
        self.decided_until = self.sched.now();
        self.apply(at, cmds)?;
        if self
            .held_starts
            .as_ref()
            .is_some_and(|h| h.effects.is_empty())
        {
            self.held_starts = None;
        }
        Ok(())
    }

    /// A spawn or a kill: out now, or behind a batch held for its instant
    /// (a kill must not overtake the spawn it ends).
    fn act(&mut self, effect: NodeEffect) {
        match &mut self.held_starts {
            Some(h) => h.effects.push(effect),
            None => self.effects.push_back(effect),
        }
    }

    /// An action ended.
    pub fn handle_finished(&mut self, r: Reading, key: RunKey, end: Finished) -> StoreResult<()> {
        let Some(run) = self.running.remove(&key) else {
            return Ok(());
        };
        let now = self.guard.time_of(r).max(run.fired_at);
        let mut record = RunRecord {
            task_id: key.task_id,
            agent_id: self.cfg.agent_id,
            scheduled_at: key.scheduled_at,
            attempt: key.attempt,
            fired_at: Some(run.fired_at),
            finished_at: Some(now),
            outcome: end.outcome,
            exit_code: end.exit_code,
            offline: run.offline,
            detail: end.detail,
            stdout_tail: end.stdout_tail,
            stderr_tail: end.stderr_tail,
        };
        if self.killed_for_stop.remove(&key) {
            record.outcome = Outcome::Interrupted;
            record.exit_code = None;
            record.detail = Some(STOPPED_DETAIL.to_owned());
        }
        let told = if self.manual.remove(&key) {
            Some(MANUAL_DETAIL.to_owned())
        } else {
            self.sched
                .trigger_text(key.task_id)
                .map(|t| format!("triggered after {t}"))
        };
        if let Some(told) = told {
            record.detail = Some(match record.why() {
                Some(why) => format!("{told}; {why}"),
                None => told,
            });
        }
        let outcome = record.outcome;
        // The retry waits from now on trusted time (a run that started
        // before a correction back must not wait for its old clock).
        let mut cmds = Vec::new();
        let retry = self
            .sched
            .run_finished(key, outcome, self.guard.time_of(r), &mut cmds);
        let mut then = Step::default();
        then.retries
            .extend(retry.filter(|_| !self.cfg.bugs.volatile_retries));
        follow_ups(
            &mut then,
            cmds,
            self.cfg.agent_id,
            run.offline,
            self.cfg.bugs,
        );
        self.store.finish_run(&record, &then)?;
        self.events.push_back(Event::RunRecorded { key, outcome });
        self.session.outbox_changed();
        self.pump(r)
    }

    /// Persists the clock state now (the agent stops).
    pub fn persist_clock_now(&mut self) -> StoreResult<()> {
        self.persist_clock(true)
    }

    /// The agent is stopping: nothing new fires; running actions may finish.
    pub fn begin_stop(&mut self) {
        self.stopping = true;
    }

    /// The stop grace is over: kills every running action; their records
    /// say `interrupted`, as they end.
    pub fn kill_all_for_stop(&mut self) {
        let mut keys: Vec<RunKey> = self.running.keys().copied().collect();
        keys.sort_unstable();
        for key in keys {
            if self.killed_for_stop.insert(key) {
                self.act(NodeEffect::Kill { key });
            }
        }
    }

    pub fn handle_connected(&mut self, r: Reading) -> StoreResult<()> {
        let hello = HelloInfo {
            last_revision: self.store.last_revision()?,
            outbox_len: self.store.outbox_len()?,
            agent_version: self.cfg.agent_version.clone(),
            allow_exec: self.cfg.allow_exec.clone(),
            allow_env: self.cfg.allow_env.clone(),
            seal_key: self.cfg.seal_key,
            functions: Some(sundial_protocol::wire::FunctionsHello {
                modules: self
                    .store
                    .module_hashes(sundial_protocol::wire::HELLO_MODULES_MAX)?,
                ..self.cfg.functions.clone()
            }),
        };
        self.session.handle_connected(now_of(r), hello);
        // A boot whose time was never vouched for: hold firing until the
        // session's first clock sample (moments away) says what time it is.
        if !self.guard.is_vouched()
            && self.vouch_wait_until.is_none()
            && self.cfg.vouch_wait_ms > 0
            && !self.cfg.bugs.no_vouch_wait
        {
            self.vouch_wait_until = Some(r.boot_ms.saturating_add(self.cfg.vouch_wait_ms));
        }
        self.pump(r)
    }

    pub fn handle_connect_failed(&mut self, r: Reading, closed: Closed) -> StoreResult<()> {
        self.end_vouch_wait(r, true);
        self.session.handle_connect_failed(now_of(r), closed);
        self.pump(r)
    }

    pub fn handle_closed(&mut self, r: Reading, closed: Closed) -> StoreResult<()> {
        self.end_vouch_wait(r, true);
        self.session.handle_closed(now_of(r), closed);
        self.pump(r)
    }

    /// Whether firing waits for the coordinator to vouch for the time (a
    /// new boot, not vouched yet).
    pub fn awaits_vouching(&self) -> bool {
        self.vouch_wait_until.is_some()
    }

    /// Firing stops waiting for a vouching that has not come: it goes on by
    /// the wall clock, the best clock this boot has.
    fn end_vouch_wait(&mut self, r: Reading, unreachable: bool) {
        if let Some(until) = self.vouch_wait_until.take() {
            if self.guard.is_vouched() {
                return;
            }
            let waited_ms = r.boot_ms - (until - self.cfg.vouch_wait_ms);
            self.events.push_back(Event::ClockUnvouched {
                waited_ms,
                unreachable,
            });
        }
    }

    /// Packets arrived on the connection.
    pub fn handle_heard(&mut self, r: Reading) -> StoreResult<()> {
        self.session.handle_heard(now_of(r));
        self.pump(r)
    }

    pub fn handle_message(&mut self, r: Reading, msg: CoordMsg) -> StoreResult<()> {
        // Clock samples use the raw wall clock, as the coordinator's offset
        // is to it.
        let raw = Now {
            mono_ms: r.boot_ms.max(0) as u64,
            wall: Timestamp::from_millis_saturating(r.wall_ms),
        };
        self.session.handle_message(raw, msg);
        self.pump(r)
    }

    fn persist_clock(&mut self, force: bool) -> StoreResult<()> {
        let Some(good) = self.guard.last_known_good() else {
            return Ok(());
        };
        let ms = good.as_millis();
        if !force && ms.saturating_sub(self.last_persisted_good_ms) < KNOWN_GOOD_PERSIST_MS {
            return Ok(());
        }
        let anchor = match self.guard.base() {
            Some(a) => Some((self.cfg.boot_id, a)),
            None => self.store.clock_state()?.anchor,
        };
        let offset_boot = if self.guard.is_vouched() {
            self.cfg.boot_id
        } else {
            self.store.clock_state()?.offset_boot
        };
        self.store.set_clock_state(&ClockState {
            offset_ms: self.guard.offset_ms(),
            offset_boot,
            last_known_good: Some(good),
            anchor,
        })?;
        self.last_persisted_good_ms = ms;
        Ok(())
    }

    /// The agent's figures for the coordinator.
    fn report(&mut self) -> StoreResult<AgentReport> {
        let outbox_len = self.store.outbox_len()?;
        Ok(AgentReport {
            outbox_len,
            oldest_unsynced: if outbox_len == 0 {
                None
            } else {
                self.store.outbox_oldest()?
            },
            applied_revision: self.store.last_revision()?,
            tasks_held: self.store.task_count()?,
            running: u32::try_from(self.running.len()).unwrap_or(u32::MAX),
            store_bytes: self.store.size_bytes(),
            clock_vouched: self.clock_view().vouched,
            clock_offset_ms: self.clock_view().offset_ms,
            clock_held: self.clock_view().held,
            late_max_ms: self.late_max_ms.take(),
        })
    }

    /// Carries out what the session asks, until it has nothing more.
    fn pump(&mut self, r: Reading) -> StoreResult<()> {
        loop {
            let mut busy = false;
            while let Some(effect) = self.session.poll_effect() {
                busy = true;
                self.session_effect(r, effect)?;
            }
            while let Some(msg) = self.session.poll_transmit() {
                busy = true;
                if self.cfg.bugs.early_ack {
                    if let AgentMsg::Results { runs, .. } = &msg {
                        let keys: Vec<RunKey> = runs.iter().map(RunRecord::key).collect();
                        self.store.outbox_ack(&keys)?;
                    }
                }
                self.effects.push_back(NodeEffect::Transmit(msg));
            }
            while let Some(e) = self.session.poll_event() {
                self.events.push_back(e);
            }
            if !busy {
                return Ok(());
            }
        }
    }

    fn session_effect(&mut self, r: Reading, effect: AgentEffect) -> StoreResult<()> {
        let now = self.guard.time_of(r).max(self.sched.now());
        match effect {
            AgentEffect::Connect { timeout_ms } => {
                self.effects.push_back(NodeEffect::Connect { timeout_ms })
            }
            AgentEffect::Disconnect => {
                self.effects.push_back(NodeEffect::Disconnect);
                self.session.handle_closed(now_of(r), Closed::Lost);
            }
            AgentEffect::ReadOutbox {
                after,
                runs_max,
                bytes_max,
            } => {
                let batch = self.store.outbox_after(after, runs_max, bytes_max)?;
                self.session.handle_outbox(now_of(r), batch);
            }
            AgentEffect::StoreModule { hash, bytes } => self.store.put_module(hash, &bytes)?,
            AgentEffect::Apply {
                changes,
                upto_revision,
            } => {
                // One page of changes: removals, then every upsert with the
                // revision in one transaction (a crash in between leaves
                // the old revision, and the page is sent again).
                let mut upserts = Vec::new();
                let mut removed = Vec::new();
                for change in changes {
                    match change {
                        AssignmentChange::Upsert(task) => upserts.push(*task),
                        AssignmentChange::Cancel { task_id, .. } => removed.push(task_id),
                    }
                }
                let revision =
                    (upto_revision > self.store.last_revision()?).then_some(upto_revision);
                // A changed task keeps its place unless its schedule
                // changed: the old one is loaded if it is not held.
                let absent: Vec<TaskId> = upserts
                    .iter()
                    .map(|t| t.id)
                    .filter(|id| !self.sched.contains(*id))
                    .collect();
                if !absent.is_empty() {
                    for (old, due) in self.store.tasks_by_id(&absent)?.into_iter().flatten() {
                        self.sched.restore(SchedTask::from(&old), Some(due));
                    }
                }
                let mut cmds = Vec::new();
                for task in &upserts {
                    self.sched.upsert(SchedTask::from(task), &mut cmds);
                }
                let states: Vec<(TaskId, Option<Timestamp>)> = cmds
                    .into_iter()
                    .filter_map(|c| match c {
                        Command::SaveState { task_id, next_due } => Some((task_id, next_due)),
                        _ => None,
                    })
                    .collect();
                self.store
                    .apply_changes(&upserts, &removed, &states, revision)?;
                for task_id in removed {
                    self.sched.remove(task_id);
                    self.events.push_back(Event::TaskRemoved { task_id });
                }
                for task in &upserts {
                    self.events.push_back(Event::TaskAssigned {
                        task_id: task.id,
                        revision: task.revision,
                    });
                }
            }
            AgentEffect::Ack { keys } => {
                if !self.cfg.bugs.early_ack {
                    self.store.outbox_ack(&keys)?;
                }
            }
            AgentEffect::Clock { offset_ms, rtt_ms } => {
                if rtt_ms > crate::session::agent::CLOCK_SAMPLE_RTT_MAX_MS
                    && self.guard.is_vouched()
                {
                    // Too slow to be worth more than what we have.
                    return Ok(());
                }
                let was_ahead = self.guard.ahead_ms();
                match self.guard.vouch(offset_ms, r) {
                    Vouch::Applied {
                        at,
                        moved_ms,
                        confirmed,
                    } => {
                        self.vouch_wait_until = None;
                        // Time went back: the scheduler goes back with it,
                        // so what was not decided yet fires at its time
                        // instead of when the wrong time comes round again.
                        let decided_until = self.sched.now();
                        let rewound = at.millis_since(decided_until) < -JUMP_THRESHOLD_MS
                            && !self.cfg.bugs.no_vouch_wait;
                        if rewound {
                            self.sched.rewind(at);
                            self.decided_until = self.decided_until.min(at);
                        }
                        self.events.push_back(Event::ClockVouched {
                            offset_ms,
                            rtt_ms,
                            was_ahead_ms: was_ahead,
                            moved_ms,
                            confirmed,
                            rewound_from: rewound.then_some(decided_until),
                            at,
                        });
                        self.persist_clock(true)?;
                    }
                    Vouch::Disputed { by_ms, samples } => {
                        self.events
                            .push_back(Event::Clock(ClockNote::Disputed { by_ms, samples }));
                    }
                }
            }
            AgentEffect::RunNow { task_id, at } => {
                if !self.sched.contains(task_id) {
                    if let Some(Some((task, due))) =
                        self.store.tasks_by_id(&[task_id])?.into_iter().next()
                    {
                        self.sched.restore(SchedTask::from(&task), Some(due));
                    }
                }
                if self.sched.contains(task_id) {
                    let key = RunKey {
                        task_id,
                        scheduled_at: at,
                        attempt: 1,
                    };
                    self.manual.insert(key);
                    let mut cmds = Vec::new();
                    self.sched.run_now(key, &mut cmds);
                    self.apply(now, cmds)?;
                }
            }
            AgentEffect::Online(online) => self.online = online,
            AgentEffect::PersistLastSync { wall } => self.store.set_last_sync(wall)?,
            AgentEffect::Report => {
                let report = self.report()?;
                self.session.handle_report(now_of(r), report);
            }
            AgentEffect::Revoked => {
                // Retired by its coordinator: nothing new fires, so the
                // outbox (which can never be sent) grows no more; runs going
                // finish and are recorded.
                self.store.set_revoked()?;
                self.stopping = true;
            }
        }
        Ok(())
    }

    /// Carries out the scheduler's commands: one atomic write, then spawns.
    fn apply(&mut self, now: Timestamp, cmds: Vec<Command>) -> StoreResult<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        let offline = !self.online;
        if self.running.len() < self.cfg.runs_concurrent_max {
            self.cap_told = false;
        }
        let mut step = Step::default();
        let mut starts = Vec::new();
        let mut kills = Vec::new();
        let mut queue: VecDeque<Command> = cmds.into();
        while let Some(c) = queue.pop_front() {
            match c {
                Command::SaveState { task_id, next_due } => step.states.push((task_id, next_due)),
                Command::Start { key, .. }
                    if self.running.len() + starts.len() >= self.cfg.runs_concurrent_max =>
                {
                    if !self.cap_told {
                        self.cap_told = true;
                        self.events.push_back(Event::ConcurrencyCap {
                            max: self.cfg.runs_concurrent_max,
                            task_id: key.task_id,
                        });
                    }
                    step.records.push(skipped(
                        key,
                        self.cfg.agent_id,
                        offline,
                        SkipReason::ConcurrencyCap,
                    ));
                    // Skipped is an end: what it triggers is decided in
                    // the same step.
                    let mut more = Vec::new();
                    self.sched
                        .run_finished(key, Outcome::Skipped, now, &mut more);
                    queue.extend(more);
                }
                Command::Start { key, .. } => {
                    step.started.push((
                        key,
                        Started {
                            fired_at: now,
                            offline,
                        },
                    ));
                    starts.push(key);
                }
                Command::Skip { key, reason } => {
                    step.records
                        .push(skipped(key, self.cfg.agent_id, offline, reason))
                }
                Command::Kill { key } => kills.push(key),
                c @ (Command::Trigger { .. } | Command::FanIn { .. }) => follow_ups(
                    &mut step,
                    vec![c],
                    self.cfg.agent_id,
                    offline,
                    self.cfg.bugs,
                ),
            }
        }
        // Not durable, so not started: at most once wins over on time.
        self.store.apply_step(&step)?;
        let recorded = !step.records.is_empty();
        // Each action is read from the store as it fires.
        let ids: Vec<TaskId> = starts.iter().map(|k| k.task_id).collect();
        let specs = if ids.is_empty() {
            Vec::new()
        } else {
            self.store.tasks_by_id(&ids)?
        };
        for (i, key) in starts.into_iter().enumerate() {
            let spec = specs.get(i).cloned().flatten().map(|(task, _)| {
                let mut spec = task.action;
                // A sharded task's run is told its seat in its window.
                if let Some(p) = &task.placement {
                    if let Decision::Mine {
                        shard: Some((index, count)),
                        ..
                    } = p.decide_seated(task.id, key.scheduled_at)
                    {
                        let env = spec.env_mut();
                        env.push(("SUNDIAL_SHARD_INDEX".into(), index.to_string()));
                        env.push(("SUNDIAL_SHARD_COUNT".into(), count.to_string()));
                    }
                }
                spec
            });
            self.running.insert(
                key,
                Started {
                    fired_at: now,
                    offline,
                },
            );
            match spec {
                Some(spec) => {
                    let late = u64::try_from(now.millis_since(key.scheduled_at)).unwrap_or(0);
                    self.late_max_ms = Some(self.late_max_ms.map_or(late, |m| m.max(late)));
                    self.events.push_back(Event::RunFired { key, offline });
                    if self.cfg.bugs.double_fire {
                        self.act(NodeEffect::Spawn {
                            key,
                            spec: spec.clone(),
                        });
                    }
                    self.act(NodeEffect::Spawn { key, spec });
                }
                None => {
                    // Unknown action: recorded rejected at once.
                    self.running.remove(&key);
                    let rec = RunRecord {
                        outcome: Outcome::Rejected,
                        fired_at: Some(now),
                        finished_at: Some(now),
                        detail: Some("the task's action is unknown to this agent".into()),
                        ..skipped(key, self.cfg.agent_id, offline, SkipReason::Overlap)
                    };
                    let mut cmds = Vec::new();
                    let retry = self
                        .sched
                        .run_finished(key, Outcome::Rejected, now, &mut cmds);
                    let mut then = Step::default();
                    then.retries.extend(retry);
                    follow_ups(&mut then, cmds, self.cfg.agent_id, offline, self.cfg.bugs);
                    self.store.finish_run(&rec, &then)?;
                }
            }
        }
        for key in kills {
            if self.running.contains_key(&key) {
                self.act(NodeEffect::Kill { key });
            }
        }
        if recorded {
            self.session.outbox_changed();
        }
        Ok(())
    }
}

fn skipped(key: RunKey, agent_id: AgentId, offline: bool, reason: SkipReason) -> RunRecord {
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
        detail: Some(reason.detail()),
        stdout_tail: Vec::new(),
        stderr_tail: Vec::new(),
    }
}

/// Adds what an end decided beyond its own record (the runs it triggers,
/// fan-in progress, the tasks it left untriggered) to `step`.
fn follow_ups(
    step: &mut Step,
    cmds: Vec<Command>,
    agent_id: AgentId,
    offline: bool,
    bugs: SeededBugs,
) {
    for c in cmds {
        match c {
            Command::Trigger { key, at } => {
                if !bugs.lost_trigger {
                    step.retries.push((key, at))
                }
            }
            Command::FanIn {
                task_id,
                scheduled_at,
                ended,
            } => step.fanin.push((task_id, scheduled_at, ended)),
            Command::Skip { key, reason } => {
                step.records.push(skipped(key, agent_id, offline, reason))
            }
            // An end decides no starts, kills or schedule states.
            Command::Start { .. } | Command::Kill { .. } | Command::SaveState { .. } => {
                debug_assert!(false, "an end decided {c:?}");
            }
        }
    }
}
