//! The web dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver): every part loads with no
//! console error, shows the agents, tasks and runs `sundialctl -o json`
//! shows, and updates when a run arrives. A screenshot is saved under
//! `target/test-artefacts/`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Coordinator};
use serde_json::{json, Value};

fn browser_available() -> bool {
    let found = ["/usr/bin/chromium", "/usr/bin/chromedriver"]
        .iter()
        .all(|p| std::path::Path::new(p).exists());
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("CI must install chromium and chromium-driver (Debian) for the dashboard test");
    }
    eprintln!("SKIPPED: chromium or chromedriver is not installed (apt-get install chromium chromium-driver)");
    false
}

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One WebDriver call: (method, path, body) → the answer's `value`.
fn wd(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    // Headers, then Content-Length bytes of body.
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    // A signal (a child of the browser ending) may interrupt a read.
    let mut read = |buf: &mut [u8]| loop {
        match s.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other.map_err(|e| e.to_string()),
        }
    };
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = read(&mut chunk)?;
        if n == 0 {
            return Err("no HTTP answer".into());
        }
        raw.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut answer = raw[head_end + 4..].to_vec();
    while answer.len() < len {
        let n = read(&mut chunk)?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    let v: Value = serde_json::from_slice(&answer)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&answer)))?;
    if v["value"]["error"].is_string() {
        return Err(format!(
            "{}: {}",
            v["value"]["error"], v["value"]["message"]
        ));
    }
    Ok(v["value"].clone())
}

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
}

impl Driver {
    fn start(root: &std::path::Path) -> Driver {
        let addr = free_tcp();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={}", addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let profile = root.join("chromium-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--window-size=1200,1400",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let deadline = Instant::now() + Duration::from_secs(30);
        let session = loop {
            match wd(addr, "POST", "/session", Some(&caps)) {
                Ok(v) => break v["sessionId"].as_str().unwrap_or("").to_owned(),
                Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        Driver {
            child,
            addr,
            session,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        wd(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// Runs `script` in the page; its return value.
    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = wd(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cells(d: &Driver, table: &str, column: usize) -> Vec<String> {
    d.js(&format!(
        "return [...document.querySelectorAll('#{table} tbody tr')].map(r => r.children[{column}].textContent)"
    ))
    .as_array()
    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
    .unwrap_or_default()
}

#[test]
fn the_dashboard_shows_the_fleet_in_a_browser_and_follows_new_runs() {
    if !browser_available() {
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let http = free_tcp();
    let coord = Coordinator::start_with(root.path(), &["--http", &http.to_string()]);
    let _a1 = coord.agent(&root.path().join("edge-1"), "edge-1");
    let _a2 = coord.agent(&root.path().join("edge-2"), "edge-2");
    coord.ctl_ok(&[
        "task",
        "create",
        "--name",
        "tick",
        "--selector",
        "site=lab",
        "--every",
        "1s",
        "--",
        "/bin/true",
    ]);
    coord.ctl_ok(&[
        "task", "create", "--name", "broken", "--agent", "edge-2", "--every", "2s", "--",
        "/bin/sh", "-c", "exit 4",
    ]);
    wait_for("runs stored", || coord.runs(&[]).len() >= 4);

    let d = Driver::start(root.path());
    d.call(
        "POST",
        "/url",
        Some(json!({"url": format!("http://{http}/")})),
    );
    wait_for("the page drawn", || {
        d.js("return document.getElementById('updated').textContent")
            .as_str()
            .is_some_and(|t| t.starts_with("as of"))
    });
    // The same agents and tasks as sundialctl.
    let mut agents: Vec<String> = cells(&d, "agents", 0)
        .iter()
        .map(|c| c.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    agents.sort();
    let mut want_agents: Vec<String> = coord
        .json(&["agent", "list"])
        .as_array()
        .expect("agents")
        .iter()
        .map(|a| a["name"].as_str().unwrap_or("").to_owned())
        .collect();
    want_agents.sort();
    assert_eq!(agents, want_agents);
    let mut tasks: Vec<String> = cells(&d, "tasks", 0)
        .iter()
        .map(|c| c.split_whitespace().next().unwrap_or("").to_owned())
        .collect();
    tasks.sort();
    assert_eq!(tasks, vec!["broken", "tick"]);
    // Failures say why.
    wait_for("a failed run with its reason", || {
        d.js("return [...document.querySelectorAll('#runs tbody tr')].some(r => r.children[4].textContent === 'failed' && r.children[7].textContent === 'exit 4')")
            == Value::Bool(true)
    });
    // It follows: a run stored after the page was drawn appears.
    let newest = |d: &Driver| -> Option<String> {
        d.js("const r = document.querySelector('#runs tbody tr'); return r ? r.dataset.run : null")
            .as_str()
            .map(str::to_owned)
    };
    let first = newest(&d).expect("a run shown");
    wait_for("a newer run shown", || {
        newest(&d).is_some_and(|n| n != first)
    });
    let shown = newest(&d).expect("a run");
    let stored: Vec<String> = coord
        .runs(&[])
        .iter()
        .map(|r| {
            format!(
                "{}/{}/{}/{}",
                r["task_id"].as_str().unwrap_or(""),
                r["agent_id"].as_str().unwrap_or(""),
                r["scheduled_at"].as_str().unwrap_or(""),
                r["attempt"]
            )
        })
        .collect();
    assert!(stored.contains(&shown), "{shown} is not a stored run");
    // The plots are drawn: a dot per recent run, bars for lateness.
    assert!(
        d.js("return document.querySelectorAll('#timeline circle').length")
            .as_u64()
            > Some(2)
    );
    assert_eq!(
        d.js("return document.querySelectorAll('#lateness rect').length")
            .as_u64(),
        Some(10)
    );
    // No console error.
    let log = d.call("POST", "/se/log", Some(json!({"type": "browser"})));
    let errors: Vec<&Value> = log
        .as_array()
        .map(|a| a.iter().filter(|e| e["level"] == "SEVERE").collect())
        .unwrap_or_default();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    // A screenshot, as a test artefact.
    let png = d.call("GET", "/screenshot", None);
    let bytes = base64_decode(png.as_str().unwrap_or(""));
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-artefacts");
    std::fs::create_dir_all(&dir).expect("artefacts dir");
    std::fs::write(dir.join("dashboard.png"), &bytes).expect("screenshot saved");
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}
