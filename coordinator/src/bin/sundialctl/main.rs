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
use sundial_protocol::placement::{PlacementAsk, PlacementMode};
use sundial_protocol::policy::{MisfireMode, MisfirePolicy, OverlapPolicy, Policies, RetryPolicy};
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::wasm::ModuleHash;

use sundial_protocol::wire::{
    AdminInfo, AdminRequest, AdminResponse, AgentInfo, AuditEntry, AuditQuery, LastRun, Role,
    TaskDraft, TaskInfo, TaskPatch, TokenInfo,
};
use sundial_protocol::{
    AgentId, DurationMs, OutcomeSet, RunRecord, Schedule, TaskId, Timestamp, Trigger,
};

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

mod args;
mod render;
mod request;

use args::*;
use render::*;
use request::*;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sundialctl: {}", sundial_protocol::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Talks to the coordinator for one command, resolving names to ids.
struct Ctl {
    client: AdminClient,
    creds: AdminCreds,
}

/// A module file's hash and bytes: a binary `.wasm`, or WebAssembly text
/// (`.wat`), assembled here. Bounded: the largest any coordinator takes.
fn read_module(path: &std::path::Path) -> anyhow::Result<(ModuleHash, Vec<u8>)> {
    use std::io::Read;
    let limit = sundial_protocol::wasm::MODULE_BYTES_LIMIT;
    let f = std::fs::File::open(path).with_context(|| format!("--wasm {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("--wasm {}: reading it", path.display()))?;
    if bytes.len() as u64 > limit {
        bail!(
            "--wasm {}: larger than {limit} bytes, more than any coordinator takes",
            path.display()
        );
    }
    if !bytes.starts_with(b"\0asm") {
        bytes = wat::parse_bytes(&bytes)
            .map_err(|e| {
                anyhow::anyhow!(
                    "--wasm {}: neither a WebAssembly module (.wasm) nor WebAssembly text (.wat): {e}",
                    path.display()
                )
            })?
            .into_owned();
    }
    Ok((ModuleHash::of(&bytes), bytes))
}

impl Ctl {
    async fn ask(&self, req: AdminRequest) -> anyhow::Result<AdminResponse> {
        self.client.request(&req).await.map_err(anyhow::Error::msg)
    }

    /// Uploads a module unless the coordinator holds it already (modules
    /// are stored by hash: uploaded once however many tasks use them).
    async fn upload_module(&self, hash: ModuleHash, bytes: &[u8]) -> anyhow::Result<()> {
        if let AdminResponse::Module(Some(_)) = self.ask(AdminRequest::ModuleGet(hash)).await? {
            return Ok(());
        }
        let pieces: Vec<(u64, &[u8])> = sundial_protocol::wasm::chunks(bytes).collect();
        let n = pieces.len();
        for (i, (offset, chunk)) in pieces.into_iter().enumerate() {
            if n > 4 {
                eprint!(
                    "\rsundialctl: uploading module {} ({}/{n})",
                    hash.short(),
                    i + 1
                );
            }
            let r = self
                .ask(AdminRequest::ModuleUpload {
                    hash,
                    size: bytes.len() as u64,
                    offset,
                    chunk: chunk.to_vec(),
                })
                .await;
            if n > 4 && (r.is_err() || i + 1 == n) {
                eprintln!();
            }
            match r.with_context(|| format!("uploading the module {}", hash.short()))? {
                AdminResponse::Done | AdminResponse::Module(Some(_)) => {}
                r => return Err(unexpected(r)),
            }
        }
        Ok(())
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

impl Ctl {
    /// `secrets` sealed to every agent `target` reaches now; agents that
    /// have published no key are named (their runs will be rejected until
    /// a reseal).
    async fn seal(
        &self,
        target: &Target,
        secrets: &[Secret],
    ) -> anyhow::Result<Vec<sundial_protocol::seal::SealedEnv>> {
        let (keys, missing) = match self.ask(AdminRequest::SealKeys(target.clone())).await? {
            AdminResponse::SealKeys { keys, missing } => (keys, missing),
            r => return Err(unexpected(r)),
        };
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(ToString::to_string).collect();
            eprintln!(
                "sundialctl: warning: {} {} published no sealing key yet (not connected since joining, or older than 0.5): the secrets are not sealed to {}; run `sundialctl task reseal` once {} connected",
                names.join(", "),
                if missing.len() == 1 { "has" } else { "have" },
                if missing.len() == 1 { "it" } else { "them" },
                if missing.len() == 1 { "it has" } else { "they have" },
            );
        }
        if keys.is_empty() {
            if let Target::Agent(a) = target {
                bail!("agent {a} has published no sealing key (it has not connected since joining, or runs an agent older than 0.5): start it, then try again");
            }
        }
        if !keys.is_empty() {
            // Fingerprints to compare with `sundial-agent status` on the
            // device, for those who do not take the coordinator's word.
            let mut shown: Vec<String> = keys
                .iter()
                .take(5)
                .map(|(a, k)| format!("{a} (key {})", k.fingerprint()))
                .collect();
            if keys.len() > 5 {
                shown.push(format!("and {} more", keys.len() - 5));
            }
            eprintln!("sundialctl: sealing to {}", shown.join(", "));
        }
        seal_all(secrets, &keys)
    }
}

/// A word any shell takes as it is: letters, digits and `._-:@+=,/`, not
/// starting with `-`.
fn shell_word(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:@+=,/".contains(c))
}

fn unexpected(r: AdminResponse) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the coordinator: {r:?}")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Completions { shell } => {
            let out = sundial_net::shell::completions(*shell, Cli::command(), "sundialctl");
            out!("{}", String::from_utf8_lossy(&out));
            out!(
                "{}",
                sundial_net::shell::name_completions(
                    *shell,
                    &Cli::command(),
                    "sundialctl",
                    "__names"
                )
            );
            return Ok(());
        }
        Cmd::Manpage { dir: None } => {
            let out = sundial_net::shell::manpage(Cli::command())?;
            out!("{}", String::from_utf8_lossy(&out));
            return Ok(());
        }
        Cmd::Manpage { dir: Some(dir) } => {
            let n = sundial_net::shell::manpages_to(Cli::command(), dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?;
            outln!("wrote {n} manual pages into {}", dir.display());
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
    // What the command line alone says is wrong is said before anything
    // needs a coordinator.
    if let Cmd::Task(TaskCmd::Create(a)) = &cli.command {
        if a.agent.is_none() && a.selector.is_none() && a.after.is_empty() {
            bail!("one of --agent or --selector is required (or --after TASK, to run where TASK runs)");
        }
    }
    let Some(creds_path) = cli.creds.clone() else {
        bail!("no credentials: pass --creds FILE or set SUNDIAL_CREDS (the admin.creds that `sundial-coordinator init` printed)");
    };
    let creds = AdminCreds::load(&creds_path).map_err(anyhow::Error::msg)?;
    if let Some(end) = creds.expires_at {
        let now = cli::now();
        let who = creds.admin.as_deref().unwrap_or("admin");
        if end <= now {
            bail!(
                "the credential of {who} in {} expired at {end}; an owner can renew it with `sundialctl admin renew {who}`",
                creds_path.display()
            );
        }
        if end.millis_since(now) < 14 * 86_400_000 {
            eprintln!(
                "sundialctl: warning: the credential of {who} expires at {end} ({}); renew it with `sundialctl admin renew`",
                ago(end, now)
            );
        }
    }
    if let Cmd::Admin(AdminCmd::Pem { out }) = &cli.command {
        let written =
            sundial_coordinator::pki::export_pem(out, &creds).map_err(anyhow::Error::msg)?;
        for p in &written {
            outln!("wrote {}", p.display());
        }
        let d = out.display();
        outln!("curl:    curl --cacert {d}/ca.pem --cert {d}/cert.pem --key {d}/key.pem https://HOST:PORT/api/fleet");
        outln!("browser: openssl pkcs12 -export -in {d}/cert.pem -inkey {d}/key.pem -out {d}/admin.p12, then import admin.p12 (your certificate) and {d}/ca.pem (an authority, for websites) into the browser");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let client = AdminClient::connect(&creds)
            .await
            .map_err(anyhow::Error::msg)?;
        let ctl = Ctl { client, creds };
        let result = command(&ctl, cli.command, &creds_path).await;
        ctl.client.close();
        result
    })
}

async fn command(ctl: &Ctl, cmd: Cmd, creds_path: &std::path::Path) -> anyhow::Result<()> {
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
        Cmd::Agent(AgentCmd::Retire { id, wait }) => retire(ctl, &id, wait).await?,
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
            let mut triggers = Vec::new();
            let mut inherited = None;
            if !args.after.is_empty() {
                let tasks = ctl.tasks().await?;
                for text in std::mem::take(&mut args.after) {
                    let (task, on) = request::parse_after(&text)?;
                    let upstream = ctl.task_id(&task).await?;
                    let Some(up) = tasks.iter().find(|t| t.spec.id == upstream) else {
                        bail!("--after {text}: no task {upstream} (see sundialctl task list)");
                    };
                    if inherited.is_none() {
                        inherited = Some(up.spec.target.clone());
                    }
                    triggers.push(Trigger { upstream, on });
                }
            }
            let secrets = secrets(&args.secrets)?;
            let module = match &args.wasm {
                Some(path) => Some(read_module(path)?),
                None => None,
            };
            let mut draft = draft(
                args,
                agent,
                triggers,
                inherited,
                module.as_ref().map(|(h, b)| (*h, b.len() as u64)),
            )?;
            if let Some((hash, bytes)) = module {
                ctl.upload_module(hash, &bytes).await?;
            }
            if !secrets.is_empty() {
                let sealed = ctl.seal(&draft.target, &secrets).await?;
                draft.action.set_sealed_env(sealed);
            }
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
        Cmd::Task(TaskCmd::Reseal { id, secrets: a }) => {
            let secrets = secrets(&a)?;
            if secrets.is_empty() {
                bail!(
                    "nothing to reseal: give --secret-env NAME[=VALUE] or --secret-env-file FILE"
                );
            }
            let id = ctl.task_id(&id).await?;
            let task = match ctl.ask(AdminRequest::TaskGet(id)).await? {
                AdminResponse::Task(t) => t,
                r => return Err(unexpected(r)),
            };
            let sealed_env = ctl.seal(&task.spec.target, &secrets).await?;
            let agents: std::collections::BTreeSet<AgentId> =
                sealed_env.iter().flat_map(|s| s.recipients()).collect();
            match ctl.ask(AdminRequest::TaskReseal { id, sealed_env }).await? {
                AdminResponse::Updated { revision } => {
                    outln!(
                        "{id} resealed to {} agent(s): revision {revision}",
                        agents.len()
                    )
                }
                AdminResponse::TaskCreatedWarn { warnings, .. } => {
                    for w in warnings {
                        eprintln!("sundialctl: warning: {w}");
                    }
                    outln!("{id} resealed to {} agent(s)", agents.len())
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
                    let downstream = downstream_of(t.spec.id, &ctl.tasks().await?);
                    if out.output == Output::Json {
                        let mut v = task_json(&t);
                        if let Some(m) = v.as_object_mut() {
                            m.insert(
                                "triggers".into(),
                                json!(downstream
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()),
                            );
                        }
                        print_json(&v)?;
                    } else {
                        let chained =
                            !downstream.is_empty() || !t.spec.schedule.triggers().is_empty();
                        let names = ctl.names(chained).await;
                        out!("{}", describe_task(&t, &names, &downstream));
                    }
                }
                r => return Err(unexpected(r)),
            }
        }
        Cmd::Task(TaskCmd::Cancel { ids }) => {
            let mut cancelled = Vec::new();
            for id in ids {
                let id = ctl.task_id(&id).await?;
                ctl.ask(AdminRequest::TaskCancel(id)).await?;
                outln!("cancelled {id}");
                cancelled.push(id);
            }
            // What the cancelled tasks leave without a trigger.
            let tasks = ctl.tasks().await?;
            let names = ctl.names(true).await;
            for id in &cancelled {
                let left: Vec<String> = downstream_of(*id, &tasks)
                    .into_iter()
                    .filter(|d| !cancelled.contains(d))
                    .map(|d| names.task(d))
                    .collect();
                if !left.is_empty() {
                    let (them, they) = if left.len() == 1 {
                        ("it", "it")
                    } else {
                        ("them", "they")
                    };
                    eprintln!(
                        "sundialctl: warning: {} ran after {}, so {they} will not fire again: cancel {them} too, or create {them} anew --after another task",
                        left.join(", "),
                        names.task(*id),
                    );
                }
            }
        }
        Cmd::Task(TaskCmd::Update(args)) => {
            let id = ctl.task_id(&args.id).await?;
            let function = if args.wasm.is_some() || args.fuel.is_some() || args.memory.is_some() {
                let current = match ctl.ask(AdminRequest::TaskGet(id)).await? {
                    AdminResponse::Task(t) => t.spec.action,
                    r => return Err(unexpected(r)),
                };
                let module = match &args.wasm {
                    Some(path) => Some(read_module(path)?),
                    None => None,
                };
                let mut w = match (current, &module) {
                    (Action::Wasm(w), _) => w,
                    (Action::Exec(_), Some((hash, bytes))) => sundial_protocol::wasm::WasmSpec {
                        module: *hash,
                        module_bytes: bytes.len() as u64,
                        args: Vec::new(),
                        env: Vec::new(),
                        sealed_env: Vec::new(),
                        fuel: None,
                        memory_bytes: None,
                    },
                    (Action::Exec(_), None) => {
                        bail!("{id} runs a program: --fuel and --memory are for functions (give --wasm FILE to make it one)")
                    }
                };
                if let Some((hash, bytes)) = module {
                    ctl.upload_module(hash, &bytes).await?;
                    w.module = hash;
                    w.module_bytes = bytes.len() as u64;
                }
                if !args.command.is_empty() {
                    w.args = args.command.clone();
                }
                w.fuel = args.fuel.or(w.fuel);
                w.memory_bytes = args.memory.or(w.memory_bytes);
                if let Some(why) = w.refusal() {
                    bail!("{why}");
                }
                Some(w)
            } else {
                None
            };
            let patch = patch(*args, function)?;
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
                                "sundialctl: warning: {id}: not run on agent(s) {}: not in session with this coordinator (offline; with several coordinators, the one holding the session runs it if it does within a minute)",
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
        Cmd::Run(RunCmd::Get { run, out }) => run_get(ctl, &run, out.output).await?,
        Cmd::Run(RunCmd::List {
            task,
            agent,
            since,
            limit,
            after,
            before,
            follow,
            outcome,
            page,
            arrival,
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
            if follow && arrival {
                return follow_arrivals(ctl, task, agent, limit, after, out.output).await;
            }
            if follow && after.is_some() {
                bail!("--follow starts from the latest runs; to resume from a cursor, follow in arrival order: --arrival --follow --after CURSOR");
            }
            if follow {
                return follow_runs(
                    ctl,
                    task,
                    agent,
                    since,
                    limit,
                    outcome.map(|o| o.0),
                    out.output,
                )
                .await;
            }
            if let Some(Outcomes(outcomes)) = outcome {
                return runs_with_outcomes(ctl, task, agent, since, limit, &outcomes, out.output)
                    .await;
            }
            if arrival && after.as_deref().is_some_and(|a| !a.starts_with("arrival.")) {
                bail!("--arrival pages with the cursors it prints (arrival.EPOCH.SEQ); `--after arrival.0.0` starts from the first run stored");
            }
            let answer = ctl
                .client
                .run_list(&AdminRequest::RunList {
                    task,
                    agent,
                    since,
                    limit,
                    after: after.clone(),
                    // Arrival order without a cursor: the latest page.
                    before: match (arrival, &after) {
                        (true, None) => Some("arrival".into()),
                        _ => before,
                    },
                })
                .await
                .map_err(anyhow::Error::msg)?;
            let names = ctl.names(true).await;
            if page {
                if out.output != Output::Json {
                    bail!("--page is a JSON form: add -o json");
                }
                let runs: Vec<serde_json::Value> = answer
                    .runs
                    .iter()
                    .map(|r| run_json(r, &answer.runs, &names))
                    .collect();
                print_json(&json!({
                    "runs": runs,
                    "more": answer.more,
                    "matched": answer.matched,
                    "older": answer.first.as_ref().map(ToString::to_string),
                    "newer": answer.last.as_ref().map(ToString::to_string),
                }))?;
            } else {
                runs_out(&answer.runs, &names, out.output)?;
            }
            if answer.unreadable > 0 {
                eprintln!(
                    "sundialctl: warning: {} stored run records could not be read and were skipped (the coordinator's log names them)",
                    answer.unreadable
                );
            }
            if arrival && out.output != Output::Json {
                // A consumer needs its place whether or not more is waiting.
                let next = answer.last.as_deref().unwrap_or("arrival.0.0");
                if answer.more {
                    eprintln!(
                        "showing {} runs; more: --arrival --after {next}",
                        answer.runs.len()
                    );
                } else {
                    eprintln!("next: --arrival --after {next}");
                }
            } else if answer.more && out.output != Output::Json {
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
        Cmd::Status { window, out } => status(ctl, window, out.output).await?,
        Cmd::Names { kind } => {
            // A name goes into a shell's command line: one that is not a
            // plain word (an agent's name is its device owner's choice) is
            // offered as its id instead.
            let word = |name: Option<String>, id: String| match name {
                Some(n) if shell_word(&n) => n,
                _ => id,
            };
            let names: Vec<String> = match kind {
                NameKind::Tasks => ctl
                    .tasks()
                    .await?
                    .into_iter()
                    .filter(|t| !t.cancelled)
                    .map(|t| word(t.spec.name, t.spec.id.to_string()))
                    .collect(),
                NameKind::Agents => ctl
                    .agents()
                    .await?
                    .into_iter()
                    .map(|a| word(a.name, a.agent_id.to_string()))
                    .collect(),
            };
            for n in names {
                outln!("{n}");
            }
        }
        Cmd::Admin(AdminCmd::Create {
            name,
            role,
            ttl,
            out,
        }) => {
            let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.creds")));
            refuse_existing(&out)?;
            let (key_pem, csr_der) = new_key()?;
            let answer = ctl
                .ask(AdminRequest::AdminCreate {
                    name: name.clone(),
                    role,
                    ttl_ms: ttl.0,
                    csr_der,
                })
                .await?;
            let admin = write_admin_creds(ctl, answer, key_pem, &out)?;
            outln!(
                "created admin {} ({}), valid until {}: credentials in {}",
                admin.name,
                admin.role,
                admin.expires_at,
                out.display()
            );
        }
        Cmd::Admin(AdminCmd::List(o)) => match ctl.ask(AdminRequest::AdminList).await? {
            AdminResponse::Admins(a) => admins_out(&a, o.output)?,
            r => return Err(unexpected(r)),
        },
        Cmd::Admin(AdminCmd::Renew { name, ttl, out }) => {
            let Some(name) = name.or_else(|| ctl.creds.admin.clone()) else {
                bail!("name the admin to renew (these credentials are from before named admins: they belong to the owner named `owner`)");
            };
            // Renewing oneself replaces one's own file (the old credential
            // stops working at once); anyone else's goes to a new file.
            let own = ctl.creds.admin.as_deref() == Some(name.as_str());
            let (out, replace) = match out {
                Some(out) => (out, false),
                None if own => (creds_path.to_path_buf(), true),
                None => (PathBuf::from(format!("{name}.creds")), false),
            };
            if !replace {
                refuse_existing(&out)?;
            }
            let (key_pem, csr_der) = new_key()?;
            let answer = ctl
                .ask(AdminRequest::AdminRenew {
                    name: name.clone(),
                    ttl_ms: ttl.0,
                    csr_der,
                })
                .await?;
            let admin = if replace {
                let tmp = out.with_extension("creds.new");
                let _ = std::fs::remove_file(&tmp);
                let admin = write_admin_creds(ctl, answer, key_pem, &tmp)?;
                std::fs::rename(&tmp, &out).with_context(|| {
                    format!("replacing {} with {}", out.display(), tmp.display())
                })?;
                admin
            } else {
                write_admin_creds(ctl, answer, key_pem, &out)?
            };
            outln!(
                "renewed admin {}, valid until {}: credentials in {}; the old credential no longer works",
                admin.name,
                admin.expires_at,
                out.display()
            );
        }
        Cmd::Admin(AdminCmd::Revoke { name }) => {
            ctl.ask(AdminRequest::AdminRevoke(name.clone())).await?;
            outln!("revoked admin {name}");
        }
        Cmd::Audit(AuditCmd::List {
            admin,
            task,
            agent,
            about_admin,
            refused,
            since,
            limit,
            after,
            before,
            out,
        }) => {
            let subject = if let Some(t) = task {
                Some(format!("task {}", ctl.task_id(&t).await?))
            } else if let Some(a) = agent {
                Some(format!("agent {}", ctl.agent_id(&a).await?))
            } else {
                about_admin.map(|a| format!("admin {a}"))
            };
            let (entries, more) = ctl
                .client
                .audit_list(&AdminRequest::AuditList(AuditQuery {
                    admin,
                    subject,
                    since,
                    refused,
                    limit,
                    after,
                    before,
                }))
                .await
                .map_err(anyhow::Error::msg)?;
            audit_out(&entries, out.output)?;
            if more && out.output != Output::Json {
                let hint = if after.is_some() {
                    entries
                        .last()
                        .map(|e| format!("newer: --after {}", e.seq))
                        .unwrap_or_default()
                } else {
                    entries
                        .first()
                        .map(|e| format!("older: --before {}", e.seq))
                        .unwrap_or_default()
                };
                eprintln!(
                    "showing {} entries; {hint} (or --limit, --since)",
                    entries.len()
                );
            }
        }
        Cmd::Schedule(_)
        | Cmd::Completions { .. }
        | Cmd::Manpage { .. }
        | Cmd::Admin(AdminCmd::Pem { .. }) => {}
    }
    Ok(())
}

fn refuse_existing(path: &std::path::Path) -> anyhow::Result<()> {
    if path.exists() {
        bail!(
            "{} exists; refusing to replace it (choose another --out, or move it away)",
            path.display()
        );
    }
    Ok(())
}

/// A new key pair, made here: its private key (PEM) and a certificate
/// signing request for its public key (DER).
fn new_key() -> anyhow::Result<(String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate().context("making a key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("making a certificate signing request")?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// Writes the credentials file of an admin create or renew.
fn write_admin_creds(
    ctl: &Ctl,
    answer: AdminResponse,
    key_pem: String,
    out: &std::path::Path,
) -> anyhow::Result<AdminInfo> {
    let AdminResponse::AdminCert { admin, cert_der } = answer else {
        return Err(unexpected(answer));
    };
    let creds = AdminCreds {
        coordinator: ctl.creds.coordinator.clone(),
        server_name: ctl.creds.server_name.clone(),
        ca_pem: ctl.creds.ca_pem.clone(),
        cert_pem: sundial_coordinator::pki::cert_pem(&cert_der),
        key_pem,
        admin: Some(admin.name.clone()),
        role: Some(admin.role.to_string()),
        expires_at: Some(admin.expires_at),
    };
    sundial_coordinator::pki::write_creds(out, &creds).map_err(anyhow::Error::msg)?;
    Ok(admin)
}

/// Runs `status` looks at, at most (the newest).
const STATUS_RUNS_MAX: u32 = 10_000;

/// `sundialctl status`: the fleet at a glance.
async fn status(ctl: &Ctl, window: DurationMs, out: Output) -> anyhow::Result<()> {
    let now = cli::now();
    let since = now.saturating_add_ms(-window.as_millis_i64());
    let agents = ctl.agents().await?;
    let tasks = ctl.tasks().await?;
    let page = ctl
        .client
        .run_list(&AdminRequest::RunList {
            task: None,
            agent: None,
            since: Some(since),
            limit: STATUS_RUNS_MAX,
            after: None,
            before: None,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let names = Names {
        agents: agents
            .iter()
            .filter_map(|a| a.name.clone().map(|n| (a.agent_id, n)))
            .collect(),
        tasks: tasks
            .iter()
            .filter_map(|t| t.spec.name.clone().map(|n| (t.spec.id, n)))
            .collect(),
        retry: tasks
            .iter()
            .map(|t| (t.spec.id, t.spec.policies.retry))
            .collect(),
    };
    let live: Vec<&AgentInfo> = agents.iter().filter(|a| !a.revoked).collect();
    let online = live.iter().filter(|a| a.online).count();
    let offline: Vec<&&AgentInfo> = live.iter().filter(|a| !a.online).collect();
    let revoked = agents.len() - live.len();
    let mut by_outcome: std::collections::BTreeMap<&str, u64> = Default::default();
    // Per task: runs that did not succeed, and late first attempts.
    let mut failing: std::collections::BTreeMap<TaskId, (u64, Option<&RunRecord>)> =
        Default::default();
    let mut late: std::collections::BTreeMap<TaskId, (u64, i64)> = Default::default();
    for r in &page.runs {
        *by_outcome.entry(r.outcome.as_str()).or_default() += 1;
        if matches!(
            r.outcome,
            sundial_protocol::Outcome::Failed
                | sundial_protocol::Outcome::TimedOut
                | sundial_protocol::Outcome::Rejected
                | sundial_protocol::Outcome::Interrupted
        ) {
            let e = failing.entry(r.task_id).or_default();
            e.0 += 1;
            if e.1.is_none_or(|l| l.scheduled_at <= r.scheduled_at) {
                e.1 = Some(r);
            }
        }
        if let Some(ms) = lateness_ms(r, &page.runs, &names).filter(|ms| *ms > 1_000) {
            let e = late.entry(r.task_id).or_default();
            e.0 += 1;
            e.1 = e.1.max(ms);
        }
    }
    let backlog: Vec<(&AgentInfo, u64)> = live
        .iter()
        .filter_map(|a| a.outbox_len.filter(|n| *n > 0).map(|n| (*a, n)))
        .collect();
    let backlog_total: u64 = backlog.iter().map(|(_, n)| n).sum();
    // The oldest unsynced run among the agents that report (online, 0.3+).
    let oldest = live
        .iter()
        .filter_map(|a| {
            a.report
                .as_ref()
                .and_then(|r| r.oldest_unsynced)
                .map(|t| (*a, t))
        })
        .min_by_key(|(_, t)| *t);
    let clock_trouble: Vec<(&AgentInfo, &str)> = live
        .iter()
        .filter(|a| a.online)
        .filter_map(|a| {
            let r = a.report.as_ref()?;
            if r.clock_held {
                Some((*a, "holds its firing: its clock went back"))
            } else if !r.clock_vouched {
                Some((*a, "clock not vouched for since its boot"))
            } else {
                None
            }
        })
        .collect();
    if out == Output::Json {
        return print_json(&json!({
            "window_ms": window.0,
            "agents": {
                "online": online,
                "offline": offline.iter().map(|a| a.agent_id.to_string()).collect::<Vec<_>>(),
                "revoked": revoked,
            },
            "runs": by_outcome,
            "runs_truncated": page.more,
            "failing_tasks": failing.iter().map(|(t, (n, last))| json!({
                "task_id": t.to_string(),
                "task_name": names.tasks.get(t),
                "runs": n,
                "last_why": last.map(why),
                "last_agent_id": last.map(|r| r.agent_id.to_string()),
            })).collect::<Vec<_>>(),
            "late_tasks": late.iter().map(|(t, (n, max))| json!({
                "task_id": t.to_string(),
                "task_name": names.tasks.get(t),
                "runs": n,
                "max_lateness_ms": max,
            })).collect::<Vec<_>>(),
            "backlog_runs": backlog_total,
            "backlog_agents": backlog.len(),
            "oldest_unsynced": oldest.map(|(a, t)| json!({
                "agent_id": a.agent_id.to_string(),
                "ended_at": t.to_string(),
                "age_ms": now.millis_since(t).max(0),
            })),
            "clock_trouble": clock_trouble.iter().map(|(a, why)| json!({
                "agent_id": a.agent_id.to_string(),
                "why": why,
            })).collect::<Vec<_>>(),
        }));
    }
    let agent_name = |a: &AgentInfo| a.name.clone().unwrap_or_else(|| a.agent_id.to_string());
    let task_name = |t: &TaskId| {
        names
            .tasks
            .get(t)
            .map_or_else(|| t.to_string(), |n| format!("{n} ({t})"))
    };
    outln!(
        "agents    {online} online, {} offline, {revoked} revoked",
        offline.len()
    );
    for a in &offline {
        outln!(
            "          offline: {} (last seen {})",
            agent_name(a),
            a.last_seen.map_or_else(|| "never".into(), |t| ago(t, now))
        );
    }
    let runs_text = if by_outcome.is_empty() {
        "none".to_owned()
    } else {
        by_outcome
            .iter()
            .map(|(o, n)| format!("{n} {o}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    outln!(
        "runs      {runs_text} in the last {}{}",
        human_secs(window.as_millis_i64() / 1000),
        if page.more {
            format!(" (the newest {STATUS_RUNS_MAX} only)")
        } else {
            String::new()
        }
    );
    if failing.is_empty() {
        outln!("failing   none");
    }
    for (t, (n, last)) in &failing {
        let last = last.map_or_else(String::new, |r| {
            format!(
                "; last: {} on {}",
                why(r),
                names
                    .agents
                    .get(&r.agent_id)
                    .cloned()
                    .unwrap_or_else(|| r.agent_id.to_string())
            )
        });
        outln!("failing   {}: {n} run(s){last}", task_name(t));
    }
    for (t, (n, max)) in &late {
        outln!(
            "late      {}: {n} run(s) more than 1s late, at most {} ms",
            task_name(t),
            max
        );
    }
    // Online agents report their backlog as it changes; an offline one's
    // figure is the last it gave.
    if backlog.is_empty() {
        outln!("backlog   none");
    } else {
        let (worst, most) = backlog
            .iter()
            .max_by_key(|(_, n)| *n)
            .map(|(a, n)| (agent_name(a), *n))
            .unwrap_or_default();
        outln!(
            "backlog   {backlog_total} unsynced run record(s) on {} agent(s), most on {worst} ({most})",
            backlog.len()
        );
    }
    if let Some((a, t)) = oldest {
        outln!(
            "oldest    unsynced run ended {} on {}",
            ago(t, now),
            agent_name(a)
        );
    }
    for (a, why) in &clock_trouble {
        outln!("clock     {}: {why}", agent_name(a));
    }
    Ok(())
}

/// `agent retire`: cancel what is aimed at the agent alone, wait for its
/// outbox to drain (as it reports it), then revoke it.
async fn retire(ctl: &Ctl, agent: &str, wait: DurationMs) -> anyhow::Result<()> {
    let id = ctl.agent_id(agent).await?;
    let tasks = ctl.tasks().await?;
    let mine: Vec<&TaskInfo> = tasks
        .iter()
        .filter(|t| !t.cancelled && t.spec.target == Target::Agent(id))
        .collect();
    for t in &mine {
        ctl.ask(AdminRequest::TaskCancel(t.spec.id)).await?;
        eprintln!("cancelled {} (aimed at {id} alone)", t.spec.id);
    }
    let shared = tasks
        .iter()
        .filter(|t| !t.cancelled && matches!(t.spec.target, Target::Selector(_)))
        .count();
    if shared > 0 {
        eprintln!("{shared} selector task(s) may reach {id} too: they stay, for the other agents");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(wait.0);
    let mut said = std::time::Instant::now();
    loop {
        let a = match ctl.ask(AdminRequest::AgentGet(id)).await? {
            AdminResponse::Agent(a) => a,
            r => return Err(unexpected(r)),
        };
        if a.revoked {
            bail!("{id} is revoked already; its outbox can no longer be synced");
        }
        // Drained by its own report in this session (an older agent, which
        // does not report, cannot say: its Hello's figure is too old).
        let report = a.report.as_ref().filter(|_| a.online);
        let left = report.map(|r| r.outbox_len);
        // Nothing unsynced and nothing going (a run going would add one).
        if report.is_some_and(|r| r.outbox_len == 0 && r.running == 0) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "{id} has not reported an empty outbox within {wait} ({}): nothing revoked; run again with a longer --wait, or `agent revoke {id}` to drop what it holds",
                match (a.online, left) {
                    (false, _) => "it is offline".to_owned(),
                    (true, None) => "it does not report (older than 0.3?)".to_owned(),
                    (true, Some(n)) => format!("{n} run record(s) still unsynced"),
                }
            );
        }
        if said.elapsed() >= std::time::Duration::from_secs(10) {
            said = std::time::Instant::now();
            eprintln!(
                "waiting for {id}: {}",
                match left {
                    Some(n) => format!("{n} run record(s) unsynced"),
                    None if !a.online => "offline".to_owned(),
                    None => "no report yet".to_owned(),
                }
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    ctl.ask(AdminRequest::AgentRevoke(id)).await?;
    outln!("retired {id}: its outbox was empty; revoked, it fires nothing more");
    Ok(())
}

/// `run list --follow`: the latest runs, then every run as it is stored.
async fn follow_runs(
    ctl: &Ctl,
    task: Option<TaskId>,
    agent: Option<AgentId>,
    since: Option<Timestamp>,
    limit: u32,
    outcomes: Option<Vec<sundial_protocol::Outcome>>,
    out: Output,
) -> anyhow::Result<()> {
    let wanted = |r: &RunRecord| outcomes.as_ref().is_none_or(|o| o.contains(&r.outcome));
    // The follow first (on a connection of its own), then the list: no
    // run stored in between is missed; one on both is printed once.
    let follower = AdminClient::connect(&ctl.creds)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut stream = follower
        .follow(&AdminRequest::RunFollow { task, agent })
        .await
        .map_err(anyhow::Error::msg)?;
    let answer = ctl
        .client
        .run_list(&AdminRequest::RunList {
            task,
            agent,
            since,
            limit,
            after: None,
            before: None,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let mut names = ctl.names(true).await;
    let mut printed: std::collections::HashSet<sundial_protocol::RunKey> =
        answer.runs.iter().map(RunRecord::key).collect();
    let mut answer = answer;
    answer.runs.retain(|r| wanted(r));
    let print = |runs: &[RunRecord], names: &Names, header: bool| -> anyhow::Result<()> {
        if out == Output::Json {
            for r in runs {
                outln!("{}", run_json(r, runs, names));
            }
            Ok(())
        } else {
            let text = runs_text(runs, names, out);
            let body = if header {
                text
            } else {
                text.lines().skip(1).map(|l| format!("{l}\n")).collect()
            };
            out!("{body}");
            Ok(())
        }
    };
    print(&answer.runs, &names, true)?;
    eprintln!("following: runs are printed as they are stored (Ctrl-C ends)");
    loop {
        let runs = match stream.next().await {
            Ok(Some(runs)) => runs,
            Ok(None) => bail!("the coordinator ended the follow"),
            Err(e) => bail!("{e}"),
        };
        let fresh: Vec<RunRecord> = runs
            .into_iter()
            .filter(|r| printed.insert(r.key()) && wanted(r))
            .collect();
        if fresh.is_empty() {
            continue;
        }
        if fresh.iter().any(|r| {
            !names.tasks.contains_key(&r.task_id) || !names.agents.contains_key(&r.agent_id)
        }) {
            names = ctl.names(true).await;
        }
        print(&fresh, &names, false)?;
    }
}

/// `run list --arrival --follow`: pages in arrival order, polled each
/// second, from `after` or from the latest page. It reads the store, so it
/// sees the runs every coordinator on it stores, each once.
async fn follow_arrivals(
    ctl: &Ctl,
    task: Option<TaskId>,
    agent: Option<AgentId>,
    limit: u32,
    after: Option<String>,
    out: Output,
) -> anyhow::Result<()> {
    if let Some(a) = &after {
        if !a.starts_with("arrival.") {
            bail!("--arrival pages with the cursors it prints (arrival.EPOCH.SEQ)");
        }
    }
    let mut cursor = after;
    let mut names = ctl.names(true).await;
    let mut header = true;
    let mut told = false;
    loop {
        let answer = ctl
            .client
            .run_list(&AdminRequest::RunList {
                task,
                agent,
                since: None,
                limit,
                before: cursor.is_none().then(|| "arrival".to_owned()),
                after: cursor.clone(),
            })
            .await
            .map_err(anyhow::Error::msg)?;
        if answer.runs.iter().any(|r| {
            !names.tasks.contains_key(&r.task_id) || !names.agents.contains_key(&r.agent_id)
        }) {
            names = ctl.names(true).await;
        }
        if out == Output::Json {
            for r in &answer.runs {
                outln!("{}", run_json(r, &answer.runs, &names));
            }
        } else if !answer.runs.is_empty() {
            let text = runs_text(&answer.runs, &names, out);
            let body: String = if header {
                text
            } else {
                text.lines().skip(1).map(|l| format!("{l}\n")).collect()
            };
            out!("{body}");
            header = false;
        }
        if let Some(next) = answer.last {
            if !answer.runs.is_empty() {
                // Where a consumer that stops here resumes.
                eprintln!("next: --arrival --follow --after {next}");
            }
            cursor = Some(next);
        }
        if !told {
            eprintln!("following in arrival order, polled each second (Ctrl-C ends; resume with --after the last cursor)");
            told = true;
        }
        if !answer.more {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

/// `run get TASK/AGENT/SCHEDULED_AT[/ATTEMPT]`.
async fn run_get(ctl: &Ctl, run: &str, out: Output) -> anyhow::Result<()> {
    let parts: Vec<&str> = run.split('/').collect();
    let (task, agent, at, attempt) = match parts.as_slice() {
        [t, a, at] => (*t, *a, *at, None),
        [t, a, at, n] => (
            *t,
            *a,
            *at,
            Some(n.parse::<u32>().map_err(|_| {
                anyhow::anyhow!("`{n}` is not an attempt number (1, 2, …)")
            })?),
        ),
        _ => bail!(
            "`{run}` is not a run: write TASK/AGENT/SCHEDULED_AT[/ATTEMPT], e.g. t3/a1/2026-12-06T02:30:00.000Z/1 (run list -o json shows them)"
        ),
    };
    let at = Timestamp::parse(at).map_err(|e| anyhow::anyhow!("{e}"))?;
    let task = ctl.task_id(task).await?;
    let agent = ctl.agent_id(agent).await?;
    let answer = ctl
        .client
        .run_list(&AdminRequest::RunList {
            task: Some(task),
            agent: Some(agent),
            since: Some(at),
            limit: sundial_coordinator::server::RUN_LIST_MAX,
            after: None,
            before: None,
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let found: Vec<&RunRecord> = answer
        .runs
        .iter()
        .filter(|r| r.scheduled_at == at && attempt.is_none_or(|n| r.attempt == n))
        .collect();
    if found.is_empty() {
        if answer.more {
            bail!("{run} is not among the newest {} runs of {task} on {agent} since its time: page to it with run list --task {task} --agent {agent} --before CURSOR", sundial_coordinator::server::RUN_LIST_MAX);
        }
        bail!("no run {run} is stored (see sundialctl run list --task {task} --agent {agent})");
    }
    let names = ctl.names(true).await;
    if out == Output::Json {
        let all: Vec<RunRecord> = answer.runs.clone();
        let v: Vec<Value> = found.iter().map(|r| run_json(r, &all, &names)).collect();
        return print_json(&if v.len() == 1 {
            v[0].clone()
        } else {
            Value::Array(v)
        });
    }
    for (i, r) in found.iter().enumerate() {
        if i > 0 {
            outln!("");
        }
        let line = |k: &str, v: String| outln!("{k:<11}{v}");
        line(
            "run",
            format!(
                "{}/{}/{}/{}",
                r.task_id, r.agent_id, r.scheduled_at, r.attempt
            ),
        );
        line("task", names.task(r.task_id));
        line("agent", names.agent(r.agent_id));
        line("scheduled", r.scheduled_at.to_string());
        line("fired", or_dash(r.fired_at));
        line("finished", or_dash(r.finished_at));
        line("took", or_dash(duration_ms(r).map(|ms| format!("{ms} ms"))));
        line(
            "late",
            or_dash(lateness_ms(r, &answer.runs, &names).map(|ms| format!("{ms} ms"))),
        );
        line("attempt", r.attempt.to_string());
        line("outcome", r.outcome.to_string());
        line("exit code", or_dash(r.exit_code));
        line(
            "offline",
            if r.offline { "yes".into() } else { "no".into() },
        );
        line("why", why(r));
        for (name, tail) in [("stdout", &r.stdout_tail), ("stderr", &r.stderr_tail)] {
            outln!("--- {name} ({} bytes kept) ---", tail.len());
            let text = String::from_utf8_lossy(tail);
            out!("{text}");
            if !text.is_empty() && !text.ends_with('\n') {
                outln!("");
            }
        }
    }
    Ok(())
}

/// Runs `run list --outcome` looks back through, at most.
const OUTCOME_SCAN_MAX: usize = 100_000;

/// `run list --outcome`: the latest `limit` runs with these outcomes, read
/// page by page back from the newest.
async fn runs_with_outcomes(
    ctl: &Ctl,
    task: Option<TaskId>,
    agent: Option<AgentId>,
    since: Option<Timestamp>,
    limit: u32,
    outcomes: &[sundial_protocol::Outcome],
    out: Output,
) -> anyhow::Result<()> {
    let mut found: Vec<RunRecord> = Vec::new();
    let mut before: Option<String> = None;
    let mut scanned = 0usize;
    let capped = loop {
        let page = ctl
            .client
            .run_list(&AdminRequest::RunList {
                task,
                agent,
                since,
                limit: sundial_coordinator::server::RUN_LIST_MAX,
                after: None,
                before: before.clone(),
            })
            .await
            .map_err(anyhow::Error::msg)?;
        scanned += page.runs.len();
        let mut older: Vec<RunRecord> = page
            .runs
            .into_iter()
            .filter(|r| outcomes.contains(&r.outcome))
            .collect();
        older.append(&mut found);
        found = older;
        if found.len() >= limit as usize || !page.more || page.first.is_none() {
            break false;
        }
        if scanned >= OUTCOME_SCAN_MAX {
            break true;
        }
        before = page.first;
    };
    let keep = found.len().saturating_sub(limit as usize);
    let runs: Vec<RunRecord> = found.split_off(keep);
    let names = ctl.names(true).await;
    runs_out(&runs, &names, out)?;
    if capped && out != Output::Json {
        eprintln!(
            "looked back through the newest {scanned} runs only; narrow with --task, --agent or --since"
        );
    }
    Ok(())
}
