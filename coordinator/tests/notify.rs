//! The webhook (`serve --notify`): a receiver on loopback gets every failed
//! run exactly once, signed, also after it was down for a while and after
//! the coordinator was killed and restarted; a receiver that never answers
//! does not slow the fleet.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_for, Agent, Coordinator};
use serde_json::Value;

const SECRET: &str = "a shared secret";

#[derive(Debug, Clone)]
struct Got {
    id: String,
    signed_ok: bool,
    body: Value,
}

/// A webhook receiver: answers 200 to every POST (or never, when `hang`).
struct Receiver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn read_request(s: &mut TcpStream) -> Option<(BTreeMap<String, String>, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // A signal may interrupt a read: read again.
    let mut read = |buf: &mut [u8]| loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other.ok(),
        }
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = read(&mut chunk)?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = read(&mut chunk)?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, body))
}

impl Receiver {
    fn start(addr: SocketAddr, got: Arc<Mutex<Vec<Got>>>, hang: bool) -> Receiver {
        let listener = TcpListener::bind(addr).expect("the receiver binds");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let (s, g) = (stop.clone(), got.clone());
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let Some((headers, body)) = read_request(&mut conn) else {
                    continue;
                };
                if hang {
                    held.push(conn);
                    continue;
                }
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
                let want = format!(
                    "sha256={}",
                    sundial_protocol::token::hex(ring::hmac::sign(&key, &body).as_ref())
                );
                g.lock().expect("lock").push(Got {
                    id: headers.get("x-sundial-id").cloned().unwrap_or_default(),
                    signed_ok: headers.get("x-sundial-signature") == Some(&want),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Receiver {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn failed_run_ids(coord: &Coordinator) -> Vec<String> {
    coord
        .runs(&[])
        .iter()
        .filter(|r| r["outcome"] == "failed")
        .map(|r| {
            format!(
                "{}/{}/{}/{}",
                r["task_id"].as_str().unwrap_or(""),
                r["agent_id"].as_str().unwrap_or(""),
                r["scheduled_at"].as_str().unwrap_or(""),
                r["attempt"]
            )
        })
        .collect()
}

fn start_fleet(root: &std::path::Path, url: &str) -> (Coordinator, Agent) {
    start_fleet_with(root, url, &[])
}

fn start_fleet_with(root: &std::path::Path, url: &str, extra: &[&str]) -> (Coordinator, Agent) {
    let secret = root.join("notify.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    let mut args = vec![
        "--notify",
        url,
        "--notify-secret-file",
        secret.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(extra);
    let coord = Coordinator::start_with(root, &args);
    let agent = coord.agent(&root.join("agent"), "edge-1");
    (coord, agent)
}

#[test]
fn every_failed_run_reaches_the_receiver_once_signed_through_its_outage_and_a_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), got.clone(), false);
    let port = receiver.addr;
    let (mut coord, mut agent) = start_fleet(root.path(), &format!("http://{port}/hooks/sundial"));
    coord.ctl_ok(&[
        "task", "create", "--name", "broken", "--agent", "edge-1", "--every", "1s", "--",
        "/bin/sh", "-c", "exit 3",
    ]);
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "fine",
        "--agent",
        "edge-1",
        "--every",
        "1s",
        "--",
        "/bin/true",
    ]);
    wait_for("three notifications", || {
        got.lock().expect("lock").len() >= 3
    });
    // The receiver goes away; failures go on; the coordinator is killed
    // and comes back while it is away.
    receiver.stop();
    let before = got.lock().expect("lock").len();
    wait_for("more failures stored", || {
        failed_run_ids(&coord).len() >= before + 3
    });
    coord.kill9();
    std::thread::sleep(Duration::from_secs(2));
    coord.restart();
    wait_for("failures stored after the restart", || {
        failed_run_ids(&coord).len() >= before + 6
    });
    // Back, on the same address.
    let _receiver = Receiver::start(port, got.clone(), false);
    coord.ctl_ok(&["task", "cancel", "broken", "fine"]);
    // Every record synced, then every failed run told, once.
    agent.stop();
    let mut agent = Agent::start(&agent.dir.clone());
    wait_for("the outbox synced", || agent.status().outbox_len == 0);
    agent.stop();
    let want = failed_run_ids(&coord);
    wait_for("a notification for every failed run", || {
        let g = got.lock().expect("lock");
        want.iter().all(|id| g.iter().any(|n| n.id == *id))
    });
    std::thread::sleep(Duration::from_secs(2));
    let g = got.lock().expect("lock").clone();
    let mut seen = std::collections::BTreeSet::new();
    for n in &g {
        assert!(n.signed_ok, "a bad signature: {n:?}");
        assert!(seen.insert(n.id.clone()), "told twice: {}", n.id);
        assert_eq!(n.body["kind"], "run");
        assert_eq!(n.body["outcome"], "failed", "{n:?}");
        assert_eq!(n.body["why"], "exit 3");
        assert_eq!(n.body["id"], n.id);
    }
    assert_eq!(seen.len(), want.len(), "one per failed run, no more");
}

#[test]
fn a_receiver_that_never_answers_does_not_slow_the_fleet() {
    let root = tempfile::tempdir().expect("tempdir");
    let got = Arc::new(Mutex::new(Vec::new()));
    let _receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), got.clone(), true);
    let url = format!("http://{}/", _receiver.addr);
    let (coord, agent) = start_fleet(root.path(), &url);
    coord.ctl_ok(&[
        "task", "create", "--name", "broken", "--agent", "edge-1", "--every", "200ms", "--",
        "/bin/sh", "-c", "exit 1",
    ]);
    // Runs keep being stored, acknowledged and counted while every POST
    // hangs for its 10 s timeout.
    wait_for("twenty failed runs stored", || {
        failed_run_ids(&coord).len() >= 20
    });
    assert!(got.lock().expect("lock").is_empty());
    let backlog = agent.status().outbox_len;
    assert!(backlog < 20, "the agent's outbox grew to {backlog}");
}

#[test]
fn an_agent_offline_too_long_is_told_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let got = Arc::new(Mutex::new(Vec::new()));
    let _receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"), got.clone(), false);
    let url = format!("http://{}/", _receiver.addr);
    let (coord, mut agent) = start_fleet_with(root.path(), &url, &["--notify-offline-after", "3s"]);
    wait_for("the agent online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    agent.stop();
    let offline = |g: &[Got]| {
        g.iter()
            .filter(|n| n.body["kind"] == "agent_offline")
            .cloned()
            .collect::<Vec<_>>()
    };
    wait_for("an offline notification", || {
        !offline(&got.lock().expect("lock")).is_empty()
    });
    // Several more checks: still once.
    std::thread::sleep(Duration::from_secs(4));
    let told = offline(&got.lock().expect("lock"));
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].body["agent_id"], "a1");
    assert!(told[0].signed_ok);
    assert!(told[0].body["offline_ms"].as_i64() > Some(3_000));
}
