//! The Debian packages on a real systemd: Debian bookworm booted under
//! `systemd-nspawn`, with systemd as PID 1, and the packages built from
//! this tree installed, run, restarted, killed, rebooted, upgraded and
//! purged inside it, as a device owner and an operator would.
//!
//! Needs root, `systemd-nspawn`, `nsenter` and (for a first run)
//! `debootstrap` with a Debian mirror. Without them it says why and passes;
//! under CI (`CI=true`) it fails instead. The minimal root file system is
//! kept between runs in the temporary directory
//! (`$TMPDIR/sundial-rootfs-cache`, or `SUNDIAL_ROOTFS_CACHE`); every run
//! boots a fresh copy of it. The container has its own network namespace
//! (`--private-network`): the coordinator listens there, on its loopback.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2,ca-certificates,adduser,procps";
const ADDR: &str = "127.0.0.1:7447";
const CREDS: &str = "SUNDIAL_CREDS=/var/lib/sundial-coordinator/admin.creds";
/// Generous: a busy 2-core machine boots and restarts slowly.
const LONG: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sundialctl"))
        .parent()
        .expect("a directory")
        .to_path_buf()
}

/// Why this machine cannot run the test, if it cannot.
fn missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root (systemd-nspawn boots a container)".into());
    }
    for tool in ["systemd-nspawn", "nsenter", "chroot", "dpkg-deb"] {
        if !on_path(tool) {
            return Some(format!(
                "{tool} not found (apt-get install systemd-container util-linux coreutils dpkg)"
            ));
        }
    }
    if !cache_dir().join("etc/os-release").exists() && !on_path("debootstrap") {
        return Some("no cached root file system and no debootstrap to make one".into());
    }
    if !bin_dir().join("sundial-agent").exists() {
        return Some("sundial-agent is not built beside this test (cargo test --workspace)".into());
    }
    None
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("SUNDIAL_ROOTFS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sundial-rootfs-cache"));
    // The package list is part of the name: a changed list makes a new one.
    let tag: u32 = INCLUDE.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    base.join(format!("{SUITE}-minbase-{tag:08x}"))
}

/// The Debian mirror apt is configured with (debootstrap needs one).
fn mirror() -> String {
    if let Ok(m) = std::env::var("SUNDIAL_DEBIAN_MIRROR") {
        return m;
    }
    let mut texts = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            texts.extend(std::fs::read_to_string(e.path()));
        }
    }
    texts.extend(std::fs::read_to_string("/etc/apt/sources.list"));
    for t in &texts {
        for line in t.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.contains("://"))
            } else {
                None
            };
            // Debian's own archive, not security or a third party's.
            if let Some(u) = uri.filter(|u| u.trim_end_matches('/').ends_with("/debian")) {
                return u.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// The cached minimal bookworm, made once with debootstrap (about a minute).
fn cached_rootfs() -> PathBuf {
    let dir = cache_dir();
    if dir.join("etc/os-release").exists() {
        eprintln!("root file system: cached at {}", dir.display());
        return dir;
    }
    let parent = dir.parent().expect("a parent");
    std::fs::create_dir_all(parent).expect("cache directory");
    let partial = parent.join(format!(".partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    let started = Instant::now();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&partial)
        .arg(mirror())
        .output()
        .expect("debootstrap runs");
    assert!(
        out.status.success(),
        "debootstrap failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::rename(&partial, &dir).expect("cache in place");
    eprintln!(
        "root file system: made with debootstrap in {:.0?}",
        started.elapsed()
    );
    dir
}

fn run_host(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A booted container: nspawn in the foreground, its systemd as `leader`.
struct Machine {
    nspawn: Option<Child>,
    leader: i32,
    log: PathBuf,
}

impl Machine {
    fn boot(root: &Path, log: &Path) -> Machine {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=pipe",
                "-b",
            ])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .process_group(0)
            .spawn()
            .expect("systemd-nspawn starts");
        let mut m = Machine {
            nspawn: Some(child),
            leader: 0,
            log: log.to_path_buf(),
        };
        let pid = m.nspawn.as_ref().map_or(0, Child::id);
        let deadline = Instant::now() + LONG;
        while m.leader == 0 {
            assert!(Instant::now() < deadline, "no init in the container");
            m.check_alive();
            m.leader = children(pid)
                .into_iter()
                .find(|c| comm(*c).as_deref() == Some("systemd"))
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        m.wait_until("the container finished booting", || {
            let o = m.sh("systemctl is-system-running");
            let s = String::from_utf8_lossy(&o.stdout);
            s.trim() == "running" || s.trim() == "degraded"
        });
        m
    }

    fn check_alive(&mut self) {
        if let Some(c) = self.nspawn.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "systemd-nspawn exited ({st}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
        }
    }

    /// A shell command inside the container, with every namespace of its init.
    fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args([
                "-t",
                &self.leader.to_string(),
                "-a",
                "--",
                "/bin/sh",
                "-c",
                script,
            ])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null())
            .output()
            .expect("nsenter runs")
    }

    /// A command that must succeed; its standard output.
    fn ok(&self, script: &str) -> String {
        let o = self.sh(script);
        if !o.status.success() {
            let journal = self.sh("journalctl -n 60 --no-pager");
            panic!(
                "in the container, `{script}` failed ({}):\n{}{}\n-- last journal lines --\n{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + LONG;
        while !f() {
            if Instant::now() > deadline {
                let journal = self.sh("journalctl -n 80 --no-pager");
                panic!(
                    "timed out waiting until {what}\n-- last journal lines --\n{}",
                    String::from_utf8_lossy(&journal.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.ok(&format!("systemctl show -P MainPID {unit}"))
            .parse()
            .expect("a pid")
    }

    fn wait_active(&self, unit: &str) {
        self.wait_until(&format!("{unit} is active"), || {
            self.sh(&format!("systemctl is-active --quiet {unit}"))
                .status
                .success()
                && self.main_pid(unit) != 0
        });
    }

    /// `systemctl reboot` or `poweroff` inside; nspawn's exit code.
    fn shut(mut self, verb: &str) -> i32 {
        let _ = self.sh(&format!("systemctl {verb} --no-block"));
        let mut child = self.nspawn.take().expect("running");
        let deadline = Instant::now() + LONG;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the container did not {verb}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut c) = self.nspawn.take() {
            if let Some(pg) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process_group(pg, rustix::process::Signal::KILL);
            }
            let _ = c.wait();
        }
    }
}

fn children(pid: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .expect("exists")
        .permissions()
        .mode()
        & 0o7777
}

/// The scheduled instants the every-second task wrote, one line a firing.
fn fires(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("srv/fires/tick"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn assert_fired_once_each(root: &Path) {
    let all = fires(root);
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(
        all.len(),
        distinct.len(),
        "an occurrence fired more than once: {all:?}"
    );
}

/// Runs recorded at the coordinator for `task`: (scheduled_at, attempt, outcome).
fn runs(m: &Machine, task: &str) -> Vec<(String, u64, String)> {
    let text = m.ok(&format!(
        "{CREDS} sundialctl run list --task {task} --limit 10000 -o json"
    ));
    let v: serde_json::Value = serde_json::from_str(&text).expect("run list JSON");
    v.as_array()
        .expect("an array")
        .iter()
        .map(|r| {
            (
                r["scheduled_at"].as_str().unwrap_or_default().to_string(),
                r["attempt"].as_u64().unwrap_or_default(),
                r["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn succeeded(m: &Machine, task: &str) -> usize {
    runs(m, task).iter().filter(|r| r.2 == "succeeded").count()
}

/// Waits until `task` has `more` succeeded runs beyond what it has now.
fn runs_go_on(m: &Machine, task: &str, more: usize) {
    let before = succeeded(m, task);
    m.wait_until(&format!("{more} more runs of {task} are recorded"), || {
        succeeded(m, task) >= before + more
    });
}

fn exposure(m: &Machine, unit: &str) -> f64 {
    let text = m.ok(&format!("systemd-analyze security --no-pager {unit} 2>&1"));
    let last = text
        .lines()
        .rev()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    last.split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read: {last}"))
}

fn debs(out: &Path) -> (PathBuf, PathBuf) {
    let text = run_host(
        Command::new("sh")
            .arg(repo().join("deploy/build-deb.sh"))
            .arg("--bin-dir")
            .arg(bin_dir())
            .arg("--out")
            .arg(out),
    );
    let find = |name: &str| {
        text.lines()
            .map(PathBuf::from)
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")))
            })
            .unwrap_or_else(|| panic!("build-deb.sh made no {name}: {text}"))
    };
    (find("sundial-agent"), find("sundial-coordinator"))
}

#[test]
fn packages_install_run_survive_restarts_and_reboots_upgrade_and_purge_under_systemd() {
    if let Some(why) = missing() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI must run the systemd-nspawn test, but: {why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (agent_deb, coord_deb) = debs(&tmp.path().join("debs"));
    let cache = cached_rootfs();
    let root = tmp.path().join("root");
    run_host(
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&cache)
            .arg(&root),
    );
    let stage = root.join("root/sundial");
    std::fs::create_dir_all(&stage).expect("stage");
    for f in [&agent_deb, &coord_deb] {
        std::fs::copy(f, stage.join(f.file_name().expect("a name"))).expect("copy deb");
    }
    run_host(
        Command::new("cp")
            .arg("-a")
            .arg(repo().join("deploy"))
            .arg(&stage),
    );
    std::fs::copy(bin_dir().join("sundial-agent"), stage.join("sundial-agent")).expect("binary");
    let agent_deb_in = format!(
        "/root/sundial/{}",
        agent_deb
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8")
    );
    let coord_deb_in = format!(
        "/root/sundial/{}",
        coord_deb
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8")
    );
    let wants = root.join("etc/systemd/system/multi-user.target.wants/sundial-agent.service");

    // An image built offline: the agent package installed into the root
    // file system with no systemd running is enabled, and a purge there
    // leaves no enablement link behind.
    assert!(!root.join("run/systemd/system").exists());
    let chroot = |cmd: &str| {
        run_host(
            Command::new("chroot")
                .arg(&root)
                .args(["/bin/sh", "-c", cmd])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    chroot(&format!("dpkg -i {agent_deb_in}"));
    assert!(
        std::fs::symlink_metadata(&wants).is_ok(),
        "an offline install leaves the agent disabled"
    );
    chroot("dpkg --purge sundial-agent");
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "a purge in a chroot leaves {} behind",
        wants.display()
    );
    chroot(&format!("dpkg -i {agent_deb_in}"));
    let boot_log = tmp.path().join("nspawn.log");
    let first = Instant::now();
    let m = Machine::boot(&root, &boot_log);
    eprintln!("booted in {:.1?}", first.elapsed());

    // First boot: enabled, and waiting for enrollment rather than failing.
    assert_eq!(m.ok("systemctl is-enabled sundial-agent"), "enabled");
    assert_eq!(
        m.ok("systemctl show -P ConditionResult sundial-agent"),
        "no"
    );
    assert!(!m
        .sh("systemctl is-failed --quiet sundial-agent")
        .status
        .success());

    // The coordinator's package installed on the running system.
    m.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive dpkg -i {coord_deb_in}"
    ));
    assert_eq!(m.ok("systemctl is-enabled sundial-coordinator"), "enabled");
    m.ok("id -u sundial");
    assert_eq!(
        m.ok("getent passwd sundial | cut -d: -f7"),
        "/usr/sbin/nologin"
    );
    for (path, want, owner) in [
        ("var/lib/sundial-agent", 0o700, "sundial"),
        ("var/lib/sundial-coordinator", 0o700, "sundial"),
        ("etc/sundial/agent.toml", 0o644, "root"),
        ("etc/sundial/coordinator.toml", 0o644, "root"),
        ("usr/bin/sundial-agent", 0o755, "root"),
        ("usr/bin/sundial-coordinator", 0o755, "root"),
        ("usr/bin/sundialctl", 0o755, "root"),
        ("lib/systemd/system/sundial-agent.service", 0o644, "root"),
        (
            "lib/systemd/system/sundial-coordinator.service",
            0o644,
            "root",
        ),
    ] {
        assert_eq!(mode(&root.join(path)), want, "mode of /{path}");
        assert_eq!(
            m.ok(&format!("stat -c %U /{path}")),
            owner,
            "owner of /{path}"
        );
    }

    // Both units' exposure, as systemd itself rates them.
    for unit in ["sundial-agent.service", "sundial-coordinator.service"] {
        let score = exposure(&m, unit);
        eprintln!("systemd-analyze security {unit}: {score}");
        assert!(score <= 3.5, "{unit} is rated {score}, above 3.5");
    }

    // `init` as root refuses and names the command; as the user it works.
    let o = m.sh("sundial-coordinator init --data-dir /var/lib/sundial-coordinator --advertise 127.0.0.1:7447");
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "init as root went ahead");
    assert!(
        said.contains("runuser -u sundial -- sundial-coordinator init"),
        "{said}"
    );
    m.ok(&format!("runuser -u sundial -- sundial-coordinator init --data-dir /var/lib/sundial-coordinator --advertise {ADDR}"));
    m.ok("systemctl start sundial-coordinator");
    m.wait_active("sundial-coordinator");
    let token = m.ok(&format!("{CREDS} sundialctl token create"));
    m.ok(&format!(
        "printf '%s\\n' '{token}' | runuser -u sundial -- sundial-agent join --coordinator {ADDR} \
         --token-file - --data-dir /var/lib/sundial-agent --name dev1 --allow-exec /bin/sh"
    ));
    // Where a task writes is the owner's choice, by a drop-in.
    m.ok("install -d -o sundial -g sundial /srv/fires \
          && mkdir -p /etc/systemd/system/sundial-agent.service.d \
          && printf '[Service]\\nReadWritePaths=/srv/fires\\n' > /etc/systemd/system/sundial-agent.service.d/fires.conf \
          && systemctl daemon-reload && systemctl start sundial-agent");
    m.wait_active("sundial-agent");
    m.ok(&format!(
        "{CREDS} sundialctl task create --name tick --agent dev1 --every 1s -- \
         /bin/sh -c 'echo $SUNDIAL_SCHEDULED_AT >> /srv/fires/tick'"
    ));
    runs_go_on(&m, "tick", 3);

    // restart, and kill -9 of each main process: systemd brings it back.
    for unit in ["sundial-coordinator", "sundial-agent"] {
        let pid = m.main_pid(unit);
        m.ok(&format!("systemctl restart {unit}"));
        m.wait_active(unit);
        assert_ne!(m.main_pid(unit), pid, "{unit} was not restarted");
        let pid = m.main_pid(unit);
        m.ok(&format!("kill -9 {pid}"));
        m.wait_until(&format!("systemd restarts {unit} after kill -9"), || {
            let now = m.main_pid(unit);
            now != 0 && now != pid
        });
        m.wait_active(unit);
        runs_go_on(&m, "tick", 2);
    }
    assert_fired_once_each(&root);

    // A stop lets a running action finish (the drain) and records it.
    m.ok(&format!(
        "{CREDS} sundialctl task create --name slow --agent dev1 --at $(date -u -d '+2 seconds' +%Y-%m-%dT%H:%M:%SZ) -- \
         /bin/sh -c 'touch /srv/fires/slow-started; sleep 4; touch /srv/fires/slow-done'"
    ));
    m.wait_until("the slow action started", || {
        root.join("srv/fires/slow-started").exists()
    });
    m.ok("systemctl stop sundial-agent");
    assert!(
        root.join("srv/fires/slow-done").exists(),
        "stopping the agent cut its running action short"
    );
    m.ok("systemctl start sundial-agent");
    m.wait_until("the drained run is recorded succeeded", || {
        runs(&m, "slow").iter().any(|r| r.2 == "succeeded")
    });
    assert!(
        !runs(&m, "slow").iter().any(|r| r.2 == "interrupted"),
        "the drained run was recorded interrupted: {:?}",
        runs(&m, "slow")
    );

    // A reboot and a power-off: both services come back by themselves.
    let mut m = m;
    for (verb, code) in [("reboot", 133), ("poweroff", 0)] {
        assert_eq!(m.shut(verb), code, "nspawn's exit code after {verb}");
        m = Machine::boot(&root, &boot_log);
        m.wait_active("sundial-coordinator");
        m.wait_active("sundial-agent");
        runs_go_on(&m, "tick", 3);
        assert_fired_once_each(&root);
    }

    // Upgrade by reinstalling both packages: restarted, identity and runs kept.
    let id_before = m.ok("sundial-agent status --data-dir /var/lib/sundial-agent");
    let pids = (
        m.main_pid("sundial-agent"),
        m.main_pid("sundial-coordinator"),
    );
    m.ok(&format!(
        "DEBIAN_FRONTEND=noninteractive dpkg -i {agent_deb_in} {coord_deb_in}"
    ));
    m.wait_active("sundial-agent");
    m.wait_active("sundial-coordinator");
    assert_ne!(
        m.main_pid("sundial-agent"),
        pids.0,
        "the upgrade did not restart the agent"
    );
    assert_ne!(
        m.main_pid("sundial-coordinator"),
        pids.1,
        "the upgrade did not restart the coordinator"
    );
    let id_after = m.ok("sundial-agent status --data-dir /var/lib/sundial-agent");
    assert_eq!(
        id_before.lines().next(),
        id_after.lines().next(),
        "the agent's identity changed"
    );
    runs_go_on(&m, "tick", 2);
    assert_fired_once_each(&root);

    // Purge the agent's package: stopped, no unit, no link, no state.
    m.ok("dpkg --purge sundial-agent");
    assert!(!m
        .sh("systemctl is-active --quiet sundial-agent")
        .status
        .success());
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "purge left {}",
        wants.display()
    );
    assert!(!root
        .join("lib/systemd/system/sundial-agent.service")
        .exists());
    assert!(!root.join("var/lib/sundial-agent").exists());

    // install-agent.sh on the same device: install, upgrade, uninstall.
    let token = m.ok(&format!("{CREDS} sundialctl token create"));
    m.ok(&format!(
        "sh /root/sundial/deploy/install-agent.sh --binary /root/sundial/sundial-agent \
         --coordinator {ADDR} --token '{token}' --name dev2 --allow-exec /bin/sh"
    ));
    m.wait_active("sundial-agent");
    assert_eq!(m.ok("systemctl is-enabled sundial-agent"), "enabled");
    m.ok(&format!(
        "{CREDS} sundialctl task create --name tock --agent dev2 --every 1s -- /bin/sh -c 'exit 0'"
    ));
    runs_go_on(&m, "tock", 2);
    let pid = m.main_pid("sundial-agent");
    m.ok("sh /root/sundial/deploy/install-agent.sh --binary /root/sundial/sundial-agent");
    m.wait_active("sundial-agent");
    assert_ne!(
        m.main_pid("sundial-agent"),
        pid,
        "the script's upgrade did not restart"
    );
    runs_go_on(&m, "tock", 2);
    m.ok("sh /root/sundial/deploy/install-agent.sh --uninstall --purge");
    assert!(!m
        .sh("systemctl is-active --quiet sundial-agent")
        .status
        .success());
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "uninstall left {}",
        wants.display()
    );
    assert!(!root
        .join("etc/systemd/system/sundial-agent.service")
        .exists());
    assert!(!root.join("var/lib/sundial-agent").exists());

    // And the coordinator's purge.
    m.ok("dpkg --purge sundial-coordinator");
    assert!(!m
        .sh("systemctl is-active --quiet sundial-coordinator")
        .status
        .success());
    assert!(!root.join("var/lib/sundial-coordinator").exists());
    assert!(std::fs::symlink_metadata(
        root.join("etc/systemd/system/multi-user.target.wants/sundial-coordinator.service")
    )
    .is_err());
    assert_eq!(m.shut("poweroff"), 0);
    eprintln!("systemd-nspawn test: {:.0?} in all", started.elapsed());
}
