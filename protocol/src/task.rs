//! Tasks, actions and run records as they travel between coordinator and
//! agents. Stores keep their own versioned records; these are wire types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::placement::Placement;
use crate::policy::Policies;
use crate::schedule::Schedule;
pub use crate::seal::SealedEnv;
use crate::time::{DurationMs, Timestamp};
pub use crate::wasm::{ModuleHash, WasmSpec};

macro_rules! short_id {
    ($name:ident, $prefix:literal, $what:literal) => {
        #[doc = concat!("The id of ", $what, ", shown as `", $prefix, "N`.")]
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let digits = s.strip_prefix($prefix).unwrap_or(s);
                digits.parse().map($name).map_err(|_| {
                    format!(
                        concat!("`{}` is not ", $what, " id (expected e.g. ", $prefix, "12)"),
                        s
                    )
                })
            }
        }
    };
}

short_id!(TaskId, "t", "a task");
short_id!(AgentId, "a", "an agent");

/// The largest stdout or stderr tail kept per run, by default.
pub const OUTPUT_TAIL_BYTES_DEFAULT: usize = 64 * 1024;
/// The largest stdout or stderr tail any agent may keep or send: an agent
/// configured for more is clamped to this, and a record with more is refused
/// by the coordinator. Two such tails and a record fit well under the frame cap.
pub const OUTPUT_TAIL_BYTES_MAX: usize = 1024 * 1024;
/// The longest `detail` text of a run record.
pub const DETAIL_BYTES_MAX: usize = 4 * 1024;
/// The most attempts of one occurrence (the first run and its retries).
pub const ATTEMPTS_MAX: u32 = crate::policy::RETRIES_MAX + 1;

/// What a task runs.
///
/// On the wire an exec without sealed variables keeps the encoding of 0.4
/// and earlier (so older agents read it); one with them is another variant,
/// which an older peer refuses rather than misreads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ActionWire", into = "ActionWire")]
pub enum Action {
    Exec(ExecSpec),
    /// A WebAssembly function the task carries (new in 0.7).
    Wasm(WasmSpec),
}

/// A program to run, without a shell.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// Variables whose values are sealed to each agent's key (new in 0.5):
    /// opened on the agent when a run starts, never stored or shown open.
    pub sealed_env: Vec<SealedEnv>,
}

/// [`Action`] as encoded.
#[derive(Serialize, Deserialize)]
enum ActionWire {
    Exec(ExecSpecV0),
    ExecSealed(ExecSpec),
    Wasm(WasmSpec),
}

/// [`ExecSpec`] as 0.4 and earlier encode it.
#[derive(Serialize, Deserialize)]
struct ExecSpecV0 {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
}

impl From<ActionWire> for Action {
    fn from(a: ActionWire) -> Action {
        match a {
            ActionWire::Exec(e) => Action::Exec(ExecSpec {
                program: e.program,
                args: e.args,
                env: e.env,
                cwd: e.cwd,
                sealed_env: Vec::new(),
            }),
            ActionWire::ExecSealed(e) => Action::Exec(e),
            ActionWire::Wasm(w) => Action::Wasm(w),
        }
    }
}

impl From<Action> for ActionWire {
    fn from(a: Action) -> ActionWire {
        match a {
            Action::Exec(e) if e.sealed_env.is_empty() => ActionWire::Exec(ExecSpecV0 {
                program: e.program,
                args: e.args,
                env: e.env,
                cwd: e.cwd,
            }),
            Action::Exec(e) => ActionWire::ExecSealed(e),
            Action::Wasm(w) => ActionWire::Wasm(w),
        }
    }
}

impl Action {
    /// Its sealed variables.
    pub fn sealed_env(&self) -> &[SealedEnv] {
        match self {
            Action::Exec(e) => &e.sealed_env,
            Action::Wasm(w) => &w.sealed_env,
        }
    }

    pub fn sealed_env_mut(&mut self) -> &mut Vec<SealedEnv> {
        match self {
            Action::Exec(e) => &mut e.sealed_env,
            Action::Wasm(w) => &mut w.sealed_env,
        }
    }

    /// Its plain environment.
    pub fn env(&self) -> &[(String, String)] {
        match self {
            Action::Exec(e) => &e.env,
            Action::Wasm(w) => &w.env,
        }
    }

    pub fn env_mut(&mut self) -> &mut Vec<(String, String)> {
        match self {
            Action::Exec(e) => &mut e.env,
            Action::Wasm(w) => &mut w.env,
        }
    }

    /// Its module, if it is a function.
    pub fn module(&self) -> Option<ModuleHash> {
        match self {
            Action::Exec(_) => None,
            Action::Wasm(w) => Some(w.module),
        }
    }

    /// This action as one agent is sent it: only the values sealed to it.
    pub fn for_agent(&self, agent: AgentId) -> Action {
        let mut a = self.clone();
        for s in a.sealed_env_mut() {
            s.sealed.retain(|(a, _)| *a == agent);
        }
        a
    }

    /// This action as admins are shown it: sealed variables' names and
    /// recipients, without their ciphertext.
    pub fn without_ciphertext(&self) -> Action {
        let mut a = self.clone();
        for s in a.sealed_env_mut() {
            for (_, c) in &mut s.sealed {
                c.clear();
            }
        }
        a
    }

    /// The action with these sealed variables.
    pub fn set_sealed_env(&mut self, sealed: Vec<SealedEnv>) {
        *self.sealed_env_mut() = sealed;
    }
}

/// Which agents a task is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Agent(AgentId),
    /// Every agent whose labels include all of these pairs.
    Selector(Vec<(String, String)>),
}

/// A task as assigned to agents.
///
/// On the wire a task without placement keeps the encoding of 0.5 (older
/// agents read it); a placed one carries its placement in another variant
/// of the action, which older peers refuse rather than misread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "TaskSpecWire", into = "TaskSpecWire")]
pub struct TaskSpec {
    pub id: TaskId,
    pub name: Option<String>,
    pub target: Target,
    pub schedule: Schedule,
    pub action: Action,
    pub policies: Policies,
    /// Increases with every change of any task on the coordinator.
    pub revision: u64,
    /// When the coordinator created the task: occurrences before it are not
    /// expected, those after it are (even if the agent learns of the task late).
    pub created_at: Timestamp,
    /// On which of the agents it reaches each occurrence runs (new in 0.6;
    /// `None`: on every one). An agent is sent only its own seats.
    pub placement: Option<Placement>,
}

/// [`TaskSpec`] as encoded.
#[derive(Serialize, Deserialize)]
struct TaskSpecWire {
    id: TaskId,
    name: Option<String>,
    target: Target,
    schedule: Schedule,
    action: TaskActionWire,
    policies: Policies,
    revision: u64,
    created_at: Timestamp,
}

/// [`ActionWire`] with a third variant for placed tasks (the first two
/// encode exactly as [`ActionWire`]'s).
#[derive(Serialize, Deserialize)]
enum TaskActionWire {
    Exec(ExecSpecV0),
    ExecSealed(ExecSpec),
    Placed(ExecSpec, Placement),
    /// A function (new in 0.7), placed or not.
    Wasm(WasmSpec, Option<Placement>),
}

impl From<TaskSpecWire> for TaskSpec {
    fn from(w: TaskSpecWire) -> TaskSpec {
        let (action, placement) = match w.action {
            TaskActionWire::Exec(e) => (Action::from(ActionWire::Exec(e)), None),
            TaskActionWire::ExecSealed(e) => (Action::Exec(e), None),
            TaskActionWire::Placed(e, p) => (Action::Exec(e), Some(p)),
            TaskActionWire::Wasm(w, p) => (Action::Wasm(w), p),
        };
        TaskSpec {
            id: w.id,
            name: w.name,
            target: w.target,
            schedule: w.schedule,
            action,
            policies: w.policies,
            revision: w.revision,
            created_at: w.created_at,
            placement,
        }
    }
}

impl From<TaskSpec> for TaskSpecWire {
    fn from(t: TaskSpec) -> TaskSpecWire {
        let action = match (t.action, t.placement) {
            (Action::Wasm(w), p) => TaskActionWire::Wasm(w, p),
            (Action::Exec(e), Some(p)) => TaskActionWire::Placed(e, p),
            (action, None) => match ActionWire::from(action) {
                ActionWire::Exec(e) => TaskActionWire::Exec(e),
                ActionWire::ExecSealed(e) => TaskActionWire::ExecSealed(e),
                ActionWire::Wasm(w) => TaskActionWire::Wasm(w, None),
            },
        };
        TaskSpecWire {
            id: t.id,
            name: t.name,
            target: t.target,
            schedule: t.schedule,
            action,
            policies: t.policies,
            revision: t.revision,
            created_at: t.created_at,
        }
    }
}

impl TaskSpec {
    /// This task as `agent` is sent it: only the values sealed to it and
    /// only its own seats.
    pub fn for_agent(&self, agent: AgentId) -> TaskSpec {
        TaskSpec {
            action: self.action.for_agent(agent),
            placement: self.placement.as_ref().map(|p| p.for_agent(agent)),
            ..self.clone()
        }
    }

    /// This task with these sealed variables.
    pub fn with_sealed_env(mut self, sealed: Vec<SealedEnv>) -> TaskSpec {
        self.action.set_sealed_env(sealed);
        self
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    /// The agent's allowlist refused the program, or it could not be started.
    Rejected,
    /// Not run: missed while down (misfire policy) or overlap `forbid`.
    Skipped,
    /// The agent stopped (crash, power loss) while it ran.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Rejected => "rejected",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
        }
    }

    /// The outcome named by [`Outcome::as_str`].
    pub fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "succeeded" => Outcome::Succeeded,
            "failed" => Outcome::Failed,
            "timed_out" => Outcome::TimedOut,
            "rejected" => Outcome::Rejected,
            "skipped" => Outcome::Skipped,
            "interrupted" => Outcome::Interrupted,
            _ => return None,
        })
    }

    /// Whether the retry policy applies to a run that ended so.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Outcome::Failed | Outcome::TimedOut | Outcome::Interrupted
        )
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one run: an occurrence of a task on an agent, and its attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunKey {
    pub task_id: TaskId,
    pub scheduled_at: Timestamp,
    pub attempt: u32,
}

/// The record of one run, as uploaded by the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub task_id: TaskId,
    pub agent_id: AgentId,
    pub scheduled_at: Timestamp,
    pub attempt: u32,
    pub fired_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub outcome: Outcome,
    pub exit_code: Option<i32>,
    /// No live session with the coordinator when it fired.
    pub offline: bool,
    /// Why it was skipped, rejected or interrupted, in words.
    pub detail: Option<String>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

impl RunRecord {
    pub fn key(&self) -> RunKey {
        RunKey {
            task_id: self.task_id,
            scheduled_at: self.scheduled_at,
            attempt: self.attempt,
        }
    }

    /// Why this record, as received from a peer, cannot be true; `None` if
    /// every field is within its bounds. Instants are range-checked when
    /// they are decoded (see [`Timestamp`]).
    pub fn implausibility(&self) -> Option<String> {
        // Named only in an answer: formatting the instant costs more than
        // every check of a plausible run together.
        let key = || format!("{}@{}#{}", self.task_id, self.scheduled_at, self.attempt);
        if self.attempt == 0 || self.attempt > ATTEMPTS_MAX {
            return Some(format!(
                "run {}: attempt {} is outside 1..={ATTEMPTS_MAX}",
                key(),
                self.attempt
            ));
        }
        if self.stdout_tail.len() > OUTPUT_TAIL_BYTES_MAX
            || self.stderr_tail.len() > OUTPUT_TAIL_BYTES_MAX
        {
            return Some(format!(
                "run {}: an output tail exceeds {OUTPUT_TAIL_BYTES_MAX} bytes",
                key()
            ));
        }
        if self
            .detail
            .as_ref()
            .is_some_and(|d| d.len() > DETAIL_BYTES_MAX)
        {
            return Some(format!(
                "run {}: detail exceeds {DETAIL_BYTES_MAX} bytes",
                key()
            ));
        }
        if let (Some(f), Some(e)) = (self.fired_at, self.finished_at) {
            if e < f {
                return Some(format!("run {}: finished before it fired", key()));
            }
        }
        None
    }

    /// Why the run ended as it did, in a few words: its detail, or for a run
    /// that did not succeed, its exit code and the last line it wrote to
    /// stderr (or stdout). `None` for a plain success.
    pub fn why(&self) -> Option<String> {
        if let Some(d) = &self.detail {
            return Some(d.clone());
        }
        if self.outcome == Outcome::Succeeded {
            return None;
        }
        let last_line = |tail: &[u8]| {
            String::from_utf8_lossy(tail)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().chars().take(200).collect::<String>())
        };
        let said = last_line(&self.stderr_tail).or_else(|| last_line(&self.stdout_tail));
        match (self.exit_code, said) {
            (Some(c), Some(s)) => Some(format!("exit {c}: {s}")),
            (Some(c), None) => Some(format!("exit {c}")),
            (None, said) => said,
        }
    }

    /// How late the run started, if it started.
    pub fn lateness(&self) -> Option<DurationMs> {
        self.fired_at
            .map(|f| DurationMs(f.millis_since(self.scheduled_at).max(0) as u64))
    }
}

/// Labels as an operator writes them: `k=v,k2=v2`.
pub fn labels_text(labels: &[(String, String)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
