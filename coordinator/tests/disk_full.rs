//! A full disk is a normal day: the agent and the coordinator notice that
//! their store can no longer write, say so, and exit so that their
//! supervisor restarts them with the store reopened (redb refuses every
//! write after an I/O error until then); nothing committed is lost, and
//! work resumes once there is room. Each store lives on a small tmpfs the
//! test mounts under its own temporary directory (root only; skipped with a
//! printed reason elsewhere, and a failure under CI).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{join, wait_for, Agent, Coordinator, CTL, WAIT_MAX};
use sundial_agent::store::AgentStore;
use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::{AgentId, DurationMs, Schedule, TaskId, TaskSpec, Timestamp};

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs {
                path: path.to_owned(),
            }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                    Err(e) => e.to_string(),
                };
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("CI must be able to mount a tmpfs for the disk-full tests: {why}");
                }
                eprintln!("SKIPPED: cannot mount a tmpfs (run as root to test a full disk): {why}");
                None
            }
        }
    }

    /// Fills the filesystem to the last byte; returns the filler's path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn agent_bin() -> PathBuf {
    Path::new(CTL).with_file_name("sundial-agent")
}

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    Timestamp::from_millis(ms).expect("in range")
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(Instant::now() < deadline, "still running on a full disk");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_agent(dir: &Path, log: &Path) -> Child {
    Command::new(agent_bin())
        .args([
            "run",
            "--standalone",
            "--allow-exec",
            "/bin/sh",
            "--data-dir",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log"),
        )
        .spawn()
        .expect("agent starts")
}

/// The outbox's run keys; read-only beside a running agent, or opened for
/// writing (which repairs a store left by a killed agent) when `repair`.
fn outbox_keys(dir: &Path, repair: bool) -> Vec<(u64, i64, u32)> {
    let path = dir.join("agent.redb");
    let store = if repair {
        AgentStore::open(&path)
    } else {
        AgentStore::open_read_only(&path)
    }
    .expect("store");
    let mut keys: Vec<_> = store
        .outbox_batch(usize::MAX, usize::MAX)
        .expect("outbox")
        .iter()
        .map(|r| (r.task_id.0, r.scheduled_at.as_millis(), r.attempt))
        .collect();
    keys.sort();
    keys
}

#[test]
fn an_agent_on_a_full_disk_exits_loudly_loses_nothing_and_resumes() {
    let root = tempfile::tempdir().expect("tempdir");
    let Some(fs) = Tmpfs::mount(&root.path().join("disk"), "24m") else {
        return;
    };
    let dir = fs.path.join("agent");
    let log = root.path().join("agent.log");
    std::fs::create_dir(&dir).expect("data dir");
    {
        let store = AgentStore::open(&dir.join("agent.redb")).expect("store");
        let task = TaskSpec {
            id: TaskId(1),
            name: None,
            target: Target::Agent(AgentId(0)),
            schedule: Schedule::every(DurationMs(100), now()).expect("valid"),
            action: Action::Exec(ExecSpec {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), "head -c 60000 /dev/zero".into()],
                env: vec![],
                cwd: None,
                sealed_env: Vec::new(),
            }),
            policies: Policies::default(),
            revision: 1,
            created_at: now(),
            placement: None,
        };
        store.put_task(&task, Some(1)).expect("task");
    }
    let mut agent = run_agent(&dir, &log);
    wait_for("some records", || {
        sundial_agent::status::read(&dir).is_ok_and(|s| s.outbox_len >= 5)
    });
    // What was committed before the disk filled (read beside the agent).
    let before = outbox_keys(&dir, false);
    assert!(before.len() >= 5);
    let filler = fs.fill();
    let status = wait_exit(&mut agent);
    assert!(!status.success(), "exited {status:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("agent store"), "{text}");

    // Room again: the restarted agent has every record and fires again.
    std::fs::remove_file(filler).expect("free");
    let mut agent = run_agent(&dir, &log);
    wait_for("new records", || {
        sundial_agent::status::read(&dir).is_ok_and(|s| s.outbox_len as usize > before.len() + 3)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let after = outbox_keys(&dir, true);
    for k in &before {
        assert!(after.contains(k), "record {k:?} was lost");
    }
}

#[test]
fn a_coordinator_on_a_full_disk_exits_loudly_and_agents_lose_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let Some(fs) = Tmpfs::mount(&root.path().join("disk"), "24m") else {
        return;
    };
    let mut coord = Coordinator::start_logged(&fs.path, &[], Some(root.path().join("serve.log")));
    let a_dir = root.path().join("a");
    let a = join(&coord.addr.to_string(), &coord.token(&[]), &a_dir, "a", &[]).expect("a");
    let mut agent = Agent::start(&a_dir);
    let task = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &a,
        "--every",
        "100ms",
        "--",
        "/bin/sh",
        "-c",
        "head -c 60000 /dev/zero",
    ]);
    wait_for("runs stored", || coord.runs(&["--task", &task]).len() >= 5);
    let filler = fs.fill();
    let status = coord.wait_exit(WAIT_MAX);
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let log = std::fs::read_to_string(&coord.log).unwrap_or_default();
    assert!(log.contains("store failed to write"), "{log}");

    // Room again, a restart: the agent's buffered records all arrive.
    std::fs::remove_file(filler).expect("free");
    coord.restart();
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let outbox = agent.status().outbox_len;
    let mut again = Agent::start(&a_dir);
    wait_for("the outbox to drain", || again.status().outbox_len == 0);
    again.stop();
    let stored = coord.runs(&["--task", &task]).len();
    assert!(
        stored >= 5 + outbox as usize,
        "{stored} stored, {outbox} were waiting"
    );
}
