//! `sundialctl`: Sundial's admin CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use chrono::TimeZone;
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Map, Value};
use sundial_coordinator::cli::{self, labels_text, table, Output, ScheduleArgs};
use sundial_coordinator::client::AdminClient;
use sundial_coordinator::pki::AdminCreds;
use sundial_coordinator::server::TOKEN_TTL_DEFAULT;
use sundial_protocol::policy::{MisfireMode, MisfirePolicy, OverlapPolicy, Policies, RetryPolicy};
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::wire::{AdminRequest, AdminResponse, AgentInfo, TaskDraft, TaskInfo};
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
#[command(name = "sundialctl", version, about)]
struct Cli {
    /// Admin credentials file.
    #[arg(long, value_name = "FILE", env = "SUNDIAL_CREDS", global = true)]
    creds: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Args)]
struct OutputArg {
    /// Output format: an aligned table, or JSON (snake_case, RFC 3339 UTC).
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
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// List agents.
    List(OutputArg),
    /// Show one agent.
    Get {
        #[arg(value_name = "ID")]
        id: AgentId,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Revoke an agent: its certificate is refused from now on.
    Revoke {
        #[arg(value_name = "ID")]
        id: AgentId,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCmd {
    /// Create a task; prints its id.
    ///
    /// Example: sundialctl task create --name backup --selector site=lab --cron '30 2 * * *' --tz Europe/Berlin -- /usr/local/bin/backup --fast
    Create(Box<CreateArgs>),
    /// List tasks.
    List(OutputArg),
    /// Show one task.
    Get {
        #[arg(value_name = "ID")]
        id: TaskId,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Cancel a task; agents drop it, also those offline now, when they reconnect.
    Cancel {
        #[arg(value_name = "ID")]
        id: TaskId,
    },
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// A unique name.
    #[arg(long)]
    name: Option<String>,
    /// Run on this agent.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "selector",
        required_unless_present = "selector"
    )]
    agent: Option<AgentId>,
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
        /// Only runs of this task.
        #[arg(long, value_name = "ID")]
        task: Option<TaskId>,
        /// Only runs of this agent.
        #[arg(long, value_name = "ID")]
        agent: Option<AgentId>,
        /// Only runs scheduled at or after this instant: RFC 3339, a date
        /// (2026-11-26), or a duration meaning that long ago (1h, 7d).
        #[arg(long, value_name = "T", value_parser = cli::parse_since)]
        since: Option<Timestamp>,
        /// Show at most N runs, the most recent (1 to 10000).
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
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
            eprintln!("sundialctl: {e:#}");
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
    })
}

fn target_text(t: &Target) -> String {
    match t {
        Target::Agent(a) => a.to_string(),
        Target::Selector(s) => labels_text(s),
    }
}

fn task_json(t: &TaskInfo) -> Value {
    let Action::Exec(exec) = &t.spec.action;
    let p = &t.spec.policies;
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
        "revision": t.spec.revision,
        "created_at": t.spec.created_at.to_string(),
        "cancelled": t.cancelled,
        "misfire": p.misfire.mode.to_string(),
        "grace_ms": p.misfire.grace.0,
        "retries": p.retry.retries,
        "overlap": p.overlap.to_string(),
        "timeout_ms": p.timeout.map(|d| d.0),
    })
}

fn run_json(r: &RunRecord) -> Value {
    json!({
        "task_id": r.task_id.to_string(),
        "agent_id": r.agent_id.to_string(),
        "scheduled_at": r.scheduled_at.to_string(),
        "fired_at": opt_ts(r.fired_at),
        "finished_at": opt_ts(r.finished_at),
        "attempt": r.attempt,
        "outcome": r.outcome.as_str(),
        "exit_code": r.exit_code,
        "offline": r.offline,
        "lateness_ms": r.lateness().map(|d| d.0),
        "detail": r.detail,
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

fn agents_out(agents: &[AgentInfo], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(agents.iter().map(agent_json).collect()));
    }
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
                or_dash(a.last_seen),
                or_dash(a.clock_offset_ms.map(|o| format!("{o:+}"))),
                or_dash(a.rtt_ms),
                labels_text(&a.labels),
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
                "OFFSET MS",
                "RTT MS",
                "LABELS"
            ],
            &rows
        )
    );
    Ok(())
}

fn tasks_out(tasks: &[TaskInfo], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(tasks.iter().map(task_json).collect()));
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let Action::Exec(exec) = &t.spec.action;
            vec![
                t.spec.id.to_string(),
                or_dash(t.spec.name.clone()),
                target_text(&t.spec.target),
                t.spec.schedule.to_string(),
                if t.cancelled {
                    "cancelled".into()
                } else {
                    "active".into()
                },
                std::iter::once(exec.program.clone())
                    .chain(exec.args.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &["ID", "NAME", "TARGET", "SCHEDULE", "STATE", "COMMAND"],
            &rows
        )
    );
    Ok(())
}

fn runs_out(runs: &[RunRecord], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(runs.iter().map(run_json).collect()));
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.task_id.to_string(),
                r.agent_id.to_string(),
                r.scheduled_at.to_string(),
                r.attempt.to_string(),
                r.outcome.to_string(),
                or_dash(r.exit_code),
                or_dash(r.lateness().map(|d| d.0)),
                if r.offline { "yes".into() } else { "no".into() },
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
                "LATE MS",
                "OFFLINE"
            ],
            &rows
        )
    );
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
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
        let ask = |req: AdminRequest| {
            let client = &client;
            async move { client.request(&req).await.map_err(anyhow::Error::msg) }
        };
        let unexpected =
            |r: AdminResponse| anyhow::anyhow!("unexpected answer from the coordinator: {r:?}");
        match cli.command {
            Cmd::Token(TokenCmd::Create { ttl, uses, labels }) => {
                if ttl.0 == 0 {
                    bail!("--ttl must be longer than 0 (default {TOKEN_TTL_DEFAULT})");
                }
                match ask(AdminRequest::TokenCreate {
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
            Cmd::Agent(AgentCmd::List(o)) => match ask(AdminRequest::AgentList).await? {
                AdminResponse::Agents(a) => agents_out(&a, o.output)?,
                r => return Err(unexpected(r)),
            },
            Cmd::Agent(AgentCmd::Get { id, out }) => match ask(AdminRequest::AgentGet(id)).await? {
                AdminResponse::Agent(a) => {
                    if out.output == Output::Json {
                        print_json(&agent_json(&a))?;
                    } else {
                        agents_out(&[*a], out.output)?;
                    }
                }
                r => return Err(unexpected(r)),
            },
            Cmd::Agent(AgentCmd::Revoke { id }) => {
                ask(AdminRequest::AgentRevoke(id)).await?;
                outln!("revoked {id}");
            }
            Cmd::Task(TaskCmd::Create(args)) => {
                let draft = draft(*args)?;
                match ask(AdminRequest::TaskCreate(Box::new(draft))).await? {
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
            Cmd::Task(TaskCmd::List(o)) => match ask(AdminRequest::TaskList).await? {
                AdminResponse::Tasks(t) => tasks_out(&t, o.output)?,
                r => return Err(unexpected(r)),
            },
            Cmd::Task(TaskCmd::Get { id, out }) => match ask(AdminRequest::TaskGet(id)).await? {
                AdminResponse::Task(t) => {
                    if out.output == Output::Json {
                        print_json(&task_json(&t))?;
                    } else {
                        tasks_out(&[*t], out.output)?;
                    }
                }
                r => return Err(unexpected(r)),
            },
            Cmd::Task(TaskCmd::Cancel { id }) => {
                ask(AdminRequest::TaskCancel(id)).await?;
                outln!("cancelled {id}");
            }
            Cmd::Run(RunCmd::List {
                task,
                agent,
                since,
                limit,
                out,
            }) => {
                let (runs, matched, unreadable) = client
                    .run_list(&AdminRequest::RunList {
                        task,
                        agent,
                        since,
                        limit,
                    })
                    .await
                    .map_err(anyhow::Error::msg)?;
                runs_out(&runs, out.output)?;
                if unreadable > 0 {
                    eprintln!("sundialctl: warning: {unreadable} stored run records could not be read and were skipped (the coordinator's log names them)");
                }
                if matched > runs.len() as u64 && out.output == Output::Table {
                    eprintln!(
                        "showing the latest {} of {matched} runs; narrow with --since/--task/--agent or raise --limit",
                        runs.len()
                    );
                }
            }
            Cmd::Schedule(_) => {}
        }
        client.close();
        Ok(())
    })
}

/// How far in the past `--at` or `--end` may be (`--at now` is parsed a
/// moment before it is checked).
const PAST_SLACK_MS: i64 = 1_000;
/// The grace when none is given and the schedule's period is longer.
const GRACE_DEFAULT: DurationMs = DurationMs(60_000);

fn draft(a: CreateArgs) -> anyhow::Result<TaskDraft> {
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
    let target = match (a.agent, a.selector) {
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
        Output::Table => {
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
