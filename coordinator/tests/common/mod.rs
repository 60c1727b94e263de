//! Helpers for fleet tests: a coordinator process, in-process agents, a
//! fault-injecting UDP relay, and `sundialctl`. Everything listens on
//! 127.0.0.1 and writes under temporary directories.

#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const COORDINATOR: &str = env!("CARGO_BIN_EXE_sundial-coordinator");
pub const CTL: &str = env!("CARGO_BIN_EXE_sundialctl");
/// Generous bound for anything that waits on the real clock.
pub const WAIT_MAX: Duration = Duration::from_secs(60);

pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// A coordinator process and its data directory.
pub struct Coordinator {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
    pub serve_args: Vec<String>,
    /// Environment of `serve` (e.g. libfaketime's), from the next restart.
    pub serve_env: Vec<(String, String)>,
    /// Where `serve` logs (appended across restarts).
    pub log: PathBuf,
}

impl Coordinator {
    /// `init` + `serve` on a free loopback port.
    pub fn start(root: &Path) -> Coordinator {
        Coordinator::start_with(root, &[])
    }

    /// `init` + `serve` with extra `serve` flags.
    pub fn start_with(root: &Path, serve_args: &[&str]) -> Coordinator {
        Coordinator::start_logged(root, serve_args, None)
    }

    /// As [`Coordinator::start_with`], logging to `log` (default: in its data dir).
    pub fn start_logged(root: &Path, serve_args: &[&str], log: Option<PathBuf>) -> Coordinator {
        let port = free_udp_port();
        let dir = root.join("coord");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let out = Command::new(COORDINATOR)
            .args(["init", "--data-dir"])
            .arg(&dir)
            .args(["--advertise", &addr.to_string()])
            .output()
            .expect("init runs");
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut c = Coordinator {
            dir,
            addr,
            child: None,
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
            serve_env: Vec::new(),
            log: log.unwrap_or_else(|| root.join("coord").join("serve.log")),
        };
        c.restart();
        c
    }

    pub fn creds(&self) -> PathBuf {
        self.dir.join("admin.creds")
    }

    /// Starts `serve` (again) on the same data and port.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(COORDINATOR)
            .args(["serve", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr.to_string()])
            .args(&self.serve_args)
            .envs(self.serve_env.iter().map(|(k, v)| (k, v)))
            .env("SUNDIAL_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve starts");
        self.child = Some(child);
        wait_for("the coordinator to answer", || {
            self.ctl(&["agent", "list"]).0
        });
    }

    /// Waits up to `max` for `serve` to exit by itself; its status, if it did.
    pub fn wait_exit(&mut self, max: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + max;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Stops `serve` as systemd does (SIGTERM) and waits for it.
    #[allow(dead_code)]
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            c.wait().expect("reaped");
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("reaped");
        }
    }

    /// Runs sundialctl with these credentials: (success, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        self.ctl_as(&self.creds(), args)
    }

    /// Runs sundialctl with the credentials in `creds`.
    pub fn ctl_as(&self, creds: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(CTL)
            .args(args)
            .env("SUNDIAL_CREDS", creds)
            .output()
            .expect("sundialctl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    }

    /// sundialctl that must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.ctl(args);
        assert!(ok, "sundialctl {args:?} failed: {err}");
        out
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ctl_ok(&a)).expect("JSON output")
    }

    pub fn token(&self, extra: &[&str]) -> String {
        let mut a = vec!["token", "create"];
        a.extend_from_slice(extra);
        self.ctl_ok(&a)
    }

    pub fn runs(&self, extra: &[&str]) -> Vec<Value> {
        let mut a = vec!["run", "list", "--limit", "10000"];
        a.extend_from_slice(extra);
        self.json(&a).as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Enrolls an agent in-process.
pub fn join(
    coordinator: &str,
    token: &str,
    dir: &Path,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(sundial_agent::enroll::join(
        dir,
        sundial_agent::enroll::JoinRequest {
            coordinator: Some(coordinator.to_owned()),
            token: token.to_owned(),
            name: Some(name.to_owned()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            allow_exec: vec!["/bin/sh".into(), "/bin/echo".into(), "/bin/true".into()],
            allow_env: vec![],
            allow_wasm: false,
            allow_wasm_dirs: vec![],
        },
    ))
    .map(|id| id.to_string())
}

impl Coordinator {
    /// Enrolls an agent named `name` (labels site=lab) in `dir` and starts it.
    pub fn agent(&self, dir: &Path, name: &str) -> Agent {
        join(
            &self.addr.to_string(),
            &self.token(&[]),
            dir,
            name,
            &[("site", "lab")],
        )
        .expect("joins");
        Agent::start(dir)
    }
}

/// An agent running in-process on its own thread and runtime.
pub struct Agent {
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    pub fn start(dir: &Path) -> Agent {
        Agent::start_with(dir, |_| {})
    }

    /// An agent whose configuration `set` changes first.
    pub fn start_with(
        dir: &Path,
        set: impl FnOnce(&mut sundial_agent::runtime::AgentConfig) + Send + 'static,
    ) -> Agent {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let d = dir.to_owned();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let mut cfg = sundial_agent::runtime::AgentConfig::new(d);
            set(&mut cfg);
            let r = rt.block_on(sundial_agent::runtime::run(cfg, async {
                let _ = rx.await;
            }));
            if let Err(e) = r {
                eprintln!("agent stopped with error: {e}");
            }
        });
        Agent {
            dir: dir.to_owned(),
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Stops the agent (like a power cut: runs going are reported interrupted later).
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn status(&self) -> sundial_agent::status::Status {
        sundial_agent::status::read(&self.dir).expect("status readable")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the relay does with packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Link {
    Pass = 0,
    /// Partition: nothing either way.
    DropBoth = 1,
    /// Coordinator → agent lost (acks never arrive).
    DropDown = 2,
}

/// A UDP relay for one client: the agent dials `addr`, the relay forwards to
/// the coordinator, and drops what its `Link` says.
pub struct Relay {
    pub addr: SocketAddr,
    link: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind back");
        front
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        back.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let addr = front.local_addr().expect("addr");
        let link = Arc::new(AtomicU8::new(Link::Pass as u8));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (front2, back2) = (
            front.try_clone().expect("clone"),
            back.try_clone().expect("clone"),
        );
        {
            let (link, stop, client) = (link.clone(), stop.clone(), client.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        *client.lock().expect("lock") = Some(from);
                        if link.load(Ordering::Relaxed) == Link::Pass as u8
                            || link.load(Ordering::Relaxed) == Link::DropDown as u8
                        {
                            let _ = back.send_to(&buf[..n], target);
                        }
                    }
                }
            });
        }
        {
            let (link, stop) = (link.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, _)) = back2.recv_from(&mut buf) {
                        let to = *client.lock().expect("lock");
                        if let (Some(to), true) =
                            (to, link.load(Ordering::Relaxed) == Link::Pass as u8)
                        {
                            let _ = front2.send_to(&buf[..n], to);
                        }
                    }
                }
            });
        }
        Relay { addr, link, stop }
    }

    pub fn set(&self, l: Link) {
        self.link.store(l as u8, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A run's scheduled time in ms from its JSON.
pub fn sched_ms(run: &Value) -> i64 {
    sundial_protocol::Timestamp::parse(run["scheduled_at"].as_str().expect("scheduled_at"))
        .expect("RFC 3339")
        .as_millis()
}
