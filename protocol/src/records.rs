//! Durable records shared by the agent's and the coordinator's stores.
//!
//! These are storage types, not wire types: each store writes one version
//! byte ([`RECORD_V1`]) and then postcard of a `*V1` struct made of plain
//! fields. A new layout gets a new version and a conversion, so a store
//! written by an older build stays readable, and a wire change never
//! silently changes what is on disk.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::placement::{LeaseWindow, Placement, PlacementMode};
use crate::policy::{MisfireMode, MisfirePolicy, OverlapPolicy, Policies, RetryPolicy};
use crate::schedule::{OutcomeSet, ScheduleError, Trigger};
use crate::task::{Action, ExecSpec, SealedEnv, Target};
use crate::{
    AgentId, DurationMs, Outcome, RunRecord, Schedule, ScheduleKind, TaskId, TaskSpec, Timestamp,
};

/// A stored record that does not decode; the store names where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt record in table `{table}` at key {key}: {reason}")]
pub struct RecordError {
    pub table: &'static str,
    pub key: String,
    pub reason: String,
}

pub const RECORD_V1: u8 = 1;

pub fn encode<T: Serialize>(rec: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.push(RECORD_V1);
    append(rec, out)
}

/// Room made up front for a record: most fit, so one allocation each.
const ENCODE_CAPACITY: usize = 128;

/// `out` with `rec` written after what it holds, in place (no second
/// buffer to copy from).
fn append<T: Serialize + ?Sized>(rec: &T, out: Vec<u8>) -> Vec<u8> {
    // Invariant: postcard serialization of plain structs into a Vec cannot fail.
    postcard::to_extend(rec, out).expect("postcard encodes plain records")
}

pub fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: impl ToString,
    bytes: &[u8],
) -> Result<T, RecordError> {
    let corrupt = |reason: String| RecordError {
        table,
        key: key.to_string(),
        reason,
    };
    match bytes.split_first() {
        Some((&RECORD_V1, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string())),
        Some((v, _)) => Err(corrupt(format!("unknown record version {v}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// A record followed by its task's sealed variables (new in 0.5): written
/// only for tasks that have some, so a store without them stays readable by
/// older builds.
pub const RECORD_V2: u8 = 2;

/// A sealed variable as stored: (agent id, sealed value) pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SealedEnvV1 {
    pub name: String,
    pub sealed: Vec<(u64, Vec<u8>)>,
}

impl SealedEnvV1 {
    fn from_env(sealed: &[SealedEnv]) -> Vec<SealedEnvV1> {
        sealed
            .iter()
            .map(|s| SealedEnvV1 {
                name: s.name.clone(),
                sealed: s.sealed.iter().map(|(a, v)| (a.0, v.clone())).collect(),
            })
            .collect()
    }

    fn into_env(stored: Vec<SealedEnvV1>) -> Vec<SealedEnv> {
        stored
            .into_iter()
            .map(|s| SealedEnv {
                name: s.name,
                sealed: s.sealed.into_iter().map(|(a, v)| (AgentId(a), v)).collect(),
            })
            .collect()
    }
}

/// `rec`, and the sealed variables of its task if it has any.
pub fn encode_with_sealed<T: Serialize>(rec: &T, sealed: &[SealedEnv]) -> Vec<u8> {
    if sealed.is_empty() {
        return encode(rec);
    }
    let sealed = SealedEnvV1::from_env(sealed);
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.push(RECORD_V2);
    append(&sealed, append(rec, out))
}

/// A record written by [`encode`] or [`encode_with_sealed`], and its
/// task's sealed variables (none for the former).
pub fn decode_with_sealed<T: DeserializeOwned>(
    table: &'static str,
    key: impl ToString,
    bytes: &[u8],
) -> Result<(T, Vec<SealedEnv>), RecordError> {
    let corrupt = |reason: String| RecordError {
        table,
        key: key.to_string(),
        reason,
    };
    match bytes.split_first() {
        Some((&RECORD_V2, rest)) => {
            let (rec, rest) =
                postcard::take_from_bytes::<T>(rest).map_err(|e| corrupt(e.to_string()))?;
            let sealed: Vec<SealedEnvV1> = postcard::from_bytes(rest)
                .map_err(|e| corrupt(format!("sealed variables: {e}")))?;
            Ok((rec, SealedEnvV1::into_env(sealed)))
        }
        _ => decode(table, key, bytes).map(|rec| (rec, Vec::new())),
    }
}

/// The record and its sealed variables at the head of a v4 or v5 layout,
/// and what follows them.
fn take_head<'a, T: DeserializeOwned>(
    bytes: &'a [u8],
    corrupt: &dyn Fn(String) -> RecordError,
) -> Result<(T, Vec<SealedEnvV1>, &'a [u8]), RecordError> {
    let (rec, rest) = postcard::take_from_bytes::<T>(bytes).map_err(|e| corrupt(e.to_string()))?;
    let (sealed, rest) = postcard::take_from_bytes::<Vec<SealedEnvV1>>(rest)
        .map_err(|e| corrupt(format!("sealed variables: {e}")))?;
    Ok((rec, sealed, rest))
}

/// A task record followed by its sealed variables (maybe none) and its
/// placement (new in 0.6): written only for placed tasks.
pub const RECORD_V4: u8 = 4;

/// A lease window as stored: (from, until, count, seats as (seat, agent id)).
pub type LeaseWindowV1 = (i64, i64, u32, Vec<(u32, u64)>);

/// A placement as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlacementV1 {
    /// 0 one, 1 shard
    pub mode: u8,
    pub lease_ms: u64,
    pub windows: Vec<LeaseWindowV1>,
}

impl PlacementV1 {
    pub fn from_placement(p: &Placement) -> PlacementV1 {
        PlacementV1 {
            mode: match p.mode {
                PlacementMode::One => 0,
                PlacementMode::Shard => 1,
            },
            lease_ms: p.lease.0,
            windows: p
                .windows
                .iter()
                .map(|w| {
                    (
                        w.from.as_millis(),
                        w.until.as_millis(),
                        w.count,
                        w.seats.iter().map(|(s, a)| (*s, a.0)).collect(),
                    )
                })
                .collect(),
        }
    }

    pub fn into_placement(self, table: &'static str, key: &str) -> Result<Placement, RecordError> {
        let corrupt = |reason: String| RecordError {
            table,
            key: key.to_owned(),
            reason,
        };
        let mode = match self.mode {
            0 => PlacementMode::One,
            1 => PlacementMode::Shard,
            m => return Err(corrupt(format!("unknown placement mode {m}"))),
        };
        let windows = self
            .windows
            .into_iter()
            .map(|(from, until, count, seats)| {
                Ok(LeaseWindow {
                    from: ts(table, key, from)?,
                    until: ts(table, key, until)?,
                    count,
                    seats: seats.into_iter().map(|(s, a)| (s, AgentId(a))).collect(),
                })
            })
            .collect::<Result<Vec<_>, RecordError>>()?;
        let p = Placement {
            mode,
            lease: DurationMs(self.lease_ms),
            windows,
        };
        match p.refusal() {
            Some(why) => Err(corrupt(format!("placement: {why}"))),
            None => Ok(p),
        }
    }
}

/// `rec` with its task's sealed variables and placement: the layout of
/// [`encode_with_sealed`] when the task is not placed, else [`RECORD_V4`].
pub fn encode_placed<T: Serialize>(
    rec: &T,
    sealed: &[SealedEnv],
    placement: Option<&Placement>,
) -> Vec<u8> {
    let Some(p) = placement else {
        return encode_with_sealed(rec, sealed);
    };
    let sealed = SealedEnvV1::from_env(sealed);
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.push(RECORD_V4);
    append(
        &PlacementV1::from_placement(p),
        append(&sealed, append(rec, out)),
    )
}

/// A record written by [`encode_placed`] (or [`encode`], or
/// [`encode_with_sealed`]), its sealed variables and its placement.
pub fn decode_placed<T: DeserializeOwned>(
    table: &'static str,
    key: impl ToString,
    bytes: &[u8],
) -> Result<(T, Vec<SealedEnv>, Option<Placement>), RecordError> {
    let key = key.to_string();
    let Some((&RECORD_V4, rest)) = bytes.split_first() else {
        return decode_with_sealed(table, key, bytes).map(|(r, s)| (r, s, None));
    };
    let corrupt = |reason: String| RecordError {
        table,
        key: key.clone(),
        reason,
    };
    let (rec, sealed, rest) = take_head::<T>(rest, &corrupt)?;
    let placement: PlacementV1 =
        postcard::from_bytes(rest).map_err(|e| corrupt(format!("placement: {e}")))?;
    Ok((
        rec,
        SealedEnvV1::into_env(sealed),
        Some(placement.into_placement(table, &key)?),
    ))
}

/// A function task's record (new in 0.7): the record (its `args` and `env`
/// the function's, its program empty), sealed variables, placement if any,
/// then [`WasmV1`]. Written only for functions.
pub const RECORD_V5: u8 = 5;

/// A function's module and limits as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WasmV1 {
    pub module: [u8; 32],
    pub module_bytes: u64,
    pub fuel: Option<u64>,
    pub memory_bytes: Option<u64>,
}

/// `rec` (a record holding a [`TaskRecordV1`]) with its task's sealed
/// variables, placement and, for a function, [`WasmV1`]: the layout of
/// [`encode_placed`] unless the action is a function, else [`RECORD_V5`].
pub fn encode_with_action<T: Serialize>(
    rec: &T,
    action: &Action,
    placement: Option<&Placement>,
) -> Vec<u8> {
    encode_parts(
        rec,
        action.sealed_env(),
        placement,
        WasmV1::of(action).as_ref(),
    )
}

impl WasmV1 {
    /// A function's module and limits as stored; `None` for a program.
    pub fn of(action: &Action) -> Option<WasmV1> {
        match action {
            Action::Exec(_) => None,
            Action::Wasm(w) => Some(WasmV1 {
                module: w.module.0,
                module_bytes: w.module_bytes,
                fuel: w.fuel,
                memory_bytes: w.memory_bytes,
            }),
        }
    }
}

/// [`encode_with_action`] from the parts [`decode_with_action`] gives.
pub fn encode_parts<T: Serialize>(
    rec: &T,
    sealed: &[SealedEnv],
    placement: Option<&Placement>,
    wasm: Option<&WasmV1>,
) -> Vec<u8> {
    let Some(wasm) = wasm else {
        return encode_placed(rec, sealed, placement);
    };
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.push(RECORD_V5);
    let out = append(rec, out);
    let out = append(&SealedEnvV1::from_env(sealed), out);
    let out = append(&placement.map(PlacementV1::from_placement), out);
    append(wasm, out)
}

/// What [`encode_with_action`] wrote: the record, its sealed variables,
/// its placement and its function's module and limits (if it is one).
pub type Decoded<T> = (T, Vec<SealedEnv>, Option<Placement>, Option<WasmV1>);

/// Reads what [`encode_with_action`] (or an older layout) wrote.
pub fn decode_with_action<T: DeserializeOwned>(
    table: &'static str,
    key: impl ToString,
    bytes: &[u8],
) -> Result<Decoded<T>, RecordError> {
    let key = key.to_string();
    let Some((&RECORD_V5, rest)) = bytes.split_first() else {
        return decode_placed(table, key, bytes).map(|(r, s, p)| (r, s, p, None));
    };
    let corrupt = |reason: String| RecordError {
        table,
        key: key.clone(),
        reason,
    };
    let (rec, sealed, rest) = take_head::<T>(rest, &corrupt)?;
    let (placement, rest) = postcard::take_from_bytes::<Option<PlacementV1>>(rest)
        .map_err(|e| corrupt(format!("placement: {e}")))?;
    let wasm: WasmV1 = postcard::from_bytes(rest).map_err(|e| corrupt(format!("function: {e}")))?;
    let placement = placement
        .map(|p| p.into_placement(table, &key))
        .transpose()?;
    Ok((rec, SealedEnvV1::into_env(sealed), placement, Some(wasm)))
}

/// `spec` with the action the record's parts make: its exec (as the
/// record has it), or the function `wasm` with the record's arguments and
/// environment; and its sealed variables and placement.
pub fn assemble(
    table: &'static str,
    mut spec: TaskSpec,
    sealed: Vec<SealedEnv>,
    placement: Option<Placement>,
    wasm: Option<WasmV1>,
) -> Result<TaskSpec, RecordError> {
    if let (Some(wasm), Action::Exec(exec)) = (wasm, &spec.action) {
        let w = crate::wasm::WasmSpec {
            module: crate::wasm::ModuleHash(wasm.module),
            module_bytes: wasm.module_bytes,
            args: exec.args.clone(),
            env: exec.env.clone(),
            sealed_env: Vec::new(),
            fuel: wasm.fuel,
            memory_bytes: wasm.memory_bytes,
        };
        if let Some(why) = w.refusal() {
            return Err(RecordError {
                table,
                key: spec.id.to_string(),
                reason: format!("function: {why}"),
            });
        }
        spec.action = Action::Wasm(w);
    }
    let mut spec = spec.with_sealed_env(sealed);
    spec.placement = placement;
    Ok(spec)
}

/// A task as stored in a `tasks` table.
pub fn encode_task(t: &TaskSpec) -> Vec<u8> {
    encode_with_action(&TaskRecordV1::from_spec(t), &t.action, t.placement.as_ref())
}

/// A task written by [`encode_task`].
pub fn decode_task(table: &'static str, id: u64, bytes: &[u8]) -> Result<TaskSpec, RecordError> {
    let (rec, sealed, placement, wasm) = decode_with_action::<TaskRecordV1>(table, id, bytes)?;
    assemble(table, rec.into_spec(id)?, sealed, placement, wasm)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ScheduleV1 {
    At(i64),
    Every {
        period_ms: u64,
        anchor_ms: i64,
    },
    Cron {
        expr: String,
        tz: String,
    },
    /// (upstream task id, outcome bits); new in 0.4.
    After(Vec<(u64, u8)>),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecordV1 {
    pub name: Option<String>,
    pub revision: u64,
    pub created_at_ms: i64,
    pub target_agent: Option<u64>,
    pub target_selector: Vec<(String, String)>,
    pub schedule: ScheduleV1,
    pub window_start_ms: Option<i64>,
    pub window_end_ms: Option<i64>,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// 0 skip, 1 once, 2 all
    pub misfire_mode: u8,
    pub misfire_cap: u32,
    pub misfire_grace_ms: u64,
    pub retries: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub overlap_forbid: bool,
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecordV1 {
    pub task_id: u64,
    pub agent_id: u64,
    pub scheduled_at_ms: i64,
    pub attempt: u32,
    pub fired_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// Outcome::as_str
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub offline: bool,
    pub detail: Option<String>,
    pub stdout_tail: Vec<u8>,
    pub stderr_tail: Vec<u8>,
}

pub fn ts(table: &'static str, key: &str, ms: i64) -> Result<Timestamp, RecordError> {
    Timestamp::from_millis(ms).map_err(|e| RecordError {
        table,
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

impl TaskRecordV1 {
    pub fn from_spec(t: &TaskSpec) -> TaskRecordV1 {
        let (window_start, window_end) = t.schedule.window();
        let schedule = match t.schedule.kind() {
            ScheduleKind::At(at) => ScheduleV1::At(at.as_millis()),
            ScheduleKind::Every { period, anchor } => ScheduleV1::Every {
                period_ms: period.0,
                anchor_ms: anchor.as_millis(),
            },
            ScheduleKind::Cron { expr, tz } => ScheduleV1::Cron {
                expr: expr.as_str().to_owned(),
                tz: tz.name().to_owned(),
            },
            ScheduleKind::After(t) => {
                ScheduleV1::After(t.iter().map(|t| (t.upstream.0, u8::from(t.on))).collect())
            }
        };
        let (program, args, env, cwd) = match &t.action {
            Action::Exec(e) => (e.program.clone(), &e.args, &e.env, e.cwd.clone()),
            Action::Wasm(w) => (String::new(), &w.args, &w.env, None),
        };
        let (target_agent, target_selector) = match &t.target {
            Target::Agent(a) => (Some(a.0), Vec::new()),
            Target::Selector(s) => (None, s.clone()),
        };
        let p = &t.policies;
        let (misfire_mode, misfire_cap) = match p.misfire.mode {
            MisfireMode::Skip => (0, 0),
            MisfireMode::Once => (1, 0),
            MisfireMode::All { cap } => (2, cap),
        };
        TaskRecordV1 {
            name: t.name.clone(),
            revision: t.revision,
            created_at_ms: t.created_at.as_millis(),
            target_agent,
            target_selector,
            schedule,
            window_start_ms: window_start.map(Timestamp::as_millis),
            window_end_ms: window_end.map(Timestamp::as_millis),
            program,
            args: args.clone(),
            env: env.clone(),
            cwd,
            misfire_mode,
            misfire_cap,
            misfire_grace_ms: p.misfire.grace.0,
            retries: p.retry.retries,
            backoff_initial_ms: p.retry.backoff_initial.0,
            backoff_max_ms: p.retry.backoff_max.0,
            overlap_forbid: p.overlap == OverlapPolicy::Forbid,
            timeout_ms: p.timeout.map(|d| d.0),
        }
    }

    pub fn into_spec(self, id: u64) -> Result<TaskSpec, RecordError> {
        let key = id.to_string();
        let corrupt = |reason: String| RecordError {
            table: "tasks",
            key: key.clone(),
            reason,
        };
        let schedule = match self.schedule {
            ScheduleV1::At(at) => Ok(Schedule::at(ts("tasks", &key, at)?)),
            ScheduleV1::Every {
                period_ms,
                anchor_ms,
            } => Schedule::every(DurationMs(period_ms), ts("tasks", &key, anchor_ms)?),
            ScheduleV1::Cron { expr, tz } => Schedule::cron(&expr, &tz),
            ScheduleV1::After(t) => t
                .into_iter()
                .map(|(upstream, on)| {
                    Ok(Trigger {
                        upstream: TaskId(upstream),
                        on: OutcomeSet::try_from(on).map_err(ScheduleError::Triggers)?,
                    })
                })
                .collect::<Result<Vec<Trigger>, ScheduleError>>()
                .and_then(Schedule::after),
        }
        .map_err(|e| corrupt(e.to_string()))?;
        let start = self
            .window_start_ms
            .map(|v| ts("tasks", &key, v))
            .transpose()?;
        let end = self
            .window_end_ms
            .map(|v| ts("tasks", &key, v))
            .transpose()?;
        let schedule = schedule
            .with_window(start, end)
            .map_err(|e| corrupt(e.to_string()))?;
        let mode = match self.misfire_mode {
            0 => MisfireMode::Skip,
            1 => MisfireMode::Once,
            2 => MisfireMode::All {
                cap: self.misfire_cap,
            },
            m => return Err(corrupt(format!("unknown misfire mode {m}"))),
        };
        Ok(TaskSpec {
            id: TaskId(id),
            name: self.name,
            target: match self.target_agent {
                Some(a) => Target::Agent(AgentId(a)),
                None => Target::Selector(self.target_selector),
            },
            schedule,
            action: Action::Exec(ExecSpec {
                program: self.program,
                args: self.args,
                env: self.env,
                cwd: self.cwd,
                sealed_env: Vec::new(),
            }),
            policies: Policies {
                misfire: MisfirePolicy {
                    mode,
                    grace: DurationMs(self.misfire_grace_ms),
                },
                retry: RetryPolicy {
                    retries: self.retries,
                    backoff_initial: DurationMs(self.backoff_initial_ms),
                    backoff_max: DurationMs(self.backoff_max_ms),
                },
                overlap: if self.overlap_forbid {
                    OverlapPolicy::Forbid
                } else {
                    OverlapPolicy::Allow
                },
                timeout: self.timeout_ms.map(DurationMs),
            },
            revision: self.revision,
            created_at: ts("tasks", &key, self.created_at_ms)?,
            placement: None,
        })
    }
}

impl RunRecordV1 {
    pub fn from_run(r: &RunRecord) -> RunRecordV1 {
        RunRecordV1 {
            task_id: r.task_id.0,
            agent_id: r.agent_id.0,
            scheduled_at_ms: r.scheduled_at.as_millis(),
            attempt: r.attempt,
            fired_at_ms: r.fired_at.map(Timestamp::as_millis),
            finished_at_ms: r.finished_at.map(Timestamp::as_millis),
            outcome: r.outcome.as_str().to_owned(),
            exit_code: r.exit_code,
            offline: r.offline,
            detail: r.detail.clone(),
            stdout_tail: r.stdout_tail.clone(),
            stderr_tail: r.stderr_tail.clone(),
        }
    }

    pub fn into_run(self, seq: u64) -> Result<RunRecord, RecordError> {
        let key = seq.to_string();
        let Some(outcome) = Outcome::parse(&self.outcome) else {
            return Err(RecordError {
                table: "outbox",
                key,
                reason: format!("unknown outcome `{}`", self.outcome),
            });
        };
        Ok(RunRecord {
            task_id: TaskId(self.task_id),
            agent_id: AgentId(self.agent_id),
            scheduled_at: ts("outbox", &key, self.scheduled_at_ms)?,
            attempt: self.attempt,
            fired_at: self
                .fired_at_ms
                .map(|v| ts("outbox", &key, v))
                .transpose()?,
            finished_at: self
                .finished_at_ms
                .map(|v| ts("outbox", &key, v))
                .transpose()?,
            outcome,
            exit_code: self.exit_code,
            offline: self.offline,
            detail: self.detail,
            stdout_tail: self.stdout_tail,
            stderr_tail: self.stderr_tail,
        })
    }
}
