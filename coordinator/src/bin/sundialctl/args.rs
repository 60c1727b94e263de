//! The command line: every command, flag and its help.

use super::*;

/// Sundial admin CLI. Reads the coordinator's address and admin credentials
/// from --creds FILE or SUNDIAL_CREDS (the file `sundial-coordinator init` wrote).
#[derive(Debug, Parser)]
#[command(
    name = "sundialctl",
    version,
    about = "Sundial's admin CLI: join tokens, agents, tasks, runs and schedules",
    after_long_help = AFTER_HELP
)]
pub(crate) struct Cli {
    /// Admin credentials file.
    #[arg(long, value_name = "FILE", env = "SUNDIAL_CREDS", global = true)]
    pub(crate) creds: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

/// The time semantics, misfire policy and JSON conventions, for `--help`
/// and the manual page.
const AFTER_HELP: &str = "\
TIME
  Instants are UTC with millisecond resolution, written RFC 3339
  (2026-11-26T08:00:00.000Z). Agents fire on their own clocks, offline too.
  --at T fires once; --every DUR fires at anchor + k * DUR; --cron EXPR
  follows Debian (Vixie) cron in --tz ZONE (default UTC): in a spring-forward
  gap a fixed-time job fires once right after the gap, in a fall-back overlap
  once (first pass), while a job whose minute or hour starts with * fires in
  both. Quartz forms (?, seconds first, a year of *), N/S steps, CRON_TZ=
  and @every are read and said so; H, L, W, # and @reboot are refused.

MISFIRE
  Occurrences missed while an agent was down longer than --grace (default:
  a minute, or the period if shorter): --misfire skip records each as
  skipped; once (default) runs one catch-up unless an on-time run covers it;
  all[:CAP] runs the most recent up to CAP.

JSON (-o json)
  snake_case fields, RFC 3339 UTC instants, ids as text (a1, t3). Runs:
  task_id, task_name, agent_id, agent_name, scheduled_at, fired_at,
  finished_at, duration_ms, attempt, outcome (succeeded, failed, timed_out,
  rejected, skipped, interrupted), exit_code, offline, lateness_ms, detail,
  why, stdout, stderr. run list --page -o json
  wraps a page with its cursors: {\"runs\", \"more\", \"matched\",
  \"older\", \"newer\"}. Every field is listed in the README (JSON: the
  scripting interface).

Examples:
  sundialctl task create --name backup --selector site=lab --cron '30 2 * * *' --tz Europe/Berlin -- /usr/local/bin/backup
  sundialctl run list --task backup --outcome failed,timed_out
  sundialctl status";

#[derive(Debug, Args)]
pub(crate) struct OutputArg {
    /// Output format: an aligned table, a wide table (nothing shortened), or
    /// JSON (snake_case, RFC 3339 UTC; the scripting interface).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub(crate) output: Output,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
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
    /// The fleet at a glance: agents online and offline, runs of the last
    /// hour by outcome, failing and late tasks, unsynced backlogs.
    Status {
        /// The window of runs looked at (a duration back from now).
        #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "1h")]
        window: DurationMs,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Named admin credentials and their roles (viewer, operator, owner).
    #[command(subcommand)]
    Admin(AdminCmd),
    /// The audit log: every change an admin made, and every refused request.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Print a shell completion script: `sundialctl completions bash >
    /// /etc/bash_completion.d/sundialctl` (bash, zsh and fish also complete
    /// task and agent names, asking the coordinator of SUNDIAL_CREDS).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Task or agent names, one per line, for shell completion.
    #[command(name = "__names", hide = true)]
    Names {
        #[arg(value_enum)]
        kind: NameKind,
    },
    /// Print the manual page (roff): `sundialctl manpage | man -l -`; with
    /// --dir, write a page for every subcommand too (sundialctl-*.1).
    Manpage {
        /// Write the pages into this directory instead of printing one.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// What `__names` lists.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum NameKind {
    /// Live tasks: by name, or id when unnamed.
    Tasks,
    /// Agents: by name, or id when unnamed.
    Agents,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCmd {
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
pub(crate) enum AgentCmd {
    /// List agents.
    List(OutputArg),
    /// Show one agent (by id or name).
    Get {
        #[arg(value_name = "AGENT")]
        id: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Take a device out of service without losing its last records:
    /// cancel the tasks aimed at it alone, wait until it reports an empty
    /// outbox (so every run it made is stored), then revoke it. A revoked
    /// agent fires nothing more.
    ///
    /// Example: sundialctl agent retire press-7 --wait 30m
    Retire {
        #[arg(value_name = "AGENT")]
        id: String,
        /// How long to wait for its outbox to drain; past it, nothing is
        /// revoked and the command fails saying what is left [default: 10m].
        #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "10m")]
        wait: DurationMs,
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
pub(crate) enum TaskCmd {
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
    /// Seal secret variables again, to every agent the task reaches now
    /// (agents that joined since, or made a new sealing key): the named
    /// ones are replaced or added, the others kept. The values are needed
    /// again: nobody but each agent can read the sealed ones.
    ///
    /// Example: sundialctl task reseal upload --secret-env-file upload.secrets
    Reseal {
        #[arg(value_name = "TASK")]
        id: String,
        #[command(flatten)]
        secrets: SecretArgs,
    },
}

/// Secret environment variables, sealed here to each agent's own key.
#[derive(Debug, Args, Default)]
pub(crate) struct SecretArgs {
    /// A secret environment variable, encrypted here to each target
    /// agent's public key: the coordinator stores and forwards only what
    /// it cannot read; the agent opens it when a run starts. NAME=VALUE,
    /// or NAME alone to take the value from this shell's environment (so
    /// it is in neither shell history nor `ps`). Repeatable. `task get`
    /// shows names only. The device owner's --allow-env rules apply to
    /// the name (TASK_* is allowed everywhere).
    #[arg(long = "secret-env", value_name = "NAME[=VALUE]")]
    pub(crate) secret_env: Vec<String>,
    /// Secret variables from a file: one NAME=VALUE per line; empty lines
    /// and lines starting with # are skipped. Repeatable.
    #[arg(long = "secret-env-file", value_name = "FILE")]
    pub(crate) secret_env_file: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    /// The task (id or name).
    #[arg(value_name = "TASK")]
    pub(crate) id: String,
    /// A new schedule: --at, --every [--anchor] or --cron [--tz].
    #[command(flatten)]
    pub(crate) schedule: ScheduleArgs,
    /// skip, once, all or all:CAP.
    #[arg(long, value_name = "POLICY", value_parser = cli::Suggest::<MisfireMode>::new(cli::MISFIRE_VALUES))]
    pub(crate) misfire: Option<MisfireMode>,
    /// An occurrence at most this late still runs normally.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    pub(crate) grace: Option<DurationMs>,
    /// Retries after a failed, timed-out or interrupted run.
    #[arg(long, value_name = "N")]
    pub(crate) retries: Option<u32>,
    /// Delay before the first retry; doubles for each further one.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    pub(crate) backoff: Option<DurationMs>,
    /// The longest delay between retries.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    pub(crate) backoff_max: Option<DurationMs>,
    /// Kill a run still going after this long.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, conflicts_with = "no_timeout")]
    pub(crate) timeout: Option<DurationMs>,
    /// Remove the timeout.
    #[arg(long)]
    pub(crate) no_timeout: bool,
    /// allow or forbid.
    #[arg(long, value_name = "POLICY", value_parser = cli::Suggest::<OverlapPolicy>::new(cli::OVERLAP_VALUES))]
    pub(crate) overlap: Option<OverlapPolicy>,
    /// Replace the environment (repeatable; all of it is replaced).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = cli::parse_env)]
    pub(crate) env: Vec<(String, String)>,
    /// Remove every environment variable.
    #[arg(long, conflicts_with = "env")]
    pub(crate) clear_env: bool,
    /// A new working directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) cwd: Option<String>,
    /// A new module for a function (`.wasm` or `.wat`; uploaded unless
    /// the coordinator has it): its agents get it beside the new revision.
    /// On a program's task, the task becomes a function.
    #[arg(long, value_name = "FILE", conflicts_with = "cwd")]
    pub(crate) wasm: Option<std::path::PathBuf>,
    /// A function's new fuel limit.
    #[arg(long, value_name = "N")]
    pub(crate) fuel: Option<u64>,
    /// A function's new memory limit, e.g. 64MiB.
    #[arg(long, value_name = "SIZE", value_parser = sundial_protocol::wasm::parse_bytes)]
    pub(crate) memory: Option<u64>,
    /// A new program and arguments, after `--` (for a function: its new arguments).
    #[arg(last = true, value_name = "PROGRAM [ARGS]...")]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Args)]
#[command(group(
    clap::ArgGroup::new("target")
        .args(["agent", "selector"])
        .required(false)
        .multiple(false)
))]
pub(crate) struct CreateArgs {
    /// A unique name.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Run on this agent (id or name).
    #[arg(long, value_name = "AGENT")]
    pub(crate) agent: Option<String>,
    /// Run on every agent with these labels, including agents that join later.
    #[arg(long, value_name = "K=V[,K=V]", value_parser = cli::parse_selector)]
    pub(crate) selector: Option<cli::Selector>,
    #[command(flatten)]
    pub(crate) schedule: ScheduleArgs,
    /// Triggered instead of scheduled: runs on the same agent when a run of
    /// TASK (id or name), after its retries, ends with one of OUTCOMES
    /// (succeeded [default], failed, timed_out, skipped, any; comma
    /// separated). Repeat for a fan-in: fires when all of them have ended
    /// so for the same occurrence. Decided on the device, online or not;
    /// without --agent or --selector it runs where TASK runs.
    #[arg(long, value_name = "TASK[:OUTCOMES]", conflicts_with_all = ["at", "every", "cron", "start", "end"])]
    pub(crate) after: Vec<String>,
    /// What to do with occurrences missed while the agent was down: skip,
    /// once (one catch-up run), all or all:CAP.
    #[arg(long, value_name = "POLICY", default_value = "once", value_parser = cli::Suggest::<MisfireMode>::new(cli::MISFIRE_VALUES))]
    pub(crate) misfire: MisfireMode,
    /// An occurrence at most this late still runs normally [default: 1m,
    /// or the period of the schedule if that is shorter].
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    pub(crate) grace: Option<DurationMs>,
    /// Retries after a failed, timed-out or interrupted run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub(crate) retries: u32,
    /// Delay before the first retry; doubles for each further one.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "1s")]
    pub(crate) backoff: DurationMs,
    /// The longest delay between retries.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "5m")]
    pub(crate) backoff_max: DurationMs,
    /// Kill a run still going after this long (timed_out).
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration)]
    pub(crate) timeout: Option<DurationMs>,
    /// allow: occurrences may run side by side; forbid: record as skipped.
    #[arg(long, value_name = "POLICY", default_value = "allow", value_parser = cli::Suggest::<OverlapPolicy>::new(cli::OVERLAP_VALUES))]
    pub(crate) overlap: OverlapPolicy,
    /// Start of the window in which occurrences count (RFC 3339).
    #[arg(long, value_name = "T", value_parser = cli::parse_instant)]
    pub(crate) start: Option<Timestamp>,
    /// End of the window (exclusive).
    #[arg(long, value_name = "T", value_parser = cli::parse_instant)]
    pub(crate) end: Option<Timestamp>,
    /// Environment for the program (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = cli::parse_env)]
    pub(crate) env: Vec<(String, String)>,
    /// Working directory for the program.
    #[arg(long, value_name = "DIR")]
    pub(crate) cwd: Option<String>,
    #[command(flatten)]
    pub(crate) secrets: SecretArgs,
    /// With --selector: `one` runs each occurrence on exactly one of the
    /// matching agents in session; `shard` runs it on every one, each told
    /// SUNDIAL_SHARD_INDEX and SUNDIAL_SHARD_COUNT. Decided ahead in lease
    /// windows (--lease) that members keep firing offline; an occurrence
    /// runs at most once (`one`), and a member that goes dark is left out
    /// of the windows planned after it was last heard.
    #[arg(long, value_name = "MODE", value_parser = ["one", "shard"])]
    pub(crate) placement: Option<String>,
    /// The lease window of --placement: each member's share is planned
    /// this far ahead (half of it before it begins) and holds offline;
    /// shorter fails over sooner, longer rides out longer outages. 1s to 1d.
    #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, requires = "placement", default_value = "1m")]
    pub(crate) lease: DurationMs,
    /// Run a function instead of a program: this WebAssembly module (a
    /// WASI preview 1 command, e.g. built with `cargo build --target
    /// wasm32-wasip1`), uploaded once to the coordinator (by its SHA-256)
    /// and sent to the agents with the task; the words after `--` are its
    /// arguments. Agents run it sandboxed, offline too, if their owner
    /// allows functions (--allow-wasm).
    #[arg(long, value_name = "FILE", conflicts_with = "cwd")]
    pub(crate) wasm: Option<std::path::PathBuf>,
    /// With --wasm: instructions the function may run (about one unit of
    /// fuel each) before it is stopped and recorded failed [default:
    /// 1000000000].
    #[arg(long, value_name = "N", requires = "wasm")]
    pub(crate) fuel: Option<u64>,
    /// With --wasm: the memory the function may grow to, e.g. 64MiB
    /// [default: 64MiB].
    #[arg(long, value_name = "SIZE", requires = "wasm", value_parser = sundial_protocol::wasm::parse_bytes)]
    pub(crate) memory: Option<u64>,
    /// The program and its arguments after `--` (with --wasm: the
    /// function's arguments).
    #[arg(
        last = true,
        required_unless_present = "wasm",
        value_name = "PROGRAM [ARGS]..."
    )]
    pub(crate) command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RunCmd {
    /// Show one run whole: its times, outcome and why, and its stdout and
    /// stderr (the tails the agent kept).
    ///
    /// RUN is TASK/AGENT/SCHEDULED_AT[/ATTEMPT], as `run list -o json`
    /// gives and webhooks name it (e.g. t3/a1/2026-12-06T02:30:00.000Z/1);
    /// task and agent may be names; without ATTEMPT, every attempt.
    Get {
        #[arg(value_name = "RUN")]
        run: String,
        #[command(flatten)]
        out: OutputArg,
    },
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
        /// Only runs with these outcomes (comma-separated: succeeded,
        /// failed, timed_out, rejected, skipped, interrupted); the latest N
        /// of them, looking back through at most 100,000 runs.
        #[arg(long, value_name = "OUTCOMES", value_parser = parse_outcomes, conflicts_with_all = ["after", "before"])]
        outcome: Option<Outcomes>,
        /// Then print runs as the coordinator stores them (pushed, not
        /// polled) until interrupted; with -o json, one object per line.
        /// With --arrival: every run any coordinator stores, in arrival
        /// order, polled each second (from --after CURSOR if given).
        #[arg(short = 'f', long, conflicts_with = "before")]
        follow: bool,
        /// With -o json, one object with the page and its cursors instead
        /// of a bare array: {"runs": [...], "more": bool, "matched": N,
        /// "older": CURSOR, "newer": CURSOR}, for scripts that page
        /// (--before OLDER goes back, --after NEWER forward).
        #[arg(long, conflicts_with_all = ["follow", "outcome"])]
        page: bool,
        /// In the order the coordinators stored the runs, not by scheduled
        /// time: for scripts that consume runs, late ones included (an
        /// offline agent's backlog arrives scheduled in the past). Without
        /// --after, the latest runs to arrive; the cursor to continue from
        /// is printed after every page (--page: "newer"); `--after
        /// arrival.0.0` reads from the first run stored.
        #[arg(long, conflicts_with_all = ["before", "since", "outcome"])]
        arrival: bool,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ScheduleCmd {
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

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCmd {
    /// Create a named admin credential and write it to a file (its key is
    /// made here and never leaves this machine). Owners only.
    ///
    /// Roles: viewer reads everything (dashboards, scripts); operator also
    /// manages tasks and join tokens; owner also manages admins and agents.
    ///
    /// Example: sundialctl admin create alice --role operator --out alice.creds
    Create {
        /// A name: lower-case letters, digits, '.', '_' and '-'.
        #[arg(value_name = "NAME")]
        name: String,
        /// viewer, operator or owner.
        #[arg(long, value_name = "ROLE")]
        role: Role,
        /// How long the credential is valid (1h to 1098d).
        #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "365d")]
        ttl: DurationMs,
        /// Where to write it [default: NAME.creds]; an existing file is not replaced.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// List admins: name, role, created, expires, last used.
    List(OutputArg),
    /// Give an admin a new credential (a new key and lifetime); its old one
    /// stops working at once. Owners renew anyone; anyone renews itself.
    Renew {
        /// The admin [default: the one of --creds].
        #[arg(value_name = "NAME")]
        name: Option<String>,
        /// How long the new credential is valid (1h to 1098d).
        #[arg(long, value_name = "DUR", value_parser = cli::parse_duration, default_value = "365d")]
        ttl: DurationMs,
        /// Where to write it [default: your own renewal replaces the --creds
        /// file; another admin's goes to NAME.creds, not replacing a file].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Revoke an admin: its connections close now and its credential is
    /// refused from now on. Owners only; the last owner cannot be revoked.
    Revoke {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Write the --creds credential as PEM files (ca.pem, cert.pem, key.pem)
    /// for a browser or curl reaching `serve --https`. Nothing is sent.
    ///
    /// Example: sundialctl --creds dash.creds admin pem --out dash/
    Pem {
        /// A directory (created if missing); existing files are not replaced.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCmd {
    /// List audit entries, oldest first (the most recent N when more match).
    List {
        /// Only what this admin did.
        #[arg(long, value_name = "NAME")]
        admin: Option<String>,
        /// Only entries about this task (id or name).
        #[arg(long, value_name = "TASK", conflicts_with_all = ["agent", "about_admin"])]
        task: Option<String>,
        /// Only entries about this agent (id or name).
        #[arg(long, value_name = "AGENT", conflicts_with = "about_admin")]
        agent: Option<String>,
        /// Only entries about this admin (created, renewed, revoked).
        #[arg(long = "about-admin", value_name = "NAME")]
        about_admin: Option<String>,
        /// Only refused requests.
        #[arg(long)]
        refused: bool,
        /// Only entries at or after this instant: RFC 3339, a date, or a
        /// duration meaning that long ago (1h, 7d).
        #[arg(long, value_name = "T", value_parser = cli::parse_since)]
        since: Option<Timestamp>,
        /// Show at most N entries, the most recent (1 to 10000).
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        limit: u32,
        /// The page after this cursor (an entry's SEQ), oldest first.
        #[arg(long, value_name = "SEQ", conflicts_with = "before")]
        after: Option<u64>,
        /// The page before this cursor (an entry's SEQ): older entries.
        #[arg(long, value_name = "SEQ")]
        before: Option<u64>,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// Outcomes named on the command line (`failed,timed_out`).
#[derive(Debug, Clone)]
pub(crate) struct Outcomes(pub(crate) Vec<sundial_protocol::Outcome>);

/// `failed,timed_out` → the outcomes.
fn parse_outcomes(s: &str) -> Result<Outcomes, String> {
    s.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| {
            sundial_protocol::Outcome::parse(o).ok_or_else(|| {
                format!("`{o}` is not an outcome: succeeded, failed, timed_out, rejected, skipped or interrupted")
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("name at least one outcome".into())
            } else {
                Ok(Outcomes(v))
            }
        })
}
