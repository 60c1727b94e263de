//! Functions end to end: WebAssembly modules uploaded with `sundialctl`,
//! sent to real agent processes beside their tasks, run sandboxed with
//! their limits, offline too, and their output and reasons in the runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

fn agent_bin() -> PathBuf {
    let p = Path::new(CTL).with_file_name("sundial-agent");
    assert!(
        p.exists(),
        "sundial-agent is not built beside this test; run `cargo test --workspace`"
    );
    p
}

/// A `sundial-agent run` process, killed when dropped.
struct AgentProc {
    dir: PathBuf,
    child: Option<Child>,
}

impl AgentProc {
    /// Joins with `join_args` (labels, --allow-wasm...) and starts it.
    fn join(coord: &Coordinator, dir: &Path, name: &str, join_args: &[&str]) -> AgentProc {
        let token = dir.with_extension("token");
        std::fs::write(&token, coord.token(&[])).expect("token file");
        let out = Command::new(agent_bin())
            .args(["join", "--coordinator", &coord.addr.to_string()])
            .arg("--token-file")
            .arg(&token)
            .arg("--data-dir")
            .arg(dir)
            .args(["--name", name, "--label", "site=lab"])
            .args(join_args)
            .output()
            .expect("join runs");
        assert!(
            out.status.success(),
            "join: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut a = AgentProc {
            dir: dir.to_owned(),
            child: None,
        };
        a.start(&[]);
        a
    }

    fn start(&mut self, run_args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .expect("log");
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(run_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent starts");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn status(&self) -> Value {
        let out = Command::new(agent_bin())
            .args(["status", "-o", "json", "--data-dir"])
            .arg(&self.dir)
            .output()
            .expect("status runs");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write module");
    p.display().to_string()
}

/// Prints "hello" and its arguments and TASK_GREETING on stdout, a line
/// on stderr, and exits with the number of arguments.
const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $asz (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $aget (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $esz (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $eget (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 8) "hello\n")
  (data (i32.const 24) "to stderr\n")
  (func $out (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $w (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 40))))
  (func (export "_start")
    (call $out (i32.const 1) (i32.const 8) (i32.const 6))
    (call $out (i32.const 2) (i32.const 24) (i32.const 10))
    ;; arguments at 1000 (pointers at 100), environment at 3000 (pointers at 200)
    (drop (call $asz (i32.const 44) (i32.const 48)))
    (drop (call $aget (i32.const 100) (i32.const 1000)))
    (call $out (i32.const 1) (i32.const 1000) (i32.load (i32.const 48)))
    (drop (call $esz (i32.const 52) (i32.const 56)))
    (drop (call $eget (i32.const 200) (i32.const 3000)))
    (call $out (i32.const 1) (i32.const 3000) (i32.load (i32.const 56)))
    (call $exit (i32.sub (i32.load (i32.const 44)) (i32.const 1)))))"#;

const SPIN: &str = r#"(module (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))"#;

const BOMB: &str = r#"(module (memory (export "memory") 1)
  (func (export "_start") (loop $l (drop (memory.grow (i32.const 16))) (br $l))))"#;

const TRAP: &str = r#"(module (memory (export "memory") 1)
  (func (export "_start") unreachable))"#;

/// Returns at once.
const NOOP: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

fn create(coord: &Coordinator, args: &[&str]) -> String {
    let mut a = vec!["task", "create"];
    a.extend_from_slice(args);
    coord.ctl_ok(&a)
}

/// The runs of `task` once at least `n` are recorded.
fn runs_of(coord: &Coordinator, task: &str, n: usize) -> Vec<Value> {
    let mut runs = Vec::new();
    wait_for(&format!("{n} run(s) of {task}"), || {
        runs = coord.runs(&["--task", task]);
        runs.len() >= n
    });
    runs
}

fn field<'a>(r: &'a Value, k: &str) -> &'a str {
    r[k].as_str().unwrap_or_default()
}

#[test]
fn functions_run_sandboxed_with_their_output_limits_and_reasons() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let _fn_agent = AgentProc::join(&coord, &root.path().join("a1"), "fn", &["--allow-wasm"]);
    let _plain = AgentProc::join(&coord, &root.path().join("a2"), "plain", &[]);
    wait_for("both agents online", || {
        coord.json(&["agent", "list"]).as_array().is_some_and(|a| {
            a.len() == 2
                && a.iter()
                    .all(|x| x["online"] == true && !x["functions"].is_null())
        })
    });
    let agents = coord.json(&["agent", "list"]);
    let allowed: Vec<(String, bool)> = agents
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                field(a, "name").to_owned(),
                a["functions"]["allowed"] == true,
            )
        })
        .collect();
    assert!(allowed.contains(&("fn".into(), true)), "{allowed:?}");
    assert!(allowed.contains(&("plain".into(), false)), "{allowed:?}");
    let table = coord.ctl_ok(&["agent", "list"]);
    assert!(table.contains("FUNCTIONS"), "{table}");

    let m = root.path();
    let hello = write(m, "hello.wat", HELLO);
    // Arguments, environment and output reach the record; the exit code
    // is the function's (three arguments with argv[0]: exit 2).
    let t = create(
        &coord,
        &[
            "--agent",
            "fn",
            "--at",
            "now",
            "--wasm",
            &hello,
            "--env",
            "TASK_GREETING=hi",
            "--",
            "one",
            "two",
        ],
    );
    let r = &runs_of(&coord, &t, 1)[0];
    assert_eq!(field(r, "outcome"), "failed", "{r}");
    assert_eq!(r["exit_code"], 2, "{r}");
    let stdout = field(r, "stdout");
    assert!(stdout.starts_with("hello\n"), "{stdout:?}");
    assert!(stdout.contains("one\0two\0"), "{stdout:?}");
    assert!(stdout.contains("TASK_GREETING=hi"), "{stdout:?}");
    assert!(
        stdout.contains("SUNDIAL_TASK_ID="),
        "the run's own variables: {stdout:?}"
    );
    assert_eq!(field(r, "stderr"), "to stderr\n", "{r}");

    // A sealed variable reaches a function as it reaches a program.
    let sealed = create(
        &coord,
        &[
            "--agent",
            "fn",
            "--at",
            "now",
            "--wasm",
            &hello,
            "--secret-env",
            "TASK_SECRET=s3cr3t-value",
        ],
    );
    let r = &runs_of(&coord, &sealed, 1)[0];
    assert!(
        field(r, "stdout").contains("TASK_SECRET=s3cr3t-value"),
        "{r}"
    );
    let got = coord.json(&["task", "get", &sealed]);
    assert!(!got.to_string().contains("s3cr3t-value"), "{got}");

    // `task update -- ARGS` gives a function new arguments, nothing else.
    coord.ctl_ok(&["task", "update", &t, "--", "three"]);
    let updated = coord.json(&["task", "get", &t]);
    assert_eq!(updated["args"], serde_json::json!(["three"]), "{updated}");
    assert_eq!(updated["kind"], "wasm", "{updated}");

    // `task get` shows the module, its size and the limits.
    let got = coord.json(&["task", "get", &t]);
    let module = field(&got["function"], "module").to_owned();
    assert!(module.starts_with("sha256:"), "{got}");
    assert!(
        got["function"]["module_bytes"].as_u64().unwrap_or(0) > 100,
        "{got}"
    );
    assert_eq!(got["function"]["fuel"], 1_000_000_000u64, "{got}");
    assert_eq!(got["kind"], "wasm", "{got}");
    let described = coord.ctl_ok(&["task", "get", &t]);
    assert!(
        described.contains("Function:") && described.contains("Limits:"),
        "{described}"
    );

    // Fuel, the timeout, the memory cap and a trap stop a function; each
    // is recorded with its reason.
    let spin = write(m, "spin.wat", SPIN);
    let bomb = write(m, "bomb.wat", BOMB);
    let trap = write(m, "trap.wat", TRAP);
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--wasm", &spin, "--fuel", "10000000"],
            "failed",
            "fuel exhausted after 10,000,000 instructions",
        ),
        (
            vec!["--wasm", &spin, "--fuel", "100000000000", "--timeout", "2s"],
            "timed_out",
            "killed at its timeout",
        ),
        (
            vec!["--wasm", &bomb, "--memory", "2MiB"],
            "failed",
            "memory limit of 2 MiB reached",
        ),
        (vec!["--wasm", &trap], "failed", "trap: "),
    ];
    for (flags, outcome, says) in cases {
        let mut args = vec!["--agent", "fn", "--at", "now"];
        args.extend(flags.iter().copied());
        let t = create(&coord, &args);
        let r = &runs_of(&coord, &t, 1)[0];
        assert_eq!(field(r, "outcome"), outcome, "{flags:?}: {r}");
        assert!(field(r, "detail").contains(says), "{flags:?}: {r}");
    }

    // A device that does not allow functions records each run rejected.
    let t = create(
        &coord,
        &["--agent", "plain", "--at", "now", "--wasm", &hello],
    );
    let r = &runs_of(&coord, &t, 1)[0];
    assert_eq!(field(r, "outcome"), "rejected", "{r}");
    assert!(field(r, "detail").contains("--allow-wasm"), "{r}");

    // What cannot run is refused at create, before any agent sees it.
    let sock = write(
        m,
        "sock.wat",
        r#"(module (import "env" "connect" (func (param i32) (result i32)))
            (memory (export "memory") 1) (func (export "_start")))"#,
    );
    let junk = write(m, "junk.wasm", "#!/bin/sh\necho not a module\n");
    for (file, says) in [
        (&sock, "env.connect"),
        (&junk, "neither a WebAssembly module"),
    ] {
        let (ok, _, err) = coord.ctl(&[
            "task", "create", "--agent", "fn", "--at", "now", "--wasm", file,
        ]);
        assert!(!ok, "{file}: created");
        assert!(err.contains(says), "{file}: {err}");
    }
    let (ok, _, err) = coord.ctl(&[
        "task", "create", "--agent", "fn", "--at", "now", "--wasm", &hello, "--memory", "lots",
    ]);
    assert!(!ok && err.contains("size"), "{err}");
}

#[test]
fn functions_fire_offline_after_a_restart_share_one_module_and_go_with_their_tasks() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(root.path());
    let mut agent = AgentProc::join(&coord, &root.path().join("a1"), "fn", &["--allow-wasm"]);
    let noop = write(root.path(), "noop.wat", NOOP);
    let t1 = create(&coord, &["--agent", "fn", "--every", "1s", "--wasm", &noop]);
    let t2 = create(
        &coord,
        &["--agent", "fn", "--every", "1s", "--wasm", &noop, "--", "x"],
    );
    runs_of(&coord, &t1, 2);
    runs_of(&coord, &t2, 2);
    // One module, stored once for both tasks.
    let s = agent.status();
    assert_eq!(s["functions"]["allowed"], true, "{s}");
    assert_eq!(s["functions"]["modules"], 1, "{s}");

    // The coordinator goes down, the agent is killed and restarted: the
    // functions keep firing from its own store.
    coord.kill9();
    agent.kill9();
    agent.start(&[]);
    let before = coord_down_outbox(&agent);
    wait_for("runs recorded while the coordinator is down", || {
        coord_down_outbox(&agent) >= before + 6
    });
    coord.restart();
    wait_for("the offline runs synced", || {
        coord
            .runs(&["--task", &t1])
            .iter()
            .any(|r| r["offline"] == true && field(r, "outcome") == "succeeded")
    });

    // A new version of the function: uploaded, sent, run from the next
    // occurrence on.
    let hello = write(root.path(), "hello.wat", HELLO);
    coord.ctl_ok(&["task", "update", &t2, "--wasm", &hello, "--fuel", "5000000"]);
    let got = coord.json(&["task", "get", &t2]);
    assert_eq!(got["function"]["fuel"], 5_000_000, "{got}");
    assert_eq!(
        got["args"],
        serde_json::json!(["x"]),
        "arguments kept: {got}"
    );
    wait_for("a run of the new version", || {
        coord
            .runs(&["--task", &t2])
            .iter()
            .any(|r| field(r, "stdout").starts_with("hello\n"))
    });
    let (ok, _, err) = coord.ctl(&["task", "update", &t2, "--memory", "1"]);
    assert!(!ok && err.contains("memory"), "{err}");

    // Cancelled, both: the modules go from the agent's store.
    assert_eq!(
        agent.status()["functions"]["modules"],
        2,
        "both versions held"
    );
    coord.ctl_ok(&["task", "cancel", &t1]);
    // t1's module (the old version) goes; t2's new one stays.
    wait_for("t1's module dropped", || {
        agent.status()["functions"]["modules"] == 1
    });
    coord.ctl_ok(&["task", "cancel", &t2]);
    wait_for("the module dropped", || {
        agent.status()["functions"]["modules"] == 0
    });
}

/// Records waiting in the agent's outbox.
fn coord_down_outbox(agent: &AgentProc) -> u64 {
    agent.status()["outbox_len"].as_u64().unwrap_or(0)
}

#[test]
fn a_module_over_the_coordinators_limit_is_refused_naming_the_setting() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start_with(root.path(), &["--wasm-module-max", "1KiB"]);
    let dir = root.path().join("a1");
    let _agent = AgentProc::join(&coord, &dir, "fn", &["--allow-wasm"]);
    let big = format!(
        r#"(module (memory (export "memory") 1) (data (i32.const 0) "{}") (func (export "_start")))"#,
        "x".repeat(2_000)
    );
    let file = write(root.path(), "big.wat", &big);
    let (ok, _, err) = coord.ctl(&[
        "task", "create", "--agent", "fn", "--at", "now", "--wasm", &file,
    ]);
    assert!(!ok, "created");
    assert!(err.contains("--wasm-module-max"), "{err}");
    let small = write(root.path(), "small.wat", NOOP);
    let t = create(&coord, &["--agent", "fn", "--at", "now", "--wasm", &small]);
    assert_eq!(field(&runs_of(&coord, &t, 1)[0], "outcome"), "succeeded");
}
