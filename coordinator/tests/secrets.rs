//! Sealed secrets over real QUIC: the action sees the value, and neither
//! store, log, process list nor `task get` ever holds it; an agent that
//! joined after the task gets it only when the operator reseals.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use sundial_protocol::token::{hex, sha256};

/// Every byte tracing writes in this test process (the agents run in it).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether any file under `dir` holds `needle`, and which.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    found.push(p.display().to_string());
                }
            }
        }
    }
    found
}

fn outcomes_on(coord: &Coordinator, task: &str, agent: &str) -> Vec<(String, String, String)> {
    coord
        .runs(&["--task", task, "--agent", agent])
        .iter()
        .map(|r| {
            (
                r["outcome"].as_str().unwrap_or_default().to_owned(),
                r["stdout"].as_str().unwrap_or_default().to_owned(),
                r["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_sealed_secret_reaches_the_action_and_nothing_else() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let root = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = "hunter2-TOPSECRET-7f3a9c";
    let digest = hex(&sha256(secret.as_bytes()));
    let file = outside.path().join("upload.secrets");
    std::fs::write(&file, format!("# the upload key\nTASK_TOKEN={secret}\n")).expect("write");

    let coord = Coordinator::start(root.path());
    let a1_dir = root.path().join("a1");
    let a1 = join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &a1_dir,
        "till-1",
        &[("role", "till")],
    )
    .expect("joins");
    let _agent1 = Agent::start(&a1_dir);
    wait_for("a1 in session", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });

    let file_arg = file.display().to_string();
    let create = [
        "task",
        "create",
        "--name",
        "upload",
        "--selector",
        "role=till",
        "--every",
        "1s",
        "--misfire",
        "skip",
        "--secret-env-file",
        &file_arg,
        "--",
        "/bin/sh",
        "-c",
        "printf %s \"$TASK_TOKEN\" | sha256sum",
    ];
    let task = coord.ctl_ok(&create);
    wait_for("a1 ran the task with the secret", || {
        outcomes_on(&coord, &task, &a1)
            .iter()
            .any(|(o, out, _)| o == "succeeded" && out.starts_with(&digest))
    });

    // An agent that joins later holds no value sealed to it: its runs are
    // rejected, saying what to do, until the operator reseals.
    let a2_dir = root.path().join("a2");
    let a2 = join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &a2_dir,
        "till-2",
        &[("role", "till")],
    )
    .expect("joins");
    let _agent2 = Agent::start(&a2_dir);
    wait_for("a2 rejects the runs it cannot open", || {
        outcomes_on(&coord, &task, &a2)
            .iter()
            .any(|(o, _, d)| o == "rejected" && d.contains("task reseal"))
    });
    let (ok, out, err) = coord.ctl(&["task", "reseal", "upload", "--secret-env-file", &file_arg]);
    assert!(ok, "reseal: {err}");
    assert!(out.contains("2 agent(s)"), "{out}");
    wait_for("a2 runs with the secret after the reseal", || {
        outcomes_on(&coord, &task, &a2)
            .iter()
            .any(|(o, out, _)| o == "succeeded" && out.starts_with(&digest))
    });

    // task get shows the name and where it is sealed, never the value.
    let got = coord.json(&["task", "get", "upload"]);
    assert_eq!(got["secret_env"][0]["name"], "TASK_TOKEN");
    assert_eq!(
        got["secret_env"][0]["sealed_to"].as_array().map(Vec::len),
        Some(2)
    );
    let text = coord.ctl_ok(&["task", "get", "upload"]);
    assert!(text.contains("TASK_TOKEN (sealed to"), "{text}");
    let listed = coord.ctl_ok(&["task", "list", "-o", "json"]);

    // The process list while runs come and go.
    let mut ps = String::new();
    for _ in 0..10 {
        if let Ok(o) = std::process::Command::new("ps")
            .args(["-eww", "-o", "args"])
            .output()
        {
            ps.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // A wrong name is refused before anything is sent, naming only the name.
    let (ok, _, err) = coord.ctl(&["task", "reseal", "upload", "--secret-env", "1BAD=x"]);
    assert!(!ok && err.contains("1BAD"), "{err}");
    let (ok, _, err) = coord.ctl(&[
        "task",
        "reseal",
        "upload",
        "--secret-env",
        "TASK_UNSET_HERE",
    ]);
    assert!(!ok && err.contains("not set"), "{err}");

    // Nothing at rest or in words holds the value.
    let needle = secret.as_bytes();
    assert_eq!(
        files_holding(outside.path(), needle).len(),
        1,
        "the scan finds the value where it is"
    );
    assert_eq!(files_holding(root.path(), needle), Vec::<String>::new());
    let logged = log.0.lock().map(|v| v.clone()).unwrap_or_default();
    assert!(!logged.is_empty(), "the agents logged through the capture");
    assert!(
        !logged.windows(needle.len()).any(|w| w == needle),
        "a log holds the secret"
    );
    let coord_log = std::fs::read(&coord.log).unwrap_or_default();
    assert!(!coord_log.is_empty());
    assert!(!coord_log.windows(needle.len()).any(|w| w == needle));
    for (what, text) in [
        ("task get -o json", got.to_string()),
        ("task get", text),
        ("task list", listed),
        ("ps", ps),
    ] {
        assert!(!text.contains(secret), "{what} shows the secret");
    }
    // The coordinator holds no agent's private sealing key.
    for dir in [&a1_dir, &a2_dir] {
        let seed = std::fs::read(dir.join("seal.key")).expect("the agent's sealing key");
        assert_eq!(seed.len(), 32);
        assert_eq!(
            files_holding(&root.path().join("coord"), &seed),
            Vec::<String>::new()
        );
    }
}

#[test]
fn a_secret_for_an_agent_without_a_key_or_a_bad_file_is_refused_clearly() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    // An agent that joined but never connected has published its key at
    // enrollment: sealing to it works before it ever runs.
    let dir = root.path().join("a");
    let id = join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &dir,
        "edge",
        &[("site", "lab")],
    )
    .expect("joins");
    let (ok, out, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        "1m",
        "--secret-env",
        "TASK_A=1",
        "--",
        "/bin/true",
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with('t'), "{out}");
    let bad = root.path().join("bad.secrets");
    std::fs::write(&bad, "TASK_A=1\nno equals sign here\n").expect("write");
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        "1m",
        "--secret-env-file",
        &bad.display().to_string(),
        "--",
        "/bin/true",
    ]);
    assert!(!ok && err.contains(":2: expected NAME=VALUE"), "{err}");
    // A plain and a sealed variable of one name: refused by the coordinator.
    let (ok, _, err) = coord.ctl(&[
        "task",
        "create",
        "--agent",
        &id,
        "--every",
        "1m",
        "--env",
        "TASK_A=plain",
        "--secret-env",
        "TASK_A=1",
        "--",
        "/bin/true",
    ]);
    assert!(!ok && err.contains("both a plain and a sealed"), "{err}");
}
