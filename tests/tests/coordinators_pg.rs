//! Two coordinator processes on one PostgreSQL serving one fleet, end to
//! end: one `init --store`, the data directory copied to the second; agents
//! spread over both; a task created through either reaches every target; a
//! token raced through both is accepted once; a revoke through one closes a
//! session the other holds; one coordinator killed with SIGKILL, its agents
//! move to the other, and every run is recorded exactly once, with no
//! occurrence lost.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sundial_coordinator::client::AdminClient;
use sundial_coordinator::pki::AdminCreds;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::wire::{AdminRequest, AdminResponse, AuditQuery, Role, TaskDraft};
use sundial_protocol::{AgentId, DurationMs, Outcome, Schedule, TaskId, Timestamp};
use sundial_tests::harness::{SUB_AGENT, SUB_COORDINATOR};
use sundial_tests::pg::PgCluster;

const SIM: &str = env!("CARGO_BIN_EXE_sundial-sim");

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
}

fn log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("a log file")
}

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(SIM)
        .args(args)
        .output()
        .expect("sundial-sim runs")
}

struct Proc(Child);

impl Proc {
    /// SIGTERM, as an operator stops it, and waits.
    fn stop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path, addr: SocketAddr) -> Proc {
    Proc(
        Command::new(SIM)
            .args([SUB_COORDINATOR, "serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(log(&dir.join("coordinator.log")))
            .spawn()
            .expect("a coordinator starts"),
    )
}

fn run_agent(dir: &Path) -> Proc {
    Proc(
        Command::new(SIM)
            .args([SUB_AGENT, "run", "--data-dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(log(&dir.join("agent.log")))
            .spawn()
            .expect("an agent starts"),
    )
}

/// Admin credentials that dial only `addr` (to ask one coordinator).
fn creds_for(creds: &AdminCreds, addr: SocketAddr) -> AdminCreds {
    let mut c = creds.clone();
    c.coordinator = addr.to_string();
    c
}

/// A join token for `uses` agents with these labels.
async fn new_token(creds: &AdminCreds, uses: u32, labels: Vec<(String, String)>) -> String {
    match ask(
        creds,
        AdminRequest::TokenCreate {
            ttl_ms: 3_600_000,
            uses,
            labels,
        },
    )
    .await
    {
        Ok(AdminResponse::Token(t)) => t,
        other => panic!("no token: {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn ask(creds: &AdminCreds, req: AdminRequest) -> Result<AdminResponse, String> {
    let c = AdminClient::connect(creds).await?;
    let r = c.request(&req).await;
    c.close();
    r
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("not within {within:?}: {what}");
}

async fn online(creds: &AdminCreds) -> BTreeSet<AgentId> {
    match ask(creds, AdminRequest::AgentList).await {
        Ok(AdminResponse::Agents(all)) => all
            .into_iter()
            .filter(|a| a.online)
            .map(|a| a.agent_id)
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn every_second(target: Target, anchor: Timestamp) -> TaskDraft {
    TaskDraft {
        name: None,
        target,
        schedule: Schedule::every(DurationMs(1_000), anchor).expect("a schedule"),
        action: Action::Exec(ExecSpec {
            program: "/bin/true".into(),
            ..Default::default()
        }),
        policies: Default::default(),
        anchor_at_creation: true,
        placement: Default::default(),
    }
}

fn created(r: Result<AdminResponse, String>) -> TaskId {
    match r {
        Ok(AdminResponse::TaskCreated(id)) | Ok(AdminResponse::TaskCreatedWarn { id, .. }) => id,
        other => panic!("no task: {other:?}"),
    }
}

fn join(dir: &Path, token: &str, coordinators: Option<String>) -> Result<AgentId, String> {
    let mut args = vec![
        SUB_AGENT.to_string(),
        "join".into(),
        "--token".into(),
        token.into(),
    ];
    if let Some(c) = coordinators {
        args.extend(["--coordinator".into(), c]);
    }
    args.extend([
        "--allow-exec".into(),
        "/bin/true".into(),
        "--data-dir".into(),
        dir.display().to_string(),
    ]);
    let out = Command::new(SIM).args(&args).output().expect("join runs");
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "no agent id printed".to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn two_coordinators_on_one_postgres_serve_a_fleet_and_survive_either() {
    let Some(pg) = PgCluster::start().expect("a PostgreSQL cluster starts") else {
        return;
    };
    let root = tempfile::tempdir().expect("a temporary directory");
    let (c1_dir, c2_dir) = (root.path().join("c1"), root.path().join("c2"));
    let (c1_addr, c2_addr) = (free_udp(), free_udp());
    let out = sim(&[
        SUB_COORDINATOR,
        "init",
        "--data-dir",
        &c1_dir.display().to_string(),
        "--advertise",
        &format!("{c1_addr},{c2_addr}"),
        "--store",
        &pg.url(),
    ]);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second init on the same database is refused: coordinators are
    // added by copying a data directory.
    let again = sim(&[
        SUB_COORDINATOR,
        "init",
        "--data-dir",
        &root.path().join("other").display().to_string(),
        "--advertise",
        "127.0.0.1:1",
        "--store",
        &pg.url(),
    ]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("copy the data directory"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    copy_dir(&c1_dir, &c2_dir);
    let mut c1 = Some(serve(&c1_dir, c1_addr));
    let _c2 = serve(&c2_dir, c2_addr);
    let creds = AdminCreds::load(&c1_dir.join("admin.creds")).expect("creds");
    let (via1, via2) = (creds_for(&creds, c1_addr), creds_for(&creds, c2_addr));

    let rt = runtime();
    rt.block_on(async {
        for (what, c) in [("c1", &via1), ("c2", &via2)] {
            wait_until(what, Duration::from_secs(30), || async {
                AdminClient::connect(c).await.is_ok()
            })
            .await;
        }
        // Ten agents: five joined through c1 (the token's order), five
        // through c2 (their own list), all knowing both.
        let token = new_token(&via2, 10, vec![("fleet".into(), "pg".into())]).await;
        let mut agents = Vec::new();
        let mut procs = Vec::new();
        for i in 0..10 {
            let dir = root.path().join(format!("agent{i}"));
            let list = (i % 2 == 1).then(|| format!("{c2_addr},{c1_addr}"));
            let id = join(&dir, &token, list).expect("an agent joins");
            procs.push(run_agent(&dir));
            agents.push((id, dir));
        }
        let ids: BTreeSet<AgentId> = agents.iter().map(|a| a.0).collect();
        wait_until(
            "every agent online, through either coordinator",
            Duration::from_secs(60),
            // Each lists every agent online, those in session with the other too.
            || async { online(&via1).await == ids && online(&via2).await == ids },
        )
        .await;
        // The agents that dial c2 first (they enrolled through it).
        let on2: BTreeSet<AgentId> = agents
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, a)| a.0)
            .collect();

        // A token raced through both coordinators is accepted once.
        let single = new_token(&via1, 1, vec![]).await;
        let (ra, rb) = std::thread::scope(|s| {
            let a = s.spawn(|| {
                join(
                    &root.path().join("race-a"),
                    &single,
                    Some(c1_addr.to_string()),
                )
            });
            let b = s.spawn(|| {
                join(
                    &root.path().join("race-b"),
                    &single,
                    Some(c2_addr.to_string()),
                )
            });
            (a.join().expect("joins"), b.join().expect("joins"))
        });
        assert!(
            ra.is_ok() != rb.is_ok(),
            "exactly one enrollment: {ra:?} / {rb:?}"
        );

        // A task through c1 reaches the agents c2 serves (and c1's).
        let start = Timestamp::from_millis_saturating(chrono::Utc::now().timestamp_millis());
        let all_task = created(
            ask(
                &via1,
                AdminRequest::TaskCreate(Box::new(every_second(
                    Target::Selector(vec![("fleet".into(), "pg".into())]),
                    start,
                ))),
            )
            .await,
        );
        wait_until(
            "every agent runs the task",
            Duration::from_secs(30),
            || async {
                let runs = runs_of(&via1, all_task).await;
                let by: BTreeSet<AgentId> = runs.iter().map(|r| r.0).collect();
                by == ids
            },
        )
        .await;

        // A revoke through c1 closes a session c2 holds.
        let victim = *on2.iter().next().expect("an agent on c2");
        match ask(&via1, AdminRequest::AgentRevoke(victim)).await {
            Ok(AdminResponse::Error(e)) | Err(e) => panic!("revoke: {e}"),
            Ok(_) => {}
        }
        wait_until(
            "the revoked agent is offline through either coordinator",
            Duration::from_secs(10),
            || async {
                !online(&via2).await.contains(&victim) && !online(&via1).await.contains(&victim)
            },
        )
        .await;
        let (vi, _) = agents
            .iter()
            .enumerate()
            .find(|(_, a)| a.0 == victim)
            .expect("the victim");
        let victim_dir = agents[vi].1.clone();
        wait_until(
            "the agent records its revocation",
            Duration::from_secs(10),
            || {
                let dir = victim_dir.clone();
                async move {
                    sundial_agent::status::read(&dir)
                        .map(|s| s.revoked)
                        .unwrap_or(false)
                }
            },
        )
        .await;
        let live: BTreeSet<AgentId> = ids.iter().copied().filter(|a| *a != victim).collect();

        // c1 killed: its agents are in session with c2 within seconds, and
        // what they fire is stored through it.
        drop(c1.take());
        let killed = Instant::now();
        let killed_ms = chrono::Utc::now().timestamp_millis();
        wait_until(
            "every live agent's runs stored through c2",
            Duration::from_secs(30),
            || async {
                let runs = runs_of(&via2, all_task).await;
                live.iter()
                    .all(|a| runs.iter().any(|r| r.0 == *a && r.1 > killed_ms))
            },
        )
        .await;
        eprintln!(
            "failover: every agent's runs after the kill stored through c2 {:?} after it",
            killed.elapsed()
        );
        // A task through c2 now reaches everyone left.
        let after = created(
            ask(
                &via2,
                AdminRequest::TaskCreate(Box::new(every_second(
                    Target::Agent(*live.iter().next().expect("one")),
                    start,
                ))),
            )
            .await,
        );
        wait_until("the new task runs", Duration::from_secs(20), || async {
            !runs_of(&via2, after).await.is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Agents stopped, their outboxes drained into c2: each agent's
        // runs of the every-second task are stored once each, one per
        // second from its first to its last, none missing.
        for p in &mut procs {
            p.stop();
        }
        for (id, dir) in &agents {
            let status = sundial_agent::status::read(dir).expect("status");
            if *id != victim {
                assert_eq!(status.outbox_len, 0, "{id}: everything synced");
            }
        }
        let runs = runs_of(&via2, all_task).await;
        let mut by: BTreeMap<AgentId, Vec<(i64, u32, Outcome)>> = BTreeMap::new();
        for (agent, sched, attempt, outcome) in runs {
            by.entry(agent).or_default().push((sched, attempt, outcome));
        }
        for agent in &live {
            let mut v = by.remove(agent).unwrap_or_default();
            v.sort_by_key(|r| (r.0, r.1));
            let keys: BTreeSet<(i64, u32)> = v.iter().map(|r| (r.0, r.1)).collect();
            assert_eq!(keys.len(), v.len(), "{agent}: a run stored twice");
            let scheds: Vec<i64> = v.iter().map(|r| r.0).collect();
            assert!(scheds.len() > 5, "{agent}: {scheds:?}");
            for w in scheds.windows(2) {
                assert_eq!(
                    w[1] - w[0],
                    1_000,
                    "{agent}: an occurrence missing: {scheds:?}"
                );
            }
        }
    });
}

/// (agent, scheduled_at ms, attempt, outcome) of every stored run of `task`.
async fn runs_of(creds: &AdminCreds, task: TaskId) -> Vec<(AgentId, i64, u32, Outcome)> {
    let Ok(c) = AdminClient::connect(creds).await else {
        return Vec::new();
    };
    let r = c
        .run_list(&AdminRequest::RunList {
            task: Some(task),
            agent: None,
            since: None,
            limit: 10_000,
            after: None,
            before: None,
        })
        .await;
    c.close();
    r.map(|a| {
        a.runs
            .into_iter()
            .map(|r| (r.agent_id, r.scheduled_at.as_millis(), r.attempt, r.outcome))
            .collect()
    })
    .unwrap_or_default()
}

fn copy_dir(from: &Path, to: &PathBuf) {
    std::fs::create_dir_all(to).expect("a directory");
    for e in std::fs::read_dir(from).expect("readable").flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copied");
        }
    }
}

#[test]
fn a_coordinator_waits_out_a_postgres_outage_and_loses_nothing() {
    let Some(mut pg) = PgCluster::start().expect("a PostgreSQL cluster starts") else {
        return;
    };
    let root = tempfile::tempdir().expect("a temporary directory");
    let dir = root.path().join("c");
    let addr = free_udp();
    let out = sim(&[
        SUB_COORDINATOR,
        "init",
        "--data-dir",
        &dir.display().to_string(),
        "--advertise",
        &addr.to_string(),
        "--store",
        &pg.url(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut coord = serve(&dir, addr);
    let creds = AdminCreds::load(&dir.join("admin.creds")).expect("creds");
    let rt = runtime();
    rt.block_on(async {
        wait_until("the coordinator", Duration::from_secs(30), || async {
            AdminClient::connect(&creds).await.is_ok()
        })
        .await;
        let token = new_token(&creds, 2, vec![]).await;
        let mut procs = Vec::new();
        let mut ids = Vec::new();
        for i in 0..2 {
            let d = root.path().join(format!("agent{i}"));
            ids.push(join(&d, &token, None).expect("joins"));
            procs.push((run_agent(&d), d));
        }
        let start = Timestamp::from_millis_saturating(chrono::Utc::now().timestamp_millis());
        let mut tasks = Vec::new();
        for id in &ids {
            tasks.push(created(
                ask(
                    &creds,
                    AdminRequest::TaskCreate(Box::new(every_second(Target::Agent(*id), start))),
                )
                .await,
            ));
        }
        wait_until("runs stored", Duration::from_secs(30), || async {
            !runs_of(&creds, tasks[0]).await.is_empty()
        })
        .await;

        // Stopped for 30 s under load.
        pg.stop().expect("PostgreSQL stops");
        let stopped_at = chrono::Utc::now().timestamp_millis();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let refused = ask(&creds, AdminRequest::TaskList).await;
        assert!(
            matches!(&refused, Ok(AdminResponse::Error(_)) | Err(_)),
            "an admin request during the outage gets an error: {refused:?}"
        );
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(
            coord.0.try_wait().expect("waitable").is_none(),
            "the coordinator keeps running through the outage"
        );
        pg.start_server().expect("PostgreSQL starts again");
        pg.wait_ready(Duration::from_secs(30)).expect("ready");
        let started_at = chrono::Utc::now().timestamp_millis();
        wait_until(
            "admin requests answered again",
            Duration::from_secs(30),
            || async {
                matches!(
                    ask(&creds, AdminRequest::TaskList).await,
                    Ok(AdminResponse::Tasks(_))
                )
            },
        )
        .await;
        // The outbox drains once sessions are back; then every second of
        // the whole span is stored once.
        for task in &tasks {
            wait_until("runs after the outage stored", Duration::from_secs(60), || async {
                runs_of(&creds, *task)
                    .await
                    .iter()
                    .any(|r| r.1 > started_at + 1_000)
            })
            .await;
        }
        wait_until("outboxes drained", Duration::from_secs(60), || {
            let dirs: Vec<PathBuf> = procs.iter().map(|p| p.1.clone()).collect();
            async move {
                dirs.iter().all(|d| {
                    sundial_agent::status::read(d)
                        .is_ok_and(|s| s.outbox_len == 0 && s.last_sync.is_some())
                })
            }
        })
        .await;
        for (p, _) in &mut procs {
            p.stop();
        }
        for (d, task) in procs.iter().map(|p| &p.1).zip(&tasks) {
            let s = sundial_agent::status::read(d).expect("status");
            assert_eq!(s.outbox_len, 0, "everything synced");
            let runs = runs_of(&creds, *task).await;
            let mut scheds: Vec<i64> = runs.iter().map(|r| r.1).collect();
            scheds.sort();
            let n = scheds.len();
            scheds.dedup();
            assert_eq!(n, scheds.len(), "a run stored twice");
            assert!(
                scheds.iter().any(|t| (stopped_at..started_at).contains(t)),
                "runs fired during the outage ({stopped_at}..{started_at}) were stored after it: {scheds:?}"
            );
            for w in scheds.windows(2) {
                assert_eq!(w[1] - w[0], 1_000, "an occurrence missing: {scheds:?}");
            }
        }
    });
}

#[test]
fn an_embedded_coordinator_moves_to_postgres_with_nothing_lost() {
    let Some(pg) = PgCluster::start().expect("a PostgreSQL cluster starts") else {
        return;
    };
    let root = tempfile::tempdir().expect("a temporary directory");
    let dir = root.path().join("c");
    let addr = free_udp();
    let out = sim(&[
        SUB_COORDINATOR,
        "init",
        "--data-dir",
        &dir.display().to_string(),
        "--advertise",
        &addr.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let creds = AdminCreds::load(&dir.join("admin.creds")).expect("creds");
    let rt = runtime();
    rt.block_on(async {
        let mut coord = serve(&dir, addr);
        wait_until("the coordinator", Duration::from_secs(30), || async {
            AdminClient::connect(&creds).await.is_ok()
        })
        .await;
        let token = new_token(&creds, 1, vec![]).await;
        let adir = root.path().join("agent");
        let agent = join(&adir, &token, None).expect("joins");
        let mut ap = run_agent(&adir);
        let start = Timestamp::from_millis_saturating(chrono::Utc::now().timestamp_millis());
        let task = created(
            ask(
                &creds,
                AdminRequest::TaskCreate(Box::new(every_second(Target::Agent(agent), start))),
            )
            .await,
        );
        wait_until("runs stored", Duration::from_secs(30), || async {
            runs_of(&creds, task).await.len() >= 3
        })
        .await;
        let before = runs_of(&creds, task).await.len();
        // Stopped (as an operator stops it), imported while the agent
        // goes on firing offline.
        coord.stop();
        let out = sim(&[
            SUB_COORDINATOR,
            "import",
            "--data-dir",
            &dir.display().to_string(),
            "--store",
            &pg.url(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("1 agent(s), 1 task(s)"), "{said}");
        assert!(dir.join("store.url").exists());
        // A second import is refused: the directory uses PostgreSQL now.
        assert!(!sim(&[
            SUB_COORDINATOR,
            "import",
            "--data-dir",
            &dir.display().to_string(),
            "--store",
            &pg.url(),
        ])
        .status
        .success());

        let _coord = serve(&dir, addr);
        wait_until(
            "the coordinator on PostgreSQL",
            Duration::from_secs(30),
            || async { AdminClient::connect(&creds).await.is_ok() },
        )
        .await;
        let next = created(
            ask(
                &creds,
                AdminRequest::TaskCreate(Box::new(every_second(Target::Agent(agent), start))),
            )
            .await,
        );
        assert!(next.0 > task.0, "ids go on: {next} after {task}");
        wait_until(
            "the agent syncs to the moved coordinator",
            Duration::from_secs(30),
            || async { runs_of(&creds, next).await.len() >= 2 },
        )
        .await;
        ap.stop();
        let runs = runs_of(&creds, task).await;
        assert!(runs.len() > before, "old runs kept, new ones added");
        let mut scheds: Vec<i64> = runs.iter().map(|r| r.1).collect();
        scheds.sort();
        let n = scheds.len();
        scheds.dedup();
        assert_eq!(n, scheds.len(), "a run stored twice");
        for w in scheds.windows(2) {
            assert_eq!(w[1] - w[0], 1_000, "an occurrence missing: {scheds:?}");
        }
    });
}

/// Two coordinators on one database: one init, the data directory copied,
/// both serving; the owner's credentials and each coordinator's own.
struct Pair {
    _pg: PgCluster,
    _root: tempfile::TempDir,
    _procs: [Proc; 2],
    via: [AdminCreds; 2],
}

fn pair() -> Option<Pair> {
    let pg = PgCluster::start().expect("a PostgreSQL cluster starts")?;
    let root = tempfile::tempdir().expect("a temporary directory");
    let (c1_dir, c2_dir) = (root.path().join("c1"), root.path().join("c2"));
    let (c1_addr, c2_addr) = (free_udp(), free_udp());
    let out = sim(&[
        SUB_COORDINATOR,
        "init",
        "--data-dir",
        &c1_dir.display().to_string(),
        "--advertise",
        &format!("{c1_addr},{c2_addr}"),
        "--store",
        &pg.url(),
    ]);
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    copy_dir(&c1_dir, &c2_dir);
    let procs = [serve(&c1_dir, c1_addr), serve(&c2_dir, c2_addr)];
    let creds = AdminCreds::load(&c1_dir.join("admin.creds")).expect("creds");
    let via = [creds_for(&creds, c1_addr), creds_for(&creds, c2_addr)];
    Some(Pair {
        _pg: pg,
        _root: root,
        _procs: procs,
        via,
    })
}

#[test]
fn an_admin_made_through_one_coordinator_works_through_the_other_until_revoked_through_either() {
    let Some(p) = pair() else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        for c in &p.via {
            wait_until("a coordinator answers", Duration::from_secs(30), || async {
                AdminClient::connect(c).await.is_ok()
            })
            .await;
        }
        // alice is made through c1, her key made here.
        let key = rcgen::KeyPair::generate().expect("a key");
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|params| params.serialize_request(&key))
            .expect("a CSR");
        let made = ask(
            &p.via[0],
            AdminRequest::AdminCreate {
                name: "alice".into(),
                role: Role::Operator,
                ttl_ms: 86_400_000,
                csr_der: csr.der().to_vec(),
            },
        )
        .await;
        let Ok(AdminResponse::AdminCert { admin, cert_der }) = made else {
            panic!("admin create: {made:?}");
        };
        assert_eq!((admin.name.as_str(), admin.role), ("alice", Role::Operator));
        let alice = |via: &AdminCreds| AdminCreds {
            cert_pem: sundial_coordinator::pki::cert_pem(&cert_der),
            key_pem: key.serialize_pem(),
            admin: Some("alice".into()),
            ..via.clone()
        };
        let alice2 = alice(&p.via[1]);
        // c2 learns of her certificate from the store's feed.
        wait_until("c2 knows alice", Duration::from_secs(10), || async {
            matches!(
                ask(&alice2, AdminRequest::TaskList).await,
                Ok(AdminResponse::Tasks(_))
            )
        })
        .await;
        // Her role holds there too.
        let err = ask(&alice2, AdminRequest::AgentForget(AgentId(1)))
            .await
            .expect_err("an operator may not forget agents");
        assert!(err.contains("needs the owner role"), "{err}");
        // She holds a connection to c2; the owner revokes her through c1.
        let held = AdminClient::connect(&alice2).await.expect("connects");
        assert!(held.request(&AdminRequest::TaskList).await.is_ok());
        assert!(matches!(
            ask(&p.via[0], AdminRequest::AdminRevoke("alice".into())).await,
            Ok(AdminResponse::Done)
        ));
        let cut = Instant::now();
        let err = loop {
            match held.request(&AdminRequest::TaskList).await {
                Err(e) => break e,
                Ok(_) if cut.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => panic!("alice's connection to c2 outlived her revocation by 10 s"),
            }
        };
        assert!(err.contains("revoked"), "{err}");
        assert!(ask(&alice(&p.via[0]), AdminRequest::TaskList)
            .await
            .is_err());
        assert!(ask(&alice2, AdminRequest::TaskList).await.is_err());
        // One audit log, whichever coordinator wrote it.
        let c = AdminClient::connect(&p.via[1]).await.expect("connects");
        let (log, _) = c
            .audit_list(&AdminRequest::AuditList(AuditQuery {
                limit: 100,
                ..AuditQuery::default()
            }))
            .await
            .expect("audit list");
        let said: Vec<(&str, &str, bool)> = log
            .iter()
            .map(|e| (e.admin.as_str(), e.action.as_str(), e.refused.is_some()))
            .collect();
        assert_eq!(
            said,
            vec![
                ("init", "admin create", false),
                ("owner", "admin create", false),
                ("alice", "agent forget", true),
                ("owner", "admin revoke", false),
            ]
        );
    });
}
