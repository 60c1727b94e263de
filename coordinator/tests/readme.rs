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

/// Runs the README's shell block between `<!-- NAME:start -->` and
/// `<!-- NAME:end -->` in bash; its stdout.
fn run_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .expect("start marker");
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .expect("end marker");
    let block = &readme[start..end];
    let body: Vec<&str> = block
        .lines()
        .skip_while(|l| !l.starts_with("```sh"))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .filter(|l| !l.starts_with("cargo build") && !l.starts_with("export PATH="))
        .collect();
    assert!(body.len() > 10, "{name} too short: {body:?}");
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
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

#[test]
fn the_walkthrough_runs_as_written() {
    let stdout = run_block("walkthrough");
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

#[test]
fn the_placement_section_runs_as_written() {
    let stdout = run_block("placement");
    assert!(
        stdout.contains("Placement:    one (lease window 10s"),
        "task get: {stdout}"
    );
    // One record per occurrence: never two for one instant.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("t1 (clear-queue)"))
        .collect();
    assert!(rows.len() >= 30, "run list: {stdout}");
    let instants: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    assert_eq!(
        instants.len(),
        rows.len(),
        "an occurrence recorded twice: {stdout}"
    );
    // The others took over while till2 was dark: a stretch of runs with
    // no till2 among them, and till2's missed share recorded skipped.
    let dark = rows.windows(8).any(|w| {
        w.iter()
            .all(|l| !l.contains("till2") && l.contains("succeeded"))
    });
    assert!(dark, "till1 and till3 took over: {stdout}");
    assert!(
        rows.iter()
            .any(|l| l.contains("till2") && l.contains("skipped") && l.contains("lease ended")),
        "till2's missed share: {stdout}"
    );
}

#[test]
fn the_functions_section_runs_as_written() {
    let stdout = run_block("functions");
    assert!(
        stdout.contains("Function:     sha256:"),
        "task get: {stdout}"
    );
    assert!(stdout.contains("fuel 1000000"), "task get: {stdout}");
    // Every device ran the function, and each has runs from while the
    // coordinator was stopped, recorded offline and synced after.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("t1 (hello)"))
        .collect();
    for dev in ["dev1", "dev2", "dev3"] {
        let theirs: Vec<&&str> = rows.iter().filter(|l| l.contains(dev)).collect();
        assert!(
            theirs.iter().filter(|l| l.contains("succeeded")).count() >= 8,
            "{dev} ran the function every two seconds: {stdout}"
        );
        assert!(
            theirs
                .iter()
                .any(|l| l.contains("succeeded") && l.split_whitespace().any(|w| w == "yes")),
            "{dev}'s runs while cut off, synced after the heal: {stdout}"
        );
    }
    assert!(
        !rows.iter().any(|l| !l.contains("succeeded")),
        "every run succeeded: {stdout}"
    );
    assert!(
        stdout.contains("hello from a function"),
        "its output in the run: {stdout}"
    );
}
