//! The fleet over real QUIC on loopback: enrollment, assignment, offline
//! firing across a partition, changes made while an agent is away, a
//! coordinator killed with SIGKILL, and acknowledgements lost after commit.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{join, sched_ms, wait_for, Agent, Coordinator, Link, Relay};

/// A coordinator, one agent dialling it through a relay, and a task running
/// `/bin/true` on that agent every `period`.
fn relayed_agent_with_task(period: &str) -> (tempfile::TempDir, Coordinator, Relay, Agent, String) {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let relay = Relay::start(coord.addr);
    let dir = root.path().join("a");
    let id = join(&relay.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let agent = Agent::start(&dir);
    // In session (and its clock vouched for) before the task exists: on a
    // busy machine a slow first session would otherwise make the first
    // occurrences of a fast task misfires, which is not what these tests are about.
    wait_for("the agent in session", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    let task = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        period,
        "--",
        "/bin/true",
    ]);
    (root, coord, relay, agent, task)
}

/// Every occurrence of an every-`period_ms` task between the first and the
/// last recorded one is there, and none twice.
fn each_once_without_gaps(times: &[i64], period_ms: i64) {
    let distinct: HashSet<i64> = times.iter().copied().collect();
    assert_eq!(distinct.len(), times.len(), "a run was stored twice");
    let first = times.iter().min().copied().unwrap_or(0);
    let last = times.iter().max().copied().unwrap_or(0);
    assert_eq!(
        ((last - first) / period_ms + 1) as usize,
        times.len(),
        "an occurrence is missing"
    );
}

#[test]
fn join_assign_fire_record_and_a_selector_reaches_a_later_agent() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let addr = coord.addr.to_string();
    let a_id = join(
        &addr,
        &coord.token(&["--label", "site=lab"]),
        &root.path().join("a"),
        "a",
        &[],
    )
    .expect("a joins");
    let mut a = Agent::start(&root.path().join("a"));
    let sel = coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "lab-echo",
        "--selector",
        "site=lab",
        "--every",
        "1s",
        "--",
        "/bin/echo",
        "hi",
    ]);
    let only_a = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &a_id,
        "--every",
        "1s",
        "--",
        "/bin/true",
    ]);
    wait_for("runs from a", || coord.runs(&["--task", &sel]).len() >= 2);

    // b joins later with a matching label (its own, not the token's).
    let b_id = join(
        &addr,
        &coord.token(&[]),
        &root.path().join("b"),
        "b",
        &[("site", "lab")],
    )
    .expect("b joins");
    let mut b = Agent::start(&root.path().join("b"));
    // Its first occurrence may be recorded skipped if the assignment reached
    // it after that occurrence's grace; the next ones run.
    let ran = |runs: Vec<serde_json::Value>| runs.into_iter().find(|r| r["outcome"] != "skipped");
    wait_for("a run from b", || {
        ran(coord.runs(&["--task", &sel, "--agent", &b_id])).is_some()
    });
    let run = ran(coord.runs(&["--task", &sel, "--agent", &b_id])).expect("a run");
    assert_eq!(run["outcome"], "succeeded");
    assert_eq!(run["stdout"], "hi\n");
    assert_eq!(run["offline"], false);
    // Occurrences from before b joined are not b's: none is recorded.
    let enrolled = sundial_protocol::Timestamp::parse(
        coord.json(&["agent", "get", &b_id])["enrolled_at"]
            .as_str()
            .expect("enrolled_at"),
    )
    .expect("RFC 3339")
    .as_millis();
    for r in coord.runs(&["--task", &sel, "--agent", &b_id]) {
        assert!(common::sched_ms(&r) >= enrolled, "{r}");
    }
    // The agent-targeted task never reaches b.
    std::thread::sleep(Duration::from_secs(2));
    assert!(coord
        .runs(&["--task", &only_a, "--agent", &b_id])
        .is_empty());
    assert!(!coord
        .runs(&["--task", &only_a, "--agent", &a_id])
        .is_empty());
    assert!(b.status().tasks.iter().all(|t| t.task_id != only_a));

    let agents = coord.json(&["agent", "list"]);
    let list = agents.as_array().expect("array");
    assert_eq!(list.len(), 2);
    for ag in list {
        for field in [
            "agent_id",
            "name",
            "labels",
            "online",
            "last_seen",
            "clock_offset_ms",
            "rtt_ms",
        ] {
            assert!(ag.get(field).is_some(), "agent list lacks {field}: {ag}");
        }
        assert_eq!(ag["online"], true);
    }
    a.stop();
    b.stop();
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn a_partitioned_agent_keeps_firing_and_every_run_arrives_once() {
    let (_root, coord, relay, mut agent, task) = relayed_agent_with_task("500ms");
    wait_for("online runs", || coord.runs(&["--task", &task]).len() >= 3);

    let cut_ms = wall_ms();
    relay.set(Link::DropBoth);
    // The coordinator notices the silence after its idle timeout; the agent
    // is recorded last seen when it was last heard, not when that was noticed.
    wait_for("the coordinator to see the agent offline", || {
        coord.json(&["agent", "list"])[0]["online"] == false
    });
    let noticed_ms = wall_ms();
    let last_seen = coord.json(&["agent", "list"])[0]["last_seen"]
        .as_str()
        .and_then(|t| sundial_protocol::Timestamp::parse(t).ok())
        .map(|t| t.as_millis())
        .expect("a last seen");
    assert!(
        last_seen <= noticed_ms - 4_000 && last_seen >= cut_ms - 6_000,
        "last seen {} ms after the cut, noticed {} ms after it",
        last_seen - cut_ms,
        noticed_ms - cut_ms
    );
    // Longer than the idle timeout, so the agent knows it is offline.
    std::thread::sleep(Duration::from_secs(10));
    let during = agent.status().outbox_len;
    assert!(during > 0, "nothing buffered while cut off");
    relay.set(Link::Pass);
    wait_for("the outbox to drain", || agent.status().outbox_len == 0);
    agent.stop();

    let runs = coord.runs(&["--task", &task]);
    let times: Vec<i64> = runs.iter().map(sched_ms).collect();
    each_once_without_gaps(&times, 500);
    let offline = runs.iter().filter(|r| r["offline"] == true).count();
    assert!(offline >= 4, "only {offline} runs marked offline");
    for r in &runs {
        assert_eq!(r["outcome"], "succeeded", "{r}");
        let late = r["lateness_ms"].as_i64().unwrap_or(i64::MAX);
        // Generous: on time is measured by the benchmarks; this catches a stall.
        assert!(late < 2_000, "a run started {late} ms late");
    }
}

#[test]
fn changes_made_while_an_agent_is_away_arrive_in_order() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let id = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    let mut agent = Agent::start(&dir);
    let t1 = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        "1s",
        "--",
        "/bin/true",
    ]);
    wait_for("t1 runs", || !coord.runs(&["--task", &t1]).is_empty());
    agent.stop();

    let t2 = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        "1s",
        "--",
        "/bin/echo",
        "two",
    ]);
    coord.ctl_ok(&["task", "cancel", &t1]);
    let t3 = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &id,
        "--at",
        "2099-01-01T00:00:00Z",
        "--",
        "/bin/true",
    ]);
    let back = sundial_coordinator::cli::now().as_millis();
    let mut agent = Agent::start(&dir);
    wait_for("t2 runs", || !coord.runs(&["--task", &t2]).is_empty());
    wait_for("the agent to drop t1", || {
        let ids: Vec<String> = agent
            .status()
            .tasks
            .iter()
            .map(|t| t.task_id.clone())
            .collect();
        ids == [t2.clone(), t3.clone()]
    });
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let late_t1 = coord
        .runs(&["--task", &t1])
        .iter()
        .filter(|r| sched_ms(r) > back + 1_000)
        .count();
    assert_eq!(late_t1, 0, "a cancelled task kept running");
    assert!(agent.status().last_revision >= 4);
}

#[test]
fn a_coordinator_killed_and_restarted_loses_nothing_and_agents_come_back() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let id = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
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
    wait_for("runs", || coord.runs(&["--task", &task]).len() >= 5);
    let before: HashSet<i64> = coord
        .runs(&["--task", &task])
        .iter()
        .map(sched_ms)
        .collect();
    coord.kill9();
    std::thread::sleep(Duration::from_secs(3));
    coord.restart();
    // The agent reconnects by itself and delivers what it fired meanwhile.
    wait_for("the agent back online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    wait_for("the outbox to drain", || agent.status().outbox_len == 0);
    agent.stop();
    let after: Vec<i64> = coord
        .runs(&["--task", &task])
        .iter()
        .map(sched_ms)
        .collect();
    let after_set: HashSet<i64> = after.iter().copied().collect();
    assert!(before.is_subset(&after_set), "an acknowledged run was lost");
    each_once_without_gaps(&after, 300);
    assert!(after.len() >= before.len() + 5);
}

#[test]
fn acks_lost_after_commit_are_resent_without_duplicates() {
    let (_root, coord, relay, mut agent, task) = relayed_agent_with_task("250ms");
    wait_for("runs", || coord.runs(&["--task", &task]).len() >= 3);

    // The coordinator keeps receiving and committing; its acks are lost.
    relay.set(Link::DropDown);
    let stored_before = coord.runs(&["--task", &task]).len();
    wait_for("commits whose acks are lost", || {
        coord.runs(&["--task", &task]).len() >= stored_before + 4
    });
    let committed_unacked = agent.status().outbox_len;
    assert!(
        committed_unacked > 0,
        "the agent deleted records without an ack"
    );
    std::thread::sleep(Duration::from_secs(12));
    relay.set(Link::Pass);
    wait_for("the outbox to drain", || agent.status().outbox_len == 0);
    agent.stop();
    let runs = coord.runs(&["--task", &task]);
    let times: Vec<i64> = runs.iter().map(sched_ms).collect();
    // Records the coordinator had committed but the agent never saw acked
    // (`committed_unacked` above) were resent and acknowledged: the outbox
    // drained, and each occurrence is stored once.
    each_once_without_gaps(&times, 250);
}

/// A run of `-o json` as (task, agent, scheduled_at).
fn run_id(r: &serde_json::Value) -> (String, String, String) {
    let field = |k: &str| r[k].as_str().expect(k).to_owned();
    (field("task_id"), field("agent_id"), field("scheduled_at"))
}

/// One page of `run list --page -o json` after `cursor` (arrival order when
/// it is an arrival cursor): the runs as (task, agent, scheduled_at), and
/// the cursor to go on from.
fn page_after(coord: &Coordinator, cursor: &str) -> (Vec<(String, String, String)>, String) {
    let mut args = vec!["run", "list", "--page", "--limit", "50", "--after", cursor];
    if cursor.starts_with("arrival.") {
        args.push("--arrival");
    }
    let p = coord.json(&args);
    let runs = p["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(run_id)
        .collect();
    let next = p["newer"].as_str().map_or(cursor.to_owned(), str::to_owned);
    (runs, next)
}

/// Follows from `cursor` until a page comes back empty.
fn follow(coord: &Coordinator, cursor: &mut String, seen: &mut Vec<(String, String, String)>) {
    loop {
        let (runs, next) = page_after(coord, cursor);
        *cursor = next;
        if runs.is_empty() {
            return;
        }
        seen.extend(runs);
    }
}

#[test]
fn a_consumer_in_arrival_order_gets_an_offline_agents_backlog_once() {
    // Agent `a` stays online; `b` is cut off and fires offline. A script
    // that follows runs by scheduled time passes b's backlog while it is
    // still on b; one that follows arrival order gets every run once.
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let relay = Relay::start(coord.addr);
    join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &root.path().join("a"),
        "a",
        &[],
    )
    .expect("a joins");
    join(
        &relay.addr.to_string(),
        &coord.token(&[]),
        &root.path().join("b"),
        "b",
        &[],
    )
    .expect("b joins");
    let mut a = Agent::start(&root.path().join("a"));
    let mut b = Agent::start(&root.path().join("b"));
    wait_for("both agents in session", || {
        coord
            .json(&["agent", "list"])
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|x| x["online"] == true))
    });
    // The arrival follower starts at the end of what is stored (nothing).
    let start = coord.json(&["run", "list", "--arrival", "--page"]);
    let mut arrival = start["newer"]
        .as_str()
        .expect("an arrival cursor")
        .to_owned();
    assert!(arrival.starts_with("arrival."), "{arrival}");
    for agent in ["a", "b"] {
        coord.ctl_ok(&[
            "task",
            "create",
            "--agent",
            agent,
            "--every",
            "400ms",
            "--",
            "/bin/true",
        ]);
    }
    wait_for("runs of both", || coord.runs(&[]).len() >= 6);
    // By time: from the first instant on (a cursor before every run).
    let mut by_time = "0.0.0.0".to_owned();
    let mut seen_arrival = Vec::new();
    let mut seen_time = Vec::new();
    follow(&coord, &mut arrival, &mut seen_arrival);
    follow(&coord, &mut by_time, &mut seen_time);

    relay.set(Link::DropBoth);
    wait_for("b offline", || {
        coord
            .json(&["agent", "list"])
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x["name"] == "b" && x["online"] == false))
    });
    // Both followers keep reading while b buffers.
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(500));
        follow(&coord, &mut arrival, &mut seen_arrival);
        follow(&coord, &mut by_time, &mut seen_time);
    }
    assert!(b.status().outbox_len > 0, "b buffered nothing");
    relay.set(Link::Pass);
    wait_for("b's backlog to sync", || b.status().outbox_len == 0);
    a.stop();
    b.stop();
    follow(&coord, &mut arrival, &mut seen_arrival);
    follow(&coord, &mut by_time, &mut seen_time);

    // Every run stored after the followers started, from the store itself.
    let stored: HashSet<(String, String, String)> = coord.runs(&[]).iter().map(run_id).collect();
    let got: HashSet<_> = seen_arrival.iter().cloned().collect();
    assert_eq!(got.len(), seen_arrival.len(), "a run was read twice");
    assert_eq!(got, stored, "arrival order missed runs");
    // `--arrival --follow` from the first run: the same runs, once each.
    let mut child = std::process::Command::new(common::CTL)
        .args([
            "run",
            "list",
            "--arrival",
            "--follow",
            "--after",
            "arrival.0.0",
            "--limit",
            "7",
            "-o",
            "json",
        ])
        .env("SUNDIAL_CREDS", coord.creds())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sundialctl runs");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut followed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while followed.len() < stored.len() && std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            let r: serde_json::Value = serde_json::from_str(&line).expect("a JSON run per line");
            followed.push(run_id(&r));
        }
    }
    // Nothing more comes: a poll or two later, still the same.
    std::thread::sleep(Duration::from_millis(2_500));
    while let Ok(line) = rx.try_recv() {
        followed.push(("extra".into(), line, String::new()));
    }
    let _ = child.kill();
    let _ = child.wait();
    let followed_set: HashSet<_> = followed.iter().cloned().collect();
    assert_eq!(followed_set.len(), followed.len(), "a run followed twice");
    assert_eq!(
        followed_set, stored,
        "--arrival --follow missed or added runs"
    );
    let by_time: HashSet<_> = seen_time.iter().cloned().collect();
    eprintln!(
        "stored {}; followed by scheduled time: {}; in arrival order: {}",
        stored.len(),
        by_time.len(),
        got.len()
    );
    assert!(
        by_time.len() < stored.len(),
        "the time-order follower was expected to pass b's backlog: {} of {}",
        by_time.len(),
        stored.len()
    );
}
