//! Both stores encrypted at rest, over real QUIC: task definitions and run
//! output never sit in plain text in either store's file; keys rotate
//! while runs flow with nothing lost; a wrong or missing key file is
//! refused at start and touches nothing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const COORDINATOR: &str = env!("CARGO_BIN_EXE_sundial-coordinator");
/// In the task's arguments only.
const ARG_MARKER: &str = "ARG-MARKER-7c1e";
/// In the runs' output only (the shell computes it).
const OUT_MARKER: &str = "OUT-MARKER-9002";

fn holds(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

/// Every file under `dir` but logs.
fn store_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_none_or(|x| x != "log") {
                out.push(p);
            }
        }
    }
    out
}

fn good_runs(coord: &Coordinator, task: &str) -> usize {
    coord
        .runs(&["--task", task])
        .iter()
        .filter(|r| {
            r["outcome"] == "succeeded"
                && r["stdout"].as_str().is_some_and(|o| o.contains(OUT_MARKER))
        })
        .count()
}

fn sha(path: &Path) -> [u8; 32] {
    sundial_protocol::token::sha256(&std::fs::read(path).expect("read"))
}

#[test]
fn tasks_and_output_are_encrypted_in_both_stores_and_keys_rotate_while_runs_flow() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let dir = root.path().join("a1");
    let mut agent = coord.agent(&dir, "edge");
    wait_for("the agent in session", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    let task = coord.ctl_ok(&[
        "task",
        "create",
        "--selector",
        "site=lab",
        "--every",
        "1s",
        "--",
        "/bin/sh",
        "-c",
        &format!(": {ARG_MARKER}; echo OUT-MARKER-$(( 9000 + 2 ))"),
    ]);
    // The operator reads the output as ever.
    wait_for("runs with their output", || good_runs(&coord, &task) >= 3);
    assert!(
        holds(&coord.dir.join("store.key"), "current"),
        "the key ring was made"
    );
    assert!(holds(&dir.join("store.key"), "current"));

    // Rotate both keys while runs flow.
    let out = Command::new(COORDINATOR)
        .args(["rotate-key", "--data-dir"])
        .arg(&coord.dir)
        .output()
        .expect("rotate-key runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("key 2 added"));
    let (old, new) =
        sundial_agent::runtime::rotate_store_key(&dir.join("store.key")).expect("agent rotates");
    assert_eq!((old, new), (1, 2));
    let before = good_runs(&coord, &task);
    wait_for("both reloaded their rings", || {
        let log = std::fs::read_to_string(&coord.log).unwrap_or_default();
        log.contains("new records use key 2")
    });
    wait_for("runs flowing after the rotation", || {
        good_runs(&coord, &task) >= before + 6
    });
    agent.stop();
    coord.kill9();

    // Old and new records alike readable after a restart, nothing lost.
    let mut agent_store =
        sundial_agent::store::AgentStore::open_read_only(&sundial_agent::runtime::store_path(&dir))
            .expect("agent store");
    let ring = sundial_net::at_rest::StoreCipher::from_file(&dir.join("store.key"), false)
        .expect("ring")
        .expect("present");
    agent_store
        .read_with(std::sync::Arc::new(ring), &dir.join("store.key"))
        .expect("the ring matches");
    assert_eq!(agent_store.key_ids().expect("ids"), vec![1, 2]);
    drop(agent_store);
    coord.restart();
    let total = good_runs(&coord, &task);
    assert!(total >= before + 6, "{total} runs after a restart");

    // Neither store's file holds the task's command line or any output.
    for f in store_files(root.path()) {
        assert!(
            !holds(&f, ARG_MARKER),
            "{} holds the task's arguments",
            f.display()
        );
        assert!(!holds(&f, OUT_MARKER), "{} holds run output", f.display());
    }
    // The check can fail: the markers are there, in plain, where they are meant to be.
    let listed = coord.ctl_ok(&["run", "list", "--task", &task, "-o", "json"]);
    assert!(listed.contains(OUT_MARKER));
    assert!(coord.ctl_ok(&["task", "get", &task]).contains(ARG_MARKER));
}

#[test]
fn a_wrong_or_missing_key_file_is_refused_at_start_and_touches_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    coord.ctl_ok(&[
        "task",
        "create",
        "--selector",
        "site=lab",
        "--every",
        "1m",
        "--",
        "/bin/true",
    ]);
    // Stopped cleanly: a store left by a kill is repaired (rewritten) by
    // whatever opens it next, key or not.
    coord.stop();
    let key = coord.dir.join("store.key");
    let store = coord.dir.join("coordinator.redb");
    let kept = std::fs::read(&key).expect("key ring");
    let serve = |coord: &Coordinator| {
        let mut child = Command::new(COORDINATOR)
            .args(["serve", "--data-dir"])
            .arg(&coord.dir)
            .args(["--listen", &coord.addr.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                use std::io::Read;
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status.success(), err);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("serve did not stop on a bad key");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Another ring with the same key id.
    let other = sundial_net::at_rest::Keyring::generate().expect("ring");
    sundial_net::at_rest::save(&key, &other).expect("save");
    let before = sha(&store);
    let (ok, err) = serve(&coord);
    assert!(!ok);
    assert!(
        err.contains("not the key this store was written with"),
        "{err}"
    );
    assert_eq!(sha(&store), before, "the store was touched");

    // No key file at all: refused, and none is made.
    std::fs::remove_file(&key).expect("remove");
    let (ok, err) = serve(&coord);
    assert!(!ok);
    assert!(err.contains("no key file"), "{err}");
    assert!(!key.exists(), "a new key was made for an encrypted store");
    assert_eq!(sha(&store), before, "the store was touched");

    // The right ring back: it serves, with its task.
    std::fs::write(&key, &kept).expect("restore");
    coord.restart();
    assert_eq!(
        coord.json(&["task", "list"]).as_array().map(Vec::len),
        Some(1)
    );

    // The agent likewise.
    let dir = root.path().join("a1");
    let mut agent = coord.agent(&dir, "edge");
    wait_for("the agent's ring made", || dir.join("store.key").exists());
    wait_for("the agent in session", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    agent.stop();
    let agent_store = sundial_agent::runtime::store_path(&dir);
    let before = sha(&agent_store);
    sundial_net::at_rest::save(&dir.join("store.key"), &other).expect("save");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let r = rt.block_on(sundial_agent::runtime::run(
        sundial_agent::runtime::AgentConfig::new(dir.clone()),
        async {},
    ));
    let err = r.expect_err("a wrong key is refused").to_string();
    assert!(
        err.contains("not the key this store was written with"),
        "{err}"
    );
    assert_eq!(sha(&agent_store), before, "the agent's store was touched");
}
