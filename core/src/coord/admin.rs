//! The admin API's rules: what `sundialctl` may ask and what each request
//! does to the store. Run as a [`super::StoreJob::Admin`] (on the shell's
//! blocking pool, or inline in the simulator); what must reach live
//! sessions comes back as [`FollowUp`]s for the node to carry out.

use std::collections::HashMap;

use sundial_protocol::policy::RETRIES_MAX;
use sundial_protocol::task::{labels_text, Action, Target};
use sundial_protocol::token::{hex, sha256};
use sundial_protocol::wire::{
    admin_name_refusal, chunk_by_size, AdminInfo, AdminRequest, AdminResponse, AgentInfo,
    AuditEntry, Role, TaskDraft, TaskInfo, TaskPatch, TokenInfo, LIST_CHUNK_BYTES_MAX,
    TASK_SPEC_BYTES_MAX,
};
use sundial_protocol::{AgentId, Outcome, ScheduleKind, TaskId, TaskSpec, Timestamp};

use super::{AdminId, Limits};
use crate::coord_store::{
    targets, AdminCert, Agent, ArrivalCursor, ArrivalQuery, CoordStore, JoinToken, Page, RunCursor,
    RunQuery, StoreError, StoreResult, StoredTask, ARRIVAL_PREFIX, PAGE_MAX,
};

/// Most runs listed by one `run list`.
pub const RUN_LIST_MAX: u32 = 10_000;
/// How far in the past an `at` instant or a window's end may lie when a task
/// is created (clock differences between admin and coordinator).
pub const PAST_SLACK_MS: i64 = 10_000;
/// Bytes of entropy the shell hands with every admin request (a new join
/// token's secret).
pub const ENTROPY_BYTES: usize = sundial_protocol::token::SECRET_BYTES;

/// The most triggered tasks one coordinator holds (an agent holds every
/// triggered task of its in memory).
pub const TRIGGERED_TASKS_MAX: usize = 4_096;
/// The longest chain of triggered tasks above one.
pub const TRIGGER_DEPTH_MAX: usize = 32;

/// Most audit entries listed by one `audit list`.
pub const AUDIT_LIST_MAX: u32 = 10_000;
/// The shortest and longest lifetime of an admin credential.
pub const ADMIN_TTL_MIN_MS: u64 = 60 * 60 * 1000;
pub const ADMIN_TTL_MAX_MS: u64 = 3 * 366 * 24 * 60 * 60 * 1000;
/// An admin credential's lifetime unless `--ttl` says otherwise (a year).
pub const ADMIN_TTL_DEFAULT_MS: u64 = 365 * 24 * 60 * 60 * 1000;

/// Who may do what: the role each admin request needs. Each role may do
/// what the roles below it may (viewer < operator < owner). One exhaustive
/// match, so a new request cannot be added without its rule.
///
/// | role     | may                                                        |
/// |----------|------------------------------------------------------------|
/// | viewer   | every read: agents, tasks, runs, tokens (never a secret),  |
/// |          | admins, the audit log                                      |
/// | operator | + tasks (create, update, cancel, pause, resume, run-now)   |
/// |          | and join tokens (create, revoke)                           |
/// | owner    | + admins (create, renew, revoke) and agents (revoke,       |
/// |          | forget)                                                    |
///
/// Any admin may also renew its own credential ([`permitted`]).
pub fn required_role(req: &AdminRequest) -> Role {
    use AdminRequest as R;
    match req {
        R::AgentList
        | R::AgentGet(_)
        | R::TaskList
        | R::TaskGet(_)
        | R::TokenList
        | R::RunList { .. }
        | R::AdminList
        | R::AuditList(_)
        | R::RunFollow { .. }
        | R::SealKeys(_)
        | R::ModuleGet(_) => Role::Viewer,
        R::TokenCreate { .. }
        | R::TokenRevoke(_)
        | R::TaskCreate(_)
        | R::TaskUpdate { .. }
        | R::TaskReseal { .. }
        | R::TaskCancel(_)
        | R::TaskRunNow(_)
        | R::TaskPause(_)
        | R::TaskResume(_)
        | R::ModuleUpload { .. } => Role::Operator,
        R::AgentRevoke(_)
        | R::AgentForget(_)
        | R::AdminCreate { .. }
        | R::AdminRenew { .. }
        | R::AdminRevoke(_) => Role::Owner,
    }
}

/// Whether `who` may make `req`; if not, why (naming the role it needs).
pub fn permitted(req: &AdminRequest, who: &AdminCert) -> Result<(), String> {
    let needs = required_role(req);
    if who.role >= needs {
        return Ok(());
    }
    if let AdminRequest::AdminRenew { name, .. } = req {
        if *name == who.name {
            return Ok(());
        }
    }
    Err(format!(
        "permission denied: `{}` needs the {needs} role; admin {:?} is {} {}",
        action(req),
        who.name,
        if who.role == Role::Operator {
            "an"
        } else {
            "a"
        },
        who.role
    ))
}

/// Whether a request changes something (and so is written to the audit
/// log when done); reads are logged only when refused.
pub fn is_change(req: &AdminRequest) -> bool {
    required_role(req) > Role::Viewer
}

/// The request as the audit log and refusals name it.
pub fn action(req: &AdminRequest) -> &'static str {
    use AdminRequest as R;
    match req {
        R::TokenCreate { .. } => "token create",
        R::TokenList => "token list",
        R::TokenRevoke(_) => "token revoke",
        R::AgentList => "agent list",
        R::AgentGet(_) => "agent get",
        R::AgentRevoke(_) => "agent revoke",
        R::AgentForget(_) => "agent forget",
        R::TaskCreate(_) => "task create",
        R::TaskList => "task list",
        R::TaskGet(_) => "task get",
        R::TaskCancel(_) => "task cancel",
        R::TaskUpdate { .. } => "task update",
        R::TaskRunNow(_) => "task run-now",
        R::TaskPause(_) => "task pause",
        R::TaskResume(_) => "task resume",
        R::RunList { .. } => "run list",
        R::AdminCreate { .. } => "admin create",
        R::AdminList => "admin list",
        R::AdminRenew { .. } => "admin renew",
        R::AdminRevoke(_) => "admin revoke",
        R::AuditList(_) => "audit list",
        R::RunFollow { .. } => "run follow",
        R::SealKeys(_) => "seal keys",
        R::TaskReseal { .. } => "task reseal",
        R::ModuleGet(_) => "module get",
        R::ModuleUpload { .. } => "module upload",
    }
}

/// What a request is about, as far as it says before it is answered.
pub fn subject(req: &AdminRequest) -> Option<String> {
    use AdminRequest as R;
    match req {
        R::AgentGet(a) | R::AgentRevoke(a) | R::AgentForget(a) => Some(format!("agent {a}")),
        R::TaskGet(t)
        | R::TaskCancel(t)
        | R::TaskRunNow(t)
        | R::TaskPause(t)
        | R::TaskResume(t)
        | R::TaskUpdate { id: t, .. }
        | R::TaskReseal { id: t, .. } => Some(format!("task {t}")),
        R::TokenRevoke(id) => Some(format!("token {}", id.to_ascii_lowercase())),
        R::ModuleGet(h) | R::ModuleUpload { hash: h, .. } => Some(format!("module {h}")),
        R::AdminCreate { name, .. } | R::AdminRenew { name, .. } | R::AdminRevoke(name) => {
            Some(format!("admin {name}"))
        }
        _ => None,
    }
}

/// Why an admin create or renew cannot be signed as asked (checked before
/// the CA signs anything); the end of the new credential's life if it can.
pub fn credential_refusal(req: &AdminRequest, now: Timestamp) -> Result<Timestamp, String> {
    let (name, ttl_ms) = match req {
        AdminRequest::AdminCreate { name, ttl_ms, .. }
        | AdminRequest::AdminRenew { name, ttl_ms, .. } => (name, *ttl_ms),
        _ => return Err("not a credential request".into()),
    };
    if let Some(why) = admin_name_refusal(name) {
        return Err(why);
    }
    if !(ADMIN_TTL_MIN_MS..=ADMIN_TTL_MAX_MS).contains(&ttl_ms) {
        return Err(format!(
            "--ttl must be between 1h and {}d",
            ADMIN_TTL_MAX_MS / 86_400_000
        ));
    }
    Ok(now.saturating_add_ms(i64::try_from(ttl_ms).unwrap_or(i64::MAX)))
}

/// A certificate the CA signed for an admin create or renew.
#[derive(Clone, Debug)]
pub struct Signed {
    pub cert_der: Vec<u8>,
    pub expires_at: Timestamp,
}

/// What the node knows of an agent that the store does not: for `agent list`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SeenView {
    pub online: bool,
    pub version: Option<String>,
    pub allow_exec: Vec<String>,
    pub outbox_len: Option<u64>,
    pub last_contact: Option<Timestamp>,
    pub report: Option<(sundial_protocol::wire::AgentReport, Timestamp)>,
    pub functions: Option<sundial_protocol::wire::FunctionsHello>,
    /// Its `--allow-env` patterns, if its Hello told them (0.8 and later).
    pub allow_env: Option<Vec<String>>,
}

/// What an admin request is answered with, besides the store.
#[derive(Clone, Debug)]
pub struct AdminContext {
    pub who: AdminId,
    pub now: Timestamp,
    pub limits: Limits,
    /// The CA's certificate fingerprint (written into join tokens).
    pub ca_sha256: [u8; 32],
    /// Fresh randomness from the shell (a join token's secret).
    pub entropy: [u8; ENTROPY_BYTES],
    /// The node's view of the agents the request is about (agent list/get).
    pub seen: HashMap<AgentId, SeenView>,
    /// Other coordinators share the store: an agent in session with one of
    /// them is online too (by the store's session mark).
    pub shared: bool,
    /// The request's audit entry as far as the node knows it (who, from
    /// where, what); a change completes it in its own transaction.
    pub audit: AuditEntry,
    /// The certificate of an admin create or renew.
    pub signed: Option<Signed>,
    /// The asking admin's role: a viewer is shown no environment values.
    pub role: Role,
}

/// What a viewer is shown in place of an environment value.
pub const REDACTED: &str = "(hidden from viewers)";

/// A task as a viewer may see it: environment names, not values (they
/// may hold keys).
fn for_role(mut t: TaskInfo, role: Role) -> TaskInfo {
    // Sealed values are for their agents: admins see names and recipients.
    t.spec.action = t.spec.action.without_ciphertext();
    if role < Role::Operator {
        for (_, v) in t.spec.action.env_mut() {
            *v = REDACTED.into();
        }
    }
    t
}

/// How recently an agent marked in session with another coordinator must
/// have been seen to be shown online (sessions report its clock every 30 s;
/// a coordinator that died leaves its marks, which go stale).
pub const SESSION_MARK_FRESH_MS: i64 = 90_000;

/// A change an admin made, for the event stream (with who made it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminChange {
    TokenCreated {
        uses: u32,
    },
    TokenRevoked {
        id: String,
    },
    TaskCreated {
        task: TaskId,
        revision: u64,
    },
    TaskUpdated {
        task: TaskId,
        revision: u64,
    },
    TaskCancelled {
        task: TaskId,
        revision: u64,
    },
    TaskPaused {
        task: TaskId,
        paused: bool,
        revision: u64,
    },
    AgentRevoked {
        agent: AgentId,
    },
    AgentForgotten {
        agent: AgentId,
    },
    RunNow {
        task: TaskId,
        sent: usize,
        offline: usize,
    },
    AdminCreated {
        name: String,
        role: Role,
    },
    AdminRenewed {
        name: String,
    },
    AdminRevoked {
        name: String,
    },
}

/// What the node must do after an admin request was answered by the store.
#[derive(Clone, Debug, PartialEq)]
pub enum FollowUp {
    /// A task targeting this changed at `revision`: wake its sessions.
    Announce {
        target: Target,
        revision: u64,
    },
    /// The agent was revoked: forget its certificate, close its sessions.
    Revoked {
        agent: AgentId,
        cert_sha256: [u8; 32],
    },
    /// Send the run-now to these agents' live sessions; the answer says
    /// which were reached.
    RunNow {
        task: TaskId,
        at: Timestamp,
        agents: Vec<AgentId>,
    },
    Changed(AdminChange),
    /// An admin's certificate changed: `removed` stops working (its
    /// connections close, saying `why`), `added` is known from now on.
    AdminCert {
        removed: Option<[u8; 32]>,
        added: Option<([u8; 32], AdminCert)>,
        why: String,
    },
    /// Written to the audit log with the change (for the event stream).
    Audited(AuditEntry),
}

/// The store's answer to one admin request.
#[derive(Clone, Debug, Default)]
pub struct AdminAnswer {
    pub answers: Vec<AdminResponse>,
    pub follow: Vec<FollowUp>,
}

impl AdminAnswer {
    fn one(r: AdminResponse) -> StoreResult<AdminAnswer> {
        Ok(AdminAnswer {
            answers: vec![r],
            follow: Vec::new(),
        })
    }

    fn list(answers: Vec<AdminResponse>) -> StoreResult<AdminAnswer> {
        Ok(AdminAnswer {
            answers,
            follow: Vec::new(),
        })
    }

    fn with(mut self, f: FollowUp) -> AdminAnswer {
        self.follow.push(f);
        self
    }
}

/// Every item of a listing, read a page (one transaction) at a time.
pub fn all_pages<T, K: Copy>(
    key: impl Fn(&T) -> K,
    mut page: impl FnMut(Option<K>) -> StoreResult<Vec<T>>,
) -> StoreResult<Vec<T>> {
    let mut out: Vec<T> = Vec::new();
    loop {
        let got = page(out.last().map(&key))?;
        let full = got.len() >= PAGE_MAX;
        out.extend(got);
        if !full {
            return Ok(out);
        }
    }
}

pub fn all_agents(store: &dyn CoordStore) -> StoreResult<Vec<Agent>> {
    all_pages(|a: &Agent| a.id, |after| store.agents(after, PAGE_MAX))
}

pub fn all_tasks(store: &dyn CoordStore) -> StoreResult<Vec<StoredTask>> {
    all_pages(
        |t: &StoredTask| t.spec.id,
        |after| store.tasks(after, PAGE_MAX),
    )
}

pub fn all_admins(store: &dyn CoordStore) -> StoreResult<Vec<AdminInfo>> {
    let mut out: Vec<AdminInfo> = Vec::new();
    loop {
        let got = store.admins(out.last().map(|a| a.name.as_str()), PAGE_MAX)?;
        let full = got.len() >= PAGE_MAX;
        out.extend(got);
        if !full {
            return Ok(out);
        }
    }
}

pub fn all_tokens(store: &dyn CoordStore) -> StoreResult<Vec<JoinToken>> {
    all_pages(
        |t: &JoinToken| t.secret_sha256,
        |after| store.tokens(after, PAGE_MAX),
    )
}

fn agent_info(r: Agent, seen: Option<&SeenView>, ctx: &AdminContext) -> AgentInfo {
    let seen = seen.cloned().unwrap_or_default();
    let last_seen = match (seen.last_contact, r.last_seen) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    // In session here, or (several coordinators) marked in session with
    // another and seen lately.
    let elsewhere = ctx.shared
        && r.in_session
        && !r.revoked
        && last_seen.is_some_and(|t| t.millis_since(ctx.now) > -SESSION_MARK_FRESH_MS);
    AgentInfo {
        agent_id: r.id,
        name: r.name,
        labels: r.labels,
        online: seen.online || elsewhere,
        revoked: r.revoked,
        enrolled_at: r.enrolled_at,
        last_seen,
        clock_offset_ms: r.clock_offset_ms,
        rtt_ms: r.rtt_ms,
        version: seen.version,
        allow_exec: seen.allow_exec,
        outbox_len: seen.outbox_len,
        functions: seen.functions,
        reported_at: seen.report.as_ref().map(|(_, at)| *at),
        report: seen.report.map(|(r, _)| r),
        allow_env: seen.allow_env,
    }
}

/// Milliseconds a run-now's instant may move past an occurrence.
pub const RUN_NOW_SHIFT_MAX_MS: i64 = 1_000;

/// A run-now's instant, its run key's `scheduled_at`: now, or the first
/// millisecond after it that is not an occurrence of the schedule — an
/// occurrence's key would be run twice, once now and once on time (an
/// `every` task anchored at its creation meets a run-now on its grid one
/// time in `period` ms).
pub fn run_now_instant(schedule: &sundial_protocol::Schedule, now: Timestamp) -> Timestamp {
    let mut at = now;
    for _ in 0..RUN_NOW_SHIFT_MAX_MS {
        if schedule.next_after(at.saturating_add_ms(-1)) != Some(at) {
            return at;
        }
        at = at.saturating_add_ms(1);
    }
    at
}

/// A task as the admin sees it: state, next occurrence, latest runs, reach.
fn task_info(
    store: &dyn CoordStore,
    task: StoredTask,
    agents: &[Agent],
    detailed: bool,
    now: Timestamp,
) -> StoreResult<TaskInfo> {
    let StoredTask {
        spec,
        cancelled,
        paused,
        created_at,
    } = task;
    let mut last_runs = store.last_runs(spec.id, PAGE_MAX)?;
    let reached: Vec<AgentId> = agents
        .iter()
        .filter(|r| !r.revoked && targets(&spec.target, r.id, &r.labels))
        .map(|r| r.id)
        .collect();
    // Done: a one-shot whose run is recorded, finally, on every agent it reaches.
    let done = match spec.schedule.kind() {
        ScheduleKind::At(at) if !cancelled && !reached.is_empty() => reached.iter().all(|a| {
            last_runs.iter().any(|l| {
                l.agent_id == *a
                    && l.scheduled_at == *at
                    && (!l.outcome.is_retryable() || l.attempt > spec.policies.retry.retries)
            })
        }),
        _ => false,
    };
    let next = if cancelled || paused || done {
        None
    } else {
        spec.schedule.next_after(now)
    };
    // Every agent's latest run rejected: were they all, ever?
    let only_rejected = if detailed
        && !last_runs.is_empty()
        && last_runs.iter().all(|l| l.outcome == Outcome::Rejected)
    {
        let lookback = sundial_protocol::wire::REJECTED_LOOKBACK;
        let page = store.runs(&RunQuery {
            task: Some(spec.id),
            agent: None,
            since: None,
            limit: lookback as usize,
            page: Page::Latest,
            forward_from_since: false,
        })?;
        (!page.runs.is_empty() && page.runs.iter().all(|r| r.outcome == Outcome::Rejected))
            .then(|| u32::try_from(page.runs.len()).unwrap_or(lookback))
    } else {
        None
    };
    if !detailed {
        last_runs.sort_by_key(|l| (l.scheduled_at, l.attempt));
        let latest = last_runs.pop();
        last_runs = latest.into_iter().collect();
    }
    Ok(TaskInfo {
        spec,
        cancelled,
        paused,
        done,
        next,
        last_runs,
        reached: if detailed { reached } else { Vec::new() },
        created_at,
        only_rejected,
    })
}

/// Why a task may not be created as drafted: the coordinator's own checks,
/// whatever client sent it.
pub fn draft_refusal(limits: &Limits, draft: &TaskDraft, now: Timestamp) -> Option<String> {
    match &draft.action {
        Action::Exec(exec) if exec.program.trim().is_empty() => {
            return Some("the program is empty".into())
        }
        Action::Exec(_) => {}
        Action::Wasm(w) => {
            if let Some(why) = w.refusal() {
                return Some(why);
            }
            if w.module_bytes > limits.wasm_module_max {
                return Some(format!(
                    "the module is {} bytes; the most this coordinator takes is {} (its --wasm-module-max setting)",
                    w.module_bytes, limits.wasm_module_max
                ));
            }
        }
    }
    let sealed_env = draft.action.sealed_env();
    let p = &draft.policies;
    if p.timeout.is_some_and(|t| t.0 == 0) {
        return Some("--timeout must be longer than 0s".into());
    }
    if p.retry.retries > RETRIES_MAX {
        return Some(format!(
            "--retries {} exceeds the most allowed, {RETRIES_MAX}",
            p.retry.retries
        ));
    }
    if p.retry.retries > 0 && p.retry.backoff_initial < limits.backoff_min {
        return Some(format!(
            "--backoff {} is shorter than this coordinator's minimum of {} (serve --backoff-min)",
            p.retry.backoff_initial, limits.backoff_min
        ));
    }
    if p.retry.backoff_max < p.retry.backoff_initial {
        return Some(format!(
            "--backoff-max {} is shorter than --backoff {}",
            p.retry.backoff_max, p.retry.backoff_initial
        ));
    }
    match draft.schedule.kind() {
        ScheduleKind::Every { period, .. } if *period < limits.period_min => {
            return Some(format!(
                "--every {period} is shorter than this coordinator's minimum period of {} (serve --period-min)",
                limits.period_min
            ));
        }
        ScheduleKind::At(at) if at.millis_since(now) < -PAST_SLACK_MS => {
            return Some(format!(
                "--at {at} is in the past (now is {now}); use --at now to run at once"
            ));
        }
        _ => {}
    }
    if let (_, Some(end)) = draft.schedule.window() {
        if end.millis_since(now) < -PAST_SLACK_MS {
            return Some(format!("--end {end} is in the past (now is {now})"));
        }
    }
    if let Some(why) = sundial_protocol::seal::refusal(sealed_env, draft.action.env()) {
        return Some(why);
    }
    if let Some(ask) = draft.placement.0 {
        let p = match ask.placement() {
            Ok(p) => p,
            Err(why) => return Some(format!("--placement/--lease: {why}")),
        };
        if !matches!(draft.target, Target::Selector(_)) {
            return Some(format!(
                "--placement {} needs a selector (--selector k=v): one agent is already one",
                p.mode
            ));
        }
        if !draft.schedule.triggers().is_empty() {
            return Some(format!(
                "--placement {} is for tasks that run by time; a triggered task runs where its upstream ran",
                p.mode
            ));
        }
    }
    // Sealed values have their own bound (above).
    let size = postcard::experimental::serialized_size(draft).unwrap_or(usize::MAX)
        - postcard::experimental::serialized_size(sealed_env).unwrap_or(0);
    if size > TASK_SPEC_BYTES_MAX {
        return Some(format!(
            "the task is {size} bytes (program, arguments, environment); the most allowed is {TASK_SPEC_BYTES_MAX}: pass large data in a file on the device instead"
        ));
    }
    None
}

/// Whether every agent `down` reaches is reached by `up` as well (what a
/// triggered task needs of each upstream: it runs on the same agents).
fn reach_within(down: &Target, up: &Target, store: &dyn CoordStore) -> StoreResult<bool> {
    Ok(match (down, up) {
        (Target::Agent(a), Target::Agent(b)) => a == b,
        (Target::Agent(a), Target::Selector(sel)) => store
            .agent(*a)?
            .is_some_and(|r| sel.iter().all(|p| r.labels.contains(p))),
        (Target::Selector(d), Target::Selector(u)) => u.iter().all(|p| d.contains(p)),
        (Target::Selector(_), Target::Agent(_)) => false,
    })
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Agent(a) => format!("agent {a}"),
        Target::Selector(s) => format!("selector {}", labels_text(s)),
    }
}

/// Why a triggered task may not be stored as drafted: an upstream that is
/// unknown or cancelled, or does not reach the agents this task reaches
/// (triggers are decided on the device: same agent only); upstreams of a
/// fan-in that do not share their occurrences; a cycle (`own`: the task
/// being updated); a chain too deep; too many triggered tasks. `None` for
/// a task by time, or one that may be stored.
fn trigger_refusal(
    store: &dyn CoordStore,
    draft: &TaskDraft,
    own: Option<TaskId>,
) -> StoreResult<Option<String>> {
    let triggers = draft.schedule.triggers();
    if triggers.is_empty() {
        return Ok(None);
    }
    // The schedule an upstream's occurrences come from: its own, or, for a
    // triggered one, that of its (first) upstream, and so on up.
    let root = |mut id: TaskId| -> StoreResult<Result<sundial_protocol::Schedule, String>> {
        for _ in 0..=TRIGGER_DEPTH_MAX {
            if Some(id) == own {
                return Ok(Err(format!(
                    "--after: the chain above {id} leads back to it; triggers may not form a cycle"
                )));
            }
            let Some(t) = store.task(id)? else {
                return Ok(Err(format!("--after: no task {id}")));
            };
            match t.spec.schedule.triggers().first() {
                None => return Ok(Ok(t.spec.schedule)),
                Some(up) => id = up.upstream,
            }
        }
        Ok(Err(format!(
            "--after: the chain of triggered tasks above {id} is deeper than {TRIGGER_DEPTH_MAX}"
        )))
    };
    let mut roots: Vec<(TaskId, sundial_protocol::Schedule)> = Vec::new();
    for t in triggers {
        let Some(up) = store.task(t.upstream)? else {
            return Ok(Some(format!("--after: no task {}", t.upstream)));
        };
        if up.cancelled {
            return Ok(Some(format!(
                "--after: task {} is cancelled; it triggers nothing",
                t.upstream
            )));
        }
        if !reach_within(&draft.target, &up.spec.target, store)? {
            return Ok(Some(format!(
                "--after {}: it runs on {}, this task on {}; a triggered task runs on the same \
                 agents as each of its upstreams (triggers are decided on the device, offline): \
                 give it the same target, or leave the target out to take the upstream's",
                t.upstream,
                target_text(&up.spec.target),
                target_text(&draft.target)
            )));
        }
        // Every task above it, for cycles and depth.
        let mut above = vec![(t.upstream, 0usize)];
        while let Some((id, depth)) = above.pop() {
            if Some(id) == own {
                return Ok(Some(format!(
                    "--after {}: the chain above it leads back to this task; triggers may not form a cycle",
                    t.upstream
                )));
            }
            if depth >= TRIGGER_DEPTH_MAX {
                return Ok(Some(format!(
                    "--after {}: the chain of triggered tasks above it is deeper than {TRIGGER_DEPTH_MAX}",
                    t.upstream
                )));
            }
            if let Some(task) = store.task(id)? {
                above.extend(
                    task.spec
                        .schedule
                        .triggers()
                        .iter()
                        .map(|u| (u.upstream, depth + 1)),
                );
            }
        }
        match root(t.upstream)? {
            Ok(r) => roots.push((t.upstream, r)),
            Err(why) => return Ok(Some(why)),
        }
    }
    if let Some(((a, ra), (b, rb))) = roots.first().and_then(|first| {
        roots
            .iter()
            .find(|(_, r)| *r != first.1)
            .map(|o| (first, o))
    }) {
        return Ok(Some(format!(
            "--after: {a} ({ra}) and {b} ({rb}) do not share their occurrences; a task after \
             several fires for an occurrence when all of them have ended it, so they must \
             run on the same schedule"
        )));
    }
    if own.is_none() {
        let triggered = all_tasks(store)?
            .iter()
            .filter(|t| !t.cancelled && !t.spec.schedule.triggers().is_empty())
            .count();
        if triggered >= TRIGGERED_TASKS_MAX {
            return Ok(Some(format!(
                "this coordinator holds {triggered} triggered tasks, the most allowed \
                 ({TRIGGERED_TASKS_MAX}: each agent holds all of its in memory)"
            )));
        }
    }
    Ok(None)
}

/// Applies `task update`'s changes to a task.
pub fn apply_patch(spec: &mut TaskSpec, p: TaskPatch) {
    if let Some(s) = p.schedule {
        spec.schedule = s;
    }
    match (&mut spec.action, p.action) {
        (Action::Exec(exec), Some(Action::Exec(new))) => {
            exec.program = new.program;
            exec.args = new.args;
        }
        // `task update -- ARGS` of a function: the words are its arguments.
        (Action::Wasm(w), Some(Action::Exec(new))) => {
            w.args = std::iter::once(new.program).chain(new.args).collect();
        }
        (Action::Wasm(w), Some(Action::Wasm(new))) => {
            w.module = new.module;
            w.module_bytes = new.module_bytes;
            w.args = new.args;
            w.fuel = new.fuel;
            w.memory_bytes = new.memory_bytes;
        }
        // Another kind of action: the new one, with the task's environment.
        (action, Some(mut new)) => {
            *new.env_mut() = std::mem::take(action.env_mut());
            *new.sealed_env_mut() = std::mem::take(action.sealed_env_mut());
            *action = new;
        }
        (_, None) => {}
    }
    if let Some(env) = p.env {
        *spec.action.env_mut() = env;
    }
    if let (Some(cwd), Action::Exec(exec)) = (p.cwd, &mut spec.action) {
        exec.cwd = cwd;
    }
    let pol = &mut spec.policies;
    if let Some(m) = p.misfire {
        pol.misfire.mode = m;
    }
    if let Some(g) = p.grace {
        pol.misfire.grace = g;
    }
    if let Some(r) = p.retries {
        pol.retry.retries = r;
    }
    if let Some(b) = p.backoff {
        pol.retry.backoff_initial = b;
    }
    if let Some(b) = p.backoff_max {
        pol.retry.backoff_max = b;
    }
    if let Some(t) = p.timeout {
        pol.timeout = t;
    }
    if let Some(o) = p.overlap {
        pol.overlap = o;
    }
}

/// A patched task, checked as a new one would be, stored if nobody changed
/// it meanwhile (compare-and-set on the revision read).
fn update(
    store: &dyn CoordStore,
    ctx: &AdminContext,
    id: TaskId,
    patch: TaskPatch,
) -> StoreResult<AdminAnswer> {
    let Some(StoredTask {
        mut spec,
        cancelled,
        ..
    }) = store.task(id)?
    else {
        return Err(StoreError::NotFound(format!("no task {id}")));
    };
    if cancelled {
        return Err(StoreError::Refused(format!("task {id} is cancelled")));
    }
    let read_revision = spec.revision;
    apply_patch(&mut spec, patch);
    let draft = draft_of(&spec);
    if let Some(why) = draft_refusal(&ctx.limits, &draft, ctx.now) {
        return Err(StoreError::Refused(why));
    }
    if let Some(why) = trigger_refusal(store, &draft, Some(id))? {
        return Err(StoreError::Refused(why));
    }
    module_check(store, &draft.action)?;
    let revision = store.update_task(&spec, read_revision, Some(&ctx.audit))?;
    Ok(AdminAnswer::one(AdminResponse::Updated { revision })?
        .with(FollowUp::Audited(ctx.audit.for_task(id, revision)))
        .with(FollowUp::Announce {
            target: spec.target,
            revision,
        })
        .with(FollowUp::Changed(AdminChange::TaskUpdated {
            task: id,
            revision,
        })))
}

/// The agents `target` reaches now (not revoked, not forgotten).
fn reached_agents(store: &dyn CoordStore, target: &Target) -> StoreResult<Vec<Agent>> {
    Ok(match target {
        Target::Agent(a) => store
            .agent(*a)?
            .filter(|r| !r.revoked && !r.forgotten)
            .into_iter()
            .collect(),
        Target::Selector(_) => all_agents(store)?
            .into_iter()
            .filter(|r| !r.revoked && !r.forgotten && targets(target, r.id, &r.labels))
            .collect(),
    })
}

/// `task reseal`: the named sealed variables replaced (added if new), the
/// others kept; a new revision, sent to the agents it reaches.
fn reseal(
    store: &dyn CoordStore,
    ctx: &AdminContext,
    id: TaskId,
    sealed: Vec<sundial_protocol::seal::SealedEnv>,
) -> StoreResult<AdminAnswer> {
    let Some(StoredTask {
        mut spec,
        cancelled,
        ..
    }) = store.task(id)?
    else {
        return Err(StoreError::NotFound(format!("no task {id}")));
    };
    if cancelled {
        return Err(StoreError::Refused(format!("task {id} is cancelled")));
    }
    if sealed.is_empty() {
        return Err(StoreError::Refused(
            "nothing to reseal: give --secret-env or --secret-env-file".into(),
        ));
    }
    let read_revision = spec.revision;
    {
        let sealed_env = spec.action.sealed_env_mut();
        for s in sealed {
            match sealed_env.iter_mut().find(|o| o.name == s.name) {
                Some(o) => *o = s,
                None => sealed_env.push(s),
            }
        }
    }
    let draft = draft_of(&spec);
    if let Some(why) = draft_refusal(&ctx.limits, &draft, ctx.now) {
        return Err(StoreError::Refused(why));
    }
    let reached = reached_agents(store, &spec.target)?;
    let warnings = reach_warnings(ctx, &draft, &reached)
        .into_iter()
        .filter(|w| w.contains("sealed"))
        .collect::<Vec<_>>();
    let revision = store.update_task(&spec, read_revision, Some(&ctx.audit))?;
    let answer = if warnings.is_empty() {
        AdminResponse::Updated { revision }
    } else {
        AdminResponse::TaskCreatedWarn { id, warnings }
    };
    Ok(AdminAnswer::one(answer)?
        .with(FollowUp::Audited(ctx.audit.for_task(id, revision)))
        .with(FollowUp::Announce {
            target: spec.target,
            revision,
        })
        .with(FollowUp::Changed(AdminChange::TaskUpdated {
            task: id,
            revision,
        })))
}

/// A stored task as a draft, for the checks a create makes.
fn draft_of(spec: &TaskSpec) -> TaskDraft {
    TaskDraft {
        name: spec.name.clone(),
        target: spec.target.clone(),
        schedule: spec.schedule.clone(),
        action: spec.action.clone(),
        policies: spec.policies,
        anchor_at_creation: false,
        // Its mode and window, not its plan (a draft's is empty).
        placement: spec
            .placement
            .as_ref()
            .map(|p| sundial_protocol::placement::PlacementAsk::new(p.mode, p.lease))
            .into(),
    }
}

/// A function's module must be stored here, as the task says it is.
fn module_check(store: &dyn CoordStore, action: &Action) -> StoreResult<()> {
    let Action::Wasm(w) = action else {
        return Ok(());
    };
    match store.module(w.module)? {
        None => Err(StoreError::Refused(format!(
            "module {} is not on this coordinator: upload it first (`sundialctl task create --wasm FILE` does)",
            w.module
        ))),
        Some(bytes) if bytes.len() as u64 != w.module_bytes => Err(StoreError::Refused(format!(
            "module {} is {} bytes, not {}",
            w.module,
            bytes.len(),
            w.module_bytes
        ))),
        Some(_) => Ok(()),
    }
}

/// At most this many agents are named in one warning.
const WARN_AGENTS_MAX: usize = 5;

/// What the node knows will go wrong where a new task lands: agents whose
/// allowlist (as their last Hello told it) refuses its program, so every
/// run there would be recorded rejected; and agents that are offline, which
/// get the task only when they reconnect.
fn reach_warnings(ctx: &AdminContext, draft: &TaskDraft, reached: &[Agent]) -> Vec<String> {
    let sealed_env = draft.action.sealed_env();
    let name = |a: &Agent| match &a.name {
        Some(n) => format!("{n} ({})", a.id),
        None => a.id.to_string(),
    };
    let listed = |agents: &[String]| {
        let mut text = agents
            .iter()
            .take(WARN_AGENTS_MAX)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if agents.len() > WARN_AGENTS_MAX {
            text.push_str(&format!(" and {} more", agents.len() - WARN_AGENTS_MAX));
        }
        text
    };
    let mut refusing = Vec::new();
    let mut env_refused: Vec<String> = Vec::new();
    let mut offline = Vec::new();
    let mut old = Vec::new();
    let triggered = !draft.schedule.triggers().is_empty();
    let mut unsealed: Vec<String> = Vec::new();
    let mut old_sealed = Vec::new();
    let mut no_functions = Vec::new();
    let mut over_ceiling = Vec::new();
    let mut old_wasm = Vec::new();
    for a in reached {
        let missing: Vec<&str> = sealed_env
            .iter()
            .filter(|s| s.for_agent(a.id).is_none())
            .map(|s| s.name.as_str())
            .collect();
        if !missing.is_empty() {
            unsealed.push(format!("{} (no {})", name(a), missing.join(", ")));
        }
        let elsewhere = ctx.shared && a.in_session;
        let Some(seen) = ctx.seen.get(&a.id) else {
            if !elsewhere {
                offline.push(name(a));
            }
            continue;
        };
        if !seen.online && !elsewhere {
            offline.push(name(a));
        }
        if triggered
            && seen
                .version
                .as_deref()
                .is_some_and(|v| !sundial_protocol::wire::agent_knows_triggers(v))
        {
            old.push(name(a));
        }
        if !sealed_env.is_empty()
            && seen
                .version
                .as_deref()
                .is_some_and(|v| !sundial_protocol::wire::agent_knows_sealed(v))
        {
            old_sealed.push(name(a));
        }
        // An allowlist told in full (a clipped pattern ends in `…`, and a
        // Hello carries at most 32): the agent's own glob rule decides.
        let told = seen.version.is_some()
            && seen.allow_exec.len() < 32
            && !seen.allow_exec.iter().any(|p| p.ends_with('…'));
        // Environment variables: by the agent's own rule, on the patterns
        // its Hello told in full (0.8 and later).
        if let (Action::Exec(exec), Some(allow_env)) = (&draft.action, &seen.allow_env) {
            let in_full = allow_env.len() < sundial_protocol::wire::HELLO_ENV_PATTERNS_MAX
                && !allow_env.iter().any(|p| p.ends_with('…'));
            if in_full {
                let names = exec
                    .env
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .chain(sealed_env.iter().map(|s| s.name.as_str()));
                let mut refused: Vec<&str> = names
                    .filter(|n| sundial_protocol::policy::env_refusal(allow_env, n).is_some())
                    .collect();
                refused.dedup();
                if !refused.is_empty() {
                    env_refused.push(format!("{} [{}]", name(a), refused.join(", ")));
                }
            }
        }
        match &draft.action {
            Action::Exec(exec)
                if told
                    && !seen
                        .allow_exec
                        .iter()
                        .any(|p| sundial_protocol::policy::glob_match(p, &exec.program)) =>
            {
                refusing.push(name(a))
            }
            Action::Exec(_) => {}
            Action::Wasm(w) => {
                let version = seen.version.as_deref();
                if version.is_some_and(|v| !sundial_protocol::wire::agent_knows_wasm(v)) {
                    old_wasm.push(name(a));
                } else if let Some(f) = &seen.functions {
                    if !f.allowed {
                        no_functions.push(name(a));
                    } else if w.fuel() > f.fuel_max
                        || w.memory_bytes() > f.memory_max
                        || w.module_bytes > f.module_max
                    {
                        over_ceiling.push(format!(
                            "{} (at most fuel {}, memory {}, module {})",
                            name(a),
                            f.fuel_max,
                            sundial_protocol::wasm::show_bytes(f.memory_max),
                            sundial_protocol::wasm::show_bytes(f.module_max)
                        ));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    if let (false, Action::Exec(exec)) = (refusing.is_empty(), &draft.action) {
        out.push(format!(
            "{} {} not allow `{}` (--allow-exec on the device): every run there will be recorded rejected until the device owner allows it",
            listed(&refusing),
            if refusing.len() == 1 { "does" } else { "do" },
            exec.program
        ));
    }
    if !env_refused.is_empty() {
        out.push(format!(
            "{} {} not allow the environment variables named (--allow-env on the device): every run there will be recorded rejected until the device owner allows them",
            listed(&env_refused),
            if env_refused.len() == 1 { "does" } else { "do" },
        ));
    }
    if !no_functions.is_empty() {
        out.push(format!(
            "{} {} not allow functions (--allow-wasm on the device): every run there will be recorded rejected until the device owner allows them",
            listed(&no_functions),
            if no_functions.len() == 1 { "does" } else { "do" },
        ));
    }
    if !over_ceiling.is_empty() {
        out.push(format!(
            "the function asks for more than {} allow{}: every run there will be recorded rejected",
            listed(&over_ceiling),
            if over_ceiling.len() == 1 { "s" } else { "" },
        ));
    }
    if !old_wasm.is_empty() {
        out.push(format!(
            "{} {} an agent older than 0.7, which does not run functions: {} the task once upgraded",
            listed(&old_wasm),
            if old_wasm.len() == 1 { "runs" } else { "run" },
            if old_wasm.len() == 1 { "it gets" } else { "they get" },
        ));
    }
    if !old.is_empty() {
        out.push(format!(
            "{} {} an agent older than 0.4, which does not know triggered tasks: {} the task once upgraded",
            listed(&old),
            if old.len() == 1 { "runs" } else { "run" },
            if old.len() == 1 { "it gets" } else { "they get" },
        ));
    }
    if !unsealed.is_empty() {
        out.push(format!(
            "{} {} no value sealed to {}: its runs there are recorded rejected until `sundialctl task reseal`",
            listed(&unsealed),
            if unsealed.len() == 1 { "has" } else { "have" },
            if unsealed.len() == 1 { "it" } else { "them" },
        ));
    }
    if !old_sealed.is_empty() {
        out.push(format!(
            "{} {} an agent older than 0.5, which cannot open sealed variables: {} the task once upgraded",
            listed(&old_sealed),
            if old_sealed.len() == 1 { "runs" } else { "run" },
            if old_sealed.len() == 1 { "it gets" } else { "they get" },
        ));
    }
    if !offline.is_empty() {
        out.push(format!(
            "{} {} offline now: the task reaches {} when {} reconnect{}; occurrences due before then follow the misfire policy",
            listed(&offline),
            if offline.len() == 1 { "is" } else { "are" },
            if offline.len() == 1 { "it" } else { "them" },
            if offline.len() == 1 { "it" } else { "they" },
            if offline.len() == 1 { "s" } else { "" }
        ));
    }
    out
}

fn create(
    store: &dyn CoordStore,
    ctx: &AdminContext,
    mut draft: TaskDraft,
) -> StoreResult<AdminAnswer> {
    let now = ctx.now;
    if let Some(why) = draft_refusal(&ctx.limits, &draft, now) {
        return Err(StoreError::Refused(why));
    }
    if let Some(why) = trigger_refusal(store, &draft, None)? {
        return Err(StoreError::Refused(why));
    }
    module_check(store, &draft.action)?;
    let mut warnings = Vec::new();
    let reached: Vec<Agent> = match &draft.target {
        Target::Agent(a) => match store.agent(*a)? {
            None => return Err(StoreError::NotFound(format!("no agent {a}"))),
            Some(r) if r.revoked => {
                return Err(StoreError::Refused(format!(
                    "agent {a} is revoked; it receives no tasks"
                )))
            }
            Some(r) => vec![r],
        },
        Target::Selector(sel) => {
            let reached: Vec<Agent> = all_agents(store)?
                .into_iter()
                .filter(|r| !r.revoked && sel.iter().all(|p| r.labels.contains(p)))
                .collect();
            if reached.is_empty() {
                warnings.push(format!(
                    "the selector {} matches no agent yet; agents that join with these labels will receive the task",
                    labels_text(sel)
                ));
            }
            reached
        }
    };
    warnings.extend(reach_warnings(ctx, &draft, &reached));
    if draft.anchor_at_creation {
        if let ScheduleKind::Every { period, .. } = draft.schedule.kind() {
            let (start, end) = draft.schedule.window();
            draft.schedule = sundial_protocol::Schedule::every(*period, now)
                .and_then(|s| s.with_window(start, end))
                .map_err(|e| StoreError::Refused(e.to_string()))?;
        }
    }
    let spec = store.create_task(draft, now, Some(&ctx.audit))?;
    let answer = if warnings.is_empty() {
        AdminResponse::TaskCreated(spec.id)
    } else {
        AdminResponse::TaskCreatedWarn {
            id: spec.id,
            warnings,
        }
    };
    Ok(AdminAnswer::one(answer)?
        .with(FollowUp::Audited(
            ctx.audit.for_task(spec.id, spec.revision),
        ))
        .with(FollowUp::Announce {
            target: spec.target.clone(),
            revision: spec.revision,
        })
        .with(FollowUp::Changed(AdminChange::TaskCreated {
            task: spec.id,
            revision: spec.revision,
        })))
}

fn run_list(
    store: &dyn CoordStore,
    task: Option<TaskId>,
    agent: Option<AgentId>,
    since: Option<Timestamp>,
    limit: u32,
    after: Option<String>,
    before: Option<String>,
) -> StoreResult<AdminAnswer> {
    if limit == 0 {
        return Err(StoreError::Refused("--limit must be at least 1".into()));
    }
    let limit = limit.min(RUN_LIST_MAX) as usize;
    // Arrival order: `--after arrival.E.S` pages forward from a place,
    // `--before arrival` is the latest page (what `run list --arrival`
    // sends without a cursor).
    let arrival = |s: &Option<String>| {
        s.as_deref()
            .is_some_and(|s| s == "arrival" || s.starts_with(ARRIVAL_PREFIX))
    };
    if arrival(&after) || arrival(&before) {
        if since.is_some() {
            return Err(StoreError::Refused(
                "--since does not go with arrival order (a cursor says where to start)".into(),
            ));
        }
        let after = match (after, before.as_deref()) {
            (Some(a), None) => Some(a.parse::<ArrivalCursor>().map_err(StoreError::Refused)?),
            (None, Some("arrival")) => None,
            (None, Some(_)) => {
                return Err(StoreError::Refused(
                    "arrival order pages forward only: use --after with an arrival cursor".into(),
                ))
            }
            _ => {
                return Err(StoreError::Refused(
                    "--after and --before do not go together".into(),
                ))
            }
        };
        let page = store.runs_arrived(&ArrivalQuery {
            task,
            agent,
            limit,
            after,
        })?;
        return Ok(runs_answer(
            page.runs,
            AdminResponse::RunsSummary {
                matched: None,
                unreadable: page.unreadable,
                more: page.more,
                first: page.first.map(|c| c.to_string()),
                last: Some(page.next.to_string()),
            },
        ));
    }
    let cursor = |s: Option<String>| {
        s.map(|s| s.parse::<RunCursor>().map_err(StoreError::Refused))
            .transpose()
    };
    let page = match (cursor(after)?, cursor(before)?) {
        (Some(_), Some(_)) => {
            return Err(StoreError::Refused(
                "--after and --before do not go together".into(),
            ))
        }
        (Some(a), None) => Page::After(a),
        (None, Some(b)) => Page::Before(b),
        (None, None) => Page::Latest,
    };
    let page = store.runs(&RunQuery {
        task,
        agent,
        since,
        limit,
        page,
        forward_from_since: false,
    })?;
    Ok(runs_answer(
        page.runs,
        AdminResponse::RunsSummary {
            matched: page.matched,
            unreadable: page.unreadable,
            more: page.more,
            first: page.first.map(|c| c.to_string()),
            last: page.last.map(|c| c.to_string()),
        },
    ))
}

/// A page of runs as `run list` answers it: chunks, then the summary.
fn runs_answer(runs: Vec<sundial_protocol::RunRecord>, summary: AdminResponse) -> AdminAnswer {
    let mut answers: Vec<AdminResponse> = chunk_by_size(runs, LIST_CHUNK_BYTES_MAX)
        .into_iter()
        .map(AdminResponse::Runs)
        .collect();
    answers.push(summary);
    AdminAnswer {
        answers,
        follow: Vec::new(),
    }
}

/// Answers one admin request from the store.
pub fn answer(
    store: &dyn CoordStore,
    ctx: &AdminContext,
    req: AdminRequest,
) -> StoreResult<AdminAnswer> {
    let now = ctx.now;
    match req {
        AdminRequest::TokenCreate {
            ttl_ms,
            uses,
            labels,
        } => {
            if uses == 0 {
                return Err(StoreError::Refused("--uses must be at least 1".into()));
            }
            let secret = ctx.entropy.to_vec();
            let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
            let secret_sha256 = sha256(&secret);
            let audited = ctx
                .audit
                .made(Some(format!("token {}", hex(&secret_sha256[..4]))), None);
            store.put_token(
                &JoinToken {
                    secret_sha256,
                    expires_at: now.saturating_add_ms(ttl),
                    uses_left: uses,
                    labels,
                },
                Some(&audited),
            )?;
            let server_name = store
                .setting("server_name")?
                .unwrap_or_else(|| SERVER_NAME_DEFAULT.into());
            // The coordinators' addresses, as `init --advertise` stored
            // them; a bad list is left out rather than made into a token
            // no agent can read.
            let addresses = store
                .setting("advertise")?
                .and_then(|a| sundial_protocol::token::coordinator_list(&a).ok())
                .unwrap_or_default();
            let token = sundial_protocol::token::JoinToken {
                secret,
                ca_sha256: ctx.ca_sha256,
                server_name,
                addresses,
            };
            Ok(AdminAnswer::one(AdminResponse::Token(token.encode()))?
                .with(FollowUp::Audited(audited))
                .with(FollowUp::Changed(AdminChange::TokenCreated { uses })))
        }
        AdminRequest::AgentList => {
            let agents: Vec<AgentInfo> = all_agents(store)?
                .into_iter()
                .filter(|a| !a.forgotten)
                .map(|a| {
                    let seen = ctx.seen.get(&a.id);
                    agent_info(a, seen, ctx)
                })
                .collect();
            // A fleet of agents with long allowlists is megabytes: in pages.
            Ok(AdminAnswer {
                answers: chunk_by_size(agents, LIST_CHUNK_BYTES_MAX)
                    .into_iter()
                    .map(AdminResponse::Agents)
                    .collect(),
                follow: Vec::new(),
            })
        }
        AdminRequest::AgentGet(id) => match store.agent(id)? {
            Some(r) => AdminAnswer::one(AdminResponse::Agent(Box::new(agent_info(
                r,
                ctx.seen.get(&id),
                ctx,
            )))),
            None => AdminAnswer::one(AdminResponse::Error(format!("no agent {id}"))),
        },
        AdminRequest::AgentRevoke(id) => {
            let rec = store.revoke_agent(id, Some(&ctx.audit))?;
            Ok(AdminAnswer::one(AdminResponse::Done)?
                .with(FollowUp::Audited(ctx.audit.clone()))
                .with(FollowUp::Revoked {
                    agent: id,
                    cert_sha256: rec.cert_sha256,
                })
                .with(FollowUp::Changed(AdminChange::AgentRevoked { agent: id })))
        }
        AdminRequest::AgentForget(id) => {
            store.forget_agent(id, Some(&ctx.audit))?;
            Ok(AdminAnswer::one(AdminResponse::Done)?
                .with(FollowUp::Audited(ctx.audit.clone()))
                .with(FollowUp::Changed(AdminChange::AgentForgotten { agent: id })))
        }
        AdminRequest::TaskCreate(draft) => create(store, ctx, *draft),
        AdminRequest::TaskList => {
            let agents = all_agents(store)?;
            let tasks: Vec<TaskInfo> = all_tasks(store)?
                .into_iter()
                .map(|t| task_info(store, t, &agents, false, now).map(|t| for_role(t, ctx.role)))
                .collect::<Result<_, _>>()?;
            Ok(AdminAnswer {
                answers: chunk_by_size(tasks, LIST_CHUNK_BYTES_MAX)
                    .into_iter()
                    .map(AdminResponse::Tasks)
                    .collect(),
                follow: Vec::new(),
            })
        }
        AdminRequest::TaskGet(id) => match store.task(id)? {
            Some(task) => {
                let agents = all_agents(store)?;
                AdminAnswer::one(AdminResponse::Task(Box::new(for_role(
                    task_info(store, task, &agents, true, now)?,
                    ctx.role,
                ))))
            }
            None => AdminAnswer::one(AdminResponse::Error(format!("no task {id}"))),
        },
        AdminRequest::TaskCancel(id) => {
            let revision = store.cancel_task(id, Some(&ctx.audit))?;
            let mut a = AdminAnswer::one(AdminResponse::Done)?
                .with(FollowUp::Audited(ctx.audit.for_task(id, revision)));
            if let Some(t) = store.task(id)? {
                a = a.with(FollowUp::Announce {
                    target: t.spec.target,
                    revision,
                });
            }
            Ok(a.with(FollowUp::Changed(AdminChange::TaskCancelled {
                task: id,
                revision,
            })))
        }
        AdminRequest::TaskUpdate { id, patch } => update(store, ctx, id, *patch),
        AdminRequest::TaskReseal { id, sealed_env } => reseal(store, ctx, id, sealed_env),
        AdminRequest::ModuleGet(hash) => {
            let info = match store.module(hash)? {
                // Checked when stored; described again for the answer.
                Some(bytes) => Some(crate::wasm::inspect(&bytes, u64::MAX).map_err(|why| {
                    StoreError::Refused(format!("module {hash} is stored but {why}"))
                })?),
                None => None,
            };
            AdminAnswer::one(AdminResponse::Module(info))
        }
        // The node puts a module's pieces together: what reaches the store
        // is a whole module (see `CoordNode::handle_admin`).
        AdminRequest::ModuleUpload {
            hash,
            size,
            offset,
            chunk,
        } => {
            if offset != 0
                || size != chunk.len() as u64
                || sundial_protocol::wasm::ModuleHash::of(&chunk) != hash
            {
                return Err(StoreError::Refused(format!(
                    "module {hash}: its bytes do not have that SHA-256"
                )));
            }
            let info = crate::wasm::inspect(&chunk, ctx.limits.wasm_module_max)
                .map_err(StoreError::Refused)?;
            store.put_module(hash, &chunk)?;
            store.append_audit(&ctx.audit)?;
            Ok(AdminAnswer::one(AdminResponse::Module(Some(info)))?
                .with(FollowUp::Audited(ctx.audit.clone())))
        }
        AdminRequest::SealKeys(target) => {
            let mut keys = Vec::new();
            let mut missing = Vec::new();
            for a in reached_agents(store, &target)? {
                match crate::coord_store::seal_key(store, a.id)? {
                    Some(k) => keys.push((a.id, k)),
                    None => missing.push(a.id),
                }
            }
            AdminAnswer::one(AdminResponse::SealKeys { keys, missing })
        }
        AdminRequest::TaskRunNow(id) => {
            let Some(StoredTask {
                spec,
                cancelled,
                paused,
                ..
            }) = store.task(id)?
            else {
                return Err(StoreError::NotFound(format!("no task {id}")));
            };
            if cancelled || paused {
                return Err(StoreError::Refused(format!(
                    "task {id} is {}; resume it first",
                    if cancelled { "cancelled" } else { "paused" }
                )));
            }
            // A task placed `one` runs its extra occurrence on one member
            // in session, as it runs every other.
            let one = spec
                .placement
                .as_ref()
                .is_some_and(|p| p.mode == sundial_protocol::placement::PlacementMode::One);
            let mut agents: Vec<AgentId> = all_agents(store)?
                .into_iter()
                .filter(|r| !r.revoked && targets(&spec.target, r.id, &r.labels))
                .filter(|r| {
                    !one || ctx.seen.get(&r.id).is_some_and(|s| s.online)
                        || (ctx.shared && r.in_session)
                })
                .map(|r| r.id)
                .collect();
            if one {
                agents.truncate(1);
            }
            // The answer is the node's: it knows which agents are online.
            Ok(AdminAnswer {
                answers: Vec::new(),
                follow: vec![FollowUp::RunNow {
                    task: id,
                    at: run_now_instant(&spec.schedule, now),
                    agents,
                }],
            })
        }
        AdminRequest::TaskPause(id) | AdminRequest::TaskResume(id) => {
            let pause = matches!(req, AdminRequest::TaskPause(_));
            let revision = store.set_paused(id, pause, now, Some(&ctx.audit))?;
            let mut a = AdminAnswer::one(AdminResponse::Done)?
                .with(FollowUp::Audited(ctx.audit.for_task(id, revision)));
            if let Some(t) = store.task(id)? {
                a = a.with(FollowUp::Announce {
                    target: t.spec.target,
                    revision,
                });
            }
            Ok(a.with(FollowUp::Changed(AdminChange::TaskPaused {
                task: id,
                paused: pause,
                revision,
            })))
        }
        AdminRequest::TokenList => {
            let tokens: Vec<TokenInfo> = all_tokens(store)?
                .into_iter()
                .filter(|t| t.expires_at > now && t.uses_left > 0)
                .map(|t| TokenInfo {
                    id: hex(&t.secret_sha256[..4]),
                    expires_at: t.expires_at,
                    uses_left: t.uses_left,
                    labels: t.labels,
                })
                .collect();
            Ok(AdminAnswer {
                answers: chunk_by_size(tokens, LIST_CHUNK_BYTES_MAX)
                    .into_iter()
                    .map(AdminResponse::Tokens)
                    .collect(),
                follow: Vec::new(),
            })
        }
        AdminRequest::TokenRevoke(id) => {
            let id = id.to_ascii_lowercase();
            let matching: Vec<[u8; 32]> = all_tokens(store)?
                .into_iter()
                .map(|t| t.secret_sha256)
                .filter(|h| hex(&h[..4]) == id)
                .collect();
            match matching.as_slice() {
                [h] => {
                    store.delete_token(*h, Some(&ctx.audit))?;
                    Ok(AdminAnswer::one(AdminResponse::Done)?
                        .with(FollowUp::Audited(ctx.audit.clone()))
                        .with(FollowUp::Changed(AdminChange::TokenRevoked { id })))
                }
                [] => Err(StoreError::Refused(format!(
                    "no token {id} (see sundialctl token list)"
                ))),
                _ => Err(StoreError::Refused(format!(
                    "{id} names several tokens; wait for them to expire or use them up"
                ))),
            }
        }
        AdminRequest::RunList {
            task,
            agent,
            since,
            limit,
            after,
            before,
        } => run_list(store, task, agent, since, limit, after, before),
        AdminRequest::AdminCreate { name, role, .. } => {
            let signed = signed(ctx)?;
            let admin = AdminInfo {
                name: name.clone(),
                role,
                cert_sha256: sha256(&signed.cert_der),
                created_at: now,
                created_by: ctx.audit.admin.clone(),
                expires_at: signed.expires_at,
                revoked_at: None,
                last_used: None,
            };
            store.create_admin(&admin, Some(&ctx.audit))?;
            let cert = AdminCert {
                name: name.clone(),
                role,
                expires_at: signed.expires_at,
            };
            Ok(AdminAnswer::one(AdminResponse::AdminCert {
                admin: admin.clone(),
                cert_der: signed.cert_der.clone(),
            })?
            .with(FollowUp::Audited(ctx.audit.clone()))
            .with(FollowUp::AdminCert {
                removed: None,
                added: Some((admin.cert_sha256, cert)),
                why: String::new(),
            })
            .with(FollowUp::Changed(AdminChange::AdminCreated { name, role })))
        }
        AdminRequest::AdminRenew { name, .. } => {
            let signed = signed(ctx)?;
            let fp = sha256(&signed.cert_der);
            let old = store.renew_admin(&name, fp, signed.expires_at, Some(&ctx.audit))?;
            let admin = AdminInfo {
                cert_sha256: fp,
                expires_at: signed.expires_at,
                ..old.clone()
            };
            let cert = AdminCert {
                name: name.clone(),
                role: admin.role,
                expires_at: signed.expires_at,
            };
            Ok(AdminAnswer::one(AdminResponse::AdminCert {
                admin,
                cert_der: signed.cert_der.clone(),
            })?
            .with(FollowUp::Audited(ctx.audit.clone()))
            .with(FollowUp::AdminCert {
                removed: Some(old.cert_sha256),
                added: Some((fp, cert)),
                why: format!("the credential of admin {name:?} was renewed: use the new one"),
            })
            .with(FollowUp::Changed(AdminChange::AdminRenewed { name })))
        }
        AdminRequest::AdminRevoke(name) => {
            let old = store.revoke_admin(&name, now, Some(&ctx.audit))?;
            Ok(AdminAnswer::one(AdminResponse::Done)?
                .with(FollowUp::Audited(ctx.audit.clone()))
                .with(FollowUp::AdminCert {
                    removed: Some(old.cert_sha256),
                    added: None,
                    why: format!("the credential of admin {name:?} was revoked"),
                })
                .with(FollowUp::Changed(AdminChange::AdminRevoked { name })))
        }
        AdminRequest::AdminList => AdminAnswer::list(
            chunk_by_size(all_admins(store)?, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Admins)
                .collect(),
        ),
        AdminRequest::AuditList(mut q) => {
            if q.limit == 0 {
                return Err(StoreError::Refused("--limit must be at least 1".into()));
            }
            if q.after.is_some() && q.before.is_some() {
                return Err(StoreError::Refused(
                    "--after and --before do not go together".into(),
                ));
            }
            q.limit = q.limit.min(AUDIT_LIST_MAX);
            let page = store.audit(&q)?;
            let mut answers: Vec<AdminResponse> = chunk_by_size(page.entries, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Audit)
                .collect();
            answers.push(AdminResponse::AuditSummary { more: page.more });
            AdminAnswer::list(answers)
        }
        // The node follows runs itself; a store job never gets one.
        AdminRequest::RunFollow { .. } => Err(StoreError::Refused(
            "a run follow is served by the coordinator node".into(),
        )),
    }
}

fn signed(ctx: &AdminContext) -> StoreResult<&Signed> {
    ctx.signed
        .as_ref()
        .ok_or_else(|| StoreError::Refused("the credential was not signed".into()))
}

/// The server name written into tokens when `init` stored none.
pub const SERVER_NAME_DEFAULT: &str = "sundial-coordinator";
