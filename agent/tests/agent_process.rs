//! The real `sundial-agent` binary: fires from its own store with no
//! coordinator, and after SIGKILL mid-run reports that run `interrupted`
//! without running it again (unless its retry policy says so).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sundial_agent::store::AgentStore;
use sundial_protocol::policy::{Policies, RetryPolicy};
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::{
    AgentId, DurationMs, Outcome, RunRecord, Schedule, TaskId, TaskSpec, Timestamp,
};

const AGENT: &str = env!("CARGO_BIN_EXE_sundial-agent");
/// Generous: these tests use the real clock on a possibly busy machine.
const WAIT_MAX: Duration = Duration::from_secs(30);

fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64;
    Timestamp::from_millis(ms).expect("in range")
}

fn store_path(dir: &Path) -> PathBuf {
    dir.join("agent.redb")
}

fn sh_task(id: u64, schedule: Schedule, script: &str, policies: Policies) -> TaskSpec {
    TaskSpec {
        id: TaskId(id),
        name: Some(format!("test-{id}")),
        target: Target::Agent(AgentId(0)),
        schedule,
        action: Action::Exec(ExecSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![],
            cwd: None,
            sealed_env: Vec::new(),
        }),
        policies,
        revision: id,
        created_at: now(),
        placement: None,
    }
}

/// A running agent, killed if the test ends without stopping it.
struct AgentProc(Option<Child>);

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_agent(dir: &Path) -> AgentProc {
    start_agent_with(dir, &[])
}

fn start_agent_with(dir: &Path, extra: &[&str]) -> AgentProc {
    AgentProc(Some(
        Command::new(AGENT)
            .args(["run", "--standalone", "--data-dir"])
            .arg(dir)
            .args(["--allow-exec", "/bin/sh"])
            .args(extra)
            .env("SUNDIAL_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.with_extension("log"))
                    .expect("log file"),
            )
            .spawn()
            .expect("agent starts"),
    ))
}

fn stop(mut agent: AgentProc) {
    let Some(mut child) = agent.0.take() else {
        return;
    };
    let pid = rustix::process::Pid::from_child(&child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + WAIT_MAX;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

fn wait_for_or_show(what: &str, log: &Path, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "timed out waiting for {what}; agent log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn status_json(dir: &Path) -> serde_json::Value {
    let out = Command::new(AGENT)
        .args(["status", "-o", "json", "--data-dir"])
        .arg(dir)
        .output()
        .expect("status runs");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

fn outbox(dir: &Path) -> Vec<RunRecord> {
    AgentStore::open(&store_path(dir))
        .expect("store opens after the agent stopped")
        .outbox_batch(usize::MAX, usize::MAX)
        .expect("outbox reads")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn fires_on_time_from_its_own_store_without_a_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("fired");
    let start = now().saturating_add_ms(1_000);
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let sched = Schedule::every(DurationMs(500), start).expect("valid");
        store
            .put_task(
                &sh_task(
                    1,
                    sched,
                    &format!("date +%s%3N >> {}", log.display()),
                    Policies::default(),
                ),
                Some(1),
            )
            .expect("put task");
    }
    let agent = start_agent(dir.path());
    wait_for("six fires", || lines(&log).len() >= 6);
    let status = status_json(dir.path());
    assert_eq!(status["tasks"][0]["task_id"], "t1");
    assert!(status["tasks"][0]["next_fire"].is_string());
    stop(agent);

    let runs = outbox(dir.path());
    assert!(runs.len() >= 6, "{} runs recorded", runs.len());
    for r in &runs {
        assert_eq!(r.outcome, Outcome::Succeeded);
        assert!(r.offline, "no coordinator: every run is offline");
        let late = r.fired_at.expect("fired").millis_since(r.scheduled_at);
        // Behaviour, not a benchmark: on time means not early and not a tick late.
        assert!((0..2_000).contains(&late), "fired {late} ms after its time");
    }
    // The action's own timestamps: none before its occurrence.
    let first = lines(&log)[0].parse::<i64>().expect("ms timestamp");
    assert!(
        first >= start.as_millis(),
        "first run started before its time"
    );
}

fn crash_mid_run(retries: u32) -> (Vec<RunRecord>, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("starts");
    // First start: note our pid and hang; any later start: note it and succeed.
    let script = format!(
        "if [ -s {m} ]; then echo again >> {m}; exit 0; fi; echo $$ >> {m}; exec sleep 60",
        m = marker.display()
    );
    let policies = Policies {
        retry: RetryPolicy {
            retries,
            backoff_initial: DurationMs(200),
            backoff_max: DurationMs(200),
        },
        ..Policies::default()
    };
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let at = Schedule::at(now().saturating_add_ms(500));
        store
            .put_task(&sh_task(1, at, &script, policies), Some(1))
            .expect("put task");
    }
    let mut agent = start_agent(dir.path());
    wait_for("the run to start", || !lines(&marker).is_empty());
    let mut child = agent.0.take().expect("running");
    child.kill().expect("SIGKILL the agent");
    child.wait().expect("reaped");
    // The orphaned action keeps running (no systemd here to reap the group): end it.
    let pid: i32 = lines(&marker)[0].parse().expect("pid");
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }

    let agent = start_agent(dir.path());
    let want = if retries > 0 { 2 } else { 1 };
    let log = dir.path().with_extension("log");
    wait_for_or_show("the interrupted run to be recorded", &log, || {
        let s = status_json(dir.path());
        s["outbox_len"].as_u64() == Some(want) && s["runs_in_progress"].as_u64() == Some(0)
    });
    // Give a wrongly re-run occurrence the chance to show itself.
    std::thread::sleep(Duration::from_millis(1_500));
    stop(agent);
    (outbox(dir.path()), lines(&marker))
}

#[test]
fn sigkill_mid_run_is_reported_interrupted_and_not_run_again() {
    let (runs, starts) = crash_mid_run(0);
    assert_eq!(starts.len(), 1, "the occurrence ran again: {starts:?}");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].outcome, Outcome::Interrupted);
    assert_eq!(runs[0].attempt, 1);
    assert!(runs[0].fired_at.is_some());
}

#[test]
fn sigkill_mid_run_is_retried_when_the_policy_says_so() {
    let (runs, starts) = crash_mid_run(1);
    assert_eq!(starts.len(), 2, "{starts:?}");
    let mut outcomes: Vec<(u32, Outcome)> = runs.iter().map(|r| (r.attempt, r.outcome)).collect();
    outcomes.sort_by_key(|o| o.0);
    assert_eq!(
        outcomes,
        [(1, Outcome::Interrupted), (2, Outcome::Succeeded)]
    );
    assert!(runs.iter().all(|r| r.scheduled_at == runs[0].scheduled_at));
}

#[test]
fn a_refused_program_yields_a_rejected_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let mut t = sh_task(
            1,
            Schedule::at(now().saturating_add_ms(300)),
            "true",
            Policies::default(),
        );
        t.action = Action::Exec(ExecSpec {
            program: "/usr/bin/env".into(),
            ..ExecSpec::default()
        });
        store.put_task(&t, Some(1)).expect("put");
    }
    let agent = start_agent(dir.path());
    wait_for("a record", || {
        status_json(dir.path())["outbox_len"].as_u64() == Some(1)
    });
    // The count alone, as the harness reads it beside a running agent.
    assert_eq!(
        sundial_agent::status::outbox_len(dir.path()).expect("outbox length"),
        1
    );
    stop(agent);
    let runs = outbox(dir.path());
    assert_eq!(runs[0].outcome, Outcome::Rejected);
    assert!(runs[0]
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("not allowed"));
}

#[test]
fn status_explains_a_missing_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(AGENT)
        .args(["status", "--data-dir"])
        .arg(dir.path().join("nope"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no agent data"), "{err}");
}

#[test]
fn a_run_left_running_by_a_crash_is_ended_before_its_retry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("starts");
    // First start: note our pid and hang. The retry notes whether the
    // first is still alive: two runs of one occurrence must never overlap.
    let script = format!(
        "if [ -s {m} ]; then p=$(head -n1 {m}); if kill -0 $p 2>/dev/null; then echo alive >> {m}; else echo dead >> {m}; fi; exit 0; fi; echo $$ >> {m}; exec sleep 60",
        m = marker.display()
    );
    let policies = Policies {
        retry: RetryPolicy {
            retries: 1,
            backoff_initial: DurationMs(200),
            backoff_max: DurationMs(200),
        },
        ..Policies::default()
    };
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let at = Schedule::at(now().saturating_add_ms(500));
        store
            .put_task(&sh_task(1, at, &script, policies), Some(1))
            .expect("put task");
    }
    let mut agent = start_agent(dir.path());
    wait_for("the run to start", || !lines(&marker).is_empty());
    let first: i32 = lines(&marker)[0].parse().expect("pid");
    let mut child = agent.0.take().expect("running");
    child.kill().expect("SIGKILL the agent");
    child.wait().expect("reaped");
    let alive = |pid: i32| {
        rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
    };
    assert!(alive(first), "the action outlives a bare agent's SIGKILL");

    let agent = start_agent(dir.path());
    wait_for("the retry", || lines(&marker).len() >= 2);
    stop(agent);
    assert_eq!(
        lines(&marker)[1],
        "dead",
        "the retry ran beside the first run"
    );
    assert!(!alive(first));
    let runs = outbox(dir.path());
    let first_run = runs.iter().find(|r| r.attempt == 1).expect("attempt 1");
    assert_eq!(first_run.outcome, Outcome::Interrupted);
    assert_eq!(first_run.finished_at, None, "no invented finish time");
    assert!(
        first_run.detail.as_deref().unwrap_or("").contains("killed"),
        "{:?}",
        first_run.detail
    );
}

#[test]
fn runs_beyond_the_concurrency_cap_are_recorded_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("spans");
    // Each run logs +1 at its start and -1 at its end and takes 1 s; one
    // starts every 100 ms.
    let script = format!("echo +1 >> {l}; sleep 1; echo -1 >> {l}", l = log.display());
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let sched = Schedule::every(DurationMs(100), now().saturating_add_ms(300)).expect("valid");
        store
            .put_task(&sh_task(1, sched, &script, Policies::default()), Some(1))
            .expect("put task");
    }
    let agent = start_agent_with(dir.path(), &["--max-concurrent-runs", "2"]);
    wait_for("a few runs", || {
        lines(&log).iter().filter(|l| *l == "-1").count() >= 4
    });
    stop(agent);
    let mut going = 0;
    let mut most = 0;
    for l in lines(&log) {
        going += l.parse::<i32>().expect("+1 or -1");
        most = most.max(going);
    }
    assert!(most <= 2, "{most} runs went at once with a cap of 2");
    let runs = outbox(dir.path());
    assert!(runs.iter().any(|r| r.outcome == Outcome::Skipped
        && r.detail.as_deref().unwrap_or("").contains("concurrency")));
}

#[test]
fn a_lost_store_is_refused_and_a_store_deleted_while_running_stops_the_agent() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    // A fresh data directory is private to the agent's user.
    let agent = start_agent(&dir);
    wait_for("the store", || store_path(&dir).exists());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    wait_for("the store's mode", || mode(&store_path(&dir)) == 0o600);

    // Deleted while it runs: the agent stops with a clear error.
    std::fs::remove_file(store_path(&dir)).expect("delete");
    let mut child = agent;
    let mut proc_ = child.0.take().expect("running");
    let deadline = Instant::now() + WAIT_MAX;
    let status = loop {
        if let Some(s) = proc_.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent kept running without its store"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    assert!(log.contains("deleted or replaced"), "{log}");

    // An enrolled agent's store gone (or empty): refused, with what to do.
    std::fs::write(dir.join("agent.pem"), b"certificate").expect("cert");
    for empty in [false, true] {
        if empty {
            std::fs::write(store_path(&dir), b"").expect("empty store");
        }
        let out = Command::new(AGENT)
            .args(["run", "--data-dir"])
            .arg(&dir)
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started on a lost store");
        assert!(err.contains("backup"), "{err}");
    }
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Whether libfaketime is here; under CI its absence is a failure.
fn faketime_available() -> bool {
    if Path::new(LIBFAKETIME).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must install libfaketime (Debian package faketime) for the clock tests");
    }
    eprintln!("SKIPPED: libfaketime is not installed (apt-get install faketime)");
    false
}

/// The agent with its wall clock offset by what `offset_file` says (read on
/// every call, so the test can step it while the agent runs). The boot
/// clock is not faked.
fn start_agent_faked(dir: &Path, offset_file: &Path) -> AgentProc {
    AgentProc(Some(
        Command::new(AGENT)
            .args(["run", "--standalone", "--data-dir"])
            .arg(dir)
            .args(["--allow-exec", "/bin/sh"])
            .env("SUNDIAL_LOG", "debug")
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", offset_file)
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.with_extension("log"))
                    .expect("log file"),
            )
            .spawn()
            .expect("agent starts"),
    ))
}

/// Puts a one-shot task in 30 minutes and a per-second task logging its
/// occurrence into the agent's store.
fn clock_tasks(dir: &Path, soon: &Path, every: &Path) {
    let store = AgentStore::open(&store_path(dir)).expect("store");
    let later = Schedule::at(now().saturating_add_ms(30 * 60_000));
    store
        .put_task(
            &sh_task(
                1,
                later,
                &format!("touch {}", soon.display()),
                Policies::default(),
            ),
            Some(1),
        )
        .expect("put");
    let sched = Schedule::every(DurationMs(1_000), now()).expect("valid");
    store
        .put_task(
            &sh_task(
                2,
                sched,
                &format!("echo $SUNDIAL_SCHEDULED_AT_MS >> {}", every.display()),
                Policies::default(),
            ),
            Some(2),
        )
        .expect("put");
}

/// Every occurrence logged so far was due by now (on the real clock), and
/// none ran twice.
fn assert_none_early_none_twice(every: &Path) {
    let real_now = now().as_millis();
    let seen = lines(every);
    let mut uniq = std::collections::HashSet::new();
    for l in &seen {
        let at: i64 = l.parse().expect("ms");
        assert!(
            at <= real_now,
            "an occurrence {} ms in the future fired",
            at - real_now
        );
        assert!(uniq.insert(at), "occurrence {at} ran twice");
    }
}

#[test]
fn a_wall_clock_ahead_at_start_or_stepped_while_running_never_fires_early() {
    if !faketime_available() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    let offset = root.path().join("faketime");
    let soon = root.path().join("one-shot-ran");
    let every = root.path().join("every");
    // A first run in this boot: the agent notes trusted time on its boot clock.
    std::fs::write(&offset, "+0s").expect("offset");
    let agent = start_agent_faked(&dir, &offset);
    wait_for("the store", || store_path(&dir).exists());
    std::thread::sleep(Duration::from_millis(1_500));
    stop(agent);
    clock_tasks(&dir, &soon, &every);

    // Restarted an hour ahead: nothing of the coming hour fires.
    std::fs::write(&offset, "+3600s").expect("offset");
    let agent = start_agent_faked(&dir, &offset);
    wait_for("three per-second runs", || lines(&every).len() >= 3);
    assert_none_early_none_twice(&every);
    assert!(!soon.exists(), "a task due in 30 minutes fired at once");

    // Stepped back to the right time while running, then an hour ahead again.
    std::fs::write(&offset, "+0s").expect("offset");
    let n = lines(&every).len();
    wait_for("runs after the step back", || lines(&every).len() >= n + 2);
    std::fs::write(&offset, "+3600s").expect("offset");
    let n = lines(&every).len();
    wait_for("runs after the step forward", || {
        lines(&every).len() >= n + 3
    });
    assert_none_early_none_twice(&every);
    stop(agent);
    assert!(!soon.exists(), "a task due in 30 minutes fired");
    let runs = outbox(&dir);
    let real_now = now().as_millis();
    assert!(
        runs.iter().all(|r| r.scheduled_at.as_millis() <= real_now),
        "records of future occurrences"
    );
    let log = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    assert!(
        log.contains("ahead of trusted time"),
        "the lead was not logged"
    );
}

#[test]
fn sigterm_lets_running_actions_finish_and_records_them_truthfully() {
    // A run that needs 1.5 s finishes within the stop grace and is recorded
    // as it ended; one that would take a minute is killed at the grace's end
    // and recorded interrupted, with its whole process group gone.
    let dir = tempfile::tempdir().expect("tempdir");
    let started = dir.path().join("started");
    let short = format!("echo short >> {}; sleep 1.5; echo bye", started.display());
    let long = format!("echo long >> {}; exec sleep 60", started.display());
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let at = Schedule::at(now().saturating_add_ms(500));
        store
            .put_task(
                &sh_task(1, at.clone(), &short, Policies::default()),
                Some(1),
            )
            .expect("put");
        store
            .put_task(&sh_task(2, at, &long, Policies::default()), Some(2))
            .expect("put");
    }
    let mut agent = start_agent_with(dir.path(), &["--stop-grace", "6s"]);
    wait_for("both runs to start", || lines(&started).len() == 2);
    let mut child = agent.0.take().expect("running");
    let pid = rustix::process::Pid::from_child(&child);
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(t.elapsed() < WAIT_MAX, "the agent did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let runs = outbox(dir.path());
    let by_task = |id: u64| {
        runs.iter()
            .find(|r| r.task_id == TaskId(id))
            .unwrap_or_else(|| panic!("no record of t{id}: {runs:?}"))
    };
    assert_eq!(by_task(1).outcome, Outcome::Succeeded);
    assert_eq!(by_task(1).stdout_tail, b"bye\n");
    let long_run = by_task(2);
    assert_eq!(long_run.outcome, Outcome::Interrupted);
    assert!(long_run
        .detail
        .as_deref()
        .unwrap_or("")
        .contains("stop grace"));
    // Nothing of either is left behind, and nothing is left to recover.
    assert!(AgentStore::open(&store_path(dir.path()))
        .expect("store")
        .started()
        .expect("started")
        .is_empty());
}

#[test]
fn a_second_agent_on_the_same_data_dir_says_so_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start_agent(dir.path());
    wait_for("the store", || store_path(dir.path()).exists());
    std::thread::sleep(Duration::from_millis(500));
    let out = Command::new(AGENT)
        .args(["run", "--standalone", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a second agent ran");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    assert!(
        err.matches("in use by another process").count() <= 2,
        "said more than once and once more at the end:\n{err}"
    );
    stop(first);
}

/// A run that fails once, then a stop (SIGTERM, or SIGKILL) inside its
/// retry's backoff, then a restart: the retry runs.
fn retry_across_a_stop(kill: bool) -> Vec<RunRecord> {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("attempts");
    // The first attempt fails; any later one succeeds.
    let script = format!(
        "if [ -s {m} ]; then echo again >> {m}; exit 0; fi; echo first >> {m}; exit 3",
        m = marker.display()
    );
    let policies = Policies {
        retry: RetryPolicy {
            retries: 2,
            backoff_initial: DurationMs(3_000),
            backoff_max: DurationMs(3_000),
        },
        ..Policies::default()
    };
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let at = Schedule::at(now().saturating_add_ms(300));
        store
            .put_task(&sh_task(1, at, &script, policies), Some(1))
            .expect("put task");
    }
    let log = dir.path().with_extension("log");
    let mut agent = start_agent(dir.path());
    wait_for_or_show("the first attempt's failure", &log, || {
        status_json(dir.path())["outbox_len"].as_u64() == Some(1)
    });
    if kill {
        let mut child = agent.0.take().expect("running");
        child.kill().expect("SIGKILL the agent");
        child.wait().expect("reaped");
    } else {
        stop(agent);
    }
    assert_eq!(lines(&marker), ["first"], "the retry ran before the stop");
    let agent = start_agent(dir.path());
    wait_for_or_show("the retry after the restart", &log, || {
        lines(&marker).len() >= 2
    });
    wait_for("its record", || {
        status_json(dir.path())["outbox_len"].as_u64() == Some(2)
    });
    std::thread::sleep(Duration::from_millis(500));
    stop(agent);
    assert_eq!(lines(&marker), ["first", "again"]);
    outbox(dir.path())
}

#[test]
fn a_pending_retry_survives_a_graceful_stop() {
    let runs = retry_across_a_stop(false);
    let mut got: Vec<(u32, Outcome)> = runs.iter().map(|r| (r.attempt, r.outcome)).collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(got, [(1, Outcome::Failed), (2, Outcome::Succeeded)]);
}

#[test]
fn a_pending_retry_survives_a_kill() {
    let runs = retry_across_a_stop(true);
    let mut got: Vec<(u32, Outcome)> = runs.iter().map(|r| (r.attempt, r.outcome)).collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(got, [(1, Outcome::Failed), (2, Outcome::Succeeded)]);
}

#[test]
fn a_run_cut_short_by_the_stop_is_retried_after_the_restart() {
    // SIGTERM while the first attempt runs longer than the stop grace: it is
    // killed and recorded interrupted, and its retry runs after the restart.
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("attempts");
    let script = format!(
        "if [ -s {m} ]; then echo again >> {m}; exit 0; fi; echo first >> {m}; exec sleep 60",
        m = marker.display()
    );
    let policies = Policies {
        retry: RetryPolicy {
            retries: 1,
            backoff_initial: DurationMs(200),
            backoff_max: DurationMs(200),
        },
        ..Policies::default()
    };
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let at = Schedule::at(now().saturating_add_ms(300));
        store
            .put_task(&sh_task(1, at, &script, policies), Some(1))
            .expect("put task");
    }
    let log = dir.path().with_extension("log");
    let agent = start_agent_with(dir.path(), &["--stop-grace", "1s"]);
    wait_for("the first attempt", || !lines(&marker).is_empty());
    stop(agent);
    let runs = outbox(dir.path());
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].outcome, Outcome::Interrupted);
    let agent = start_agent(dir.path());
    wait_for_or_show("the retry after the restart", &log, || {
        lines(&marker).len() >= 2
    });
    wait_for("its record", || {
        status_json(dir.path())["outbox_len"].as_u64() == Some(2)
    });
    stop(agent);
    let mut got: Vec<(u32, Outcome)> = outbox(dir.path())
        .iter()
        .map(|r| (r.attempt, r.outcome))
        .collect();
    got.sort_by_key(|g| g.0);
    assert_eq!(got, [(1, Outcome::Interrupted), (2, Outcome::Succeeded)]);
}

/// Overwrites 4 KiB in the middle of the file with pseudo-random bytes.
fn scribble(path: &Path, seed: u64) {
    let mut bytes = std::fs::read(path).expect("read");
    let mut x = seed | 1;
    let mid = (bytes.len() / 2) & !4095;
    for b in bytes.iter_mut().skip(mid).take(4096) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn a_corrupt_page_stops_the_agent_with_a_reason_not_a_panic() {
    let mut damaged = 0;
    for seed in 1..=6u64 {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = AgentStore::open(&store_path(dir.path())).expect("store");
            let tasks: Vec<TaskSpec> = (1..=2_000)
                .map(|i| {
                    sh_task(
                        i,
                        Schedule::at(now().saturating_add_ms(3_600_000)),
                        "true",
                        Policies::default(),
                    )
                })
                .collect();
            store.put_tasks(&tasks, Some(1)).expect("put");
        }
        scribble(&store_path(dir.path()), seed);
        for args in [&["status", "-o", "json"][..], &["run", "--standalone"][..]] {
            let mut cmd = Command::new(AGENT);
            cmd.args(&args[..1])
                .arg("--data-dir")
                .arg(dir.path())
                .args(&args[1..])
                .stdin(Stdio::null());
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn");
            // `run` on a store it can read just runs: give it a moment.
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let out = child.wait_with_output().expect("output");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_ne!(
                out.status.code(),
                Some(101),
                "seed {seed}, {args:?}: a panic:\n{err}"
            );
            if out.status.code() == Some(65) {
                damaged += 1;
                assert!(
                    err.contains("store file is damaged") && err.contains("join again"),
                    "seed {seed}, {args:?}: {err}"
                );
            }
        }
    }
    assert!(damaged > 0, "no seed damaged a page the agent reads");
}

#[test]
fn status_works_after_an_unclean_stop_and_leaves_the_store_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = AgentStore::open(&store_path(dir.path())).expect("store");
        let sched = Schedule::every(DurationMs(200), now()).expect("valid");
        store
            .put_task(&sh_task(1, sched, "true", Policies::default()), Some(1))
            .expect("put task");
    }
    let mut agent = start_agent(dir.path());
    wait_for("some runs", || {
        status_json(dir.path())["outbox_len"].as_u64() >= Some(3)
    });
    let mut child = agent.0.take().expect("running");
    child.kill().expect("SIGKILL the agent");
    child.wait().expect("reaped");
    let before = std::fs::read(store_path(dir.path())).expect("read store");
    let s = status_json(dir.path());
    assert_eq!(s["tasks"][0]["task_id"], "t1", "{s}");
    assert!(s["outbox_len"].as_u64() >= Some(3), "{s}");
    // A store killed open needs the repair the agent makes at its start.
    assert_eq!(s["store_needs_recovery"], true, "{s}");
    let after = std::fs::read(store_path(dir.path())).expect("read store");
    assert!(before == after, "status changed the store");
    // Asked for JSON, a failure is JSON too.
    let out = Command::new(AGENT)
        .args(["status", "-o", "json", "--data-dir"])
        .arg(dir.path().join("nope"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no agent data")),
        "{v}"
    );
}

#[test]
fn a_run_that_does_not_succeed_is_logged_as_a_warning() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("data");
    let agent = start_agent(&dir);
    wait_for("the store", || store_path(&dir).exists());
    stop(agent);
    {
        let store = AgentStore::open(&store_path(&dir)).expect("store");
        let sched = Schedule::every(DurationMs(500), now()).expect("valid");
        store
            .put_task(&sh_task(1, sched, "exit 3", Policies::default()), Some(1))
            .expect("put");
    }
    let agent = start_agent(&dir);
    let log = dir.with_extension("log");
    wait_for("a failed run logged", || {
        std::fs::read_to_string(&log).is_ok_and(|l| {
            l.lines()
                .any(|line| line.contains("WARN") && line.contains("did not succeed"))
        })
    });
    stop(agent);
    let text = std::fs::read_to_string(&log).expect("log");
    let failed = text
        .lines()
        .find(|l| l.contains("did not succeed"))
        .expect("the line");
    assert!(failed.contains("outcome=failed"), "{failed}");
}

#[test]
fn run_refuses_a_directory_nothing_joined_and_join_names_a_running_agent() {
    let root = tempfile::tempdir().expect("tempdir");
    // A mistyped path: refused, with the join command, and not created.
    let typo = root.path().join("agnet");
    let out = Command::new(AGENT)
        .args(["run", "--data-dir"])
        .arg(&typo)
        .output()
        .expect("runs");
    assert!(!out.status.success(), "ran on a path nothing joined");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not exist") && err.contains("sundial-agent join"),
        "{err}"
    );
    assert!(err.contains("--standalone"), "{err}");
    assert!(!typo.exists(), "the mistyped directory was created");
    // A directory with a store but no enrollment: refused the same way.
    let dir = root.path().join("agent");
    let first = start_agent(&dir);
    wait_for("the store", || store_path(&dir).exists());
    let out = Command::new(AGENT)
        .args(["run", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds no enrolled agent"), "{err}");
    // Joining the directory of a running agent: says so (before any network).
    let token = sundial_protocol::token::JoinToken {
        secret: vec![7; sundial_protocol::token::SECRET_BYTES],
        ca_sha256: [1; 32],
        server_name: "coordinator".into(),
        addresses: vec!["127.0.0.1:9".into()],
    }
    .encode();
    let out = Command::new(AGENT)
        .args(["join", "--token", &token, "--data-dir"])
        .arg(&dir)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("an agent is running with"), "{err}");
    stop(first);
}
