//! `sundialctl` fails clearly and quickly: no credentials, a bad credentials
//! file, an unreachable coordinator (within about 5 s, not a hang).

use std::process::Command;
use std::time::{Duration, Instant};

const CTL: &str = env!("CARGO_BIN_EXE_sundialctl");

#[test]
fn missing_and_bad_credentials_are_explained() {
    let out = Command::new(CTL)
        .args(["agent", "list"])
        .env_remove("SUNDIAL_CREDS")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SUNDIAL_CREDS"));
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("creds");
    std::fs::write(&bad, "{ not json").expect("write");
    let out = Command::new(CTL)
        .args(["agent", "list", "--creds"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a Sundial credentials file"));
}

#[test]
fn an_unreachable_coordinator_is_reported_within_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coord = dir.path().join("coord");
    // A real coordinator's credentials, but nothing serves on its port.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let init = Command::new(env!("CARGO_BIN_EXE_sundial-coordinator"))
        .args(["init", "--data-dir"])
        .arg(&coord)
        .args(["--advertise", &format!("127.0.0.1:{port}")])
        .output()
        .expect("init");
    assert!(init.status.success());
    let start = Instant::now();
    let out = Command::new(CTL)
        .args(["agent", "list"])
        .env("SUNDIAL_CREDS", coord.join("admin.creds"))
        .output()
        .expect("runs");
    let took = start.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("coordinator"), "{err}");
    // Generous bound: the client gives up after 5 s; this only catches a hang.
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn init_refuses_to_overwrite_a_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_sundial-coordinator"))
            .args(["init", "--data-dir"])
            .arg(dir.path())
            .args(["--advertise", "127.0.0.1:7447"])
            .output()
            .expect("init")
    };
    assert!(run().status.success());
    let again = run();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a coordinator"));
}

#[test]
fn init_as_root_on_a_service_users_directory_says_the_command_to_run() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: needs root (init refuses only when run as root)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("coordinator");
    std::fs::create_dir(&data).expect("mkdir");
    // Owned by `nobody`, as the packaged directory is owned by `sundial`.
    rustix::fs::chown(
        &data,
        Some(rustix::fs::Uid::from_raw(65_534)),
        Some(rustix::fs::Gid::from_raw(65_534)),
    )
    .expect("chown");
    let out = Command::new(env!("CARGO_BIN_EXE_sundial-coordinator"))
        .args(["init", "--data-dir"])
        .arg(&data)
        .args(["--advertise", "127.0.0.1:7447"])
        .output()
        .expect("init");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runuser -u "), "{err}");
    assert!(
        err.contains("-- sundial-coordinator init --data-dir"),
        "{err}"
    );
    assert!(!data.join("ca.pem").exists(), "init wrote keys as root");
}

#[test]
fn a_second_coordinator_on_the_same_data_dir_says_so_at_once() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut coord = common_start(root.path());
    let out = Command::new(env!("CARGO_BIN_EXE_sundial-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(root.path().join("coord"))
        .output()
        .expect("serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is another sundial-coordinator serving this data directory"),
        "{err}"
    );
    let _ = coord.kill();
    let _ = coord.wait();
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// A serving coordinator (kept alive by the returned child).
fn common_start(root: &std::path::Path) -> std::process::Child {
    let dir = root.join("coord");
    let init = Command::new(env!("CARGO_BIN_EXE_sundial-coordinator"))
        .args(["init", "--advertise", "127.0.0.1:7447", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("init");
    assert!(init.status.success());
    let child = Command::new(env!("CARGO_BIN_EXE_sundial-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    // Serving once its store is open (a lock file exists while it runs).
    std::thread::sleep(Duration::from_millis(1_500));
    child
}
