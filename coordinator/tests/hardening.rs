//! What the coordinator does when a peer lies, floods or stalls, and when
//! its store is lost: revocation ends live sessions, every field from the
//! network is range-checked, agents write only their own runs and the first
//! record of a run key wins, uploads are rate-bound, every list is chunked
//! under the frame cap, unauthenticated peers are bounded, and a lost store
//! or CA is never silently replaced.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{join, wait_for, Agent, Coordinator, COORDINATOR};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use sundial_agent::session::{self, FramedRecv, SessionError};
use sundial_coordinator::store::CoordStore as _;
use sundial_net::tls::{Identity, ServerTrust};
use sundial_protocol::codec::encode;
use sundial_protocol::wire::{close, AgentMsg, CoordMsg, ALPN, ALPN_ENROLL};
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, Timestamp};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn ca(coord: &Coordinator) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(coord.dir.join("ca.pem")).expect("ca.pem")
}

fn agent_identity(dir: &Path) -> Identity {
    Identity {
        chain: vec![CertificateDer::from_pem_file(dir.join("agent.pem")).expect("agent.pem")],
        key: PrivateKeyDer::from_pem_file(dir.join("agent.key")).expect("agent.key"),
    }
}

fn closed_with(r: &Result<(), SessionError>, code: u32) -> bool {
    let text = format!("{r:?}");
    matches!(r, Err(SessionError::Connection(quinn::ConnectionError::ApplicationClosed(c))) if c.error_code == quinn::VarInt::from_u32(code))
        || matches!(r, Err(SessionError::Read(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c)))) if c.error_code == quinn::VarInt::from_u32(code))
        || text.contains(&format!("error_code: {code}"))
}

fn record(task: TaskId, at_ms: i64, outcome: Outcome) -> RunRecord {
    RunRecord {
        task_id: task,
        agent_id: AgentId(999),
        scheduled_at: Timestamp::from_millis(at_ms).expect("in range"),
        attempt: 1,
        fired_at: Some(Timestamp::from_millis(at_ms).expect("in range")),
        finished_at: Some(Timestamp::from_millis(at_ms + 5).expect("in range")),
        outcome,
        exit_code: Some(0),
        offline: false,
        detail: None,
        stdout_tail: vec![],
        stderr_tail: vec![],
    }
}

/// An agent's session driven by hand: Hello, then whatever frames the test
/// sends; returns the acknowledgements read, or how the session ended.
fn raw_session(
    coord: &Coordinator,
    dir: &Path,
    frames: Vec<Vec<u8>>,
) -> (Vec<CoordMsg>, Result<(), SessionError>) {
    rt().block_on(async {
        let mut got = Vec::new();
        let r = async {
            let (_ep, conn) = session::connect(
                &coord.addr.to_string(),
                "sundial-coordinator",
                ServerTrust::Ca(ca(coord)),
                Some(agent_identity(dir)),
                ALPN,
            )
            .await?;
            let (mut tx, rx) = conn.open_bi().await?;
            session::send(
                &mut tx,
                &AgentMsg::Hello {
                    last_revision: 0,
                    outbox_len: 0,
                    agent_version: "test".into(),
                    allow_exec: vec![],
                    seal_key: Default::default(),
                    functions: Default::default(),
                    allow_env: Default::default(),
                },
            )
            .await?;
            // Read on the side, as an agent does, so long assignment lists
            // never wait on our writes.
            let mut rx = FramedRecv::new(rx);
            let (acks_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
            let reader = tokio::spawn(async move {
                loop {
                    match rx.next::<CoordMsg>().await {
                        Ok(m @ CoordMsg::ResultsAck { .. }) => {
                            let _ = acks_tx.send(Ok(m));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = acks_tx.send(Err(e));
                            return;
                        }
                    }
                }
            });
            let n = frames.len();
            for f in frames {
                tx.write_all(&f).await?;
            }
            while got.len() < n {
                match acks.recv().await {
                    Some(Ok(m)) => got.push(m),
                    // The stream may end before the connection's close
                    // reaches us: the close, with its code, is the answer.
                    Some(Err(SessionError::Eof)) | None => {
                        return match tokio::time::timeout(Duration::from_secs(10), conn.closed())
                            .await
                        {
                            Ok(e) => Err(SessionError::Connection(e)),
                            Err(_) => Err(SessionError::Eof),
                        };
                    }
                    Some(Err(e)) => return Err(e),
                }
            }
            reader.abort();
            Ok::<(), SessionError>(())
        }
        .await;
        (got, r)
    })
}

fn results_frame(batch_id: u64, runs: Vec<RunRecord>) -> Vec<u8> {
    encode(&AgentMsg::Results { batch_id, runs }).expect("encodes")
}

fn future_task(coord: &Coordinator, agent: &str) -> String {
    coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        agent,
        "--at",
        "2099-01-01T00:00:00Z",
        "--",
        "/bin/true",
    ])
}

#[test]
fn revocation_ends_a_live_session_and_refuses_new_tasks() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let addr = coord.addr.to_string();
    let dir = root.path().join("a");
    let id = join(&addr, &coord.token(&[]), &dir, "a", &[("site", "lab")]).expect("joins");
    let mut agent = Agent::start(&dir);
    let task = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        "300ms",
        "--",
        "/bin/true",
    ]);
    wait_for("runs from a", || coord.runs(&["--task", &task]).len() >= 2);
    wait_for("a online", || {
        coord.json(&["agent", "get", &id])["online"] == true
    });

    coord.ctl_ok(&["agent", "revoke", &id]);
    // The live session ends at once, not at the next reconnect.
    assert_eq!(coord.json(&["agent", "get", &id])["online"], false);
    // The agent learns it, records it, and says so in its status.
    wait_for("the agent to know it is revoked", || agent.status().revoked);
    // Tasks aimed at it are refused; runs stop arriving.
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        &id,
        "--at",
        "2099-01-01T00:00:00Z",
        "--",
        "/bin/true",
    ]);
    assert!(!ok && err.contains("revoked"), "{err}");
    let n1 = coord.runs(&["--task", &task]).len();
    std::thread::sleep(Duration::from_secs(3));
    let n2 = coord.runs(&["--task", &task]).len();
    assert_eq!(n1, n2, "runs of a revoked agent were still stored");
    agent.stop();

    // A restarted revoked agent makes no session at all.
    let mut again = Agent::start(&dir);
    std::thread::sleep(Duration::from_secs(2));
    assert!(again.status().revoked);
    assert_eq!(coord.json(&["agent", "get", &id])["online"], false);
    again.stop();
}

/// A run record as a lying agent might encode it: instants as raw i64.
#[derive(Serialize)]
struct RawRun {
    task_id: u64,
    agent_id: u64,
    scheduled_at: i64,
    attempt: u32,
    fired_at: Option<i64>,
    finished_at: Option<i64>,
    outcome: u32,
    exit_code: Option<i32>,
    offline: bool,
    detail: Option<String>,
    stdout_tail: Vec<u8>,
    stderr_tail: Vec<u8>,
}

#[derive(Serialize)]
#[allow(dead_code)]
enum RawAgentMsg {
    Hello,
    Results { batch_id: u64, runs: Vec<RawRun> },
}

#[test]
fn out_of_range_fields_are_refused_and_unreadable_records_do_not_break_listings() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let id = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let task: TaskId = future_task(&coord, &id).parse().expect("id");

    let raw = |scheduled_at: i64, attempt: u32| RawRun {
        task_id: task.0,
        agent_id: 0,
        scheduled_at,
        attempt,
        fired_at: None,
        finished_at: None,
        outcome: 0,
        exit_code: None,
        offline: false,
        detail: None,
        stdout_tail: vec![],
        stderr_tail: vec![],
    };
    // i64::MAX is no instant: the frame is refused, nothing is stored.
    let bad = encode(&RawAgentMsg::Results {
        batch_id: 1,
        runs: vec![raw(i64::MAX, 1)],
    })
    .expect("encodes");
    let (_, r) = raw_session(&coord, &dir, vec![bad]);
    assert!(closed_with(&r, close::BAD_FRAME), "{r:?}");
    // Attempt 0 and a detail of 1 MB are out of bounds: refused with a reason.
    for rec in [
        RunRecord {
            attempt: 0,
            ..record(task, 1_000, Outcome::Succeeded)
        },
        RunRecord {
            detail: Some("x".repeat(1_000_000)),
            ..record(task, 1_000, Outcome::Succeeded)
        },
    ] {
        let (_, r) = raw_session(&coord, &dir, vec![results_frame(1, vec![rec])]);
        assert!(closed_with(&r, close::PROTOCOL), "{r:?}");
    }
    assert!(coord.runs(&[]).is_empty());

    // A good record, then an unreadable one written into the store behind
    // the coordinator's back: the listing skips it and says so.
    let (acks, r) = raw_session(
        &coord,
        &dir,
        vec![results_frame(
            1,
            vec![record(task, 1_000, Outcome::Succeeded)],
        )],
    );
    assert!(r.is_ok() && acks.len() == 1, "{r:?}");
    coord.kill9();
    {
        let db = redb::Database::create(coord.dir.join("coordinator.redb")).expect("open");
        let runs: redb::TableDefinition<(u64, u64, i64, u32), &[u8]> =
            redb::TableDefinition::new("runs");
        // A record whose bytes went bad on disk (its index entry is fine).
        let by_time: redb::TableDefinition<(i64, u64, u64, u32), u8> =
            redb::TableDefinition::new("runs_by_time");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(runs).expect("table");
            t.insert((task.0, 1, 2_000, 1), [1u8, 0xff, 0xff, 0xff].as_slice())
                .expect("insert");
            let mut i = txn.open_table(by_time).expect("table");
            i.insert((2_000, task.0, 1, 1), 1).expect("insert");
        }
        txn.commit().expect("commit");
    }
    coord.restart();
    let (ok, out, err) = coord.ctl(&["run", "list", "-o", "json"]);
    assert!(ok, "run list failed: {err}");
    let runs: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{out}");
    assert!(err.contains("could not be read"), "{err}");
}

#[test]
fn agents_write_only_their_own_runs_and_the_first_record_wins() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let addr = coord.addr.to_string();
    let a_dir = root.path().join("a");
    let b_dir = root.path().join("b");
    let a = join(&addr, &coord.token(&[]), &a_dir, "a", &[]).expect("a");
    let b = join(&addr, &coord.token(&[]), &b_dir, "b", &[]).expect("b");
    let a_task: TaskId = future_task(&coord, &a).parse().expect("id");
    let b_task: TaskId = future_task(&coord, &b).parse().expect("id");

    // B's task: refused, the session closed, nothing stored.
    let (_, r) = raw_session(
        &coord,
        &a_dir,
        vec![results_frame(
            1,
            vec![record(b_task, 1_000, Outcome::Succeeded)],
        )],
    );
    assert!(closed_with(&r, close::PROTOCOL), "task {b_task}: {r:?}");
    // A task the store does not know at all (a store restored from an older
    // backup): acknowledged so the agent's outbox moves on, and not stored.
    let (acks, r) = raw_session(
        &coord,
        &a_dir,
        vec![results_frame(
            1,
            vec![record(TaskId(4242), 1_000, Outcome::Succeeded)],
        )],
    );
    assert!(r.is_ok() && acks.len() == 1, "{r:?}");
    assert!(coord.runs(&[]).is_empty());

    // Its own task: stored under its certificate's identity. A different
    // record for the same run key later does not replace it.
    let (acks, r) = raw_session(
        &coord,
        &a_dir,
        vec![results_frame(
            1,
            vec![record(a_task, 1_000, Outcome::Failed)],
        )],
    );
    assert!(r.is_ok() && acks.len() == 1, "{r:?}");
    let (acks, r) = raw_session(
        &coord,
        &a_dir,
        vec![results_frame(
            2,
            vec![record(a_task, 1_000, Outcome::Succeeded)],
        )],
    );
    assert!(
        r.is_ok() && acks.len() == 1,
        "a resend is acknowledged: {r:?}"
    );
    let runs = coord.runs(&[]);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["outcome"], "failed", "the first record must stand");
    assert_eq!(runs[0]["agent_id"], a.as_str());
}

#[test]
fn uploads_beyond_the_rate_limit_are_slowed_not_lost() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start_with(root.path(), &["--upload-runs-per-sec", "200"]);
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let task: TaskId = future_task(&coord, &a).parse().expect("id");
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|b| {
            results_frame(
                b + 1,
                (0..250)
                    .map(|i| record(task, 1_000 + (b as i64) * 1_000 + i, Outcome::Succeeded))
                    .collect(),
            )
        })
        .collect();
    let started = Instant::now();
    let (acks, r) = raw_session(&coord, &dir, frames);
    let took = started.elapsed();
    assert!(r.is_ok() && acks.len() == 4, "{r:?}");
    // 1,000 records at 200 a second, with one second's worth of burst: at
    // least 4 s. A lower bound, so a busy machine cannot make it flake.
    assert!(
        took >= Duration::from_secs(3),
        "1,000 records took {took:?}"
    );
    assert_eq!(coord.runs(&[]).len(), 1_000);
    coord.kill9();
}

#[test]
fn large_tasks_are_refused_and_long_lists_are_chunked_under_the_frame_cap() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");

    // One task over the size limit: a clear error at create time.
    let huge = "x".repeat(70_000);
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        &a,
        "--at",
        "2099-01-01T00:00:00Z",
        "--",
        "/bin/echo",
        &huge,
    ]);
    assert!(!ok && err.contains("bytes"), "{err}");
    // Over the admin request's own limit: the same kind of error, not a
    // lost connection.
    let part = "z".repeat(100_000);
    let mut args = vec![
        "task",
        "create",
        "--agent",
        &a,
        "--at",
        "2099-01-01T00:00:00Z",
        "--",
        "/bin/echo",
    ];
    let parts = sundial_protocol::wire::ADMIN_REQUEST_BYTES_MAX / 100_000 + 1;
    args.extend(std::iter::repeat_n(part.as_str(), parts));
    let (ok, _, err) = coord.ctl(&args);
    let limit = format!(
        "{} KiB",
        sundial_protocol::wire::ADMIN_REQUEST_BYTES_MAX / 1024
    );
    assert!(!ok && err.contains(&limit), "{err}");

    // 80 tasks of 60 KB: 4.8 MB of assignments, more than one frame holds.
    let big = "y".repeat(60_000);
    for i in 0..80 {
        coord.ctl_ok(&[
            "task",
            "create",
            "--name",
            &format!("big-{i}"),
            "--agent",
            &a,
            "--at",
            "2099-01-01T00:00:00Z",
            "--",
            "/bin/echo",
            &big,
        ]);
    }
    let mut agent = Agent::start(&dir);
    wait_for("all 80 tasks on the agent", || {
        agent.status().tasks.len() == 80
    });
    let tasks = coord.json(&["task", "list"]);
    assert_eq!(tasks.as_array().map(Vec::len), Some(80));
    agent.stop();

    // Runs with 1 MiB tails: a run list of them is far over one frame.
    let task: TaskId = future_task(&coord, &a).parse().expect("id");
    let frames: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            let mut r = record(task, 10_000 + i, Outcome::Succeeded);
            r.stdout_tail = vec![b'o'; 1024 * 1024];
            r.stderr_tail = vec![b'e'; 1024 * 1024];
            results_frame(i as u64 + 1, vec![r])
        })
        .collect();
    let (acks, r) = raw_session(&coord, &dir, frames);
    assert!(r.is_ok() && acks.len() == 6, "{r:?}");
    let runs = coord.runs(&["--task", &task.to_string()]);
    assert_eq!(runs.len(), 6);
    assert_eq!(runs[0]["stdout"].as_str().map(str::len), Some(1024 * 1024));
}

#[test]
fn unauthenticated_and_silent_peers_hold_little_and_not_for_long() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let trust = || ServerTrust::Pinned(sundial_protocol::token::sha256(ca(&coord).as_ref()));
    // An enrollment that announces a 4 MiB frame is refused at the header.
    let r: Result<(), SessionError> = rt().block_on(async {
        let (_ep, conn) = session::connect(
            &coord.addr.to_string(),
            "sundial-coordinator",
            trust(),
            None,
            ALPN_ENROLL,
        )
        .await?;
        let (mut tx, rx) = conn.open_bi().await?;
        tx.write_all(&(4u32 * 1024 * 1024).to_be_bytes()).await?;
        let _: CoordMsg = FramedRecv::new(rx).next().await?;
        Ok(())
    });
    assert!(closed_with(&r, close::BAD_FRAME), "{r:?}");

    // An agent connection that never says Hello is closed by the coordinator.
    let started = Instant::now();
    let r: Result<(), SessionError> = rt().block_on(async {
        let (_ep, conn) = session::connect(
            &coord.addr.to_string(),
            "sundial-coordinator",
            ServerTrust::Ca(ca(&coord)),
            Some(agent_identity(&dir)),
            ALPN,
        )
        .await?;
        let (_tx, rx) = conn.open_bi().await?;
        let _: CoordMsg = FramedRecv::new(rx).next().await?;
        Ok(())
    });
    assert!(closed_with(&r, close::PROTOCOL), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_lost_store_or_ca_is_never_replaced_silently() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    coord.kill9();
    let store = coord.dir.join("coordinator.redb");
    let serve = |dir: &Path| {
        std::process::Command::new(COORDINATOR)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .output()
            .expect("serve runs")
    };
    // An empty store beside the CA: refused with what to do.
    let saved = std::fs::read(&store).expect("store");
    std::fs::write(&store, b"").expect("truncate");
    let out = serve(&coord.dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("empty") && err.contains("backup"), "{err}");
    // A deleted one: the same, and `init` will not replace the CA.
    std::fs::remove_file(&store).expect("delete");
    let out = serve(&coord.dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("missing"), "{err}");
    let ca_before = std::fs::read(coord.dir.join("ca.pem")).expect("ca");
    let out = std::process::Command::new(COORDINATOR)
        .args(["init", "--advertise", "127.0.0.1:7447", "--data-dir"])
        .arg(&coord.dir)
        .output()
        .expect("init runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(coord.dir.join("ca.pem")).expect("ca"),
        ca_before
    );
    // Restored from the backup, it serves again.
    std::fs::write(&store, saved).expect("restore");
    coord.restart();
    assert!(coord.ctl(&["agent", "list"]).0);
}

#[test]
fn run_retention_bounds_the_store() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let task: TaskId = future_task(&coord, &a).parse().expect("id");
    let recent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let (acks, r) = raw_session(
        &coord,
        &dir,
        vec![results_frame(
            1,
            vec![
                record(task, 1_000, Outcome::Succeeded),
                record(task, recent, Outcome::Succeeded),
            ],
        )],
    );
    assert!(r.is_ok() && acks.len() == 1, "{r:?}");
    assert_eq!(coord.runs(&[]).len(), 2);
    coord.kill9();
    coord.serve_args = vec!["--run-retention".into(), "1h".into()];
    coord.restart();
    // Retention looks 10 s after the start, then once a minute: wait up
    // to three minutes, so a busy machine does not miss it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while coord.runs(&[]).len() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the old run did not go within three minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert_eq!(common::sched_ms(&coord.runs(&[])[0]), recent);
}

#[test]
fn heavy_run_listings_do_not_starve_agent_sessions() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let task: TaskId = future_task(&coord, &a).parse().expect("id");
    // 200,000 stored runs, written straight into the store.
    coord.kill9();
    {
        let store =
            sundial_coordinator::store::CoordinatorStore::open(&coord.dir.join("coordinator.redb"))
                .expect("store");
        let agent: AgentId = a.parse().expect("id");
        for chunk in 0..20 {
            let runs: Vec<RunRecord> = (0..10_000)
                .map(|i| RunRecord {
                    agent_id: agent,
                    ..record(task, 1_000_000 + chunk * 10_000 + i, Outcome::Succeeded)
                })
                .collect();
            store.put_runs(&runs).expect("stored");
        }
    }
    coord.restart();
    let mut agent = Agent::start(&dir);
    wait_for("a online", || {
        coord.json(&["agent", "get", &a])["online"] == true
    });
    // Four listings at once, twice each, while the session is watched.
    let listers: Vec<_> = (0..4)
        .map(|_| {
            let creds = coord.creds();
            std::thread::spawn(move || {
                for _ in 0..2 {
                    let out = std::process::Command::new(common::CTL)
                        .args(["run", "list", "--limit", "10000", "-o", "json"])
                        .env("SUNDIAL_CREDS", &creds)
                        .output()
                        .expect("runs");
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            })
        })
        .collect();
    let mut samples = 0;
    while listers.iter().any(|l| !l.is_finished()) {
        let (ok, out, err) = coord.ctl(&["agent", "get", &a, "-o", "json"]);
        assert!(ok, "agent get failed during listings: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            v["online"], true,
            "the agent's session dropped during listings"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    for l in listers {
        l.join().expect("lister");
    }
    assert!(samples > 0);
    agent.stop();
}

#[test]
fn run_list_pages_with_cursors_both_ways_and_says_so() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let task: TaskId = future_task(&coord, &a).parse().expect("id");
    let runs: Vec<RunRecord> = (0..250)
        .map(|i| record(task, 1_000_000 + i * 1_000, Outcome::Succeeded))
        .collect();
    let (acks, r) = raw_session(&coord, &dir, vec![results_frame(1, runs)]);
    assert!(r.is_ok() && acks.len() == 1, "{r:?}");

    let page = |args: &[&str]| -> (Vec<i64>, String) {
        let mut a = vec!["run", "list", "--limit", "100"];
        a.extend_from_slice(args);
        let (ok, out, err) = coord.ctl(&a);
        assert!(ok, "{err}");
        let mut j = a.clone();
        j.extend(["-o", "json"]);
        let json: serde_json::Value = serde_json::from_str(&coord.ctl_ok(&j)).expect("json");
        let _ = out;
        (
            json.as_array()
                .expect("array")
                .iter()
                .map(common::sched_ms)
                .collect(),
            err,
        )
    };
    let cursor = |hint: &str, flag: &str| -> Option<String> {
        hint.split(flag)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    // The latest 100, then older pages by --before until none is left.
    let (mut seen, hint) = page(&[]);
    assert_eq!(seen.len(), 100);
    assert!(hint.contains("showing 100 of 250"), "{hint}");
    let mut hint = hint;
    while let Some(c) = cursor(&hint, "--before ") {
        let (older, h) = page(&["--before", &c]);
        assert!(older.last() < seen.first(), "pages overlap");
        seen.splice(0..0, older);
        hint = h;
    }
    assert_eq!(seen.len(), 250);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "out of order");
    // Forward from a cursor: the runs after it, oldest first.
    let first = format!("{}.{}.{}.1", seen[0], task.0, a.trim_start_matches('a'));
    let (fwd, hint) = page(&["--after", &first]);
    assert_eq!(fwd, seen[1..101]);
    assert!(cursor(&hint, "--after ").is_some(), "{hint}");
    let (ok, _, err) = coord.ctl(&["run", "list", "--after", "garbage"]);
    assert!(!ok && err.contains("cursor"), "{err}");
    // A script pages in JSON alone: --page carries the cursors.
    let mut all: Vec<i64> = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut args = vec!["run", "list", "--limit", "100", "--page"];
        if let Some(c) = &before {
            args.extend(["--before", c.as_str()]);
        }
        let env = coord.json(&args);
        let runs: Vec<i64> = env["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .map(common::sched_ms)
            .collect();
        all.splice(0..0, runs);
        if env["more"] != true {
            break;
        }
        before = env["older"].as_str().map(str::to_owned);
        assert!(before.is_some() && all.len() <= 250, "{env}");
    }
    assert_eq!(all, seen, "the same runs as the table's cursors give");
    let (ok, _, err) = coord.ctl(&["run", "list", "--page"]);
    assert!(!ok && err.contains("-o json"), "{err}");
}

#[test]
fn a_store_from_before_the_run_indexes_is_indexed_when_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.redb");
    {
        // Runs as an older coordinator stored them: the table alone.
        let db = redb::Database::create(&path).expect("create");
        let runs: redb::TableDefinition<(u64, u64, i64, u32), &[u8]> =
            redb::TableDefinition::new("runs");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(runs).expect("table");
            for i in 0..5i64 {
                let r = RunRecord {
                    agent_id: AgentId(1),
                    ..record(TaskId(7), 1_000 + i, Outcome::Succeeded)
                };
                let bytes = sundial_protocol::records::encode(
                    &sundial_protocol::records::RunRecordV1::from_run(&r),
                );
                t.insert((7, 1, 1_000 + i, 1), bytes.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let store = sundial_coordinator::store::CoordinatorStore::open(&path).expect("opens");
    let page = store
        .runs(&sundial_coordinator::store::RunQuery {
            task: Some(TaskId(7)),
            agent: None,
            since: None,
            limit: 100,
            page: sundial_coordinator::store::Page::Latest,
            forward_from_since: false,
        })
        .expect("lists");
    assert_eq!(page.runs.len(), 5);
}

#[test]
fn an_admin_refused_for_load_is_let_in_as_the_budget_allows() {
    // One handshake a second: each `sundialctl` after the first within a
    // second is refused before any cryptography, as agents are in a storm.
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start_with(root.path(), &["--handshakes-per-sec", "1"]);
    let t = Instant::now();
    for i in 0..3 {
        let (ok, out, err) = coord.ctl(&["agent", "list"]);
        assert!(ok, "request {i} turned away: {out}{err}");
    }
    // Three more connections at one a second could not all have been
    // admitted at once: they were refused, waited and were let in.
    assert!(
        t.elapsed() >= Duration::from_millis(1_500),
        "not refused at all ({:?}): the test proves nothing",
        t.elapsed()
    );
}

#[test]
fn one_address_cannot_hold_many_unauthenticated_connections() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let trust = ServerTrust::Pinned(sundial_protocol::token::sha256(ca(&coord).as_ref()));
    let (held, refused, agent_ok) = rt().block_on(async {
        // Enrollments that connect and then say nothing, from one address.
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..sundial_coordinator::server::PENDING_PER_ADDRESS_MAX + 8 {
            match session::connect(
                &coord.addr.to_string(),
                "sundial-coordinator",
                trust.clone(),
                None,
                ALPN_ENROLL,
            )
            .await
            {
                Ok(c) => held.push(c),
                Err(_) => refused += 1,
            }
        }
        let n = held.len();
        // Before the handshake nothing tells an agent from the flood, so
        // the address is refused while the flood holds; once it lets go,
        // an enrolled agent from it is served again at once.
        for (ep, c) in held.drain(..) {
            c.close(0u32.into(), b"bye");
            ep.wait_idle().await;
        }
        let mut agent_ok = false;
        for _ in 0..50 {
            if session::connect(
                &coord.addr.to_string(),
                "sundial-coordinator",
                ServerTrust::Ca(ca(&coord)),
                Some(agent_identity(&dir)),
                ALPN,
            )
            .await
            .is_ok()
            {
                agent_ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (n, refused, agent_ok)
    });
    assert!(
        held <= sundial_coordinator::server::PENDING_PER_ADDRESS_MAX,
        "{held} unauthenticated connections held from one address"
    );
    assert!(refused >= 8, "{refused} refused");
    assert!(agent_ok, "the address stayed refused after the flood ended");
}

#[test]
fn a_coordinator_restored_from_a_backup_resynchronises_agents_ahead_of_it() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let agent = Agent::start(&dir);
    let create = |coord: &Coordinator, name: &str| {
        coord.ctl_ok(&[
            "task",
            "create",
            "--name",
            name,
            "--agent",
            &a,
            "--every",
            "500ms",
            "--",
            "/bin/true",
        ])
    };
    let kept = create(&coord, "kept");
    wait_for("runs of the kept task", || {
        !coord.runs(&["--task", "kept"]).is_empty()
    });
    // The backup: taken with the coordinator stopped.
    coord.kill9();
    let store = coord.dir.join("coordinator.redb");
    let backup = root.path().join("backup.redb");
    std::fs::copy(&store, &backup).expect("backup");
    coord.restart();
    let lost = create(&coord, "lost");
    wait_for("the agent to hold the task the backup lacks", || {
        agent.status().tasks.iter().any(|t| t.task_id == lost)
    });
    std::thread::sleep(Duration::from_millis(1_500));
    // The machine dies; its store comes back from the backup.
    coord.kill9();
    std::fs::copy(&backup, &store).expect("restore");
    coord.restart();
    // The agent drops what the store does not know, keeps what it does,
    // and its outbox drains (records of the lost task are not stored).
    wait_for("the agent resynchronised", || {
        let tasks = agent.status().tasks;
        tasks.iter().any(|t| t.task_id == kept) && !tasks.iter().any(|t| t.task_id == lost)
    });
    // A task created now takes a new id and a revision past the agent's:
    // it reaches the agent and runs.
    let fresh = create(&coord, "fresh");
    assert_ne!(fresh, lost, "an id was used twice");
    wait_for("runs of the fresh task", || {
        !coord.runs(&["--task", "fresh"]).is_empty()
    });
    wait_for("the agent's outbox to drain", || {
        agent.status().outbox_len <= 2
    });
    let log = std::fs::read_to_string(&coord.log).unwrap_or_default();
    assert!(log.contains("ahead of the store"), "not said in the log");
}

#[test]
fn one_run_listing_reads_a_bounded_number_of_bytes_whatever_the_limit() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    let task: TaskId = future_task(&coord, &a).parse().expect("id");
    // 40 runs with 1 MiB output tails each: 80 MiB in all.
    coord.kill9();
    {
        let store =
            sundial_coordinator::store::CoordinatorStore::open(&coord.dir.join("coordinator.redb"))
                .expect("store");
        let agent: AgentId = a.parse().expect("id");
        let runs: Vec<RunRecord> = (0..40)
            .map(|i| RunRecord {
                agent_id: agent,
                stdout_tail: vec![b'o'; 1 << 20],
                stderr_tail: vec![b'e'; 1 << 20],
                ..record(task, 1_000_000 + i * 1_000, Outcome::Succeeded)
            })
            .collect();
        store.put_runs(&runs).expect("stored");
    }
    coord.restart();
    let page = coord.json(&["run", "list", "--limit", "600"]);
    let n = page.as_array().expect("array").len();
    let budget = sundial_coordinator::store::RUN_LIST_BYTES_MAX / (2 << 20);
    assert!(
        (1..=budget + 1).contains(&n),
        "{n} runs of 2 MiB in one answer (budget {budget})"
    );
    // The table says there is more, and the cursor pages on to the rest.
    let cursor = |hint: &str| -> Option<String> {
        hint.split("--before ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    };
    let (ok, _, mut hint) = coord.ctl(&["run", "list", "--limit", "600"]);
    assert!(ok && hint.contains("--before"), "{hint}");
    let mut seen = n;
    let mut pages = 1;
    while let Some(c) = cursor(&hint) {
        let args = ["run", "list", "--limit", "600", "--before", &c];
        let got = coord.json(&args);
        seen += got.as_array().expect("array").len();
        let (ok, _, err) = coord.ctl(&args);
        assert!(ok, "{err}");
        hint = err;
        pages += 1;
        assert!(pages < 20, "paging does not end");
    }
    assert_eq!(seen, 40, "every run reachable page by page");
}

#[test]
fn a_second_session_of_one_agent_replaces_the_first() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("a");
    rt().block_on(async {
        let open = || async {
            let (ep, conn) = session::connect(
                &coord.addr.to_string(),
                "sundial-coordinator",
                ServerTrust::Ca(ca(&coord)),
                Some(agent_identity(&dir)),
                ALPN,
            )
            .await
            .expect("connects");
            let (mut tx, rx) = conn.open_bi().await.expect("stream");
            session::send(
                &mut tx,
                &AgentMsg::Hello {
                    last_revision: 0,
                    outbox_len: 0,
                    agent_version: "test".into(),
                    allow_exec: vec![],
                    seal_key: Default::default(),
                    functions: Default::default(),
                    allow_env: Default::default(),
                },
            )
            .await
            .expect("hello");
            // The first answer: the session is up.
            let mut rx = FramedRecv::new(rx);
            rx.next::<CoordMsg>().await.expect("an answer");
            (ep, conn, tx, rx)
        };
        let (_ep1, first, _tx1, _rx1) = open().await;
        let (_ep2, second, _tx2, _rx2) = open().await;
        let reason = tokio::time::timeout(Duration::from_secs(10), first.closed())
            .await
            .expect("the first session is ended");
        match reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(c.error_code, close::REPLACED.into(), "{c:?}")
            }
            other => panic!("the first session ended otherwise: {other:?}"),
        }
        assert!(second.close_reason().is_none(), "the second session is up");
    });
}

#[test]
fn contacts_committed_without_a_flush_are_kept_across_a_clean_close() {
    use sundial_coordinator::store::{AgentSeen, CoordinatorStore, Enrollment, JoinToken};
    let root = tempfile::tempdir().expect("tempdir");
    let path = root.path().join("coordinator.redb");
    let secret = sundial_protocol::token::sha256(b"contacts");
    let at = |ms: i64| Timestamp::from_millis_saturating(1_800_000_000_000 + ms);
    let ids: Vec<AgentId> = {
        let store = CoordinatorStore::open(&path).expect("opens");
        store
            .put_token(
                &JoinToken {
                    secret_sha256: secret,
                    expires_at: Timestamp::MAX,
                    uses_left: 3,
                    labels: vec![],
                },
                None,
            )
            .expect("token");
        let ids: Vec<AgentId> = (0..3u8)
            .map(|k| {
                let id = store.reserve_agent_id().expect("id");
                store
                    .enroll(&Enrollment {
                        token_sha256: secret,
                        agent: id,
                        name: None,
                        labels: vec![],
                        cert_sha256: [k; 32],
                        now: at(0),
                    })
                    .expect("enroll")
                    .expect("accepted");
                id
            })
            .collect();
        // Many contacts in quick succession: at most one a second is
        // flushed to disk as it is committed; every one is read back at once.
        for round in 1..=200i64 {
            for (k, id) in ids.iter().enumerate() {
                let seen = AgentSeen {
                    at: at(round * 10 + k as i64),
                    clock: Some((round, k as i64)),
                    session: None,
                };
                store.agent_seen(*id, seen).expect("seen");
                let now = store.agent(*id).expect("read").expect("stored");
                assert_eq!(now.last_seen, Some(at(round * 10 + k as i64)));
            }
        }
        ids
    };
    // The store closed cleanly (dropped): the last contact of each is there.
    let store = CoordinatorStore::open(&path).expect("reopens");
    for (k, id) in ids.iter().enumerate() {
        let a = store.agent(*id).expect("read").expect("stored");
        assert_eq!(a.last_seen, Some(at(2_000 + k as i64)), "agent {id}");
        assert_eq!((a.clock_offset_ms, a.rtt_ms), (Some(200), Some(k as i64)));
    }
    // Clock reports gathered over a second go in one commit; an agent no
    // longer stored among them is skipped, the others recorded.
    let batch: Vec<(AgentId, AgentSeen)> = ids
        .iter()
        .chain([&AgentId(9_999)])
        .enumerate()
        .map(|(k, id)| {
            let seen = AgentSeen {
                at: at(5_000 + k as i64),
                clock: Some((-(k as i64), 7)),
                session: None,
            };
            (*id, seen)
        })
        .collect();
    store.agents_seen(&batch).expect("a batch of contacts");
    drop(store);
    let store = CoordinatorStore::open(&path).expect("reopens");
    for (k, id) in ids.iter().enumerate() {
        let a = store.agent(*id).expect("read").expect("stored");
        assert_eq!(a.last_seen, Some(at(5_000 + k as i64)), "agent {id}");
        assert_eq!((a.clock_offset_ms, a.rtt_ms), (Some(-(k as i64)), Some(7)));
    }
    assert!(store.agent(AgentId(9_999)).expect("read").is_none());
}
