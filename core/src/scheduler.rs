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
//! - Time never goes backwards here: an `advance` with an earlier `now` than
//!   seen before decides nothing (a wall clock stepped back fires nothing early).
//! - Work per step is bounded: at most [`MISFIRE_SCAN_MAX`] occurrences are
//!   enumerated per task and at most [`MISFIRE_RECORDS_MAX`] skipped records
//!   emitted, so no length of downtime stalls a schedule.

use std::collections::{HashMap, VecDeque};

use sundial_protocol::policy::{MisfireMode, OverlapPolicy, Policies};
use sundial_protocol::{RunKey, Schedule, TaskId, TaskSpec, Timestamp};

use crate::wheel::{TimerHandle, TimerWheel};

/// The most missed occurrences enumerated for one task in one step; beyond
/// it the schedule jumps to the present and the rest are counted as unknown.
pub const MISFIRE_SCAN_MAX: usize = 100_000;
/// The most `skipped` records emitted for one task in one catch-up (the most
/// recent ones are kept).
pub const MISFIRE_RECORDS_MAX: usize = 1_000;

/// What the scheduler needs to know of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedTask {
    pub id: TaskId,
    pub schedule: Schedule,
    pub policies: Policies,
    pub created_at: Timestamp,
}

impl From<&TaskSpec> for SchedTask {
    fn from(t: &TaskSpec) -> Self {
        SchedTask {
            id: t.id,
            schedule: t.schedule.clone(),
            policies: t.policies,
            created_at: t.created_at,
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
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Misfire => "misfire: missed while the agent was down",
            SkipReason::Overlap => "overlap: a previous run was still going",
            SkipReason::ConcurrencyCap => {
                "concurrency: the agent was already running its maximum of runs at once (--max-concurrent-runs)"
            }
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
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Due(TaskId),
    Retry(u64),
    Timeout(u64),
}

#[derive(Debug)]
struct TaskEntry {
    task: SchedTask,
    next_due: Option<Timestamp>,
    timer: Option<TimerHandle>,
    running: u32,
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
    retries: HashMap<u64, RunKey>,
    timeouts: HashMap<u64, RunKey>,
    next_token: u64,
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
    pub fn restore(&mut self, task: SchedTask, next_due: Option<Option<Timestamp>>) {
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
                let running = old.running;
                let next_due = if old.task.schedule == task.schedule {
                    old.next_due
                } else {
                    task.schedule.next_after(self.now.saturating_add_ms(-1))
                };
                self.insert_entry(task.clone(), next_due);
                if let Some(e) = self.tasks.get_mut(&task.id) {
                    e.running = running;
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
    }

    /// Forgets a task. Its running runs finish and are reported as usual;
    /// its pending retries are dropped.
    pub fn remove(&mut self, id: TaskId) {
        if let Some(e) = self.tasks.remove(&id) {
            if let Some(h) = e.timer {
                self.wheel.cancel(h);
            }
        }
    }

    fn insert_entry(&mut self, task: SchedTask, next_due: Option<Timestamp>) {
        let timer = next_due.map(|t| self.wheel.insert(tick(t), Timer::Due(task.id)));
        self.tasks.insert(
            task.id,
            TaskEntry {
                task,
                next_due,
                timer,
                running: 0,
            },
        );
    }

    /// Time has reached `now`: decides everything due by then.
    pub fn advance(&mut self, now: Timestamp, out: &mut Vec<Command>) {
        if now < self.now {
            return;
        }
        self.now = now;
        while let Some((_, timer)) = self.wheel.poll(tick(now)) {
            match timer {
                Timer::Due(id) => self.on_due(id, out),
                Timer::Retry(token) => {
                    if let Some(key) = self.retries.remove(&token) {
                        if self.tasks.contains_key(&key.task_id) {
                            self.start(key, out);
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

    /// A run ended (or was found interrupted at start-up) at `at`. Applies
    /// the retry policy.
    pub fn run_finished(&mut self, key: RunKey, outcome: sundial_protocol::Outcome, at: Timestamp) {
        if let Some(run) = self.running.remove(&key) {
            if let Some((h, token)) = run.timeout {
                self.wheel.cancel(h);
                self.timeouts.remove(&token);
            }
            if let Some(e) = self.tasks.get_mut(&key.task_id) {
                e.running = e.running.saturating_sub(1);
            }
        }
        if !outcome.is_retryable() {
            return;
        }
        let Some(e) = self.tasks.get(&key.task_id) else {
            return;
        };
        let retry = e.task.policies.retry;
        if !retry.allows_after(key.attempt) {
            return;
        }
        let when = at
            .max(self.now)
            .saturating_add_ms(retry.backoff_after(key.attempt).as_millis_i64());
        let token = self.token();
        self.wheel.insert(tick(when), Timer::Retry(token));
        self.retries.insert(
            token,
            RunKey {
                attempt: key.attempt + 1,
                ..key
            },
        );
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
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
        let schedule = &entry.task.schedule;
        let misfire = entry.task.policies.misfire;
        let grace_ms = misfire.grace.as_millis_i64();

        // Sort what is due into missed (older than grace) and on time.
        let mut missed: VecDeque<Timestamp> = VecDeque::new();
        let mut missed_count: u64 = 0;
        let mut on_time: Vec<Timestamp> = Vec::new();
        let mut scanned = 0usize;
        let mut cursor = Some(first);
        let mut jumped = false;
        while let Some(t) = cursor {
            if t > now {
                break;
            }
            if now.millis_since(t) > grace_ms {
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
        entry.timer = cursor.map(|t| self.wheel.insert(tick(t), Timer::Due(id)));
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
        for t in to_skip {
            out.push(Command::Skip {
                key: RunKey {
                    task_id: id,
                    scheduled_at: t,
                    attempt: 1,
                },
                reason: SkipReason::Misfire,
            });
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
