//! `sundialctl`: Sundial's admin CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use chrono::TimeZone;
use clap::{Args, CommandFactory, Parser, Subcommand};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use sundial_coordinator::cli::{self, labels_text, table, Output, ScheduleArgs};
use sundial_coordinator::client::AdminClient;
use sundial_coordinator::pki::AdminCreds;
use sundial_coordinator::server::TOKEN_TTL_DEFAULT;
use sundial_protocol::policy::{MisfireMode, MisfirePolicy, OverlapPolicy, Policies, RetryPolicy};
use sundial_protocol::task::{Action, ExecSpec, Target};

use sundial_protocol::wire::{
    AdminRequest, AdminResponse, AgentInfo, LastRun, TaskDraft, TaskInfo, TaskPatch, TokenInfo,
};
use sundial_protocol::{AgentId, DurationMs, RunRecord, TaskId, Timestamp};

/// Prints to stdout; a closed pipe (`sundialctl … | head`) ends the
/// program quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        write_out(&format!($($arg)*))
    };
}

macro_rules! outln {
    ($($arg:tt)*) => {
        write_out(&format!("{}\n", format!($($arg)*)))
    };
}

fn write_out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("sundialctl: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Sundial admin CLI. Reads the coordinator's address and admin credentials
/// from --creds FILE or SUNDIAL_CREDS (the file `sundial-coordinator init` wrote).
#[derive(Debug, Parser)]
#[command(
    name = "sundialctl",
    version,
    about = "Sundial's admin CLI: join tokens, agents, tasks, runs and schedules"
)]
struct Cli {
    /// Admin credentials file.
    #[arg(long, value_name = "FILE", env = "SUNDIAL_CREDS", global = true)]
    creds: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Args)]
struct OutputArg {
    /// Output format: an aligned table, a wide table (nothing shortened), or
    /// JSON (snake_case, RFC 3339 UTC; the scripting interface).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Join tokens for enrolling agents.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Enrolled agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Run records stored by the coordinator.
    #[command(subcommand)]
    Run(RunCmd),
    /// Work with schedules (no coordinator needed).
    #[command(subcommand)]
    Schedule(ScheduleCmd),
    /// Print a shell completion script: `sundialctl completions bash > /etc/bash_completion.d/sundialctl`.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `sundialctl manpage | man -l -`.
    Manpage,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a join token; prints the token alone.
    Create {
        /// How long the token is valid.
        #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "1h")]
        ttl: DurationMs,
        /// How many agents may join with it.
        #[arg(long, value_name = "N", default_value_t = 1)]
        uses: u32,
        /// A label given to agents joining with it (repeatable).
        #[arg(long = "label", value_name = "K=V", value_parser = cli::parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List tokens that can still be used (never their secrets).
    List(OutputArg),
    /// Revoke a token by the ID `token list` shows.
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// List agents.
    List(OutputArg),
    /// Show one agent (by id or name).
    Get {
        #[arg(value_name = "AGENT")]
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Revoke an agent: its live session ends now and its certificate is
    /// refused from now on.
    Revoke {
        #[arg(value_name = "AGENT")]
        id: String,
    },
    /// Remove a revoked agent from the lists; its runs stay.
    Forget {
        #[arg(value_name = "AGENT")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCmd {
    /// Create a task; prints its id.
    ///
    /// Example: sundialctl task create --name backup --selector site=lab --cron '30 2 * * *' --tz Europe/Berlin -- /usr/local/bin/backup --fast
    Create(Box<CreateArgs>),
    /// List tasks, with their next occurrence and latest run.
    List(OutputArg),
    /// Describe a task (by id or name): every field, the agents it reaches,
    /// its next occurrence and the latest run on each agent.
    Get {
        #[arg(value_name = "TASK")]
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Cancel tasks (by id or name); agents drop them, also those offline
    /// now, when they reconnect. A run already going finishes.
    Cancel {
        #[arg(value_name = "TASK", required = true)]
        ids: Vec<String>,
    },
    /// Change a task: a new revision reaches its agents (offline ones when
    /// they reconnect). A run going finishes as it started; later runs use
    /// the change. A new schedule counts from now. The target cannot change.
    ///
    /// Example: sundialctl task update nightly-backup --cron '0 3 * * *' --retries 2
    Update(Box<UpdateArgs>),
    /// Run one extra occurrence now on every online agent the task reaches;
    /// its run is recorded with "run now" in its detail. Offline agents do
    /// not run it (they are named).
    RunNow {
        #[arg(value_name = "TASK", required = true)]
        ids: Vec<String>,
    },
    /// Pause tasks: agents drop their occurrences until resumed; none is
    /// run or recorded meanwhile. A run already going finishes.
    Pause {
        #[arg(value_name = "TASK", required = true)]
        ids: Vec<String>,
    },
    /// Resume paused tasks: occurrences count again from now.
    Resume {
        #[arg(value_name = "TASK", required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct UpdateArgs {
    /// The task (id or name).
    #[arg(value_name = "TASK")]
    id: String,
    /// A new schedule: --at, --every [--anchor] or --cron [--tz].
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// skip, once, all or all:CAP.
    #[arg(long, value_name = "POLICY")]
    misfire: Option<MisfireMode>,
    /// An occurrence at most this late still runs normally.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    grace: Option<DurationMs>,
    /// Retries after a failed, timed-out or interrupted run.
    #[arg(long, value_name = "N")]
    retries: Option<u32>,
    /// Delay before the first retry; doubles for each further one.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    backoff: Option<DurationMs>,
    /// The longest delay between retries.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    backoff_max: Option<DurationMs>,
    /// Kill a run still going after this long.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, conflicts_with = "no_timeout")]
    timeout: Option<DurationMs>,
    /// Remove the timeout.
    #[arg(long)]
    no_timeout: bool,
    /// allow or forbid.
    #[arg(long, value_name = "POLICY")]
    overlap: Option<OverlapPolicy>,
    /// Replace the environment (repeatable; all of it is replaced).
    #[arg(long = "env", value_name = "K=V", value_parser = cli::parse_label)]
    env: Vec<(String, String)>,
    /// Remove every environment variable.
    #[arg(long, conflicts_with = "env")]
    clear_env: bool,
    /// A new working directory.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// A new program and arguments, after `--`.
    #[arg(last = true, value_name = "PROGRAM [ARGS]...")]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// A unique name.
    #[arg(long)]
    name: Option<String>,
    /// Run on this agent (id or name).
    #[arg(
        long,
        value_name = "AGENT",
        conflicts_with = "selector",
        required_unless_present = "selector"
    )]
    agent: Option<String>,
    /// Run on every agent with these labels, including agents that join later.
    #[arg(long, value_name = "K=V[,K=V]", value_parser = cli::parse_selector)]
    selector: Option<cli::Selector>,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// What to do with occurrences missed while the agent was down: skip,
    /// once (one catch-up run), all or all:CAP.
    #[arg(long, value_name = "POLICY", default_value = "once")]
    misfire: MisfireMode,
    /// An occurrence at most this late still runs normally [default: 1m,
    /// or the period of the schedule if that is shorter].
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    grace: Option<DurationMs>,
    /// Retries after a failed, timed-out or interrupted run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    retries: u32,
    /// Delay before the first retry; doubles for each further one.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "1s")]
    backoff: DurationMs,
    /// The longest delay between retries.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "5m")]
    backoff_max: DurationMs,
    /// Kill a run still going after this long (timed_out).
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    timeout: Option<DurationMs>,
    /// allow: occurrences may run side by side; forbid: record as skipped.
    #[arg(long, value_name = "POLICY", default_value = "allow")]
    overlap: OverlapPolicy,
    /// Start of the window in which occurrences count (RFC 3339).
    #[arg(long, value_name = "T", value_parser = cli::parse_instant)]
    start: Option<Timestamp>,
    /// End of the window (exclusive).
    #[arg(long, value_name = "T", value_parser = cli::parse_instant)]
    end: Option<Timestamp>,
    /// Environment for the program (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = cli::parse_label)]
    env: Vec<(String, String)>,
    /// Working directory for the program.
    #[arg(long, value_name = "DIR")]
    cwd: Option<String>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]...")]
    command: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum RunCmd {
    /// List runs, oldest first (the most recent N when more match).
    List {
        /// Only runs of this task (id or name).
        #[arg(long, value_name = "TASK")]
        task: Option<String>,
        /// Only runs of this agent (id or name).
        #[arg(long, value_name = "AGENT")]
        agent: Option<String>,
        /// Only runs scheduled at or after this instant: RFC 3339, a date
        /// (2026-11-26), or a duration meaning that long ago (1h, 7d).
        #[arg(long, value_name = "T", value_parser = cli::parse_since)]
        since: Option<Timestamp>,
        /// Show at most N runs, the most recent (1 to 10000).
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// The page after this cursor (printed after a page), oldest first.
        #[arg(long, value_name = "CURSOR", conflicts_with = "before")]
        after: Option<String>,
        /// The page before this cursor (printed after a page): older runs.
        #[arg(long, value_name = "CURSOR")]
        before: Option<String>,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
enum ScheduleCmd {
    /// Print the next occurrences of a schedule, as the agents will fire them.
    ///
    /// Example: sundialctl schedule next --cron '30 2 * * *' --tz America/New_York --count 3
    Next {
        #[command(flatten)]
        schedule: ScheduleArgs,
        /// List occurrences strictly after this instant (RFC 3339 or `now`).
        #[arg(long, value_name = "T", value_parser = cli::parse_instant)]
        from: Option<Timestamp>,
        /// How many occurrences to print (at most 100000).
        #[arg(long, value_name = "N", default_value_t = 5)]
        count: usize,
        /// Output format: table (with local times for cron) or json (an array of strings).
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sundialctl: {}", sundial_protocol::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn opt_ts(t: Option<Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

fn labels_json(labels: &[(String, String)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

fn agent_json(a: &AgentInfo) -> Value {
    json!({
        "agent_id": a.agent_id.to_string(),
        "name": a.name,
        "labels": labels_json(&a.labels),
        "online": a.online,
        "revoked": a.revoked,
        "enrolled_at": a.enrolled_at.to_string(),
        "last_seen": opt_ts(a.last_seen),
        "clock_offset_ms": a.clock_offset_ms,
        "rtt_ms": a.rtt_ms,
        "version": a.version,
        "allow_exec": a.allow_exec,
        "outbox_len": a.outbox_len,
    })
}

fn task_state(t: &TaskInfo) -> &'static str {
    if t.cancelled {
        "cancelled"
    } else if t.paused {
        "paused"
    } else if t.done {
        "done"
    } else {
        "active"
    }
}

fn last_run_json(l: &LastRun) -> Value {
    json!({
        "agent_id": l.agent_id.to_string(),
        "scheduled_at": l.scheduled_at.to_string(),
        "attempt": l.attempt,
        "outcome": l.outcome.as_str(),
        "finished_at": opt_ts(l.finished_at),
        "detail": l.detail,
    })
}

fn task_json(t: &TaskInfo) -> Value {
    let Action::Exec(exec) = &t.spec.action;
    let p = &t.spec.policies;
    let (start, end) = t.spec.schedule.window();
    json!({
        "task_id": t.spec.id.to_string(),
        "name": t.spec.name,
        "target": match &t.spec.target {
            Target::Agent(a) => json!({"agent": a.to_string()}),
            Target::Selector(s) => json!({"selector": labels_json(s)}),
        },
        "schedule": t.spec.schedule.to_string(),
        "program": exec.program,
        "args": exec.args,
        "env": exec.env.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        "cwd": exec.cwd,
        "revision": t.spec.revision,
        "created_at": t.spec.created_at.to_string(),
        "state": task_state(t),
        "cancelled": t.cancelled,
        "paused": t.paused,
        "done": t.done,
        "next": opt_ts(t.next),
        "misfire": p.misfire.mode.to_string(),
        "grace_ms": p.misfire.grace.0,
        "retries": p.retry.retries,
        "backoff_ms": p.retry.backoff_initial.0,
        "backoff_max_ms": p.retry.backoff_max.0,
        "overlap": p.overlap.to_string(),
        "timeout_ms": p.timeout.map(|d| d.0),
        "window_start": opt_ts(start),
        "window_end": opt_ts(end),
        "reached": t.reached.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "last_runs": t.last_runs.iter().map(last_run_json).collect::<Vec<_>>(),
    })
}

/// Names of agents and tasks, to show beside their ids.
#[derive(Default)]
struct Names {
    agents: HashMap<AgentId, String>,
    tasks: HashMap<TaskId, String>,
    /// Each task's retry policy: a retry's lateness counts from its own due time.
    retry: HashMap<TaskId, RetryPolicy>,
}

impl Names {
    fn agent(&self, id: AgentId) -> String {
        match self.agents.get(&id) {
            Some(n) => format!("{id} ({n})"),
            None => id.to_string(),
        }
    }

    fn task(&self, id: TaskId) -> String {
        match self.tasks.get(&id) {
            Some(n) => format!("{id} ({n})"),
            None => id.to_string(),
        }
    }
}

fn duration_ms(r: &RunRecord) -> Option<i64> {
    match (r.fired_at, r.finished_at) {
        (Some(f), Some(e)) => Some(e.millis_since(f)),
        _ => None,
    }
}

/// How late a run started: the first attempt from its occurrence, a retry
/// from its own due time (the previous attempt's end plus the backoff),
/// when the previous attempt is in `runs`.
fn lateness_ms(r: &RunRecord, runs: &[RunRecord], names: &Names) -> Option<i64> {
    let fired = r.fired_at?;
    if r.attempt <= 1 {
        return Some(fired.millis_since(r.scheduled_at).max(0));
    }
    let prev = runs.iter().find(|p| {
        p.task_id == r.task_id
            && p.agent_id == r.agent_id
            && p.scheduled_at == r.scheduled_at
            && p.attempt + 1 == r.attempt
    })?;
    let backoff = names.retry.get(&r.task_id)?.backoff_after(prev.attempt);
    let due = prev.finished_at?.saturating_add_ms(backoff.as_millis_i64());
    Some(fired.millis_since(due).max(0))
}

fn run_json(r: &RunRecord, runs: &[RunRecord], names: &Names) -> Value {
    json!({
        "task_id": r.task_id.to_string(),
        "task_name": names.tasks.get(&r.task_id),
        "agent_id": r.agent_id.to_string(),
        "agent_name": names.agents.get(&r.agent_id),
        "scheduled_at": r.scheduled_at.to_string(),
        "fired_at": opt_ts(r.fired_at),
        "finished_at": opt_ts(r.finished_at),
        "duration_ms": duration_ms(r),
        "attempt": r.attempt,
        "outcome": r.outcome.as_str(),
        "exit_code": r.exit_code,
        "offline": r.offline,
        "lateness_ms": lateness_ms(r, runs, names),
        "detail": r.detail,
        "why": why(r),
        "stdout": String::from_utf8_lossy(&r.stdout_tail),
        "stderr": String::from_utf8_lossy(&r.stderr_tail),
    })
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `text` cut to `max` characters with an ellipsis (tables), or whole (wide).
fn cut(text: &str, max: usize, out: Output) -> String {
    let one_line = text.replace('\n', " ");
    if out == Output::Wide || one_line.chars().count() <= max {
        return one_line;
    }
    let mut s: String = one_line.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// A word as a POSIX shell would need it quoted.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn command_text(exec: &sundial_protocol::task::ExecSpec) -> String {
    std::iter::once(exec.program.as_str())
        .chain(exec.args.iter().map(String::as_str))
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ago(t: Timestamp, now: Timestamp) -> String {
    let ms = now.millis_since(t);
    if ms < 0 {
        format!("in {}", human_secs((-ms + 999) / 1000))
    } else {
        format!("{} ago", human_secs(ms / 1000))
    }
}

fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

fn agents_out(agents: &[AgentInfo], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(agents.iter().map(agent_json).collect()));
    }
    let now = cli::now();
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.agent_id.to_string(),
                or_dash(a.name.clone()),
                if a.revoked {
                    "revoked".into()
                } else if a.online {
                    "online".into()
                } else {
                    "offline".into()
                },
                a.last_seen
                    .map_or_else(|| "never".into(), |t| format!("{t} ({})", ago(t, now))),
                or_dash(a.version.clone()),
                or_dash(a.outbox_len),
                or_dash(a.clock_offset_ms.map(|o| format!("{o:+}"))),
                or_dash(a.rtt_ms),
                cut(&labels_text(&a.labels), 30, out),
                cut(&a.allow_exec.join(","), 30, out),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &[
                "ID",
                "NAME",
                "STATE",
                "LAST SEEN",
                "VERSION",
                "OUTBOX",
                "OFFSET MS",
                "RTT MS",
                "LABELS",
                "ALLOW EXEC"
            ],
            &rows
        )
    );
    Ok(())
}

fn last_text(l: &LastRun, names: &Names, now: Timestamp) -> String {
    format!(
        "{} on {} {}",
        l.outcome,
        names.agent(l.agent_id),
        ago(l.finished_at.unwrap_or(l.scheduled_at), now)
    )
}

fn tasks_out(tasks: &[TaskInfo], names: &Names, out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(tasks.iter().map(task_json).collect()));
    }
    let now = cli::now();
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let Action::Exec(exec) = &t.spec.action;
            vec![
                t.spec.id.to_string(),
                or_dash(t.spec.name.clone()),
                match &t.spec.target {
                    Target::Agent(a) => names.agent(*a),
                    Target::Selector(s) => labels_text(s),
                },
                t.spec.schedule.to_string(),
                task_state(t).into(),
                or_dash(t.next),
                t.last_runs
                    .last()
                    .map_or_else(|| "-".into(), |l| last_text(l, names, now)),
                cut(&command_text(exec), 40, out),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &["ID", "NAME", "TARGET", "SCHEDULE", "STATE", "NEXT", "LAST", "COMMAND"],
            &rows
        )
    );
    Ok(())
}

/// `task get` for people, as `kubectl describe` does it.
fn describe_task(t: &TaskInfo, names: &Names) -> String {
    use std::fmt::Write;
    let Action::Exec(exec) = &t.spec.action;
    let p = &t.spec.policies;
    let now = cli::now();
    let mut o = String::new();
    let mut field = |k: &str, v: String| {
        let _ = writeln!(o, "{:<14}{v}", format!("{k}:"));
    };
    field("Task", t.spec.id.to_string());
    field("Name", or_dash(t.spec.name.clone()));
    field("State", task_state(t).into());
    field("Revision", t.spec.revision.to_string());
    field("Created", t.spec.created_at.to_string());
    field(
        "Target",
        match &t.spec.target {
            Target::Agent(a) => names.agent(*a),
            Target::Selector(s) => format!("selector {}", labels_text(s)),
        },
    );
    field("Schedule", t.spec.schedule.to_string());
    let (start, end) = t.spec.schedule.window();
    if start.is_some() || end.is_some() {
        field("Window", format!("[{}, {})", or_dash(start), or_dash(end)));
    }
    field(
        "Next",
        t.next
            .map_or_else(|| "-".into(), |n| format!("{n} ({})", ago(n, now))),
    );
    field("Command", command_text(exec));
    field(
        "Environment",
        if exec.env.is_empty() {
            "-".into()
        } else {
            exec.env
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    field("Working dir", or_dash(exec.cwd.clone()));
    field(
        "Misfire",
        format!("{} (grace {})", p.misfire.mode, p.misfire.grace),
    );
    field(
        "Retries",
        if p.retry.retries == 0 {
            "none".into()
        } else {
            format!(
                "{} (backoff {}, doubling up to {})",
                p.retry.retries, p.retry.backoff_initial, p.retry.backoff_max
            )
        },
    );
    field("Timeout", or_dash(p.timeout));
    field("Overlap", p.overlap.to_string());
    let mut reached: Vec<String> = t.reached.iter().map(|a| names.agent(*a)).collect();
    if reached.is_empty() {
        reached.push("none (no agent matches; agents that join with matching labels will)".into());
    }
    field("Agents", reached.join(", "));
    let _ = writeln!(o, "Last runs:");
    if t.last_runs.is_empty() {
        let _ = writeln!(o, "  none yet");
    } else {
        let rows: Vec<Vec<String>> = t
            .last_runs
            .iter()
            .map(|l| {
                vec![
                    format!("  {}", names.agent(l.agent_id)),
                    l.scheduled_at.to_string(),
                    l.attempt.to_string(),
                    l.outcome.to_string(),
                    ago(l.finished_at.unwrap_or(l.scheduled_at), now),
                    cut(l.detail.as_deref().unwrap_or("-"), 60, Output::Table),
                ]
            })
            .collect();
        o.push_str(&table(
            &[
                "  AGENT",
                "SCHEDULED AT",
                "ATTEMPT",
                "OUTCOME",
                "WHEN",
                "DETAIL",
            ],
            &rows,
        ));
    }
    o
}

/// Why a run ended as it did, in a few words.
fn why(r: &RunRecord) -> String {
    r.why().unwrap_or_else(|| "-".into())
}

fn runs_out(runs: &[RunRecord], names: &Names, out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(
            runs.iter().map(|r| run_json(r, runs, names)).collect(),
        ));
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                names.task(r.task_id),
                names.agent(r.agent_id),
                r.scheduled_at.to_string(),
                r.attempt.to_string(),
                r.outcome.to_string(),
                or_dash(r.exit_code),
                or_dash(duration_ms(r)),
                or_dash(lateness_ms(r, runs, names)),
                if r.offline { "yes".into() } else { "no".into() },
                cut(&why(r), 50, out),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &[
                "TASK",
                "AGENT",
                "SCHEDULED AT",
                "ATTEMPT",
                "OUTCOME",
                "EXIT",
                "TOOK MS",
                "LATE MS",
                "OFFLINE",
                "DETAIL"
            ],
            &rows
        )
    );
    Ok(())
}

fn tokens_out(tokens: &[TokenInfo], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(
            tokens
                .iter()
                .map(|t| {
                    json!({
                        "id": t.id,
                        "expires_at": t.expires_at.to_string(),
                        "uses_left": t.uses_left,
                        "labels": labels_json(&t.labels),
                    })
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.expires_at.to_string(),
                t.uses_left.to_string(),
                labels_text(&t.labels),
            ]
        })
        .collect();
    out!(
        "{}",
        table(&["ID", "EXPIRES AT", "USES LEFT", "LABELS"], &rows)
    );
    Ok(())
}

/// Talks to the coordinator for one command, resolving names to ids.
struct Ctl {
    client: AdminClient,
}

impl Ctl {
    async fn ask(&self, req: AdminRequest) -> anyhow::Result<AdminResponse> {
        self.client.request(&req).await.map_err(anyhow::Error::msg)
    }

    async fn agents(&self) -> anyhow::Result<Vec<AgentInfo>> {
        match self.ask(AdminRequest::AgentList).await? {
            AdminResponse::Agents(a) => Ok(a),
            r => Err(unexpected(r)),
        }
    }

    async fn tasks(&self) -> anyhow::Result<Vec<TaskInfo>> {
        match self.ask(AdminRequest::TaskList).await? {
            AdminResponse::Tasks(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }

    /// Names for display; a failure to get them only costs the names.
    async fn names(&self, tasks: bool) -> Names {
        let mut n = Names::default();
        if let Ok(agents) = self.agents().await {
            n.agents = agents
                .into_iter()
                .filter_map(|a| a.name.map(|name| (a.agent_id, name)))
                .collect();
        }
        if tasks {
            if let Ok(ts) = self.tasks().await {
                n.retry = ts
                    .iter()
                    .map(|t| (t.spec.id, t.spec.policies.retry))
                    .collect();
                n.tasks = ts
                    .into_iter()
                    .filter_map(|t| t.spec.name.map(|name| (t.spec.id, name)))
                    .collect();
            }
        }
        n
    }

    /// An agent by id (`a3`, `3`) or unique name.
    async fn agent_id(&self, text: &str) -> anyhow::Result<AgentId> {
        if let Ok(id) = text.parse::<AgentId>() {
            return Ok(id);
        }
        let matches: Vec<AgentId> = self
            .agents()
            .await?
            .into_iter()
            .filter(|a| a.name.as_deref() == Some(text))
            .map(|a| a.agent_id)
            .collect();
        match matches.as_slice() {
            [id] => Ok(*id),
            [] => bail!("no agent with id or name `{text}` (see sundialctl agent list)"),
            _ => bail!(
                "several agents are named `{text}`: use an id ({})",
                matches
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// A task by id (`t3`, `3`) or name (names are unique among live tasks).
    async fn task_id(&self, text: &str) -> anyhow::Result<TaskId> {
        if let Ok(id) = text.parse::<TaskId>() {
            return Ok(id);
        }
        let tasks = self.tasks().await?;
        let live = tasks
            .iter()
            .find(|t| !t.cancelled && t.spec.name.as_deref() == Some(text));
        let any = tasks.iter().find(|t| t.spec.name.as_deref() == Some(text));
        match live.or(any) {
            Some(t) => Ok(t.spec.id),
            None => bail!("no task with id or name `{text}` (see sundialctl task list)"),
        }
    }
}

fn unexpected(r: AdminResponse) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the coordinator: {r:?}")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "sundialctl", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            return Ok(());
        }
        Cmd::Manpage => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            out!("{}", String::from_utf8_lossy(&out));
            return Ok(());
        }
        _ => {}
    }
    if let Cmd::Schedule(ScheduleCmd::Next {
        schedule,
        from,
        count,
        output,
    }) = &cli.command
    {
        return schedule_next(schedule, *from, *count, *output);
    }
    let Some(creds_path) = cli.creds.clone() else {
        bail!("no credentials: pass --creds FILE or set SUNDIAL_CREDS (the admin.creds that `sundial-coordinator init` printed)");
    };
    let creds = AdminCreds::load(&creds_path).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let client = AdminClient::connect(&creds)
            .await
            .map_err(anyhow::Error::msg)?;
        let ctl = Ctl { client };
        let result = command(&ctl, cli.command).await;
        ctl.client.close();
        result
    })
}

async fn command(ctl: &Ctl, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Token(TokenCmd::Create { ttl, uses, labels }) => {
            if ttl.0 == 0 {
                bail!("--ttl must be longer than 0 (default {TOKEN_TTL_DEFAULT})");
            }
            match ctl
                .ask(AdminRequest::TokenCreate {
                    ttl_ms: ttl.0,
                    uses,
                    labels,
                })
                .await?
            {
                AdminResponse::Token(t) => outln!("{t}"),
                r => return Err(unexpected(r)),
            }
        }
        Cmd::Token(TokenCmd::List(o)) => match ctl.ask(AdminRequest::TokenList).await? {
            AdminResponse::Tokens(t) => tokens_out(&t, o.output)?,
            r => return Err(unexpected(r)),
        },
        Cmd::Token(TokenCmd::Revoke { id }) => {
            ctl.ask(AdminRequest::TokenRevoke(id.clone())).await?;
            outln!("revoked token {id}");
        }
        Cmd::Agent(AgentCmd::List(o)) => agents_out(&ctl.agents().await?, o.output)?,
        Cmd::Agent(AgentCmd::Get { id, out }) => {
            let id = ctl.agent_id(&id).await?;
            match ctl.ask(AdminRequest::AgentGet(id)).await? {
                AdminResponse::Agent(a) => {
                    if out.output == Output::Json {
                        print_json(&agent_json(&a))?;
                    } else {
                        agents_out(&[*a], out.output)?;
                    }
                }
                r => return Err(unexpected(r)),
            }
        }
        Cmd::Agent(AgentCmd::Revoke { id }) => {
            let id = ctl.agent_id(&id).await?;
            ctl.ask(AdminRequest::AgentRevoke(id)).await?;
            outln!("revoked {id}");
        }
        Cmd::Agent(AgentCmd::Forget { id }) => {
            let id = ctl.agent_id(&id).await?;
            ctl.ask(AdminRequest::AgentForget(id)).await?;
            outln!("forgot {id}; its runs stay");
        }
        Cmd::Task(TaskCmd::Create(args)) => {
            let mut args = *args;
            let agent = match args.agent.take() {
                Some(a) => Some(ctl.agent_id(&a).await?),
                None => None,
            };
            let draft = draft(args, agent)?;
            match ctl.ask(AdminRequest::TaskCreate(Box::new(draft))).await? {
                AdminResponse::TaskCreated(id) => outln!("{id}"),
                AdminResponse::TaskCreatedWarn { id, warnings } => {
                    for w in warnings {
                        eprintln!("sundialctl: warning: {w}");
                    }
                    outln!("{id}");
                }
                r => return Err(unexpected(r)),
            }
        }
        Cmd::Task(TaskCmd::List(o)) => {
            let tasks = ctl.tasks().await?;
            let names = if o.output == Output::Json {
                Names::default()
            } else {
                ctl.names(false).await
            };
            tasks_out(&tasks, &names, o.output)?
        }
        Cmd::Task(TaskCmd::Get { id, out }) => {
            let id = ctl.task_id(&id).await?;
            match ctl.ask(AdminRequest::TaskGet(id)).await? {
                AdminResponse::Task(t) => {
                    if out.output == Output::Json {
                        print_json(&task_json(&t))?;
                    } else {
                        let names = ctl.names(false).await;
                        out!("{}", describe_task(&t, &names));
                    }
                }
                r => return Err(unexpected(r)),
            }
        }
        Cmd::Task(TaskCmd::Cancel { ids }) => {
            for id in ids {
                let id = ctl.task_id(&id).await?;
                ctl.ask(AdminRequest::TaskCancel(id)).await?;
                outln!("cancelled {id}");
            }
        }
        Cmd::Task(TaskCmd::Update(args)) => {
            let id = ctl.task_id(&args.id).await?;
            let patch = patch(*args)?;
            match ctl
                .ask(AdminRequest::TaskUpdate {
                    id,
                    patch: Box::new(patch),
                })
                .await?
            {
                AdminResponse::Updated { revision } => {
                    outln!("updated {id} (revision {revision})")
                }
                r => return Err(unexpected(r)),
            }
        }
        Cmd::Task(TaskCmd::RunNow { ids }) => {
            for id in ids {
                let id = ctl.task_id(&id).await?;
                match ctl.ask(AdminRequest::TaskRunNow(id)).await? {
                    AdminResponse::RunNowSent { at, sent, offline } => {
                        let list = |v: &[AgentId]| {
                            v.iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        outln!(
                            "{id}: run at {at} on {} agent(s){}",
                            sent.len(),
                            if sent.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", list(&sent))
                            }
                        );
                        if !offline.is_empty() {
                            eprintln!(
                                "sundialctl: warning: {id}: not run on offline agent(s) {}",
                                list(&offline)
                            );
                        }
                    }
                    r => return Err(unexpected(r)),
                }
            }
        }
        Cmd::Task(TaskCmd::Pause { ids }) => {
            for id in ids {
                let id = ctl.task_id(&id).await?;
                ctl.ask(AdminRequest::TaskPause(id)).await?;
                outln!("paused {id}");
            }
        }
        Cmd::Task(TaskCmd::Resume { ids }) => {
            for id in ids {
                let id = ctl.task_id(&id).await?;
                ctl.ask(AdminRequest::TaskResume(id)).await?;
                outln!("resumed {id}");
            }
        }
        Cmd::Run(RunCmd::List {
            task,
            agent,
            since,
            limit,
            after,
            before,
            out,
        }) => {
            let task = match task {
                Some(t) => Some(ctl.task_id(&t).await?),
                None => None,
            };
            let agent = match agent {
                Some(a) => Some(ctl.agent_id(&a).await?),
                None => None,
            };
            let answer = ctl
                .client
                .run_list(&AdminRequest::RunList {
                    task,
                    agent,
                    since,
                    limit,
                    after: after.clone(),
                    before,
                })
                .await
                .map_err(anyhow::Error::msg)?;
            let names = ctl.names(true).await;
            runs_out(&answer.runs, &names, out.output)?;
            if answer.unreadable > 0 {
                eprintln!(
                    "sundialctl: warning: {} stored run records could not be read and were skipped (the coordinator's log names them)",
                    answer.unreadable
                );
            }
            if answer.more && out.output != Output::Json {
                let shown = answer.runs.len();
                let of = answer
                    .matched
                    .map_or_else(String::new, |m| format!(" of {m}"));
                // Forward pages continue forward; the latest pages go back.
                let hint = if after.is_some() {
                    answer
                        .last
                        .map(|c| format!("newer: --after {c}"))
                        .unwrap_or_default()
                } else {
                    answer
                        .first
                        .map(|c| format!("older: --before {c}"))
                        .unwrap_or_default()
                };
                eprintln!("showing {shown}{of} runs; {hint} (or --limit, --since)");
            }
        }
        Cmd::Schedule(_) | Cmd::Completions { .. } | Cmd::Manpage => {}
    }
    Ok(())
}

/// What `task update` changes.
fn patch(a: UpdateArgs) -> anyhow::Result<TaskPatch> {
    let schedule =
        if a.schedule.at.is_some() || a.schedule.every.is_some() || a.schedule.cron.is_some() {
            Some(
                a.schedule
                    .to_schedule(cli::now())
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
    let mut command = a.command.into_iter();
    let action = command.next().map(|program| {
        Action::Exec(ExecSpec {
            program,
            args: command.collect(),
            ..ExecSpec::default()
        })
    });
    let p = TaskPatch {
        schedule,
        action,
        env: if a.clear_env {
            Some(Vec::new())
        } else if a.env.is_empty() {
            None
        } else {
            Some(a.env)
        },
        cwd: a.cwd.map(Some),
        misfire: a.misfire,
        grace: a.grace,
        retries: a.retries,
        backoff: a.backoff,
        backoff_max: a.backoff_max,
        timeout: if a.no_timeout {
            Some(None)
        } else {
            a.timeout.map(Some)
        },
        overlap: a.overlap,
    };
    if p == TaskPatch::default() {
        bail!(
            "nothing to change: give a schedule, a policy flag, --env, --cwd, or `-- PROGRAM ARGS`"
        );
    }
    Ok(p)
}

/// How far in the past `--at` or `--end` may be (`--at now` is parsed a
/// moment before it is checked).
const PAST_SLACK_MS: i64 = 1_000;
/// The grace when none is given and the schedule's period is longer.
const GRACE_DEFAULT: DurationMs = DurationMs(60_000);

fn draft(a: CreateArgs, agent: Option<AgentId>) -> anyhow::Result<TaskDraft> {
    let now = cli::now();
    if let Some(at) = a.schedule.at {
        if at.millis_since(now) < -PAST_SLACK_MS {
            bail!("--at {at} is in the past (now is {now}); use --at now to run at once, or --at +DUR");
        }
    }
    if let Some(end) = a.end {
        if end.millis_since(now) < -PAST_SLACK_MS {
            bail!("--end {end} is in the past (now is {now})");
        }
    }
    if a.timeout.is_some_and(|t| t.0 == 0) {
        bail!("--timeout must be longer than 0s");
    }
    let anchor_at_creation = a.schedule.every.is_some() && a.schedule.anchor.is_none();
    let schedule = a
        .schedule
        .to_schedule(now)
        .map_err(anyhow::Error::msg)?
        .with_window(a.start, a.end)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // A catch-up within the grace runs as if on time: the default grace is
    // no longer than the schedule's period, so a short outage does not
    // replay a burst of a frequent task.
    let grace = a.grace.unwrap_or_else(|| {
        let mut next = schedule.occurrences_after(now).take(2);
        match (next.next(), next.next()) {
            (Some(x), Some(y)) => DurationMs(
                u64::try_from(y.millis_since(x))
                    .unwrap_or(u64::MAX)
                    .min(GRACE_DEFAULT.0),
            ),
            _ => GRACE_DEFAULT,
        }
    });
    let target = match (agent, a.selector) {
        (Some(id), _) => Target::Agent(id),
        (None, Some(sel)) => Target::Selector(sel.0),
        (None, None) => bail!("one of --agent or --selector is required"),
    };
    let mut command = a.command.into_iter();
    let Some(program) = command.next() else {
        bail!("no program given after `--`");
    };
    Ok(TaskDraft {
        name: a.name,
        target,
        schedule,
        action: Action::Exec(ExecSpec {
            program,
            args: command.collect(),
            env: a.env,
            cwd: a.cwd,
        }),
        policies: Policies {
            misfire: MisfirePolicy {
                mode: a.misfire,
                grace,
            },
            retry: RetryPolicy {
                retries: a.retries,
                backoff_initial: a.backoff,
                backoff_max: a.backoff_max,
            },
            overlap: a.overlap,
            timeout: a.timeout,
        },
        anchor_at_creation,
    })
}

fn schedule_next(
    schedule: &ScheduleArgs,
    from: Option<Timestamp>,
    count: usize,
    output: Output,
) -> anyhow::Result<()> {
    if count > cli::SCHEDULE_COUNT_MAX {
        bail!(
            "--count {count} is more than the {} occurrences this command prints",
            cli::SCHEDULE_COUNT_MAX
        );
    }
    let now = cli::now();
    let sched = schedule.to_schedule(now).map_err(anyhow::Error::msg)?;
    let from = from.unwrap_or(now);
    let next = cli::next_occurrences(&sched, from, count);
    match output {
        Output::Json => {
            let texts: Vec<String> = next.iter().map(ToString::to_string).collect();
            outln!("{}", serde_json::to_string(&texts)?);
        }
        Output::Table | Output::Wide => {
            if next.is_empty() {
                outln!("no occurrences after {from}");
            }
            let zone = schedule.zone();
            for t in next {
                match zone {
                    Some(tz) if tz != chrono_tz::UTC => {
                        let local = tz.from_utc_datetime(&t.to_naive_utc());
                        outln!("{t}  {}", local.format("%Y-%m-%d %H:%M:%S %Z"));
                    }
                    _ => outln!("{t}"),
                }
            }
        }
    }
    Ok(())
}
