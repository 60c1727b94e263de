//! The coordinator seen by a real Prometheus: Debian's `prometheus` scrapes
//! `serve --http` while a fleet on this machine runs tasks that succeed,
//! fail, time out and are skipped; Prometheus's HTTP API must report the
//! same counts as `sundialctl run list`. `promtool check metrics` passes on
//! the exposition, and `promtool test rules` on the alert rules.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_for, Agent, Coordinator};
use serde_json::Value;

/// Whether Prometheus and promtool are here; under CI their absence fails.
fn prometheus_available() -> bool {
    let found = ["prometheus", "promtool"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must install Prometheus (Debian package prometheus) for the metrics tests");
    }
    eprintln!("SKIPPED: prometheus or promtool is not installed (apt-get install prometheus)");
    false
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A plain HTTP/1.0 GET: (status, body).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("written");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("promtool ends");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> (Prometheus, SocketAddr) {
    start_prometheus_jobs(dir, &[("sundial-coordinator", target)])
}

/// Prometheus scraping each `(job, target)` every second.
fn start_prometheus_jobs(dir: &Path, jobs: &[(&str, SocketAddr)]) -> (Prometheus, SocketAddr) {
    let web = free_tcp();
    let config = dir.join("prometheus.yml");
    let mut text = "global:\n  scrape_interval: 1s\nscrape_configs:\n".to_owned();
    for (job, target) in jobs {
        text.push_str(&format!(
            "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
        ));
    }
    std::fs::write(&config, text).expect("config");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("a log file"))
        .spawn()
        .expect("prometheus starts");
    (Prometheus(child), web)
}

/// An instant query's vector: label value of `by` → value.
fn query(web: SocketAddr, promql: &str, by: &str) -> Vec<(String, f64)> {
    let q: String = promql
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some((200, body)) = get(web, &format!("/api/v1/query?query={q}")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v["data"]["result"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    (
                        r["metric"][by].as_str().unwrap_or("").to_owned(),
                        r["value"][1]
                            .as_str()
                            .and_then(|x| x.parse().ok())
                            .unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    if !prometheus_available() {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let rules = dir.join("sundial-alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().expect("utf-8")], None);
    assert!(ok, "{out}");
    let tests = dir.join("sundial-alerts.test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().expect("utf-8")], None);
    assert!(ok, "{out}");
}

#[test]
fn prometheus_sees_every_run_once_by_outcome_as_the_coordinator_stored_it() {
    if !prometheus_available() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let http = free_tcp();
    let coord = Coordinator::start_with(root.path(), &["--http", &http.to_string()]);
    assert_eq!(get(http, "/healthz").map(|r| r.0), Some(200));
    assert_eq!(get(http, "/readyz").map(|r| r.0), Some(200));
    let dir = root.path().join("agent");
    let agent = coord.agent(&dir, "edge-1");
    wait_for("the agent online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    let task = |name: &str, extra: &[&str], cmd: &str| {
        let mut args = vec!["task", "create", "--name", name, "--agent", "edge-1"];
        args.extend_from_slice(extra);
        args.extend(["--", "/bin/sh", "-c", cmd]);
        coord.ctl_ok(&args)
    };
    task("ok", &["--every", "1s"], "true");
    task("fails", &["--every", "1s"], "exit 3");
    task("slow", &["--every", "1s", "--timeout", "300ms"], "sleep 5");
    // Runs of 2.5 s every second with overlap forbidden: the ones in
    // between are skipped.
    task(
        "busy",
        &["--every", "1s", "--overlap", "forbid"],
        "sleep 2.5",
    );
    let (prom, web) = start_prometheus(root.path(), http);
    let outcomes = ["succeeded", "failed", "timed_out", "skipped"];
    wait_for("runs of every outcome", || {
        let runs = coord.runs(&[]);
        outcomes
            .iter()
            .all(|o| runs.iter().any(|r| r["outcome"] == *o))
    });
    // Stop the fleet, so the counts hold still; every record is synced.
    for t in ["ok", "fails", "slow", "busy"] {
        coord.ctl_ok(&["task", "cancel", t]);
    }
    drop(agent);
    let mut agent = Agent::start(&dir);
    wait_for("the outbox synced", || {
        agent.status().outbox_len == 0 && coord.json(&["agent", "list"])[0]["online"] == true
    });
    agent.stop();
    let stored = coord.runs(&[]);
    let mut want: std::collections::BTreeMap<String, f64> = Default::default();
    for r in &stored {
        *want
            .entry(r["outcome"].as_str().unwrap_or("").to_owned())
            .or_default() += 1.0;
    }
    for o in outcomes {
        assert!(
            want.get(o).is_some_and(|n| *n > 0.0),
            "no {o} run: {want:?}"
        );
    }
    // Prometheus scrapes every second: wait for it to have the last counts.
    let mut got = Vec::new();
    wait_for("Prometheus to see the stored counts", || {
        got = query(
            web,
            "sum by (outcome) (sundial_runs_recorded_total{job=\"sundial-coordinator\"})",
            "outcome",
        );
        got.len() == want.len() && got.iter().all(|(o, n)| want.get(o) == Some(n))
    });
    // Per task, the same again; lateness and duration counted for each.
    let per_task = query(web, "sum by (task) (sundial_task_runs_total)", "task");
    assert_eq!(
        per_task.iter().map(|(_, n)| n).sum::<f64>(),
        stored.len() as f64,
        "{per_task:?}"
    );
    let durations = query(web, "sundial_run_duration_seconds_count", "job");
    assert!(
        !durations.is_empty() && durations[0].1 > 0.0,
        "{durations:?}"
    );
    let agents = query(web, "sundial_agents", "state");
    assert!(agents.contains(&("enrolled".to_owned(), 1.0)), "{agents:?}");
    // The exposition is clean for promtool.
    let (status, text) = get(http, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics: {out}");
    drop(prom);
}

#[test]
fn an_agent_serves_its_own_metrics_and_reports_its_figures_through_its_session() {
    if !prometheus_available() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let http = free_tcp();
    let coord = Coordinator::start_with(
        root.path(),
        &["--http", &http.to_string(), "--agent-report-every", "1s"],
    );
    let dir = root.path().join("agent");
    let metrics = free_tcp();
    drop(coord.agent(&dir, "edge-1"));
    let _agent = Agent::start_with(&dir, move |c| c.metrics = Some(metrics));
    wait_for("the agent online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    for (name, cmd) in [("ok", "true"), ("fails", "exit 3")] {
        coord.ctl_ok(&[
            "task", "create", "--name", name, "--agent", "edge-1", "--every", "1s", "--",
            "/bin/sh", "-c", cmd,
        ]);
    }
    let (prom, web) = start_prometheus_jobs(
        root.path(),
        &[("sundial-coordinator", http), ("sundial-agent", metrics)],
    );
    // The device's own series, scraped from the agent itself.
    wait_for("Prometheus to see the agent's runs", || {
        let got = query(
            web,
            "sum by (outcome) (sundial_agent_runs_recorded_total{job=\"sundial-agent\"})",
            "outcome",
        );
        ["succeeded", "failed"]
            .iter()
            .all(|o| got.iter().any(|(g, n)| g == o && *n > 0.0))
    });
    wait_for("the agent's task count", || {
        query(web, "sundial_agent_tasks{job=\"sundial-agent\"}", "job")
            .first()
            .is_some_and(|(_, n)| *n == 2.0)
    });
    // The same agent's figures, as it reported them to the coordinator.
    wait_for("the coordinator to have the agent's report", || {
        let reporting = query(web, "sundial_agents_reporting", "job");
        let tasks = query(
            web,
            "sundial_agent_tasks{job=\"sundial-coordinator\"}",
            "job",
        );
        reporting.first().is_some_and(|(_, n)| *n == 1.0)
            && tasks.first().is_some_and(|(_, n)| *n == 2.0)
    });
    let lag = query(web, "sundial_assignment_lag_seconds_count", "job");
    assert!(
        lag.first().is_some_and(|(_, n)| *n >= 2.0),
        "each task create measured: {lag:?}"
    );
    let listed = coord.json(&["agent", "list"]);
    assert_eq!(listed[0]["report"]["tasks"], 2, "{listed}");
    assert_eq!(listed[0]["report"]["clock"], "vouched", "{listed}");
    // The agent's exposition is clean, and nothing else is served.
    let (status, text) = get(metrics, "/metrics").expect("agent metrics");
    assert_eq!(status, 200);
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics (agent): {out}");
    assert_eq!(get(metrics, "/").map(|r| r.0), Some(404));
    assert_eq!(get(metrics, "/healthz").map(|r| r.0), Some(200));
    drop(prom);
}
