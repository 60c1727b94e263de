//! A fleet on this machine: a coordinator process and agents — real
//! processes of the simulator's own binary, entering the same library entry
//! points as `sundial-coordinator` and `sundial-agent` — or, for large
//! fleets, lightweight in-process agents. Each agent dials its own relay;
//! with several coordinators on one PostgreSQL (a throw-away cluster the
//! fleet starts), agents dial the coordinators' list instead. Everything
//! lives in one temporary directory and listens on 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use sundial_coordinator::client::AdminClient;
use sundial_coordinator::pki::AdminCreds;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::wire::{AdminRequest, AdminResponse, TaskDraft};
use sundial_protocol::{AgentId, RunRecord, Schedule, TaskId};

use crate::relay::{LinkConfig, Relay};
use crate::rng::Rng;

/// The hidden subcommands the simulator's binary answers to.
pub const SUB_COORDINATOR: &str = "__coordinator";
pub const SUB_AGENT: &str = "__agent";
pub const SUB_PROBE: &str = "__probe";
/// Enrollments in flight at once while a fleet starts.
pub const ENROLL_CONCURRENCY_MAX: usize = 16;
/// How long start-up steps may take before the harness gives up.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How an agent runs.
#[derive(Debug)]
enum AgentRun {
    Stopped,
    Process(Child),
    InProcess {
        stop: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    },
}

/// One agent of the fleet.
#[derive(Debug)]
pub struct AgentNode {
    pub name: String,
    pub id: AgentId,
    pub dir: PathBuf,
    pub relay: Relay,
    /// Where its probe actions write what they saw.
    pub probe_log: PathBuf,
    run: AgentRun,
    in_process: bool,
    /// The agent's `--store-key` (`off`: its store kept plain).
    pub store_key: Option<PathBuf>,
}

/// A program every fleet agent may run besides the probe: a start far
/// cheaper than the probe's (this large binary), for rows that need runs,
/// not their log.
pub const LIGHT_ACTION: &str = "/bin/true";

/// The fleet.
#[derive(Debug)]
pub struct Fleet {
    pub root: tempfile::TempDir,
    exe: PathBuf,
    pub coord_dir: PathBuf,
    pub coord_addr: SocketAddr,
    coord: Option<Child>,
    pub agents: Vec<AgentNode>,
    creds: AdminCreds,
    /// One admin connection, reused until it fails.
    client: tokio::sync::Mutex<Option<AdminClient>>,
    /// Extra `serve` flags, kept for restarts.
    coordinator_args: Vec<String>,
    /// More coordinators on the same PostgreSQL (the first is
    /// `coord_dir`/`coord_addr`), and the cluster.
    others: Vec<OtherCoord>,
    pg: Option<crate::pg::PgCluster>,
}

/// A coordinator beside the first, on the same store.
#[derive(Debug)]
struct OtherCoord {
    dir: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

impl Fleet {
    /// Starts a coordinator and `n` enrolled, running agents. `exe` is the
    /// simulator binary (it serves the hidden subcommands).
    pub async fn start(
        exe: &Path,
        n: usize,
        in_process: bool,
        rng: &mut Rng,
    ) -> anyhow::Result<Fleet> {
        Fleet::start_with(exe, n, in_process, rng, &[]).await
    }

    /// As [`Fleet::start`], with extra `serve` flags for the coordinator.
    pub async fn start_with(
        exe: &Path,
        n: usize,
        in_process: bool,
        rng: &mut Rng,
        coordinator_args: &[&str],
    ) -> anyhow::Result<Fleet> {
        Fleet::start_on(exe, n, in_process, rng, coordinator_args, 1, false).await
    }

    /// As [`Fleet::start_with`], with `coordinators` coordinators: on
    /// PostgreSQL (a cluster the fleet starts; an error without it) when
    /// `postgres` or more than one, and agents then dial all of them.
    pub async fn start_on(
        exe: &Path,
        n: usize,
        in_process: bool,
        rng: &mut Rng,
        coordinator_args: &[&str],
        coordinators: usize,
        postgres: bool,
    ) -> anyhow::Result<Fleet> {
        let root = tempfile::Builder::new().prefix("sundial-sim-").tempdir()?;
        let coord_dir = root.path().join("coordinator");
        let coord_addr: SocketAddr = ([127, 0, 0, 1], free_udp_port()?).into();
        let mut others = Vec::new();
        for k in 1..coordinators.max(1) {
            others.push(OtherCoord {
                dir: root.path().join(format!("coordinator-{}", k + 1)),
                addr: ([127, 0, 0, 1], free_udp_port()?).into(),
                child: None,
            });
        }
        let advertise = std::iter::once(coord_addr)
            .chain(others.iter().map(|o| o.addr))
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let pg = if others.is_empty() && !postgres {
            None
        } else {
            match crate::pg::PgCluster::start()? {
                Some(pg) => Some(pg),
                None => bail!("several coordinators need PostgreSQL (apt-get install postgresql)"),
            }
        };
        let store = match &pg {
            Some(pg) => sundial_coordinator::server::StoreChoice::Postgres(
                sundial_coordinator::pg::PgOptions {
                    url: pg.url(),
                    password: None,
                    pool_size: 4,
                },
            ),
            None => sundial_coordinator::server::StoreChoice::Embedded,
        };
        let creds_path = sundial_coordinator::server::init_on(
            &coord_dir,
            &advertise,
            "sundial-coordinator",
            false,
            store,
        )?;
        // More coordinators are the directory copied.
        for o in &others {
            std::fs::create_dir_all(&o.dir)?;
            for e in std::fs::read_dir(&coord_dir)?.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::copy(e.path(), o.dir.join(e.file_name()))?;
                }
            }
        }
        let creds = AdminCreds::load(&creds_path).map_err(anyhow::Error::msg)?;
        let mut fleet = Fleet {
            root,
            exe: exe.to_owned(),
            coord_dir,
            coord_addr,
            coord: None,
            agents: Vec::new(),
            creds,
            client: tokio::sync::Mutex::new(None),
            coordinator_args: coordinator_args.iter().map(|s| s.to_string()).collect(),
            others,
            pg,
        };
        fleet.start_coordinator().await?;
        for k in 1..=fleet.others.len() {
            fleet.start_other(k)?;
        }
        let token = match fleet
            .admin(&AdminRequest::TokenCreate {
                ttl_ms: 3_600_000,
                uses: n.max(1) as u32,
                labels: vec![("fleet".into(), "sim".into())],
            })
            .await?
        {
            AdminResponse::Token(t) => t,
            r => bail!("token: unexpected {r:?}"),
        };
        // Enroll concurrently (bounded), then start in order.
        let mut relays = Vec::with_capacity(n);
        for _ in 0..n {
            relays.push(Relay::start(coord_addr, rng.fork()).await?);
        }
        let mut joined: Vec<Option<AgentId>> = vec![None; n];
        let mut set = tokio::task::JoinSet::new();
        for (i, relay) in relays.iter().enumerate() {
            let name = format!("agent-{}", i + 1);
            let dir = fleet.root.path().join(&name);
            // One coordinator: through the agent's relay; several: the list.
            let coordinator = if fleet.others.is_empty() {
                relay.addr().to_string()
            } else {
                advertise.clone()
            };
            let req = sundial_agent::enroll::JoinRequest {
                coordinator: Some(coordinator),
                token: token.clone(),
                name: Some(name.clone()),
                labels: vec![],
                allow_exec: vec![exe.display().to_string(), LIGHT_ACTION.into()],
                allow_env: vec![],
                allow_wasm: true,
                allow_wasm_dirs: vec![],
            };
            set.spawn(async move {
                let r = sundial_agent::enroll::join(&dir, req).await;
                (i, name, r)
            });
            if set.len() >= ENROLL_CONCURRENCY_MAX {
                if let Some(done) = set.join_next().await {
                    let (i, name, r) = done?;
                    joined[i] = Some(r.map_err(|e| anyhow!("{name} cannot join: {e}"))?);
                }
            }
        }
        while let Some(done) = set.join_next().await {
            let (i, name, r) = done?;
            joined[i] = Some(r.map_err(|e| anyhow!("{name} cannot join: {e}"))?);
        }
        for (i, relay) in relays.into_iter().enumerate() {
            let name = format!("agent-{}", i + 1);
            let dir = fleet.root.path().join(&name);
            let id = joined[i].ok_or_else(|| anyhow!("{name} did not join"))?;
            let probe_log = dir.join("probe.log");
            // A fleet whose coordinator keeps its store plain (to measure
            // what encryption costs) keeps its agents' plain too.
            let plain = fleet
                .coordinator_args
                .windows(2)
                .any(|w| w[0] == "--store-key" && w[1] == "off");
            let mut node = AgentNode {
                name,
                id,
                dir,
                relay,
                probe_log,
                run: AgentRun::Stopped,
                in_process,
                store_key: plain.then(|| PathBuf::from("off")),
            };
            node.start(&fleet.exe)?;
            fleet.agents.push(node);
        }
        Ok(fleet)
    }

    /// Starts (or restarts) the coordinator process on the same data and port.
    pub async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.exe)
            .arg(SUB_COORDINATOR)
            .args(["serve", "--data-dir"])
            .arg(&self.coord_dir)
            .args(["--listen", &self.coord_addr.to_string()])
            // Every simulated agent dials from 127.0.0.1 (through its relay):
            // a reconnect storm must not look like one address's flood.
            .args(["--pending-per-address", "100000"])
            .args(&self.coordinator_args)
            .stdout(Stdio::null())
            .stderr(log_file(&self.coord_dir.join("coordinator.log"))?)
            .spawn()
            .context("starting the coordinator")?;
        self.coord = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if AdminClient::connect(&self.creds).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the coordinator did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts (or restarts) coordinator `k` (1..: the others).
    pub fn start_other(&mut self, k: usize) -> anyhow::Result<()> {
        let args = self.coordinator_args.clone();
        let exe = self.exe.clone();
        let Some(o) = self.others.get_mut(k.wrapping_sub(1)) else {
            bail!("no coordinator {k}");
        };
        let child = Command::new(&exe)
            .arg(SUB_COORDINATOR)
            .args(["serve", "--data-dir"])
            .arg(&o.dir)
            .args(["--listen", &o.addr.to_string()])
            .args(["--pending-per-address", "100000"])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(log_file(&o.dir.join("coordinator.log"))?)
            .spawn()
            .context("starting a coordinator")?;
        o.child = Some(child);
        Ok(())
    }

    /// `kill -9` coordinator `k` (0: the first).
    pub fn kill_nth(&mut self, k: usize) {
        if k == 0 {
            self.kill_coordinator();
            return;
        }
        if let Ok(mut c) = self.client.try_lock() {
            *c = None;
        }
        if let Some(mut c) = self.others.get_mut(k - 1).and_then(|o| o.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether coordinator `k` runs.
    pub fn nth_running(&self, k: usize) -> bool {
        match k {
            0 => self.coord.is_some(),
            _ => self.others.get(k - 1).is_some_and(|o| o.child.is_some()),
        }
    }

    /// How many coordinators the fleet has.
    pub fn coordinators(&self) -> usize {
        1 + self.others.len()
    }

    /// The shared store, when the coordinators share PostgreSQL.
    pub fn pg_url(&self) -> Option<String> {
        self.pg.as_ref().map(|p| p.url())
    }

    /// `kill -9` the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Ok(mut c) = self.client.try_lock() {
            *c = None;
        }
        if let Some(mut c) = self.coord.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn coordinator_running(&self) -> bool {
        self.coord.is_some() || self.others.iter().any(|o| o.child.is_some())
    }

    /// One admin request, on the cached connection or a new one.
    pub async fn admin(&self, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
        let mut cached = self.client.lock().await;
        if let Some(c) = cached.as_ref() {
            match c.request(req).await {
                Ok(r) => return Ok(r),
                Err(_) => *cached = None,
            }
        }
        let client = AdminClient::connect(&self.creds)
            .await
            .map_err(anyhow::Error::msg)?;
        let r = client.request(req).await.map_err(anyhow::Error::msg);
        if r.is_ok() {
            *cached = Some(client);
        }
        r
    }

    /// Creates a probe task on one agent; returns its id.
    pub async fn add_task(
        &self,
        agent: usize,
        name: &str,
        schedule: Schedule,
        sleep_ms: u64,
        policies: sundial_protocol::policy::Policies,
    ) -> anyhow::Result<TaskId> {
        let node = &self.agents[agent];
        let mut args = vec![SUB_PROBE.to_string(), node.probe_log.display().to_string()];
        if sleep_ms > 0 {
            args.push(sleep_ms.to_string());
        }
        let action = Action::Exec(ExecSpec {
            program: self.exe.display().to_string(),
            args,
            env: vec![],
            cwd: None,
            sealed_env: Vec::new(),
        });
        self.create_task(agent, name, schedule, action, policies)
            .await
    }

    /// Creates a task running `program` (no arguments; the agents allow
    /// [`LIGHT_ACTION`] besides the probe) on one agent: nothing is logged
    /// of its runs but their records.
    pub async fn add_exec_task(
        &self,
        agent: usize,
        name: &str,
        schedule: Schedule,
        program: &str,
    ) -> anyhow::Result<TaskId> {
        let action = Action::Exec(ExecSpec {
            program: program.into(),
            ..ExecSpec::default()
        });
        self.create_task(agent, name, schedule, action, Default::default())
            .await
    }

    async fn create_task(
        &self,
        agent: usize,
        name: &str,
        schedule: Schedule,
        action: Action,
        policies: sundial_protocol::policy::Policies,
    ) -> anyhow::Result<TaskId> {
        let node = &self.agents[agent];
        let draft = TaskDraft {
            name: Some(format!("{}-{name}", node.name)),
            target: Target::Agent(node.id),
            schedule,
            action,
            policies,
            anchor_at_creation: false,
            placement: Default::default(),
        };
        match self
            .admin(&AdminRequest::TaskCreate(Box::new(draft)))
            .await?
        {
            // Warnings (an agent offline at creation, in a partition
            // scenario) are the operator's, not a failure.
            AdminResponse::TaskCreated(id) | AdminResponse::TaskCreatedWarn { id, .. } => Ok(id),
            r => bail!("task create: unexpected {r:?}"),
        }
    }

    /// Runs stored at the coordinator so far (by asking it).
    pub async fn synced_count(&self) -> Option<usize> {
        let req = AdminRequest::RunList {
            task: None,
            agent: None,
            since: None,
            limit: 1,
            after: None,
            before: None,
        };
        let mut cached = self.client.lock().await;
        if cached.is_none() {
            *cached = AdminClient::connect(&self.creds).await.ok();
        }
        let answer = cached.as_ref()?.run_list(&req).await;
        match answer {
            // Unfiltered, the coordinator counts every stored run (O(1)).
            Ok(a) => a.matched.map(|m| m as usize),
            Err(_) => {
                *cached = None;
                None
            }
        }
    }

    /// Every run of `task` stored at the coordinator, oldest first.
    pub async fn task_runs(&self, task: TaskId) -> anyhow::Result<Vec<RunRecord>> {
        let client = AdminClient::connect(&self.creds)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let req = AdminRequest::RunList {
                task: Some(task),
                agent: None,
                since: None,
                limit: 10_000,
                after: after.take(),
                before: None,
            };
            let page = client.run_list(&req).await.map_err(anyhow::Error::msg)?;
            out.extend(page.runs);
            match page.last {
                Some(last) if page.more => after = Some(last),
                _ => return Ok(out),
            }
        }
    }

    /// Records waiting in every agent's outbox, and runs in progress.
    /// Records waiting in agent `a`'s outbox (1 while its store cannot be
    /// read yet: not drained).
    pub fn outbox_of(&self, a: usize) -> u64 {
        self.agents.get(a).map_or(0, |a| {
            sundial_agent::status::outbox_len(&a.dir).unwrap_or(1)
        })
    }

    pub fn backlog(&self) -> (u64, usize) {
        let mut outbox = 0;
        let mut running = 0;
        for a in &self.agents {
            if let Ok(s) = sundial_agent::status::read(&a.dir) {
                outbox += s.outbox_len;
                running += s.runs_in_progress;
            } else {
                outbox += 1; // unreadable yet: not drained
            }
        }
        (outbox, running)
    }

    /// One line for the live timeline: runs started so far (from the
    /// actions' own logs) and, per agent that is cut, down or buffering, its
    /// state and outbox: `fired 180; agent-3 cut, 41 buffered`.
    pub fn activity(&self) -> String {
        let mut fired = 0usize;
        let mut parts = Vec::new();
        for a in &self.agents {
            fired += std::fs::read(&a.probe_log)
                .map(|b| b.iter().filter(|c| **c == b'\n').count())
                .unwrap_or(0);
            let link = a.relay.config();
            let state = if !a.is_running() {
                Some("down")
            } else if link.up.cut && link.down.cut {
                Some("cut")
            } else if link.up.cut || link.down.cut {
                Some("cut one way")
            } else if link != LinkConfig::pass() {
                Some("lossy")
            } else {
                None
            };
            let outbox = sundial_agent::status::outbox_len(&a.dir).unwrap_or(0);
            if state.is_some() || outbox > 0 {
                parts.push(format!(
                    "{} {}{} buffered",
                    a.name,
                    state.map_or(String::new(), |s| format!("{s}, ")),
                    outbox
                ));
            }
        }
        if parts.is_empty() {
            format!("fired {fired}")
        } else {
            format!("fired {fired}; {}", parts.join("; "))
        }
    }

    /// Heals every link and restarts whatever is down.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        for a in &self.agents {
            a.relay.set(LinkConfig::pass());
        }
        if self.coord.is_none() {
            self.start_coordinator().await?;
        }
        for k in 1..=self.others.len() {
            if !self.nth_running(k) {
                self.start_other(k)?;
            }
        }
        let exe = self.exe.clone();
        for a in &mut self.agents {
            if !a.is_running() {
                a.start(&exe)?;
            }
        }
        Ok(())
    }

    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Stops everything (agents first).
    pub async fn stop(&mut self) {
        for a in &mut self.agents {
            a.stop().await;
        }
        for k in 0..self.coordinators() {
            self.kill_nth(k);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for a in &mut self.agents {
            if let AgentRun::Process(c) = &mut a.run {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for k in 0..self.coordinators() {
            self.kill_nth(k);
        }
    }
}

impl AgentNode {
    pub fn is_running(&self) -> bool {
        !matches!(self.run, AgentRun::Stopped)
    }

    /// Starts the agent.
    pub fn start(&mut self, exe: &Path) -> anyhow::Result<()> {
        if self.in_process {
            let (stop, rx) = tokio::sync::oneshot::channel::<()>();
            let mut cfg = sundial_agent::runtime::AgentConfig::new(self.dir.clone());
            cfg.store_key = self.store_key.clone();
            let name = self.name.clone();
            let task = tokio::spawn(async move {
                let r = sundial_agent::runtime::run(cfg, async {
                    let _ = rx.await;
                })
                .await;
                if let Err(e) = r {
                    eprintln!("{name} stopped: {e}");
                }
            });
            self.run = AgentRun::InProcess { stop, task };
        } else {
            // The probe action is this (large) binary started anew for each
            // run: on a busy 2-core machine a start takes hundreds of ms, and
            // 100 runs a second would meet the default cap of 64 runs at
            // once, which the scenarios are not about (the cap has its own
            // test in the agent's suite).
            let mut cmd = Command::new(exe);
            cmd.arg(SUB_AGENT)
                .args(["run", "--max-concurrent-runs", "512", "--data-dir"])
                .arg(&self.dir);
            if let Some(k) = &self.store_key {
                cmd.arg("--store-key").arg(k);
            }
            let child = cmd
                .stdout(Stdio::null())
                .stderr(log_file(&self.dir.join("agent.log"))?)
                .spawn()
                .with_context(|| format!("starting {}", self.name))?;
            self.run = AgentRun::Process(child);
        }
        Ok(())
    }

    /// `kill -9` (a process) or drop (in-process: the nearest equivalent).
    pub async fn kill9(&mut self) {
        match std::mem::replace(&mut self.run, AgentRun::Stopped) {
            AgentRun::Process(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            AgentRun::InProcess { task, .. } => {
                task.abort();
                let _ = task.await;
            }
            AgentRun::Stopped => {}
        }
    }

    /// A clean stop.
    pub async fn stop(&mut self) {
        match std::mem::replace(&mut self.run, AgentRun::Stopped) {
            AgentRun::Process(mut c) => {
                if let Some(pid) = i32::try_from(c.id())
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = c.try_wait() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = c.kill();
                let _ = c.wait();
            }
            AgentRun::InProcess { stop, task } => {
                let _ = stop.send(());
                let _ = task.await;
            }
            AgentRun::Stopped => {}
        }
    }
}

/// When this process was started as one of the fleet's parts (the first
/// argument is a hidden subcommand), runs that part and returns its exit code.
pub fn run_as_part(args: &[String]) -> Option<std::process::ExitCode> {
    let rest = || args.iter().skip(2).cloned();
    match args.get(1).map(String::as_str) {
        Some(SUB_COORDINATOR) => Some(sundial_coordinator::coordinator_cli::main_with(
            std::iter::once("sundial-coordinator".to_string()).chain(rest()),
        )),
        Some(SUB_AGENT) => Some(sundial_agent::cli::main_with(
            std::iter::once("sundial-agent".to_string()).chain(rest()),
        )),
        Some(SUB_PROBE) => Some(probe(&args[2..])),
        // A function's runner: agents run from this binary start it so.
        Some("function-run") => Some(sundial_agent::function::runner_main()),
        _ => None,
    }
}

/// `__probe LOG [SLEEP_MS]`: the action of simulated tasks. Appends
/// `AGENT TASK SCHEDULED_MS ATTEMPT STARTED_MS` to LOG (one write, so lines
/// from concurrent runs never interleave), then sleeps if asked.
pub fn probe(args: &[String]) -> std::process::ExitCode {
    use std::io::Write;
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let Some(log) = args.first() else {
        eprintln!("usage: {SUB_PROBE} LOG [SLEEP_MS]");
        return std::process::ExitCode::from(2);
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
    let line = format!(
        "{} {} {} {} {}\n",
        var("SUNDIAL_AGENT_ID"),
        var("SUNDIAL_TASK_ID"),
        var("SUNDIAL_SCHEDULED_AT_MS"),
        var("SUNDIAL_ATTEMPT"),
        started_ms
    );
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("probe: {log}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if let Some(ms) = args.get(1).and_then(|s| s.parse::<u64>().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    std::process::ExitCode::SUCCESS
}
