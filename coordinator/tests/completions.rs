//! Shell completions as a shell runs them: `sundialctl completions SHELL`
//! sourced into bash, zsh and fish, completing task and agent names that
//! the coordinator of SUNDIAL_CREDS knows, and the static words elsewhere.

mod common;

use std::path::Path;
use std::process::Command;

use common::{wait_for, Coordinator, CTL};

/// A coordinator with one agent (`edge-1`) and tasks `backup` and `report`.
fn fleet(root: &Path) -> (Coordinator, common::Agent) {
    let coord = Coordinator::start(root);
    let agent = coord.agent(&root.join("edge-1"), "edge-1");
    wait_for("edge-1 online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    for name in ["backup", "report"] {
        coord.ctl_ok(&[
            "task",
            "create",
            "--name",
            name,
            "--agent",
            "edge-1",
            "--every",
            "1h",
            "--",
            "/bin/true",
        ]);
    }
    (coord, agent)
}

/// Runs `script` in `shell` with the completion script of that shell in
/// `dir`, sundialctl first on PATH and the coordinator's credentials set.
fn shell_out(shell: &str, creds: &Path, dir: &Path, args: &[&str]) -> String {
    let bin_dir = Path::new(CTL).parent().expect("a directory");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(shell)
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .env("SUNDIAL_CREDS", creds)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .env("XDG_DATA_HOME", dir)
        .output()
        .expect("the shell runs");
    assert!(
        out.status.success(),
        "{shell} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_script(coord: &Coordinator, shell: &str, dir: &Path) -> std::path::PathBuf {
    let script = coord.ctl_ok(&["completions", shell]);
    let file = dir.join(format!("sundialctl.{shell}"));
    std::fs::write(&file, script).expect("write the script");
    file
}

fn have(shell: &str) -> bool {
    let found = Command::new(shell)
        .args(["-c", "exit 0"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{shell} is missing under CI (.ci/run installs it)"
        );
        eprintln!("skipped: {shell} is not installed");
    }
    found
}

fn words(text: &str) -> Vec<String> {
    let mut w: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    w.sort();
    w
}

#[test]
fn bash_completes_task_and_agent_names_from_the_coordinator() {
    let root = tempfile::tempdir().expect("tempdir");
    let (mut coord, mut agent) = fleet(root.path());
    let script = write_script(&coord, "bash", root.path());
    let creds = coord.creds();
    // Completes the line COMP_WORDS up to the cursor, as bash would.
    let complete = |line: &[&str]| {
        let quoted: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
        let body = format!(
            // As bash calls it: the command, the word completed, the one before.
            "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\n_sundialctl_names sundialctl '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            quoted.join(" "),
            line.len() - 1,
            line[line.len() - 1],
            line[line.len() - 2]
        );
        words(&shell_out("bash", &creds, root.path(), &["-c", &body]))
    };
    assert_eq!(
        complete(&["sundialctl", "task", "pause", ""]),
        ["backup", "report"]
    );
    assert_eq!(complete(&["sundialctl", "task", "get", "ba"]), ["backup"]);
    assert_eq!(
        complete(&["sundialctl", "task", "pause", "backup", ""]),
        ["backup", "report"],
        "pause takes several"
    );
    assert_eq!(
        complete(&["sundialctl", "run", "list", "--limit", "5", "--agent", ""]),
        ["edge-1"]
    );
    assert_eq!(
        complete(&[
            "sundialctl",
            "--creds",
            "x.creds",
            "run",
            "list",
            "--task",
            "r"
        ]),
        ["report"],
        "a global option's value is no subcommand"
    );
    // Elsewhere the static completions answer: subcommands, enum values.
    assert!(complete(&["sundialctl", "task", ""]).contains(&"pause".to_owned()));
    assert_eq!(
        complete(&["sundialctl", "task", "create", "--misfire", ""]),
        ["all", "all:10", "once", "skip"]
    );
    // A cancelled task is not offered.
    coord.ctl_ok(&["task", "cancel", "report"]);
    assert_eq!(complete(&["sundialctl", "task", "resume", ""]), ["backup"]);
    // A device owner's name is no code for the operator's shell: offered as
    // the agent's id, and nothing it says runs.
    common::join(
        &coord.addr.to_string(),
        &coord.token(&[]),
        &root.path().join("odd"),
        "x$(touch pwned)`touch pwned2`;y",
        &[],
    )
    .expect("joins");
    assert_eq!(
        complete(&["sundialctl", "agent", "get", ""]),
        ["a2", "edge-1"]
    );
    assert!(!root.path().join("pwned").exists() && !root.path().join("pwned2").exists());
    agent.stop();
    // Without a coordinator to ask: no names, and no error on the terminal.
    coord.stop();
    assert!(complete(&["sundialctl", "task", "get", ""]).is_empty());
}

#[test]
fn zsh_and_fish_complete_names_too() {
    let root = tempfile::tempdir().expect("tempdir");
    let (coord, mut agent) = fleet(root.path());
    let creds = coord.creds();
    if have("fish") {
        let script = write_script(&coord, "fish", root.path());
        let complete = |line: &str| {
            let body = format!("source '{}'; complete -C '{line}'", script.display());
            // Each candidate is a line: the word, then a tab and its description.
            let out = shell_out("fish", &creds, root.path(), &["-c", &body]);
            let mut w: Vec<String> = out
                .lines()
                .map(|l| l.split('\t').next().unwrap_or("").to_owned())
                .collect();
            w.sort();
            w
        };
        assert_eq!(complete("sundialctl task pause "), ["backup", "report"]);
        assert_eq!(complete("sundialctl run list --agent "), ["edge-1"]);
    }
    if have("zsh") {
        let script = write_script(&coord, "zsh", root.path());
        // zsh's completion widgets need a terminal; the function that reads
        // the line is the part of ours that decides, and it is plain zsh.
        let kind = |line: &str| {
            let body = format!(
                "autoload -U compinit && compinit -u -d '{}/zcomp'; source '{}'; _sundialctl_names_kind {line}",
                root.path().display(),
                script.display()
            );
            shell_out("zsh", &creds, root.path(), &["-f", "-c", &body])
        };
        assert_eq!(kind("sundialctl task pause"), "tasks");
        assert_eq!(kind("sundialctl run list --agent"), "agents");
        assert_eq!(kind("sundialctl task create --every"), "");
        let names = shell_out(
            "zsh",
            &creds,
            root.path(),
            &["-f", "-c", "sundialctl __names tasks"],
        );
        assert_eq!(words(&names), ["backup", "report"]);
    }
    agent.stop();
}
