//! A throw-away PostgreSQL cluster for one test: `initdb` in a temporary
//! directory, a server on a loopback port and a socket in that directory,
//! stopped (and deleted) when dropped. As root, the cluster runs as the
//! `postgres` user (PostgreSQL refuses to run as root).
//!
//! Without `initdb` on the machine the tests that need one skip with a
//! printed reason; under `CI=true` they fail instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running cluster.
#[derive(Debug)]
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    run_as: Option<String>,
    stopped: bool,
}

/// Where `initdb` and `pg_ctl` are: beside each other, in a Debian
/// versioned directory, or on the PATH.
fn find_bin() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    candidates.sort();
    candidates.reverse();
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates.into_iter().find(|d| {
        d.join("initdb").is_file() && d.join("pg_ctl").is_file() && d.join("postgres").is_file()
    })
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A free TCP port on loopback (bound, read, released).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(l.local_addr()?.port())
}

impl PgCluster {
    /// Starts a cluster, or says why it cannot (`Ok(None)`: skip). Under
    /// `CI=true` a missing PostgreSQL is an error.
    pub fn start() -> Result<Option<PgCluster>> {
        let Some(bin) = find_bin() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                bail!("CI=true but PostgreSQL (initdb, pg_ctl, postgres) is not installed");
            }
            eprintln!("skipped: PostgreSQL's initdb is not installed (apt-get install postgresql)");
            return Ok(None);
        };
        let run_as = is_root().then(|| "postgres".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("sundial-pg-")
            .tempdir()
            .context("temporary directory")?;
        if let Some(user) = &run_as {
            // The server's user must reach and own its directory.
            let status = Command::new("chown")
                .arg(user)
                .arg(dir.path())
                .status()
                .context("chown the cluster directory")?;
            if !status.success() {
                bail!("cannot hand {} to {user}", dir.path().display());
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        }
        let mut c = PgCluster {
            dir,
            bin,
            port: 0,
            run_as,
            stopped: true,
        };
        let data = c.data_dir();
        let out = c
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "sundial",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .context("run initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        c.port = free_port()?;
        c.start_server()?;
        let out = c
            .command("createdb")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &c.port.to_string(),
                "-U",
                "sundial",
                "sundial",
            ])
            .output()
            .context("run createdb")?;
        if !out.status.success() {
            bail!("createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Some(c))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    /// Starts the server (again, after [`PgCluster::stop`]) on the same port.
    pub fn start_server(&mut self) -> Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &opts, "start"])
            .output()
            .context("run pg_ctl start")?;
        if !out.status.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            bail!(
                "pg_ctl start failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                log
            );
        }
        self.stopped = false;
        Ok(())
    }

    /// Stops the server at once (`immediate`: as a crash would).
    pub fn stop(&mut self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-m", "immediate", "stop"])
            .output()
            .context("run pg_ctl stop")?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.stopped = true;
        Ok(())
    }

    /// A connection string for database `db` (made if missing).
    pub fn url_for(&self, db: &str) -> Result<String> {
        if db != "sundial" {
            let out = self
                .command("createdb")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "sundial",
                    db,
                ])
                .output()
                .context("run createdb")?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if !err.contains("already exists") {
                    bail!("createdb {db} failed: {err}");
                }
            }
        }
        Ok(format!("postgres://sundial@127.0.0.1:{}/{db}", self.port))
    }

    /// The main database's connection string.
    pub fn url(&self) -> String {
        format!("postgres://sundial@127.0.0.1:{}/sundial", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until the server accepts connections (after a start).
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("PostgreSQL did not come up within {within:?}")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}
