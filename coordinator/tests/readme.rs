//! The README's walkthrough works exactly as written: its commands run in
//! bash against the binaries of this build (the build and PATH lines are
//! replaced by this test's PATH).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sundialctl"))
        .parent()
        .expect("bin dir")
        .to_owned()
}

#[test]
fn the_walkthrough_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("start marker");
    let end = readme.find("<!-- walkthrough:end -->").expect("end marker");
    let block = &readme[start..end];
    let body: Vec<&str> = block
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.starts_with("cargo build") && !l.starts_with("export PATH="))
        .collect();
    assert!(body.len() > 10, "walkthrough too short: {body:?}");
    let dir = bin_dir();
    for b in ["sundial-coordinator", "sundialctl", "sundial-agent"] {
        assert!(
            dir.join(b).exists(),
            "{b} is not built beside this test; run the README's test command, `cargo test --workspace`"
        );
    }
    let script = format!("set -eu\n{}\n", body.join("\n"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .env("TMPDIR", tmp.path())
        .env_remove("SUNDIAL_CREDS")
        .current_dir(tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let pgid = child.id() as i32;
    let out = std::thread::spawn(move || child.wait_with_output().expect("waits"));
    let out = out.join().expect("joined");
    // Whatever happened, leave no server behind.
    if let Some(pid) = rustix::process::Pid::from_raw(pgid) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walkthrough failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("dev1") && stdout.contains("online"),
        "agent list: {stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.trim() == "t1"),
        "task id: {stdout}"
    );
    let succeeded = stdout.lines().filter(|l| l.contains("succeeded")).count();
    assert!(succeeded >= 2, "runs: {stdout}");
    assert!(stdout.contains("every 2s"), "status: {stdout}");
    // The sealed secret: named in `task get`, never shown; the action saw
    // it (printenv fails when the variable is not set).
    assert!(
        stdout.contains("TASK_GREETING (sealed to a1 (dev1))"),
        "task get: {stdout}"
    );
    assert!(!stdout.contains("hello from a sealed secret"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("t2 (greet)") && l.contains("succeeded")),
        "the sealed run: {stdout}"
    );
}
