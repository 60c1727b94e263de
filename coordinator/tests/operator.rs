//! The operator's day, through `sundialctl` as a person types it: names
//! wherever ids go, tasks described and listed with their next and last
//! runs, runs that say why they failed, pause and resume, tokens listed and
//! revoked, revoked agents forgotten, and the fleet shown with versions,
//! backlogs and allowlists.

mod common;

use std::time::Duration;

use common::{join, sched_ms, wait_for, Agent, Coordinator};

#[test]
fn tasks_are_described_listed_and_named_and_failed_runs_say_why() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let mut agent = coord.agent(&dir, "edge-1");
    // Named wherever an id goes: the agent by its name.
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "nightly-backup",
        "--agent",
        "edge-1",
        "--every",
        "1s",
        "--env",
        "TASK_SECRET=hunter2",
        "--",
        "/bin/sh",
        "-c",
        "echo working; echo 'disk full' >&2; exit 3",
    ]);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "hello",
        "--selector",
        "site=lab",
        "--at",
        "+1s",
        "--",
        "/bin/echo",
        "hello world",
    ]);
    wait_for("failed runs", || {
        coord
            .runs(&["--task", "nightly-backup"])
            .iter()
            .any(|r| r["outcome"] == "failed")
    });
    wait_for("the one-shot to be done", || {
        coord.json(&["task", "get", "hello"])["state"] == "done"
    });

    // `task get` describes: quoted command, environment names (not values),
    // retries, the agents reached, the next occurrence, the last run and why.
    let text = coord.ctl_ok(&["task", "get", "nightly-backup"]);
    for want in [
        "nightly-backup",
        "/bin/sh -c 'echo working; echo '\\''disk full'\\'' >&2; exit 3'",
        "Environment:  TASK_SECRET",
        "Agents:",
        "edge-1",
        "Next:",
        "exit 3: disk full",
    ] {
        assert!(text.contains(want), "`{want}` missing from:\n{text}");
    }
    assert!(!text.contains("hunter2"), "an environment value was shown");
    let json = coord.json(&["task", "get", "nightly-backup"]);
    assert_eq!(json["state"], "active");
    assert!(json["next"].is_string());
    assert_eq!(json["last_runs"][0]["outcome"], "failed");

    // `task list` shows NEXT and LAST; a one-shot run everywhere is done.
    let list = coord.ctl_ok(&["task", "list"]);
    assert!(list.contains("NEXT") && list.contains("LAST"), "{list}");
    let hello_line = list
        .lines()
        .find(|l| l.contains("hello"))
        .expect("hello listed");
    assert!(hello_line.contains("done"), "{hello_line}");
    assert!(hello_line.contains("succeeded"), "{hello_line}");

    // `run list` says why in the table, by names; wide shows it whole.
    let runs = coord.ctl_ok(&[
        "run",
        "list",
        "--agent",
        "edge-1",
        "--task",
        "nightly-backup",
    ]);
    assert!(
        runs.contains("DETAIL") && runs.contains("TOOK MS"),
        "{runs}"
    );
    assert!(runs.contains("exit 3: disk full"), "{runs}");
    assert!(
        runs.contains("(nightly-backup)") && runs.contains("(edge-1)"),
        "{runs}"
    );
    assert!(coord
        .ctl_ok(&["run", "list", "-o", "wide"])
        .contains("exit 3: disk full"));
    let (ok, _, err) = coord.ctl(&["task", "get", "no-such-task"]);
    assert!(!ok && err.contains("no task with id or name"), "{err}");

    // Several cancelled at once, by name and id.
    let extra = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        "edge-1",
        "--at",
        "+1h",
        "--",
        "/bin/true",
    ]);
    let out = coord.ctl_ok(&["task", "cancel", "nightly-backup", &extra]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert_eq!(coord.json(&["task", "get", &extra])["state"], "cancelled");
    agent.stop();
}

#[test]
fn a_paused_task_runs_nothing_and_records_nothing_until_resumed() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let mut agent = Agent::start(&dir);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "tick",
        "--agent",
        "a",
        "--every",
        "300ms",
        "--",
        "/bin/true",
    ]);
    wait_for("runs", || coord.runs(&["--task", "tick"]).len() >= 3);
    let created = coord.json(&["task", "get", "tick"])["created_at"].clone();
    assert!(created.is_string(), "created_at: {created}");
    assert_eq!(
        coord.json(&["task", "get", "tick"])["counts_from"],
        created,
        "a task never resumed counts from its creation"
    );
    coord.ctl_ok(&["task", "pause", "tick"]);
    let paused_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    assert_eq!(coord.json(&["task", "get", "tick"])["state"], "paused");
    // Let the pause reach the agent, then watch a quiet stretch.
    std::thread::sleep(Duration::from_secs(1));
    let before = coord.runs(&["--task", "tick"]).len();
    std::thread::sleep(Duration::from_secs(2));
    let during = coord.runs(&["--task", "tick"]).len();
    assert_eq!(before, during, "a paused task ran or recorded runs");
    coord.ctl_ok(&["task", "resume", "tick"]);
    let resumed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    wait_for("runs again", || {
        coord.runs(&["--task", "tick"]).len() >= during + 2
    });
    // Nothing recorded for the paused stretch (skipped or otherwise).
    let gap: Vec<_> = coord
        .runs(&["--task", "tick"])
        .into_iter()
        .filter(|r| sched_ms(r) > paused_at + 1_000 && sched_ms(r) < resumed - 1_000)
        .collect();
    assert!(gap.is_empty(), "runs recorded while paused: {gap:?}");
    // The resume moved what the task counts from, not when it was created.
    let after = coord.json(&["task", "get", "tick"]);
    assert_eq!(after["created_at"], created, "resume moved created_at");
    let counts_from = after["counts_from"].as_str().expect("counts_from");
    let counts_from_ms = sundial_protocol::Timestamp::parse(counts_from)
        .expect("RFC 3339")
        .as_millis();
    assert!(
        counts_from_ms >= paused_at && counts_from_ms <= resumed + 1_000,
        "counts from {counts_from}, resumed at {resumed} ms"
    );
    let listed = coord.json(&["task", "list"]);
    let listed = listed
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == "tick")
        .expect("listed")
        .clone();
    assert_eq!(listed["created_at"], created);
    assert!(coord
        .ctl_ok(&["task", "get", "tick"])
        .contains("Counts from:"));
    agent.stop();
}

#[test]
fn tokens_are_listed_and_revoked_and_revoked_agents_forgotten() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let keep = coord.token(&["--label", "site=lab"]);
    let _other = coord.token(&[]);
    let tokens = coord.json(&["token", "list"]);
    let tokens = tokens.as_array().expect("array");
    assert_eq!(tokens.len(), 2);
    assert!(!serde_json::to_string(tokens).expect("json").contains(&keep));
    let lab = tokens
        .iter()
        .find(|t| t["labels"]["site"] == "lab")
        .expect("the labelled token");
    coord.ctl_ok(&["token", "revoke", lab["id"].as_str().expect("id")]);
    let err = join(
        &coord.addr.to_string(),
        &keep,
        &root.path().join("x"),
        "x",
        &[],
    )
    .expect_err("a revoked token is refused");
    assert!(err.contains("unknown join token"), "{err}");
    assert_eq!(
        coord.json(&["token", "list"]).as_array().map(Vec::len),
        Some(1)
    );

    // The fleet view: version, backlog, allowlist; then revoke and forget.
    let dir = root.path().join("a");
    let id = join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &dir,
        "edge-9",
        &[],
    )
    .expect("joins");
    let mut agent = Agent::start(&dir);
    coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        "edge-9",
        "--every",
        "500ms",
        "--",
        "/bin/true",
    ]);
    wait_for("a run", || !coord.runs(&["--agent", "edge-9"]).is_empty());
    let a = coord.json(&["agent", "get", "edge-9"]);
    assert_eq!(a["version"], env!("CARGO_PKG_VERSION"));
    assert!(a["allow_exec"]
        .as_array()
        .is_some_and(|l| l.iter().any(|p| p == "/bin/true")));
    assert!(a["outbox_len"].is_u64());
    let table = coord.ctl_ok(&["agent", "list"]);
    assert!(
        table.contains("VERSION") && table.contains("ALLOW EXEC"),
        "{table}"
    );
    let (ok, _, err) = coord.ctl(&["agent", "forget", "edge-9"]);
    assert!(!ok && err.contains("revoke it first"), "{err}");
    coord.ctl_ok(&["agent", "revoke", "edge-9"]);
    agent.stop();
    coord.ctl_ok(&["agent", "forget", &id]);
    assert!(coord
        .json(&["agent", "list"])
        .as_array()
        .is_some_and(Vec::is_empty));
    assert!(!coord.runs(&["--agent", &id]).is_empty(), "its runs stay");
}

#[test]
fn a_cut_is_known_within_seconds_on_both_sides() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let relay = common::Relay::start(coord.addr);
    let dir = root.path().join("a");
    join(&relay.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let mut agent = Agent::start(&dir);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "t",
        "--agent",
        "a",
        "--every",
        "300ms",
        "--",
        "/bin/true",
    ]);
    wait_for("runs", || coord.runs(&["--task", "t"]).len() >= 3);
    relay.set(common::Link::DropBoth);
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    // The coordinator shows it offline after its idle timeout (5 s), not 12.
    let started = std::time::Instant::now();
    wait_for("the agent shown offline", || {
        coord.json(&["agent", "get", "a"])["online"] == false
    });
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shown offline only after {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));
    relay.set(common::Link::Pass);
    wait_for("runs from the cut synced", || {
        coord
            .runs(&["--task", "t"])
            .iter()
            .any(|r| sched_ms(r) > cut + 6_000)
    });
    // Runs fired 4 s into the cut (past the 2.5 s of silence, before the
    // 5 s idle timeout) say offline; with a margin for a busy machine.
    let runs = coord.runs(&["--task", "t"]);
    let in_cut: Vec<_> = runs
        .iter()
        .filter(|r| sched_ms(r) > cut + 4_000 && sched_ms(r) < cut + 6_000)
        .collect();
    assert!(!in_cut.is_empty());
    for r in in_cut {
        assert_eq!(r["offline"], true, "{r}");
    }
    agent.stop();
}

#[test]
fn a_retry_is_late_only_against_its_own_due_time() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let mut agent = Agent::start(&dir);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "flaky",
        "--agent",
        "a",
        "--at",
        "+1s",
        "--retries",
        "1",
        "--backoff",
        "3s",
        "--",
        "/bin/sh",
        "-c",
        "exit 1",
    ]);
    wait_for("the retry", || coord.runs(&["--task", "flaky"]).len() == 2);
    let runs = coord.runs(&["--task", "flaky"]);
    let retry = runs.iter().find(|r| r["attempt"] == 2).expect("attempt 2");
    // Measured from the occurrence it would be over 3 s: the backoff.
    let late = retry["lateness_ms"].as_i64().expect("lateness");
    assert!(
        late < 2_500,
        "a retry {late} ms late against its own due time"
    );
    let table = coord.ctl_ok(&["run", "list", "--task", "flaky"]);
    assert!(table.contains("ATTEMPT"), "{table}");
    agent.stop();
}

#[test]
fn a_task_is_updated_in_place_and_run_now_on_demand() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let mut agent = Agent::start(&dir);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "say",
        "--agent",
        "a",
        "--every",
        "500ms",
        "--",
        "/bin/echo",
        "before",
    ]);
    wait_for("a run", || !coord.runs(&["--task", "say"]).is_empty());
    let out = coord.ctl_ok(&[
        "task",
        "update",
        "say",
        "--retries",
        "2",
        "--",
        "/bin/echo",
        "after",
    ]);
    assert!(out.contains("revision"), "{out}");
    let t = coord.json(&["task", "get", "say"]);
    assert_eq!(t["args"][0], "after");
    assert_eq!(t["retries"], 2);
    assert_eq!(
        t["schedule"].as_str().map(|s| s.starts_with("every 500ms")),
        Some(true)
    );
    wait_for("runs of the new revision", || {
        coord
            .runs(&["--task", "say"])
            .iter()
            .any(|r| r["stdout"] == "after\n")
    });
    let (ok, _, err) = coord.ctl(&["task", "update", "say"]);
    assert!(!ok && err.contains("nothing to change"), "{err}");

    // Run now: a one-shot far in the future runs at once, marked as asked.
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "later",
        "--agent",
        "a",
        "--at",
        "2099-01-01",
        "--",
        "/bin/echo",
        "now",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let out = coord.ctl_ok(&["task", "run-now", "later"]);
    assert!(out.contains("1 agent"), "{out}");
    wait_for("the run-now run", || {
        !coord.runs(&["--task", "later"]).is_empty()
    });
    let runs = coord.runs(&["--task", "later"]);
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["outcome"], "succeeded");
    assert!(runs[0]["detail"]
        .as_str()
        .is_some_and(|d| d.contains("run now")));
    // Still due in 2099: the extra run did not use up the occurrence.
    assert_eq!(coord.json(&["task", "get", "later"])["state"], "active");
    agent.stop();
}

#[test]
fn a_one_shot_at_now_runs_once() {
    // `--at now` is resolved on the operator's clock, a moment before the
    // coordinator stamps the task: it must still run, once.
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let mut agent = Agent::start(&dir);
    for (name, at) in [("now", "now"), ("zero", "+0s")] {
        coord.ctl_ok(&[
            "task",
            "create",
            "--name",
            name,
            "--agent",
            "a",
            "--at",
            at,
            "--",
            "/bin/true",
        ]);
    }
    // A minute-old instant is refused with the hint, not accepted silently.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let past = sundial_protocol::Timestamp::from_millis_saturating(now_ms - 60_000).to_string();
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        "a",
        "--at",
        &past,
        "--",
        "/bin/true",
    ]);
    assert!(!ok && err.contains("in the past"), "{err}");
    for name in ["now", "zero"] {
        wait_for(&format!("the run of --at {name}"), || {
            coord.runs(&["--task", name]).len() == 1
        });
    }
    std::thread::sleep(Duration::from_millis(1_500));
    for name in ["now", "zero"] {
        let runs = coord.runs(&["--task", name]);
        assert_eq!(runs.len(), 1, "{name}: {runs:?}");
        assert_eq!(runs[0]["outcome"], "succeeded", "{name}: {runs:?}");
    }
    agent.stop();
}

#[test]
fn status_shows_the_fleet_at_a_glance() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let mut agents = Vec::new();
    for name in ["edge-1", "edge-2"] {
        let dir = root.path().join(name);
        join(
            &coord.addr.to_string(),
            &coord.token(&[]),
            &dir,
            name,
            &[("site", "lab")],
        )
        .expect("joins");
        agents.push(Agent::start(&dir));
    }
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "good",
        "--agent",
        "edge-1",
        "--every",
        "1s",
        "--",
        "/bin/true",
    ]);
    coord.ctl_ok(&[
        "task", "create", "--name", "broken", "--agent", "edge-1", "--every", "1s", "--",
        "/bin/sh", "-c", "exit 7",
    ]);
    wait_for("a failed and a good run", || {
        let runs = coord.runs(&[]);
        ["failed", "succeeded"]
            .iter()
            .all(|o| runs.iter().any(|r| r["outcome"] == *o))
    });
    agents[1].stop();
    wait_for("edge-2 offline", || {
        coord.json(&["status"])["agents"]["offline"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    let s = coord.json(&["status"]);
    assert_eq!(s["agents"]["online"], 1, "{s:#}");
    assert_eq!(s["agents"]["offline"][0], "a2", "{s:#}");
    assert!(s["runs"]["failed"].as_u64() > Some(0), "{s:#}");
    assert!(s["runs"]["succeeded"].as_u64() > Some(0), "{s:#}");
    let failing = s["failing_tasks"].as_array().expect("a list");
    assert_eq!(failing.len(), 1, "{s:#}");
    assert_eq!(failing[0]["task_name"], "broken");
    assert_eq!(failing[0]["last_why"], "exit 7");
    // run list --outcome: only those, the latest N of them.
    let failed = coord.json(&[
        "run",
        "list",
        "--outcome",
        "failed,timed_out",
        "--limit",
        "2",
    ]);
    let failed = failed.as_array().expect("a list");
    assert_eq!(failed.len(), 2, "{failed:?}");
    assert!(failed.iter().all(|r| r["outcome"] == "failed"));
    let all_failed = coord
        .runs(&[])
        .into_iter()
        .filter(|r| r["outcome"] == "failed")
        .count();
    let every = coord.json(&["run", "list", "--outcome", "failed", "--limit", "10000"]);
    assert!(every.as_array().is_some_and(|a| a.len() >= all_failed));
    let (ok, _, err) = coord.ctl(&["run", "list", "--outcome", "broken"]);
    assert!(!ok && err.contains("not an outcome"), "{err}");
    let text = coord.ctl_ok(&["status"]);
    assert!(text.contains("1 online, 1 offline"), "{text}");
    assert!(text.contains("offline: edge-2"), "{text}");
    assert!(text.contains("failing   broken (t2)"), "{text}");
}

#[test]
fn run_list_follow_prints_runs_as_they_are_stored_once_each() {
    use std::io::BufRead;
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let _agent = coord.agent(&dir, "edge-1");
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "tick",
        "--agent",
        "edge-1",
        "--every",
        "500ms",
        "--",
        "/bin/true",
    ]);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "other",
        "--agent",
        "edge-1",
        "--every",
        "500ms",
        "--",
        "/bin/true",
    ]);
    wait_for("a first run", || {
        !coord.runs(&["--task", "tick"]).is_empty()
    });
    let mut child = std::process::Command::new(common::CTL)
        .args([
            "run", "list", "--follow", "--task", "tick", "--limit", "1", "-o", "json",
        ])
        .env("SUNDIAL_CREDS", coord.creds())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sundialctl follows");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The latest run, then runs pushed as they are stored: ten in all.
    let mut lines = Vec::new();
    while lines.len() < 10 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("the follow printed only {} lines: {lines:?}", lines.len()),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let runs: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(runs.iter().all(|r| r["task_name"] == "tick"), "{runs:?}");
    let keys: std::collections::BTreeSet<(String, i64)> = runs
        .iter()
        .map(|r| {
            (
                r["scheduled_at"].as_str().unwrap_or("").to_owned(),
                r["attempt"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(keys.len(), runs.len(), "a run printed twice: {runs:?}");
    // In the order they were stored: scheduled times rise.
    let times: Vec<&str> = runs
        .iter()
        .filter_map(|r| r["scheduled_at"].as_str())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
}

#[test]
fn run_get_shows_a_whole_run_with_its_output() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let _agent = coord.agent(&dir, "edge-1");
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "hello",
        "--agent",
        "edge-1",
        "--at",
        "now",
        "--",
        "/bin/sh",
        "-c",
        "echo hello; echo oops >&2; exit 2",
    ]);
    wait_for("the run stored", || {
        !coord.runs(&["--task", "hello"]).is_empty()
    });
    let r = &coord.runs(&["--task", "hello"])[0];
    let id = format!(
        "{}/{}/{}/{}",
        r["task_id"].as_str().unwrap_or(""),
        r["agent_id"].as_str().unwrap_or(""),
        r["scheduled_at"].as_str().unwrap_or(""),
        r["attempt"]
    );
    let text = coord.ctl_ok(&["run", "get", &id]);
    for want in [
        "outcome    failed",
        "exit code  2",
        "--- stdout (6 bytes kept) ---\nhello",
        "--- stderr (5 bytes kept) ---\noops",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    // By names, without the attempt; and as JSON.
    let by_name = format!("hello/edge-1/{}", r["scheduled_at"].as_str().unwrap_or(""));
    let v = coord.json(&["run", "get", &by_name]);
    assert_eq!(v["stdout"], "hello\n");
    assert_eq!(v["outcome"], "failed");
    // Bad or unknown runs say so.
    let (ok, _, err) = coord.ctl(&["run", "get", "hello/edge-1"]);
    assert!(!ok && err.contains("TASK/AGENT/SCHEDULED_AT"), "{err}");
    let (ok, _, err) = coord.ctl(&["run", "get", "hello/edge-1/2020-01-01T00:00:00Z"]);
    assert!(!ok && err.contains("no run"), "{err}");
}

#[test]
fn task_create_warns_of_a_program_the_agent_refuses_and_of_an_offline_target() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let mut online = coord.agent(&root.path().join("edge-1"), "edge-1");
    wait_for("edge-1 online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    // edge-1 allows /bin/sh, /bin/echo and /bin/true (as it joined).
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        "edge-1",
        "--every",
        "1h",
        "--",
        "/usr/bin/backup",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("edge-1 (a1)") && err.contains("does not allow `/usr/bin/backup`"),
        "{err}"
    );
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        "edge-1",
        "--every",
        "1h",
        "--",
        "/bin/echo",
        "hi",
    ]);
    assert!(ok, "{err}");
    assert!(
        !err.contains("does not allow") && !err.contains("offline"),
        "{err}"
    );
    // An environment variable the agent would refuse (by the patterns its
    // Hello told: none here beyond the defaults), and one it allows.
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        "edge-1",
        "--every",
        "1h",
        "--env",
        "DB_URL=x",
        "--env",
        "TZ=UTC",
        "--env",
        "LD_PRELOAD=/x.so",
        "--",
        "/bin/true",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("edge-1 (a1) [DB_URL, LD_PRELOAD] does not allow the environment variables"),
        "{err}"
    );
    let listed = coord.json(&["agent", "get", "edge-1"]);
    assert_eq!(listed["allow_env"], serde_json::json!([]), "{listed}");
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        "edge-1",
        "--every",
        "1h",
        "--env",
        "TASK_MODE=fast",
        "--env",
        "LC_ALL=C",
        "--",
        "/bin/true",
    ]);
    assert!(ok, "{err}");
    assert!(!err.contains("environment"), "{err}");
    // Offline: said so, and what happens to what is due meanwhile.
    online.stop();
    wait_for("edge-1 offline", || {
        coord.json(&["agent", "list"])[0]["online"] == false
    });
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--selector",
        "site=lab",
        "--every",
        "1h",
        "--",
        "/bin/true",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("edge-1 (a1) is offline now") && err.contains("misfire policy"),
        "{err}"
    );
}

#[test]
fn retiring_an_agent_waits_for_its_outbox_then_revokes_it_and_it_fires_nothing_more() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start_with(root.path(), &["--agent-report-every", "1s"]);
    let dir = root.path().join("edge-1");
    let _agent = coord.agent(&dir, "edge-1");
    wait_for("edge-1 online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "tick",
        "--agent",
        "edge-1",
        "--every",
        "500ms",
        "--",
        "/bin/true",
    ]);
    wait_for("some runs", || coord.runs(&[]).len() >= 3);
    let (ok, out, err) = coord.ctl(&["agent", "retire", "edge-1", "--wait", "60s"]);
    assert!(ok, "{err}");
    assert!(out.contains("retired a1"), "{out}");
    assert!(err.contains("cancelled"), "{err}");
    let listed = coord.json(&["agent", "list"]);
    assert_eq!(listed[0]["revoked"], true, "{listed}");
    // Every run it made is stored: its outbox was empty when revoked, and
    // a revoked agent fires nothing more, so its outbox stays empty.
    let stored = coord.runs(&[]).len();
    std::thread::sleep(Duration::from_secs(2));
    let status = sundial_agent::status::read(&dir).expect("status");
    assert_eq!(
        status.outbox_len, 0,
        "records left behind or made after revocation"
    );
    assert_eq!(coord.runs(&[]).len(), stored);
    // Retiring it again says so.
    let (ok, _, err) = coord.ctl(&["agent", "retire", "edge-1"]);
    assert!(!ok && err.contains("revoked already"), "{err}");
}

#[test]
fn task_get_says_when_every_run_so_far_was_rejected() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let mut agent = coord.agent(&root.path().join("edge-1"), "edge-1");
    wait_for("edge-1 online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    for (name, program) in [("refused", "/usr/bin/backup"), ("fine", "/bin/true")] {
        coord.ctl_ok(&[
            "task", "create", "--name", name, "--agent", "edge-1", "--every", "300ms", "--",
            program,
        ]);
    }
    wait_for("runs of both", || {
        coord.runs(&["--task", "refused"]).len() >= 2 && coord.runs(&["--task", "fine"]).len() >= 2
    });
    let refused = coord.json(&["task", "get", "refused"]);
    assert!(
        refused["only_rejected"].as_u64().is_some_and(|n| n >= 2),
        "{refused}"
    );
    let text = coord.ctl_ok(&["task", "get", "refused"]);
    assert!(
        text.contains("runs so far were rejected: the agents refuse it")
            && text.contains("/usr/bin/backup"),
        "{text}"
    );
    let fine = coord.json(&["task", "get", "fine"]);
    assert!(fine["only_rejected"].is_null(), "{fine}");
    assert!(!coord.ctl_ok(&["task", "get", "fine"]).contains("Warning"));
    agent.stop();
}
