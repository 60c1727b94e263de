//! Triggered tasks over real QUIC: a backup → upload → notify chain with a
//! failure branch keeps deciding on the device while the link is cut, and
//! the coordinator refuses what could not hold offline.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::Value;

/// (task id, scheduled_at ms) → (outcome, offline, attempt) of each record.
fn by_occurrence(coord: &Coordinator) -> HashMap<(String, i64), Vec<(String, bool)>> {
    let mut out: HashMap<(String, i64), Vec<(String, bool)>> = HashMap::new();
    for r in coord.runs(&[]) {
        let task = r["task_id"].as_str().unwrap_or_default().to_owned();
        out.entry((task, sched_ms(&r))).or_default().push((
            r["outcome"].as_str().unwrap_or_default().to_owned(),
            r["offline"] == Value::Bool(true),
        ));
    }
    out
}

#[test]
fn a_chain_with_a_failure_branch_fires_once_per_occurrence_through_a_partition() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let relay = Relay::start(coord.addr);
    let dir = root.path().join("a");
    let id = join(
        &relay.addr.to_string(),
        &coord.token(&[]),
        &dir,
        "edge",
        &[("site", "lab")],
    )
    .expect("joins");
    let _agent = Agent::start(&dir);
    wait_for("the agent in session", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    // The backup fails on every third occurrence (by its own instant).
    let backup = coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "backup",
        "--agent",
        &id,
        "--every",
        "1s",
        "--",
        "/bin/sh",
        "-c",
        "test $(( SUNDIAL_SCHEDULED_AT_MS / 1000 % 3 )) != 0",
    ]);
    // No target given: each takes its upstream's.
    let upload = coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "upload",
        "--after",
        "backup",
        "--",
        "/bin/true",
    ]);
    let alert = coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "alert",
        "--after",
        "backup:failed",
        "--",
        "/bin/true",
    ]);
    let notify = coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "notify",
        "--after",
        "upload:any",
        "--",
        "/bin/true",
    ]);
    // task get shows the chain both ways.
    let got = coord.json(&["task", "get", "upload"]);
    assert_eq!(got["after"][0]["task_id"], Value::String(backup.clone()));
    assert_eq!(got["after"][0]["on"], "succeeded");
    assert_eq!(got["triggers"], serde_json::json!([notify.clone()]));
    assert_eq!(got["target"]["agent"], Value::String(id.clone()));

    std::thread::sleep(std::time::Duration::from_secs(3));
    relay.set(Link::DropBoth);
    wait_for("the agent offline", || {
        coord.json(&["agent", "list"])[0]["online"] == false
    });
    std::thread::sleep(std::time::Duration::from_secs(4));
    relay.set(Link::Pass);
    wait_for("the agent back", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    // Cancelling the backup says what it leaves without a trigger.
    let (ok, _, err) = coord.ctl(&["task", "cancel", "backup"]);
    assert!(ok, "{err}");
    assert!(err.contains("will not fire again"), "{err}");
    assert!(err.contains(&upload) && err.contains(&alert), "{err}");
    // Everything decided reaches the coordinator.
    wait_for("the outbox drained", || {
        coord.json(&["agent", "list"])[0]["report"]["outbox_len"] == 0
    });

    let runs = by_occurrence(&coord);
    // Triggered tasks count from when the agent holds them: backups from a
    // moment after the last one was created.
    let created = sundial_protocol::Timestamp::parse(
        coord.json(&["task", "get", &notify])["created_at"]
            .as_str()
            .expect("created_at"),
    )
    .expect("RFC 3339")
    .as_millis();
    let backups: Vec<i64> = runs
        .keys()
        .filter(|(t, s)| *t == backup && *s > created + 1_000)
        .map(|(_, s)| *s)
        .collect();
    assert!(backups.len() >= 6, "backups ran: {}", backups.len());
    let mut offline_triggered = 0;
    let mut failed_seen = 0;
    for s in &backups {
        let b = &runs[&(backup.clone(), *s)];
        assert_eq!(b.len(), 1, "backup@{s} recorded {b:?}");
        failed_seen += usize::from(b[0].0 == "failed");
        let one = |task: &str| -> (String, bool) {
            let r = runs
                .get(&(task.to_owned(), *s))
                .unwrap_or_else(|| panic!("{task}@{s}: no record (backup {})", b[0].0));
            assert_eq!(r.len(), 1, "{task}@{s} recorded {r:?}");
            r[0].clone()
        };
        let (u, u_off) = one(&upload);
        let (a, _) = one(&alert);
        let (n, _) = one(&notify);
        let want = match b[0].0.as_str() {
            "succeeded" => ("succeeded", "skipped"),
            "failed" => ("skipped", "succeeded"),
            // Skipped (a machine too busy to start it within its grace):
            // neither waits for that.
            _ => ("skipped", "skipped"),
        };
        assert_eq!((u.as_str(), a.as_str()), want, "@{s}: backup {}", b[0].0);
        // `any`: after a run or a skip of the upload alike.
        assert_eq!(n, "succeeded", "notify@{s}");
        offline_triggered += usize::from(u_off && u == "succeeded");
    }
    assert!(failed_seen > 0, "the failure branch was exercised");
    assert!(
        offline_triggered > 0,
        "some uploads were triggered while the link was cut"
    );
    // Nothing triggered without its upstream's occurrence.
    let all: HashSet<i64> = runs
        .keys()
        .filter(|(t, _)| *t == backup)
        .map(|(_, s)| *s)
        .collect();
    for ((task, s), _) in runs.iter() {
        assert!(
            all.contains(s),
            "{task}@{s} has no backup of its occurrence"
        );
    }
}

#[test]
fn what_cannot_hold_offline_is_refused_at_create() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir_a = root.path().join("a");
    let dir_b = root.path().join("b");
    let a = join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &dir_a,
        "a",
        &[("site", "north")],
    )
    .expect("joins");
    let b = join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &dir_b,
        "b",
        &[("site", "south")],
    )
    .expect("joins");
    let every = |name: &str, target: &[&str], period: &str| {
        let mut args = vec!["task", "create", "--name", name];
        args.extend_from_slice(target);
        args.extend_from_slice(&["--every", period, "--", "/bin/true"]);
        coord.ctl_ok(&args)
    };
    every("on-a", &["--agent", &a], "1m");
    every("also-on-a", &["--agent", &a], "5m");
    every("north", &["--selector", "site=north"], "1m");
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["task", "create"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--", "/bin/true"]);
        let (ok, _, err) = coord.ctl(&all);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(&["--after", "nosuch"], "no task");
    refused(&["--after", "t99"], "no task t99");
    refused(&["--agent", &b, "--after", "on-a"], "same agents");
    // A selector reaches agents the upstream on one agent does not.
    refused(
        &["--selector", "site=north", "--after", "on-a"],
        "same agents",
    );
    refused(
        &["--after", "on-a", "--after", "also-on-a"],
        "do not share their occurrences",
    );
    refused(&["--after", "on-a:sometimes"], "not an outcome");
    refused(&["--after", "on-a", "--every", "1m"], "cannot be used with");
    // An agent the upstream's selector matches may run after it.
    let ok = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &a,
        "--after",
        "north",
        "--",
        "/bin/true",
    ]);
    assert!(ok.starts_with('t'), "{ok}");
    // A cancelled upstream triggers nothing.
    coord.ctl_ok(&["task", "cancel", "also-on-a"]);
    refused(&["--after", "also-on-a"], "cancelled");
}
