//! Device installation from the outside: `deploy/install-agent.sh --root`
//! against a live coordinator (install, run, upgrade, uninstall), its
//! refusals, the Debian packages' contents, and the systemd units.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{wait_for, Coordinator};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn agent_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_sundialctl")).with_file_name("sundial-agent");
    assert!(
        p.exists(),
        "sundial-agent is not built beside this test; run `cargo test --workspace`"
    );
    p
}

fn install(args: &[&str]) -> (bool, String) {
    let out = Command::new("sh")
        .arg(repo().join("deploy/install-agent.sh"))
        .args(args)
        .output()
        .expect("sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("exists").permissions().mode() & 0o777
}

fn start_installed(root: &Path) -> Child {
    Command::new(root.join("usr/local/bin/sundial-agent"))
        .args(["run", "--config"])
        .arg(root.join("etc/sundial/agent.toml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("installed agent starts")
}

fn stop(mut c: Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let _ = c.wait();
}

fn status(root: &Path) -> sundial_agent::status::Status {
    sundial_agent::status::read(&root.join("var/lib/sundial-agent")).expect("status")
}

#[test]
fn install_run_upgrade_and_uninstall_under_a_root() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut coord = Coordinator::start(tmp.path());
    let root = tmp.path().join("root");
    let root_s = root.to_str().expect("utf-8 path");
    let token = coord.token(&[]);
    let bin = agent_bin();
    // The token from a file: it never shows in `ps`.
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let (ok, text) = install(&[
        "--binary",
        bin.to_str().expect("utf-8"),
        "--coordinator",
        &coord.addr.to_string(),
        "--token-file",
        token_file.to_str().expect("utf-8"),
        "--name",
        "press-7",
        "--label",
        "site=x",
        "--allow-exec",
        "/bin/echo",
        "--allow-wasm",
        "--root",
        root_s,
    ]);
    assert!(ok, "install failed:\n{text}");
    assert!(text.contains("skipped under --root: useradd"), "{text}");
    assert_eq!(mode(&root.join("usr/local/bin/sundial-agent")), 0o755);
    assert_eq!(mode(&root.join("var/lib/sundial-agent")), 0o700);
    assert_eq!(mode(&root.join("var/lib/sundial-agent/agent.key")), 0o600);
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/sundial-agent.service"))
        .expect("unit");
    assert!(
        unit.contains(
            "ExecStart=/usr/local/bin/sundial-agent run --config /etc/sundial/agent.toml"
        ),
        "{unit}"
    );
    let id = status(&root).agent_id.expect("enrolled");

    // The installed agent runs from its config and gets work.
    let agent = start_installed(&root);
    let task = coord.ctl_ok(&[
        "task",
        "create",
        "--selector",
        "site=x",
        "--every",
        "1s",
        "--",
        "/bin/echo",
        "hi",
    ]);
    wait_for("a run from the installed agent", || {
        !coord.runs(&["--task", &task]).is_empty()
    });
    assert_eq!(coord.runs(&["--task", &task])[0]["outcome"], "succeeded");
    // `--allow-wasm` at install: the agent runs functions.
    assert_eq!(status(&root).functions.allowed, Some(true));

    // Coordinator away: runs wait in the outbox; then an upgrade.
    coord.kill9();
    wait_for("runs buffered", || status(&root).outbox_len >= 2);
    stop(agent);
    let before = status(&root);
    let (ok, text) = install(&["--binary", bin.to_str().expect("utf-8"), "--root", root_s]);
    assert!(ok, "upgrade failed:\n{text}");
    assert!(text.contains("upgraded"), "{text}");
    let after = status(&root);
    assert_eq!(
        after.agent_id.as_deref(),
        Some(id.as_str()),
        "the upgrade changed the identity"
    );
    assert_eq!(
        after.outbox_len, before.outbox_len,
        "the upgrade lost buffered runs"
    );
    assert_eq!(after.tasks.len(), 1);

    // Back together: the buffered runs arrive.
    coord.restart();
    let agent = start_installed(&root);
    wait_for("the outbox to drain", || status(&root).outbox_len == 0);
    stop(agent);

    let (ok, text) = install(&["--uninstall", "--root", root_s]);
    assert!(ok, "{text}");
    assert!(!root.join("usr/local/bin/sundial-agent").exists());
    assert!(!root
        .join("etc/systemd/system/sundial-agent.service")
        .exists());
    assert!(
        root.join("etc/sundial/agent.toml").exists(),
        "uninstall removed the config"
    );
    assert!(
        root.join("var/lib/sundial-agent/agent.redb").exists(),
        "uninstall removed the data"
    );
    // A record the coordinator never got: --purge refuses to delete it.
    {
        let store =
            sundial_agent::store::AgentStore::open(&root.join("var/lib/sundial-agent/agent.redb"))
                .expect("store");
        let record = sundial_protocol::RunRecord {
            task_id: sundial_protocol::TaskId(99),
            agent_id: sundial_protocol::AgentId(1),
            scheduled_at: sundial_protocol::Timestamp::from_millis_saturating(1_000),
            attempt: 1,
            fired_at: None,
            finished_at: None,
            outcome: sundial_protocol::Outcome::Succeeded,
            exit_code: Some(0),
            offline: true,
            detail: None,
            stdout_tail: vec![],
            stderr_tail: vec![],
        };
        store.finish_run(&record, None).expect("an unsynced record");
    }
    let (ok, text) = install(&["--uninstall", "--purge", "--root", root_s]);
    assert!(!ok && text.contains("binary is gone"), "{text}");
    let bin_s = bin.to_str().expect("utf-8");
    let (ok, text) = install(&[
        "--uninstall",
        "--purge",
        "--binary",
        bin_s,
        "--root",
        root_s,
    ]);
    assert!(
        !ok && text.contains("never synced") && text.contains("agent retire"),
        "{text}"
    );
    assert!(
        root.join("var/lib/sundial-agent/agent.redb").exists(),
        "deleted anyway"
    );
    let (ok, text) = install(&["--uninstall", "--purge", "--force", "--root", root_s]);
    assert!(ok, "{text}");
    assert!(!root.join("var/lib/sundial-agent").exists());
    assert!(!root.join("etc/sundial/agent.toml").exists());
}

#[test]
fn bad_input_ends_clearly_and_installs_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let bin = agent_bin();
    let bin = bin.to_str().expect("utf-8");
    let nothing_installed = |root: &Path| {
        !root.join("usr/local/bin/sundial-agent").exists()
            && !root
                .join("etc/systemd/system/sundial-agent.service")
                .exists()
            && !root.join("var/lib/sundial-agent").exists()
    };
    let root = tmp.path().join("r1");
    let r = root.to_str().expect("utf-8");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--root", r], "--binary PATH is required"),
        (
            vec!["--binary", bin, "--frobnicate", "--root", r],
            "unknown option '--frobnicate'",
        ),
        (
            vec![
                "--binary",
                bin,
                "--coordinator",
                "127.0.0.1:7447",
                "--root",
                r,
            ],
            "is required for a first install",
        ),
        (
            // Without --coordinator the token's addresses are used; this
            // one is no token at all.
            vec!["--binary", bin, "--token", "x", "--root", r],
            "not a Sundial join token",
        ),
        (
            vec![
                "--binary",
                bin,
                "--coordinator",
                "nohost",
                "--token",
                "x",
                "--root",
                r,
            ],
            "expected HOST:PORT",
        ),
        (
            vec!["--binary", "/nonexistent", "--root", r],
            "is not an executable file",
        ),
        (
            vec![
                "--binary",
                bin,
                "--token-file",
                "/nonexistent/token",
                "--root",
                r,
            ],
            "cannot read it",
        ),
    ];
    for (args, needle) in cases {
        let (ok, text) = install(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(text.contains(needle), "{args:?}: `{text}` lacks `{needle}`");
        assert!(nothing_installed(&root), "{args:?} left files behind");
    }
    // An unreachable coordinator (nothing listens on that port).
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let coord = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(coord.path());
    let token = c.token(&[]);
    drop(c);
    let (ok, text) = install(&[
        "--binary",
        bin,
        "--coordinator",
        &format!("127.0.0.1:{port}"),
        "--token",
        &token,
        "--root",
        r,
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("enrollment failed") && text.contains("cannot reach the coordinator"),
        "{text}"
    );
    assert!(
        nothing_installed(&root),
        "a failed enrollment left files behind"
    );
    // A garbage token is refused before anything is installed too.
    let (ok, text) = install(&[
        "--binary",
        bin,
        "--coordinator",
        "127.0.0.1:7447",
        "--token",
        "nonsense",
        "--root",
        r,
    ]);
    assert!(!ok && text.contains("not a Sundial join token"), "{text}");
    assert!(nothing_installed(&root));
}

#[test]
fn debian_packages_have_the_right_contents_and_modes() {
    let bin_dir = agent_bin().parent().expect("dir").to_owned();
    let out = tempfile::tempdir().expect("tempdir");
    let built = Command::new("sh")
        .arg(repo().join("deploy/build-deb.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out.path())
        .output()
        .expect("build-deb.sh runs");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let debs: Vec<PathBuf> = String::from_utf8_lossy(&built.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    assert_eq!(debs.len(), 2, "{debs:?}");
    let agent = debs
        .iter()
        .find(|d| d.to_string_lossy().contains("sundial-agent_"))
        .expect("agent deb");
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(agent)
        .output()
        .expect("dpkg-deb -c");
    let list = String::from_utf8_lossy(&list.stdout);
    let entry = |path: &str| {
        list.lines()
            .find(|l| l.ends_with(path))
            .unwrap_or_else(|| panic!("{path} missing:\n{list}"))
            .to_owned()
    };
    assert!(
        entry("./usr/bin/sundial-agent").starts_with("-rwxr-xr-x root/root"),
        "{list}"
    );
    assert!(entry("./lib/systemd/system/sundial-agent.service").starts_with("-rw-r--r-- root/root"));
    assert!(entry("./etc/sundial/agent.toml").starts_with("-rw-r--r-- root/root"));
    assert!(entry("./usr/share/doc/sundial-agent/README.md").starts_with("-rw-r--r--"));
    // A man page and completions for bash, zsh and fish, made by the binary.
    for path in [
        "./usr/share/man/man1/sundial-agent.1.gz",
        // A page per subcommand, as the root page's SEE ALSO names them.
        "./usr/share/man/man1/sundial-agent-run.1.gz",
        "./usr/share/man/man1/sundial-agent-join.1.gz",
        "./usr/share/bash-completion/completions/sundial-agent",
        "./usr/share/zsh/vendor-completions/_sundial-agent",
        "./usr/share/fish/vendor_completions.d/sundial-agent.fish",
    ] {
        assert!(entry(path).starts_with("-rw-r--r-- root/root"), "{path}");
    }
    let field = |f: &str| {
        let o = Command::new("dpkg-deb")
            .args(["-f"])
            .arg(agent)
            .arg(f)
            .output()
            .expect("dpkg-deb -f");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "sundial-agent");
    // Maintainer scripts are there and executable; the config is a conffile.
    let x = tempfile::tempdir().expect("tempdir");
    let ok = Command::new("dpkg-deb")
        .arg("-e")
        .arg(agent)
        .arg(x.path())
        .status()
        .expect("dpkg-deb -e");
    assert!(ok.success());
    for s in ["postinst", "prerm", "postrm"] {
        assert_eq!(mode(&x.path().join(s)), 0o755, "{s}");
    }
    let postinst = std::fs::read_to_string(x.path().join("postinst")).expect("postinst");
    assert!(
        postinst.contains("useradd") && postinst.contains("enable sundial-agent.service"),
        "{postinst}"
    );
    assert_eq!(
        std::fs::read_to_string(x.path().join("conffiles"))
            .expect("conffiles")
            .trim(),
        "/etc/sundial/agent.toml"
    );
    let tree = tempfile::tempdir().expect("tempdir");
    assert!(Command::new("dpkg-deb")
        .arg("-x")
        .arg(agent)
        .arg(tree.path())
        .status()
        .expect("-x")
        .success());
    let unit =
        std::fs::read_to_string(tree.path().join("lib/systemd/system/sundial-agent.service"))
            .expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/sundial-agent run --config /etc/sundial/agent.toml"));
    let coord = debs
        .iter()
        .find(|d| d.to_string_lossy().contains("sundial-coordinator_"))
        .expect("coordinator deb");
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(coord)
        .output()
        .expect("dpkg-deb -c");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("./usr/bin/sundialctl")
            && list.contains("./usr/bin/sundial-coordinator")
            && list.contains("./usr/share/man/man1/sundialctl-task-create.1.gz")
            && list.contains("./usr/share/man/man1/sundial-coordinator-serve.1.gz"),
        "{list}"
    );
}

#[test]
fn units_are_clean_under_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(repo().join("deploy/sundial-agent.service"))
        .arg(repo().join("deploy/sundial-coordinator.service"))
        .output()
    else {
        eprintln!("systemd-analyze is not installed here; nothing to verify");
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    // The binaries are not installed on this machine; anything else is a finding.
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.trim().is_empty() && !l.contains("is not executable: No such file or directory")
        })
        .collect();
    assert!(findings.is_empty(), "systemd-analyze verify: {findings:#?}");
}

#[test]
fn units_expose_little_under_systemd_analyze_security() {
    for (unit, max) in [
        ("deploy/sundial-coordinator.service", 2.0),
        ("deploy/sundial-agent.service", 2.0),
    ] {
        let Ok(out) = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(repo().join(unit))
            .output()
        else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI must have systemd-analyze");
            }
            eprintln!("SKIPPED: systemd-analyze is not installed here");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let level: f64 = text
            .lines()
            .find_map(|l| {
                l.split("Overall exposure level for ")
                    .nth(1)?
                    .split(": ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{text}"));
        assert!(level <= max, "{unit}: exposure {level} (at most {max})");
    }
}
