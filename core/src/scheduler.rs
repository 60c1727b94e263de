//! The agent's scheduler: decides which occurrences start when.
//!
//! A deterministic state machine in the manner of `quinn-proto`: no clock, no
//! I/O, no threads. Inputs arrive through [`Scheduler::advance`] (time has
//! reached `now`), [`Scheduler::run_finished`], [`Scheduler::upsert`] and
//! [`Scheduler::remove`]; outputs are [`Command`]s that the caller carries
//! out in order: persist first (in one transaction), then spawn or kill.
//!
//! Every task holds one timer in a [`TimerWheel`] for its next occurrence;
//! retries and timeouts hold timers of their own. When an occurrence is due
//! the scheduler sorts what is due into on-time (late by at most the misfire
//! grace) and missed, applies the misfire policy to the missed ones, and the
//! overlap policy to each start.
//!
//! Invariants:
//! - An occurrence is started at most once per attempt: a task's `next_due`
//!   moves past every occurrence it has decided on, in the same step whose
//!   commands carry the decision.
//! - Time never goes backwards here on its own: an `advance` with an earlier
//!   `now` than seen before decides nothing (a wall clock stepped back fires
//!   nothing early). Only [`Scheduler::rewind`] moves it back (a vouched
//!   correction), and it never moves a task's `next_due` back.
//! - Work per step is bounded: at most [`MISFIRE_SCAN_MAX`] occurrences are
//!   enumerated per task and at most [`MISFIRE_RECORDS_MAX`] skipped records
//!   emitted, so no length of downtime stalls a schedule.
//!
//! Two things keep it small and quick with very many tasks:
//! - **The horizon.** With [`Scheduler::set_horizon`], only tasks due at or
//!   before the horizon (a `(due, task)` key: the caller loads tasks from its
//!   store in that order) are held; a task whose next occurrence moves past
//!   it is dropped from memory (unless a run or a retry of it is pending) and
//!   loaded again by the caller when the horizon reaches it.
//! - **Hand-out first.** Each held task caches the occurrence after its next
//!   one. When a task is due on time and that following occurrence is known
//!   to be in the future, `advance` starts it without computing anything: its
//!   `next_due` moves to the cached occurrence (in the same commands, so the
//!   same transaction, as the start). The following occurrences of the tasks
//!   just started are computed by [`Scheduler::precompute`], which the driver
//!   calls after it has handed the batch out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use sundial_protocol::placement::{Decision, Placement};
use sundial_protocol::policy::{MisfireMode, OverlapPolicy, Policies};
use sundial_protocol::{Outcome, RunKey, Schedule, TaskId, TaskSpec, Timestamp};

use crate::wheel::{TimerHandle, TimerWheel};

/// The most missed occurrences enumerated for one task in one step; beyond
/// it the schedule jumps to the present and the rest are counted as unknown.
pub const MISFIRE_SCAN_MAX: usize = 100_000;
/// The most `skipped` records emitted for one task in one catch-up (the most
/// recent ones are kept).
pub const MISFIRE_RECORDS_MAX: usize = 1_000;
/// The most occurrences one fan-in task waits on at once (some of its
/// upstreams ended, not all); beyond it the oldest is given up, recorded
/// `skipped` naming the upstream that never ended.
pub const FANIN_OPEN_MAX: usize = 64;
/// The most downstream ends one run's end may decide in one step (a chain
/// of skips through a DAG); a cycle sent by a faulty coordinator stops here.
pub const TRIGGER_STEPS_MAX: usize = 4_096;

/// What the scheduler needs to know of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedTask {
    pub id: TaskId,
    pub schedule: Schedule,
    pub policies: Policies,
    pub created_at: Timestamp,
    /// Its lease windows as this agent was sent them (only its own seat):
    /// it fires only the occurrences they give it.
    pub placement: Option<Arc<Placement>>,
}

impl From<&TaskSpec> for SchedTask {
    fn from(t: &TaskSpec) -> Self {
        SchedTask {
            id: t.id,
            schedule: t.schedule.clone(),
            policies: t.policies,
            created_at: t.created_at,
            placement: t.placement.clone().map(Arc::new),
        }
    }
}

/// Why an occurrence was not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Missed while the agent was down or held, and the misfire policy says skip.
    Misfire,
    /// A run of the same task was still going and overlap is `forbid`.
    Overlap,
    /// The agent already ran its maximum of runs at once (decided by the
    /// runtime, which knows the cap).
    ConcurrencyCap,
    /// A triggered task's upstream ended otherwise than it waits for
    /// (`outcome`), or never ended for this occurrence (`None`: given up
    /// after [`FANIN_OPEN_MAX`] later occurrences).
    Untriggered {
        upstream: TaskId,
        outcome: Option<Outcome>,
    },
    /// A placed task's occurrence this agent held, missed until its lease
    /// window had ended (by more than the misfire grace): the agent was
    /// down, or the window reached it late (no member was in session).
    LeaseEnded,
}

impl SkipReason {
    /// The record's `detail`.
    pub fn detail(self) -> String {
        match self {
            SkipReason::Misfire => "misfire: missed while the agent was down".into(),
            SkipReason::Overlap => "overlap: a previous run was still going".into(),
            SkipReason::ConcurrencyCap => {
                "concurrency: the agent was already running its maximum of runs at once (--max-concurrent-runs)".into()
            }
            SkipReason::Untriggered {
                upstream,
                outcome: Some(o),
            } => format!("not triggered: upstream {upstream} ended {o}"),
            SkipReason::LeaseEnded => {
                "lease ended: its lease window had ended before this agent could run it (the agent was down or cut off, or no member held the lease in time)".into()
            }
            SkipReason::Untriggered {
                upstream,
                outcome: None,
            } => format!(
                "not triggered: upstream {upstream} never ended for this occurrence \
                 (given up after {FANIN_OPEN_MAX} later ones)"
            ),
        }
    }
}

/// What the caller must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Record the run as started (durably), then spawn it.
    Start {
        key: RunKey,
        timeout_at: Option<Timestamp>,
    },
    /// Record a `skipped` run.
    Skip { key: RunKey, reason: SkipReason },
    /// Kill a running run: its timeout has passed.
    Kill { key: RunKey },
    /// Persist the task's next due occurrence (`None`: no more occurrences).
    SaveState {
        task_id: TaskId,
        next_due: Option<Timestamp>,
    },
    /// A triggered run is pending from `at`: persist it with the end that
    /// triggered it (stored and restored as a pending retry is).
    Trigger { key: RunKey, at: Timestamp },
    /// Persist what a fan-in task has heard of one occurrence: the
    /// upstreams that ended, and how (empty: the occurrence is decided,
    /// forget it).
    FanIn {
        task_id: TaskId,
        scheduled_at: Timestamp,
        ended: Vec<(TaskId, Outcome)>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Due(TaskId),
    Retry(u64),
    Timeout(u64),
}

/// A place in due order: tasks are loaded from a store by (next due, id).
pub type DueKey = (Timestamp, TaskId);

#[derive(Debug)]
struct TaskEntry {
    task: SchedTask,
    next_due: Option<Timestamp>,
    /// The occurrence after `next_due`, when computed (`Some(None)`: none).
    after_next: Option<Option<Timestamp>>,
    timer: Option<TimerHandle>,
    running: u32,
    /// Retries of this task waiting for their time.
    retries: u32,
}

#[derive(Debug)]
struct RunningRun {
    timeout: Option<(TimerHandle, u64)>,
}

/// The scheduler; see the module doc.
#[derive(Debug)]
pub struct Scheduler {
    now: Timestamp,
    wheel: TimerWheel<Timer>,
    tasks: HashMap<TaskId, TaskEntry>,
    running: HashMap<RunKey, RunningRun>,
    retries: HashMap<u64, (RunKey, TimerHandle)>,
    timeouts: HashMap<u64, RunKey>,
    next_token: u64,
    /// Tasks due after this are not held (`None`: every task is held).
    horizon: Option<DueKey>,
    /// Tasks whose following occurrence is to be computed.
    pending_after: Vec<TaskId>,
    /// Triggered tasks by upstream.
    downstream: HashMap<TaskId, Vec<TaskId>>,
    /// Fan-in occurrences some upstreams of which have ended.
    fanin: BTreeMap<(TaskId, Timestamp), Vec<(TaskId, Outcome)>>,
}

fn tick(t: Timestamp) -> u64 {
    // Invariant: every Timestamp is >= Timestamp::MIN.
    (t.as_millis() - Timestamp::MIN.as_millis()) as u64
}

fn untick(t: u64) -> Timestamp {
    Timestamp::from_millis_saturating((t as i64).saturating_add(Timestamp::MIN.as_millis()))
}

impl Scheduler {
    /// An empty scheduler whose time starts at `now`.
    pub fn new(now: Timestamp) -> Scheduler {
        Scheduler {
            now,
            wheel: TimerWheel::new(tick(now)),
            tasks: HashMap::new(),
            running: HashMap::new(),
            retries: HashMap::new(),
            timeouts: HashMap::new(),
            next_token: 0,
            horizon: None,
            pending_after: Vec::new(),
            downstream: HashMap::new(),
            fanin: BTreeMap::new(),
        }
    }

    /// Holds only tasks due at or before `horizon` (and those with a run or
    /// a retry pending); the caller promises every other task it stores is
    /// due after it, and loads them with [`restore`](Self::restore) as it
    /// moves the horizon on. Tasks already held beyond it are dropped.
    pub fn set_horizon(&mut self, horizon: DueKey) {
        let forward = self.horizon.is_some_and(|h| h <= horizon);
        self.horizon = Some(horizon);
        if forward {
            return;
        }
        let beyond: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(id, e)| !self.within(**id, e))
            .map(|(id, _)| *id)
            .collect();
        for id in beyond {
            self.remove(id);
        }
    }

    /// The horizon, if one is set.
    pub fn horizon(&self) -> Option<DueKey> {
        self.horizon
    }

    /// Whether a task is held in memory.
    pub fn contains(&self, id: TaskId) -> bool {
        self.tasks.contains_key(&id)
    }

    fn within(&self, id: TaskId, e: &TaskEntry) -> bool {
        let Some(h) = self.horizon else {
            return true;
        };
        // Triggered tasks are always held: their occurrences come from
        // other tasks' ends, not from the due index.
        e.running > 0
            || e.retries > 0
            || e.next_due.is_some_and(|t| (t, id) <= h)
            || !e.task.schedule.triggers().is_empty()
    }

    /// Drops a task from memory if it is now beyond the horizon.
    fn settle(&mut self, id: TaskId) {
        if let Some(e) = self.tasks.get(&id) {
            if !self.within(id, e) {
                self.remove(id);
            }
        }
    }

    /// Computes the occurrence after the next one of every task started by
    /// the last [`advance`](Self::advance) (and of tasks just loaded), so
    /// that their next start needs no computation. Call it after handing a
    /// batch out; skipping it costs only speed.
    pub fn precompute(&mut self) {
        for id in std::mem::take(&mut self.pending_after) {
            if let Some(e) = self.tasks.get_mut(&id) {
                if e.after_next.is_none() {
                    e.after_next = Some(e.next_due.and_then(|t| e.task.schedule.next_after(t)));
                }
            }
        }
    }

    /// The latest time the scheduler has been advanced to.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// When [`advance`](Self::advance) next has work: sleep until then.
    pub fn next_wake(&self) -> Option<Timestamp> {
        self.wheel.next_wake().map(untick)
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    /// The next due occurrence of a task.
    pub fn next_due(&self, id: TaskId) -> Option<Timestamp> {
        self.tasks.get(&id).and_then(|e| e.next_due)
    }

    /// Runs started and not yet reported finished.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Loads a task with its persisted state at start-up. `next_due` is the
    /// stored state; `None` (never stored) starts from the task's creation.
    /// A task already held is left as it is. A task loaded beyond the
    /// horizon (to finish or run one of its runs, or to change it) is held
    /// until the next step that concerns it.
    pub fn restore(&mut self, task: SchedTask, next_due: Option<Option<Timestamp>>) {
        if self.tasks.contains_key(&task.id) {
            return;
        }
        let next_due = match next_due {
            Some(stored) => stored,
            None => first_occurrence(&task.schedule, task.created_at),
        };
        self.insert_entry(task, next_due);
    }

    /// Adds or changes a task while running. A new task's occurrences count
    /// from its creation (missed ones go through the misfire policy); a task
    /// whose schedule changed counts from now; other changes keep its place.
    pub fn upsert(&mut self, task: SchedTask, out: &mut Vec<Command>) {
        let next_due = match self.tasks.remove(&task.id) {
            Some(old) => {
                if let Some(h) = old.timer {
                    self.wheel.cancel(h);
                }
                if old.task.schedule != task.schedule {
                    self.unindex(&old.task);
                }
                let next_due = if old.task.schedule == task.schedule {
                    old.next_due
                } else {
                    task.schedule.next_after(self.now.saturating_add_ms(-1))
                };
                self.insert_entry(task.clone(), next_due);
                if let Some(e) = self.tasks.get_mut(&task.id) {
                    e.running = old.running;
                    e.retries = old.retries;
                }
                next_due
            }
            None => {
                let next_due = first_occurrence(&task.schedule, task.created_at);
                self.insert_entry(task.clone(), next_due);
                next_due
            }
        };
        out.push(Command::SaveState {
            task_id: task.id,
            next_due,
        });
        self.settle(task.id);
    }

    /// Forgets a task. Its running runs finish and are reported as usual;
    /// its pending retries are dropped.
    pub fn remove(&mut self, id: TaskId) {
        if let Some(e) = self.tasks.remove(&id) {
            if let Some(h) = e.timer {
                self.wheel.cancel(h);
            }
            self.unindex(&e.task);
        }
    }

    fn unindex(&mut self, task: &SchedTask) {
        for t in task.schedule.triggers() {
            if let Some(downs) = self.downstream.get_mut(&t.upstream) {
                downs.retain(|d| *d != task.id);
                if downs.is_empty() {
                    self.downstream.remove(&t.upstream);
                }
            }
        }
        if !task.schedule.triggers().is_empty() {
            let range = (task.id, Timestamp::MIN)..=(task.id, Timestamp::MAX);
            let open: Vec<_> = self.fanin.range(range).map(|(k, _)| *k).collect();
            for k in open {
                self.fanin.remove(&k);
            }
        }
    }

    fn insert_entry(&mut self, task: SchedTask, next_due: Option<Timestamp>) {
        for t in task.schedule.triggers() {
            let downs = self.downstream.entry(t.upstream).or_default();
            if !downs.contains(&task.id) {
                downs.push(task.id);
                downs.sort_unstable();
            }
        }
        let timer = next_due.map(|t| self.wheel.insert(tick(t), Timer::Due(task.id)));
        self.pending_after.push(task.id);
        self.tasks.insert(
            task.id,
            TaskEntry {
                task,
                next_due,
                after_next: None,
                timer,
                running: 0,
                retries: 0,
            },
        );
    }

    /// Trusted time was corrected back to `now` (the clock had been ahead,
    /// and the coordinator vouched for an earlier time): the scheduler's
    /// time goes back with it, so nothing waits for the old time to come
    /// round again. What was decided stays decided (each task's `next_due`
    /// never moves back, so no occurrence runs twice); the waits that were
    /// measured from the wrong time (retry backoffs, timeouts) move back by
    /// the correction. A `now` not earlier than the scheduler's changes nothing.
    pub fn rewind(&mut self, now: Timestamp) {
        if now >= self.now {
            return;
        }
        let by = now.millis_since(self.now);
        let shifted = |wheel: &TimerWheel<Timer>, h: TimerHandle| {
            let at = wheel.deadline(h).map_or(now, untick);
            at.saturating_add_ms(by).max(now)
        };
        // Re-inserted in a fixed order (ids, tokens), so that timers due at
        // the same tick keep a deterministic order.
        let mut wheel = TimerWheel::new(tick(now));
        let mut ids: Vec<TaskId> = self.tasks.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(e) = self.tasks.get_mut(&id) {
                e.timer = e.next_due.map(|t| wheel.insert(tick(t), Timer::Due(id)));
            }
        }
        let mut tokens: Vec<u64> = self.retries.keys().copied().collect();
        tokens.sort_unstable();
        for token in tokens {
            if let Some((_, h)) = self.retries.get_mut(&token) {
                let at = shifted(&self.wheel, *h);
                *h = wheel.insert(tick(at), Timer::Retry(token));
            }
        }
        let mut runs: Vec<(u64, RunKey)> = self
            .running
            .iter()
            .filter_map(|(k, r)| r.timeout.map(|(_, token)| (token, *k)))
            .collect();
        runs.sort_unstable();
        for (token, key) in runs {
            if let Some(run) = self.running.get_mut(&key) {
                if let Some((h, _)) = run.timeout {
                    let at = shifted(&self.wheel, h);
                    run.timeout = Some((wheel.insert(tick(at), Timer::Timeout(token)), token));
                }
            }
        }
        self.wheel = wheel;
        self.now = now;
    }

    /// Time has reached `now`: decides everything due by then.
    pub fn advance(&mut self, now: Timestamp, out: &mut Vec<Command>) {
        if now < self.now {
            return;
        }
        if self.pending_after.len() > self.tasks.len() + 1024 {
            // A driver that never calls `precompute`: keep the list bounded.
            self.precompute();
        }
        self.now = now;
        while let Some((_, timer)) = self.wheel.poll(tick(now)) {
            match timer {
                Timer::Due(id) => self.on_due(id, out),
                Timer::Retry(token) => {
                    if let Some((key, _)) = self.retries.remove(&token) {
                        if let Some(e) = self.tasks.get_mut(&key.task_id) {
                            e.retries = e.retries.saturating_sub(1);
                            self.start(key, out);
                            self.settle(key.task_id);
                        }
                    }
                }
                Timer::Timeout(token) => {
                    if let Some(key) = self.timeouts.remove(&token) {
                        if let Some(r) = self.running.get_mut(&key) {
                            r.timeout = None;
                        }
                        out.push(Command::Kill { key });
                    }
                }
            }
        }
    }

    /// A run ended (or was found interrupted at start-up, or was skipped by
    /// the caller) at `at`. Applies the retry policy: returns the retry it
    /// scheduled, with its time, for the caller to store with the run's
    /// record (a pending retry is durable state:
    /// [`restore_retry`](Self::restore_retry) brings it back). An end with
    /// no retry is the occurrence's last: the tasks triggered by it are
    /// decided, and what to store of that is pushed to `out`, for the
    /// caller to store in the same transaction as the record.
    pub fn run_finished(
        &mut self,
        key: RunKey,
        outcome: Outcome,
        at: Timestamp,
        out: &mut Vec<Command>,
    ) -> Option<(RunKey, Timestamp)> {
        if let Some(run) = self.running.remove(&key) {
            if let Some((h, token)) = run.timeout {
                self.wheel.cancel(h);
                self.timeouts.remove(&token);
            }
            if let Some(e) = self.tasks.get_mut(&key.task_id) {
                e.running = e.running.saturating_sub(1);
            }
        }
        let retry = match self.tasks.get(&key.task_id) {
            Some(e)
                if outcome.is_retryable() && e.task.policies.retry.allows_after(key.attempt) =>
            {
                e.task.policies.retry
            }
            _ => {
                self.settle(key.task_id);
                self.ended(key, outcome, at.max(self.now), out);
                return None;
            }
        };
        let when = at
            .max(self.now)
            .saturating_add_ms(retry.backoff_after(key.attempt).as_millis_i64());
        let next = RunKey {
            attempt: key.attempt + 1,
            ..key
        };
        self.restore_retry(next, when);
        Some((next, when))
    }

    /// Holds a pending retry (of a held task) for its time: one scheduled
    /// by [`run_finished`](Self::run_finished), or one stored before a
    /// restart. A retry already pending for the key is left as it is.
    pub fn restore_retry(&mut self, key: RunKey, when: Timestamp) {
        if !self.tasks.contains_key(&key.task_id) || self.retries.values().any(|(k, _)| *k == key) {
            return;
        }
        let token = self.token();
        if let Some(e) = self.tasks.get_mut(&key.task_id) {
            e.retries += 1;
        }
        let handle = self.wheel.insert(tick(when), Timer::Retry(token));
        self.retries.insert(token, (key, handle));
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    /// Brings back what a fan-in task had heard of an occurrence (stored
    /// by a [`Command::FanIn`] before a restart). The task must be held.
    pub fn restore_fanin(
        &mut self,
        task_id: TaskId,
        scheduled_at: Timestamp,
        ended: Vec<(TaskId, Outcome)>,
    ) {
        if self.tasks.contains_key(&task_id) && !ended.is_empty() {
            self.fanin.insert((task_id, scheduled_at), ended);
        }
    }

    /// The upstream tasks whose ends trigger `id`, as text (`t1:succeeded
    /// t2:any`); `None` for a task by time or one not held.
    pub fn trigger_text(&self, id: TaskId) -> Option<String> {
        let e = self.tasks.get(&id)?;
        let t = e.task.schedule.triggers();
        (!t.is_empty()).then(|| {
            t.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    /// A run's occurrence ended for good (no retry follows): decides the
    /// tasks it triggers, and theirs in turn when one is skipped.
    fn ended(&mut self, key: RunKey, outcome: Outcome, at: Timestamp, out: &mut Vec<Command>) {
        if self.downstream.is_empty() {
            return;
        }
        let mut work: VecDeque<(TaskId, Timestamp, Outcome)> =
            VecDeque::from([(key.task_id, key.scheduled_at, outcome)]);
        // Each task's occurrence is decided once; a cycle (refused by the
        // coordinator, but the wire is not trusted) stops here.
        let mut decided: HashSet<(TaskId, Timestamp)> =
            HashSet::from([(key.task_id, key.scheduled_at)]);
        let mut steps = 0usize;
        while let Some((up, s, outcome)) = work.pop_front() {
            let downs = self.downstream.get(&up).cloned().unwrap_or_default();
            for d in downs {
                steps += 1;
                if steps > TRIGGER_STEPS_MAX || decided.contains(&(d, s)) {
                    tracing::warn!(task = %d, "a trigger chain loops or is too long; not followed");
                    continue;
                }
                let Some(triggers) = self
                    .tasks
                    .get(&d)
                    .map(|e| e.task.schedule.triggers().to_vec())
                else {
                    continue;
                };
                let heard = if triggers.len() == 1 {
                    vec![(up, outcome)]
                } else {
                    let mut heard = self.fanin.remove(&(d, s)).unwrap_or_default();
                    if !heard.iter().any(|(u, _)| *u == up) {
                        heard.push((up, outcome));
                    }
                    if heard.len() < triggers.len() {
                        out.push(Command::FanIn {
                            task_id: d,
                            scheduled_at: s,
                            ended: heard.clone(),
                        });
                        self.fanin.insert((d, s), heard);
                        for (given_up, _) in self.bound_fanin(d, &triggers, out) {
                            if decided.insert((d, given_up)) {
                                work.push_back((d, given_up, Outcome::Skipped));
                            }
                        }
                        continue;
                    }
                    out.push(Command::FanIn {
                        task_id: d,
                        scheduled_at: s,
                        ended: Vec::new(),
                    });
                    heard
                };
                decided.insert((d, s));
                let refused = triggers.iter().find_map(|t| {
                    let o = heard.iter().find(|(u, _)| *u == t.upstream)?.1;
                    (!t.on.matches(o)).then_some((t.upstream, o))
                });
                let down = RunKey {
                    task_id: d,
                    scheduled_at: s,
                    attempt: 1,
                };
                match refused {
                    None => {
                        out.push(Command::Trigger { key: down, at });
                        self.restore_retry(down, at);
                    }
                    Some((upstream, o)) => {
                        out.push(Command::Skip {
                            key: down,
                            reason: SkipReason::Untriggered {
                                upstream,
                                outcome: Some(o),
                            },
                        });
                        work.push_back((d, s, Outcome::Skipped));
                    }
                }
            }
        }
    }

    /// Gives up the oldest occurrences a fan-in task waits on beyond
    /// [`FANIN_OPEN_MAX`], recording each skipped; returns them.
    fn bound_fanin(
        &mut self,
        d: TaskId,
        triggers: &[sundial_protocol::Trigger],
        out: &mut Vec<Command>,
    ) -> Vec<(Timestamp, TaskId)> {
        let range = (d, Timestamp::MIN)..=(d, Timestamp::MAX);
        let open: Vec<(TaskId, Timestamp)> = self.fanin.range(range).map(|(k, _)| *k).collect();
        let over = open.len().saturating_sub(FANIN_OPEN_MAX);
        let mut given_up = Vec::new();
        for k in open.into_iter().take(over) {
            let heard = self.fanin.remove(&k).unwrap_or_default();
            let missing = triggers
                .iter()
                .map(|t| t.upstream)
                .find(|u| !heard.iter().any(|(h, _)| h == u))
                .unwrap_or(d);
            out.push(Command::FanIn {
                task_id: d,
                scheduled_at: k.1,
                ended: Vec::new(),
            });
            out.push(Command::Skip {
                key: RunKey {
                    task_id: d,
                    scheduled_at: k.1,
                    attempt: 1,
                },
                reason: SkipReason::Untriggered {
                    upstream: missing,
                    outcome: None,
                },
            });
            given_up.push((k.1, missing));
        }
        given_up
    }

    fn on_due(&mut self, id: TaskId, out: &mut Vec<Command>) {
        let now = self.now;
        let Some(entry) = self.tasks.get_mut(&id) else {
            return;
        };
        entry.timer = None;
        let Some(first) = entry.next_due else {
            return;
        };
        let grace_ms = entry.task.policies.misfire.grace.as_millis_i64();
        let placement = entry.task.placement.clone();
        if let (Some(after), None) = (entry.after_next, &placement) {
            if after.is_none_or(|a| a > now) && now.millis_since(first) <= grace_ms {
                // On time, and the only occurrence due: hand it out now; the
                // one after is computed by `precompute`.
                entry.next_due = after;
                entry.after_next = None;
                entry.timer = after.map(|t| self.wheel.insert(tick(t), Timer::Due(id)));
                self.pending_after.push(id);
                self.start(
                    RunKey {
                        task_id: id,
                        scheduled_at: first,
                        attempt: 1,
                    },
                    out,
                );
                out.push(Command::SaveState {
                    task_id: id,
                    next_due: after,
                });
                self.settle(id);
                return;
            }
        }
        let schedule = &entry.task.schedule;
        let misfire = entry.task.policies.misfire;

        // Sort what is due into missed (older than grace) and on time.
        let mut missed: VecDeque<Timestamp> = VecDeque::new();
        let mut missed_count: u64 = 0;
        let mut on_time: Vec<Timestamp> = Vec::new();
        let mut scanned = 0usize;
        let mut cursor = Some(first);
        let mut jumped = false;
        // A placed task: occurrences not its own pass by, those past the
        // end of the plan wait for it, and its own missed until well after
        // their window ended are not run.
        let mut waiting = false;
        let mut lease_ended: Vec<Timestamp> = Vec::new();
        while let Some(t) = cursor {
            if t > now {
                break;
            }
            let decision = placement.as_ref().map(|p| p.decide_seated(id, t));
            let skip_over = match decision {
                Some(Decision::Unplanned) => {
                    waiting = true;
                    break;
                }
                Some(Decision::NotMine) => true,
                Some(Decision::Mine { until, .. }) if now.millis_since(until) > grace_ms => {
                    if lease_ended.len() < MISFIRE_RECORDS_MAX {
                        lease_ended.push(t);
                    }
                    true
                }
                _ => false,
            };
            if skip_over {
                // Passed by, or recorded apart: not the misfire policy's.
            } else if now.millis_since(t) > grace_ms {
                missed_count += 1;
                if missed.len() == MISFIRE_RECORDS_MAX {
                    missed.pop_front();
                }
                missed.push_back(t);
            } else {
                on_time.push(t);
            }
            scanned += 1;
            cursor = if scanned >= MISFIRE_SCAN_MAX && !jumped {
                // Too many to enumerate: jump to the end of the missed span.
                jumped = true;
                let resume = t.max(now.saturating_add_ms(-grace_ms - 1));
                schedule.next_after(resume)
            } else {
                schedule.next_after(t)
            };
        }
        entry.next_due = cursor;
        entry.after_next = None;
        // Waiting for the plan: woken by the task's next change.
        entry.timer = cursor
            .filter(|_| !waiting)
            .map(|t| self.wheel.insert(tick(t), Timer::Due(id)));
        self.pending_after.push(id);
        if jumped || missed_count > missed.len() as u64 {
            tracing::warn!(
                task = %id,
                missed = missed_count,
                recorded = missed.len(),
                enumeration_capped = jumped,
                "many occurrences missed; only the most recent are recorded as skipped"
            );
        }

        let run_missed = match misfire.mode {
            MisfireMode::Skip => 0,
            MisfireMode::Once if on_time.is_empty() => 1,
            MisfireMode::Once => 0,
            MisfireMode::All { cap } => cap as usize,
        }
        .min(missed.len());
        let split = missed.len() - run_missed;
        let mut to_skip: Vec<Timestamp> = missed.iter().take(split).copied().collect();
        let mut to_run: Vec<Timestamp> = missed
            .iter()
            .skip(split)
            .copied()
            .chain(on_time.iter().copied())
            .collect();
        // With overlap `forbid`, one run at a time: of a batch due together
        // (a catch-up after downtime, within the grace or not), only the
        // latest runs; the older ones were missed, and are recorded so, not
        // as overlapping a run that only started a moment ago.
        if entry.task.policies.overlap == OverlapPolicy::Forbid && to_run.len() > 1 {
            let latest = to_run.pop();
            to_skip.append(&mut to_run);
            to_run.extend(latest);
        }
        let skips = lease_ended
            .into_iter()
            .map(|t| (t, SkipReason::LeaseEnded))
            .chain(to_skip.into_iter().map(|t| (t, SkipReason::Misfire)));
        for (t, reason) in skips {
            let key = RunKey {
                task_id: id,
                scheduled_at: t,
                attempt: 1,
            };
            out.push(Command::Skip { key, reason });
            self.ended(key, Outcome::Skipped, now, out);
        }
        for t in to_run {
            self.start(
                RunKey {
                    task_id: id,
                    scheduled_at: t,
                    attempt: 1,
                },
                out,
            );
        }
        out.push(Command::SaveState {
            task_id: id,
            next_due: cursor,
        });
        self.settle(id);
    }

    fn start(&mut self, key: RunKey, out: &mut Vec<Command>) {
        let now = self.now;
        let Some(entry) = self.tasks.get_mut(&key.task_id) else {
            return;
        };
        if entry.task.policies.overlap == OverlapPolicy::Forbid && entry.running > 0 {
            out.push(Command::Skip {
                key,
                reason: SkipReason::Overlap,
            });
            self.ended(key, Outcome::Skipped, now, out);
            return;
        }
        if self.running.contains_key(&key) {
            // Already going: never start the same attempt twice.
            return;
        }
        entry.running += 1;
        let timeout_at = entry
            .task
            .policies
            .timeout
            .map(|d| now.saturating_add_ms(d.as_millis_i64()));
        let timeout = timeout_at.map(|t| {
            self.next_token += 1;
            let token = self.next_token;
            self.timeouts.insert(token, key);
            (self.wheel.insert(tick(t), Timer::Timeout(token)), token)
        });
        self.running.insert(key, RunningRun { timeout });
        out.push(Command::Start { key, timeout_at });
    }

    /// Starts one extra occurrence now (an operator's `run-now`), under the
    /// task's overlap policy; retries and timeouts apply as to any run.
    pub fn run_now(&mut self, key: RunKey, out: &mut Vec<Command>) {
        self.start(key, out);
        self.settle(key.task_id);
    }

    /// Marks a run as going without a `Start` from this scheduler (a run the
    /// caller knows is live, e.g. after reloading tasks).
    pub fn adopt_running(&mut self, key: RunKey) {
        if self
            .running
            .insert(key, RunningRun { timeout: None })
            .is_none()
        {
            if let Some(e) = self.tasks.get_mut(&key.task_id) {
                e.running += 1;
            }
        }
    }
}

/// A task's first occurrence: the first at or after its creation.
pub fn first_occurrence(schedule: &Schedule, created_at: Timestamp) -> Option<Timestamp> {
    schedule.next_after(created_at.saturating_add_ms(-1))
}
