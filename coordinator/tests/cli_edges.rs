//! The admin CLI and the coordinator refuse what cannot be meant (empty
//! programs, instants in the past, zero timeouts, periods and backoffs under
//! the floor, absurd counts) with a clear error, take times as people write
//! them, survive a closed pipe, and take a join token without showing it in
//! `ps`.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{Coordinator, CTL};

fn agent_bin() -> PathBuf {
    let p = std::path::Path::new(CTL).with_file_name("sundial-agent");
    assert!(
        p.exists(),
        "sundial-agent is not built beside this test; run `cargo test --workspace`"
    );
    p
}

#[test]
fn what_cannot_be_meant_is_refused_with_a_reason() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let create = |flags: &[&str], program: &[&str]| {
        let mut a = vec!["task", "create", "--selector", "site=lab"];
        a.extend_from_slice(flags);
        a.push("--");
        a.extend_from_slice(program);
        coord.ctl(&a)
    };
    let cases: &[(&[&str], &[&str], &str)] = &[
        (&["--at", "+1h"], &[""], "program is empty"),
        (
            &["--at", "2020-01-01T00:00:00Z"],
            &["/bin/true"],
            "in the past",
        ),
        (
            &["--every", "1h", "--end", "2020-01-01"],
            &["/bin/true"],
            "in the past",
        ),
        (
            &["--at", "+1h", "--timeout", "0s"],
            &["/bin/true"],
            "--timeout",
        ),
        (&["--every", "1ms"], &["/bin/true"], "minimum period"),
        (
            &["--at", "+1h", "--retries", "2000"],
            &["/bin/true"],
            "--retries",
        ),
        (
            &["--at", "+1h", "--retries", "2", "--backoff", "0s"],
            &["/bin/true"],
            "--backoff",
        ),
    ];
    for (flags, program, want) in cases {
        let (ok, _, err) = create(flags, program);
        assert!(!ok, "{flags:?} was accepted");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
    assert!(coord
        .json(&["task", "list"])
        .as_array()
        .is_some_and(Vec::is_empty));

    // Times as people write them; a selector that reaches nobody is said.
    let (ok, _, err) = create(&["--at", "now"], &["/bin/true"]);
    assert!(ok, "{err}");
    assert!(err.contains("matches no agent"), "{err}");
    assert!(create(&["--at", "+20s"], &["/bin/true"]).0);
    assert!(create(&["--at", "2099-01-01"], &["/bin/true"]).0);

    let (ok, _, err) = coord.ctl(&["run", "list", "--limit", "0"]);
    assert!(!ok && err.contains("--limit"), "{err}");
    let (ok, _, err) = coord.ctl(&["run", "list", "--since", "1h"]);
    assert!(ok, "{err}");
    let (ok, _, err) = coord.ctl(&["run", "list", "--since", "yesterday-ish"]);
    assert!(!ok && err.contains("RFC 3339"), "{err}");
}

#[test]
fn an_every_task_counts_from_its_creation_on_the_coordinator() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    for _ in 0..5 {
        let id = coord.ctl_ok(&[
            "task",
            "create",
            "--selector",
            "site=lab",
            "--every",
            "1h",
            "--",
            "/bin/true",
        ]);
        let task = coord.json(&["task", "get", &id]);
        let created = task["created_at"].as_str().expect("created_at").to_owned();
        let schedule = task["schedule"].as_str().expect("schedule");
        // The first occurrence is the creation instant itself, on one clock.
        assert_eq!(schedule, format!("every 1h from {created}"));
    }
}

#[test]
fn schedule_next_bounds_its_count_and_survives_a_closed_pipe() {
    let out = Command::new(CTL)
        .args([
            "schedule",
            "next",
            "--every",
            "1ms",
            "--count",
            "100000000000",
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--count"));

    // `sundialctl … | head -1`: the reader goes away; no panic.
    let mut child = Command::new(CTL)
        .args(["schedule", "next", "--every", "1s", "--count", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let mut first = [0u8; 10];
    child
        .stdout
        .take()
        .expect("stdout")
        .read_exact(&mut first)
        .expect("some output");
    let status = child.wait().expect("waits");
    let mut err = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    assert!(!err.contains("panicked"), "{err}");
    assert!(status.success(), "{status:?}: {err}");
}

#[test]
fn join_takes_its_token_from_a_file_or_stdin() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let token_file = root.path().join("token");
    std::fs::write(&token_file, format!("{}\n", coord.token(&[]))).expect("write");
    let out = Command::new(agent_bin())
        .args([
            "join",
            "--coordinator",
            &coord.addr.to_string(),
            "--token-file",
        ])
        .arg(&token_file)
        .arg("--data-dir")
        .arg(root.path().join("a"))
        .output()
        .expect("join");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut child = Command::new(agent_bin())
        .args([
            "join",
            "--coordinator",
            &coord.addr.to_string(),
            "--token-file",
            "-",
        ])
        .arg("--data-dir")
        .arg(root.path().join("b"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("join");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(coord.token(&[]).as_bytes())
            .expect("write token");
    }
    let out = child.wait_with_output().expect("join ends");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        coord.json(&["agent", "list"]).as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn every_binary_prints_completions_and_a_man_page_and_every_flag_has_help() {
    let coordinator = env!("CARGO_BIN_EXE_sundial-coordinator");
    let agent = agent_bin();
    let bins = [
        std::path::PathBuf::from(CTL),
        std::path::PathBuf::from(coordinator),
        agent,
    ];
    for bin in &bins {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin)
                .args(["completions", shell])
                .output()
                .expect("runs");
            assert!(out.status.success(), "{bin:?} completions {shell}");
            assert!(out.stdout.len() > 500, "{bin:?} {shell}: too short");
        }
        let man = Command::new(bin).arg("manpage").output().expect("runs");
        assert!(man.status.success());
        assert!(String::from_utf8_lossy(&man.stdout).contains(".TH"));
    }
    // Every flag of the commands operators use most says what it does.
    for args in [
        &["run", "list", "--help"][..],
        &["task", "create", "--help"],
        &["task", "get", "--help"],
    ] {
        let out = Command::new(CTL).args(args).output().expect("runs");
        let help = String::from_utf8_lossy(&out.stdout);
        let mut lines = help.lines().peekable();
        while let Some(l) = lines.next() {
            let t = l.trim_start();
            let is_flag = t.starts_with("--")
                || (t.starts_with('-')
                    && t.chars().nth(1).is_some_and(|c| c.is_ascii_alphanumeric()));
            if is_flag {
                // clap puts a flag's help on its line, or on the next ones.
                let own = t.split("  ").filter(|s| !s.trim().is_empty()).count() > 1;
                let next = lines.peek().is_some_and(|n| {
                    let n = n.trim_start();
                    !n.is_empty() && !n.starts_with("--")
                });
                assert!(own || next, "{args:?}: `{t}` has no help line:\n{help}");
            }
        }
    }
}

#[test]
fn the_install_script_help_is_only_help() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-agent.sh");
    let out = Command::new("sh")
        .arg(&script)
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--coordinator"), "{text}");
    assert!(
        !text.contains("set -eu") && !text.contains("prog="),
        "{text}"
    );
}

#[test]
fn log_lines_are_json_objects_when_asked() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = common::Coordinator::start(root.path());
    coord.kill9();
    coord.serve_args = vec!["--log-format".into(), "json".into()];
    coord.restart();
    coord.ctl_ok(&["task", "list"]);
    coord.kill9();
    let log = std::fs::read_to_string(&coord.log).expect("the log");
    let json: Vec<serde_json::Value> = log
        .lines()
        .skip_while(|l| !l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        json.iter()
            .any(|v| v["fields"]["message"] == "coordinator serving" && v["level"] == "INFO"),
        "{log}"
    );
}
