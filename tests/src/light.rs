//! Lightweight agents for fleet benchmarks: each is the core's
//! [`AgentSession`] (the machine every agent runs: reconnect policy, backoff,
//! Hello, outbox window) over a QUIC connection of a shared client endpoint,
//! without a store or a scheduler, so that thousands fit in one process.
//!
//! [`storm`] measures a whole fleet reconnecting at once: the coordinator is
//! killed, stays away for the cut, and comes back on the same address and
//! store; every agent is back and synced when it has its assignments again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sundial_agent::clock::SystemClock;
use sundial_agent::session::{closed_kind, FramedRecv, SessionError};
use sundial_core::session::agent::{AgentEffect, AgentSession, HelloInfo};
use sundial_core::session::Now;
use sundial_net::tls::{client_config, Identity, ServerTrust};
use sundial_protocol::wire::{CoordMsg, ALPN};
use sundial_protocol::Timestamp;
use tokio::sync::mpsc;

/// An agent's id, certificate and private key (DER), made for the bench.
type MadeIdentity = (sundial_protocol::AgentId, Vec<u8>, Vec<u8>);

/// A coordinator process with `n` agents enrolled directly in its store.
#[derive(Debug)]
pub struct BenchCoordinator {
    _root: tempfile::TempDir,
    dir: PathBuf,
    pub addr: SocketAddr,
    pub ca: CertificateDer<'static>,
    pub identities: Vec<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    child: Option<Child>,
    /// Run under another tool (`SUNDIAL_BENCH_COORD_WRAP`).
    wrapped: bool,
}

impl BenchCoordinator {
    /// Makes the coordinator's data directory and enrolls `n` agents (setup,
    /// not measured).
    pub fn setup(n: usize) -> anyhow::Result<BenchCoordinator> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("coordinator");
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        sundial_coordinator::server::init(&dir, &addr.to_string(), "sundial-coordinator")?;
        let pki = sundial_coordinator::pki::Pki::load(&dir)?;
        let started = Instant::now();
        let store_path = dir.join(sundial_coordinator::server::STORE_FILE);
        // Enrollments are setup, not what a row measures: written without
        // a flush per commit (two commits an agent took most of a 100,000
        // fleet's minute of setup), then flushed once.
        let mut store = sundial_coordinator::store::CoordinatorStore::open_with_backend(
            UnflushedFile::open(&store_path)?,
        )?;
        let key_file = dir.join(sundial_net::at_rest::KEY_FILE);
        if let Some(c) = sundial_net::at_rest::StoreCipher::from_file(&key_file, false)
            .map_err(anyhow::Error::msg)?
        {
            store.set_cipher(Arc::new(c));
        }
        let secret = vec![7u8; 32];
        let hash = sundial_protocol::token::sha256(&secret);
        use sundial_coordinator::store::{CoordStore as _, Enrollment, JoinToken};
        store.put_token(
            &JoinToken {
                secret_sha256: hash,
                expires_at: Timestamp::MAX,
                uses_left: n as u32,
                labels: vec![],
            },
            None,
        )?;
        let ids = (0..n)
            .map(|_| store.reserve_agent_id())
            .collect::<Result<Vec<_>, _>>()?;
        // Keys, requests and certificates on every core.
        let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
        let chunk = n.div_ceil(threads).max(1);
        let made: Vec<anyhow::Result<Vec<MadeIdentity>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ids
                .chunks(chunk)
                .map(|part| {
                    let pki = &pki;
                    scope.spawn(move || {
                        part.iter()
                            .map(|&id| {
                                let key = rcgen::KeyPair::generate()?;
                                let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
                                    .serialize_request(&key)?;
                                let cert = pki
                                    .sign_agent_csr(csr.der(), id)
                                    .map_err(anyhow::Error::msg)?;
                                Ok((id, cert, key.serialize_der()))
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("an identity maker panicked")))
                })
                .collect()
        });
        let mut identities = Vec::with_capacity(n);
        for part in made {
            for (id, cert, key) in part? {
                store
                    .enroll(&Enrollment {
                        token_sha256: hash,
                        agent: id,
                        name: None,
                        labels: vec![],
                        cert_sha256: sundial_protocol::token::sha256(&cert),
                        now: Timestamp::from_millis_saturating(SystemClock.read().wall_ms),
                    })?
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                identities.push((
                    CertificateDer::from(cert),
                    PrivateKeyDer::try_from(key).map_err(anyhow::Error::msg)?,
                ));
            }
        }
        drop(store);
        std::fs::File::open(&store_path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", store_path.display()))?;
        if n >= 10_000 {
            eprintln!(
                "  setup: {n} agents enrolled in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(BenchCoordinator {
            _root: root,
            dir,
            addr,
            ca: pki.ca_der.clone(),
            identities,
            child: None,
            wrapped: false,
        })
    }

    /// Starts (or restarts) the coordinator process on the same address and store.
    pub fn spawn(&mut self, exe: &Path, extra: &[&str]) -> anyhow::Result<()> {
        // A command to run the coordinator under, to look into a run (e.g.
        // SUNDIAL_BENCH_COORD_WRAP="valgrind --tool=dhat --dhat-out-file=FILE"
        // for where its memory goes); such a coordinator is stopped with
        // SIGTERM, so that the tool writes its report.
        let wrap: Vec<String> = std::env::var("SUNDIAL_BENCH_COORD_WRAP")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        self.wrapped = !wrap.is_empty();
        let mut cmd = match wrap.split_first() {
            Some((tool, args)) => {
                let mut c = Command::new(tool);
                c.args(args).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = cmd
            .arg(crate::harness::SUB_COORDINATOR)
            .args(["serve", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr.to_string()])
            .args(extra)
            // More `serve` flags for a measurement (e.g. SUNDIAL_BENCH_SERVE_ARGS="--http 127.0.0.1:9600"
            // to price the metrics).
            .args(
                std::env::var("SUNDIAL_BENCH_SERVE_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("SUNDIAL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("SUNDIAL_BENCH_COORD_LOG") {
                // Where the coordinator's warnings go, to look into a run.
                Some(p) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_or(Stdio::null(), Stdio::from),
                None => Stdio::null(),
            })
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the coordinator at once (SIGKILL), as a crash or a cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.wrapped {
                // The tool writes its report when the coordinator exits.
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .status();
                let until = Instant::now() + Duration::from_secs(120);
                while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BenchCoordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a light agent reports.
#[derive(Clone, Copy, Debug)]
pub enum LightEvent {
    /// A handshake with the coordinator completed.
    Handshake(Instant),
    /// Assignments arrived in a session (the agent is synced).
    Synced(Instant),
    /// An attempt was refused for load (no TLS work done).
    Busy,
    /// A session ended, and why (its error, or the session machine's own
    /// end of an idle link).
    Closed(&'static str),
}

/// Runs one light agent until `stop`: the session machine decides when to
/// dial and for how long; this carries its effects out on `endpoint`.
pub async fn light_agent(
    i: usize,
    endpoint: quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    seed: u64,
    events: mpsc::UnboundedSender<(usize, LightEvent)>,
) {
    let origin = Instant::now();
    let now = || Now {
        mono_ms: origin.elapsed().as_millis() as u64,
        wall: Timestamp::from_millis_saturating(SystemClock.read().wall_ms),
    };
    let mut s = AgentSession::new(seed);
    // Its place when refused for load, as a real agent's is its number.
    s.set_place(i as u64 + 1);
    loop {
        let mut dial = None;
        while let Some(e) = s.poll_effect() {
            if let AgentEffect::Connect { timeout_ms } = e {
                dial = Some(timeout_ms);
            }
        }
        let Some(timeout_ms) = dial else {
            let wake = s.poll_timeout().unwrap_or(now().mono_ms + 1_000);
            let wait = wake.saturating_sub(now().mono_ms);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            s.handle_timeout(now());
            continue;
        };
        let attempt = async {
            let conn = endpoint
                .connect_with(cfg.clone(), addr, "sundial-coordinator")
                .map_err(SessionError::from)?
                .await?;
            let (tx, rx) = conn.open_bi().await?;
            Ok::<_, SessionError>((conn, tx, rx))
        };
        let (conn, mut tx, rx) =
            match tokio::time::timeout(Duration::from_millis(timeout_ms), attempt).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    let kind = closed_kind(None, &Err(e));
                    if matches!(kind, sundial_core::session::agent::Closed::Busy { .. }) {
                        let _ = events.send((i, LightEvent::Busy));
                    }
                    s.handle_connect_failed(now(), kind);
                    continue;
                }
                Err(_) => {
                    s.handle_connect_failed(now(), sundial_core::session::agent::Closed::Lost);
                    continue;
                }
            };
        let _ = events.send((i, LightEvent::Handshake(Instant::now())));
        s.handle_connected(
            now(),
            HelloInfo {
                last_revision: 0,
                outbox_len: 0,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                allow_exec: vec![],
                allow_env: vec![],
                seal_key: None,
                functions: None,
            },
        );
        let mut rx = FramedRecv::new(rx);
        let ended: Result<(), SessionError> = async {
            loop {
                while let Some(e) = s.poll_effect() {
                    if let AgentEffect::ReadOutbox { .. } = e {
                        s.handle_outbox(now(), Vec::new());
                    }
                }
                while let Some(m) = s.poll_transmit() {
                    sundial_agent::session::send(&mut tx, &m).await?;
                }
                let wait = s
                    .poll_timeout()
                    .map_or(1_000, |t| t.saturating_sub(now().mono_ms));
                tokio::select! {
                    m = rx.next::<CoordMsg>() => {
                        let m = m?;
                        if matches!(m, CoordMsg::Assignments { .. }) {
                            let _ = events.send((i, LightEvent::Synced(Instant::now())));
                        }
                        s.handle_message(now(), m);
                    }
                    _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                        s.handle_heard(now());
                        s.handle_timeout(now());
                    }
                }
                if !s.is_up() {
                    // The session ended itself (an idle link).
                    return Ok(());
                }
            }
        }
        .await;
        let kind = closed_kind(Some(&conn), &ended);
        let why = why_ended(&ended);
        let _ = events.send((i, LightEvent::Closed(why)));
        s.handle_closed(now(), kind);
    }
}

/// Client configurations for the enrolled identities, `n` of them (an
/// identity serves several agents when `n` is larger than the enrolled set).
fn client_configs(coord: &BenchCoordinator, n: usize) -> anyhow::Result<Vec<quinn::ClientConfig>> {
    let mut per_identity = Vec::with_capacity(coord.identities.len());
    for (cert, key) in &coord.identities {
        let tls = client_config(
            ServerTrust::Ca(coord.ca.clone()),
            Some(Identity {
                chain: vec![cert.clone()],
                key: key.clone_key(),
            }),
            ALPN,
        )?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        ));
        cfg.transport_config(sundial_net::agent_transport());
        per_identity.push(cfg);
    }
    anyhow::ensure!(!per_identity.is_empty(), "no identities");
    Ok((0..n)
        .map(|i| per_identity[i % per_identity.len()].clone())
        .collect())
}

/// A client endpoint shared by thousands of light agents.
fn client_endpoint() -> anyhow::Result<quinn::Endpoint> {
    Ok(quinn::Endpoint::client("127.0.0.1:0".parse()?)?)
}

/// Why a light agent's session ended, in a few words.
fn why_ended(ended: &Result<(), SessionError>) -> &'static str {
    let lost = |e: &quinn::ConnectionError| match e {
        quinn::ConnectionError::TimedOut => "QUIC idle timeout",
        quinn::ConnectionError::ApplicationClosed(_) => "closed by the coordinator",
        quinn::ConnectionError::ConnectionClosed(_) => "closed by the coordinator's QUIC stack",
        quinn::ConnectionError::Reset => "reset",
        _ => "connection lost otherwise",
    };
    match ended {
        Ok(()) => "the link went idle (the session's own timeout)",
        Err(SessionError::Connection(e)) => lost(e),
        Err(SessionError::Read(quinn::ReadError::ConnectionLost(e))) => lost(e),
        Err(SessionError::Write(quinn::WriteError::ConnectionLost(e))) => lost(e),
        Err(_) => "another error",
    }
}

/// Which light agents are in session.
struct Held {
    up: Vec<bool>,
    count: usize,
    /// Sessions that ended (since counted from zero again).
    closed: usize,
    /// Why sessions ended, and how many (since the start).
    why: std::collections::BTreeMap<&'static str, usize>,
    /// Dials refused for load (since the start).
    refused: usize,
}

impl Held {
    fn new(n: usize) -> Held {
        Held {
            up: vec![false; n],
            count: 0,
            closed: 0,
            why: Default::default(),
            refused: 0,
        }
    }

    fn note(&mut self, i: usize, ev: LightEvent) {
        match ev {
            LightEvent::Busy => self.refused += 1,
            LightEvent::Synced(_) if !self.up[i] => {
                self.up[i] = true;
                self.count += 1;
            }
            LightEvent::Closed(why) if self.up[i] => {
                self.up[i] = false;
                self.count -= 1;
                self.closed += 1;
                *self.why.entry(why).or_insert(0) += 1;
            }
            _ => {}
        }
    }
}

/// Idle agents held by one coordinator.
#[derive(Debug)]
pub struct IdleReport {
    pub agents: usize,
    pub identities: usize,
    pub sockets: usize,
    pub held: usize,
    pub connect: Duration,
    pub rss_kib_per_agent: f64,
    /// The coordinator's CPU while the fleet idles, % of one core.
    pub idle_cpu_pct: f64,
    /// Sessions that ended while the fleet idled (churn).
    pub churned: usize,
    /// Dials refused for load while the fleet came up.
    pub refused: usize,
}

/// The coordinator's CPU time (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |k: usize| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line.
    field(11) + field(12)
}

/// `n` light agents (over `n / per_socket` client sockets, `identities`
/// enrolled agents shared round-robin) connect and idle; the coordinator's
/// memory per agent and its CPU while idle are read from /proc.
pub async fn idle(
    exe: &Path,
    n: usize,
    identities: usize,
    per_socket: usize,
    deadline: Duration,
) -> anyhow::Result<IdleReport> {
    let mut coord = BenchCoordinator::setup(identities.min(n))?;
    let sessions_arg = (n + 1_000).to_string();
    let budget = crate::bench::handshakes_for_bench();
    let budget_arg = budget.to_string();
    coord.spawn(
        exe,
        &[
            "--sessions-max",
            sessions_arg.as_str(),
            "--handshakes-per-sec",
            budget_arg.as_str(),
            // Every light agent comes from 127.0.0.1.
            "--pending-per-address",
            sessions_arg.as_str(),
        ],
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = coord
        .pid()
        .ok_or_else(|| anyhow::anyhow!("no coordinator"))?;
    let base_kib = crate::bench::rss_kib(pid);
    let sockets = n.div_ceil(per_socket.max(1)).max(1);
    let endpoints = (0..sockets)
        .map(|_| client_endpoint())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // Devices come up over time, not all in one instant (that is the storm
    // row): agents start at the coordinator's handshake budget, the rate
    // it says it admits (a faster arrival is refused and comes back later,
    // as the storm row shows).
    let pace = Duration::from_secs_f64(1.0 / f64::from(budget));
    let mut next_start = Instant::now();
    let mut held = Held::new(n);
    for (i, cfg) in client_configs(&coord, n)?.into_iter().enumerate() {
        tasks.spawn(light_agent(
            i,
            endpoints[i % sockets].clone(),
            cfg,
            coord.addr,
            0x1D1E ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            tx.clone(),
        ));
        next_start += pace;
        // In small groups, well under the budget's burst (a tenth of a
        // second's worth), so that the pace is what arrives.
        if i % 10 == 9 {
            tokio::time::sleep_until(next_start.into()).await;
            while let Ok((k, ev)) = rx.try_recv() {
                held.note(k, ev);
            }
        }
    }
    drop(tx);
    let mut last_report = Instant::now();
    while held.count < n && started.elapsed() < deadline {
        let Ok(Some((i, ev))) =
            tokio::time::timeout(deadline.saturating_sub(started.elapsed()), rx.recv()).await
        else {
            break;
        };
        held.note(i, ev);
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "  idle: {} of {n} agents in session after {:.0} s{}",
                held.count,
                started.elapsed().as_secs_f64(),
                if held.why.is_empty() {
                    String::new()
                } else {
                    format!("; sessions ended: {:?}", held.why)
                }
            );
        }
    }
    let connect = started.elapsed();
    // Idle: sessions stay up on keep-alives alone.
    let t0 = cpu_ticks(pid);
    let w = Instant::now();
    eprintln!(
        "  idle: {} of {n} in session; measuring the idle coordinator for 10 s",
        held.count
    );
    held.closed = 0;
    let settle = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(settle);
    loop {
        tokio::select! {
            _ = &mut settle => break,
            m = rx.recv() => match m {
                Some((i, ev)) => held.note(i, ev),
                None => break,
            }
        }
    }
    let ticks = cpu_ticks(pid).saturating_sub(t0) as f64;
    let hz = 100.0;
    let idle_cpu_pct = ticks / hz / w.elapsed().as_secs_f64() * 100.0;
    let rss = crate::bench::rss_kib(pid).saturating_sub(base_kib) as f64;
    tasks.abort_all();
    for e in &endpoints {
        e.close(0u32.into(), b"");
    }
    Ok(IdleReport {
        agents: n,
        identities: identities.min(n),
        sockets,
        held: held.count,
        connect,
        rss_kib_per_agent: rss / held.count.max(1) as f64,
        idle_cpu_pct,
        churned: held.closed,
        refused: held.refused,
    })
}

/// A fleet of light agents against a coordinator killed and brought back.
#[derive(Debug)]
pub struct StormReport {
    pub agents: usize,
    /// From start to every agent synced once.
    pub first_sync: Duration,
    /// From the coordinator's return to every agent synced again.
    pub healed: Duration,
    /// Agents synced again by the end (all, or the deadline passed).
    pub synced_again: usize,
    /// The most handshakes completed within any one second after the return.
    pub handshakes_max_per_sec: usize,
    /// Attempts refused for load after the return.
    pub refused: usize,
    pub budget: u32,
}

/// `n` light agents connect; the coordinator is killed, stays away `cut`,
/// and comes back with a handshake budget of `budget` per second.
pub async fn storm(
    exe: &Path,
    n: usize,
    cut: Duration,
    budget: u32,
    deadline: Duration,
) -> anyhow::Result<StormReport> {
    let mut coord = BenchCoordinator::setup(n)?;
    let budget_arg = budget.to_string();
    let sessions_arg = (n * 2).max(10_000).to_string();
    let args = [
        "--handshakes-per-sec",
        budget_arg.as_str(),
        "--sessions-max",
        sessions_arg.as_str(),
        // Every light agent comes from 127.0.0.1.
        "--pending-per-address",
        sessions_arg.as_str(),
    ];
    coord.spawn(exe, &args)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let endpoint = client_endpoint()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    // The fleet first comes up at the budget's pace, as a fleet enrolled
    // over time does. The row measures the heal after; all 10,000 dialing
    // at once at first contact, before any coordinator has told them the
    // fleet's size, took 86 s of spread-out retries, which the row does
    // not measure (the idle rows do: they all dial at once).
    let per_tenth = (budget as usize / 10).max(1);
    for (i, (cert, key)) in std::mem::take(&mut coord.identities)
        .into_iter()
        .enumerate()
    {
        if i > 0 && i % per_tenth == 0 {
            let due = started + Duration::from_millis((i / per_tenth) as u64 * 100);
            tokio::time::sleep_until(due.into()).await;
        }
        let tls = client_config(
            ServerTrust::Ca(coord.ca.clone()),
            Some(Identity {
                chain: vec![cert],
                key,
            }),
            ALPN,
        )?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
        ));
        cfg.transport_config(sundial_net::agent_transport());
        tasks.spawn(light_agent(
            i,
            endpoint.clone(),
            cfg,
            coord.addr,
            0x5EED ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            tx.clone(),
        ));
    }
    drop(tx);
    // Everyone synced once.
    let mut synced = vec![false; n];
    let mut count = 0;
    while count < n {
        let Ok(Some((i, ev))) =
            tokio::time::timeout(deadline.saturating_sub(started.elapsed()), rx.recv()).await
        else {
            anyhow::bail!("only {count} of {n} agents synced before the cut");
        };
        if let LightEvent::Synced(_) = ev {
            if !synced[i] {
                synced[i] = true;
                count += 1;
            }
        }
    }
    let first_sync = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    coord.kill();
    tokio::time::sleep(cut).await;
    while rx.try_recv().is_ok() {}
    coord.spawn(exe, &args)?;
    let back = Instant::now();
    let mut synced = vec![false; n];
    let mut count = 0;
    let mut handshakes = Vec::new();
    let mut refused = 0;
    while count < n && back.elapsed() < deadline {
        let Ok(Some((i, ev))) =
            tokio::time::timeout(deadline.saturating_sub(back.elapsed()), rx.recv()).await
        else {
            break;
        };
        match ev {
            LightEvent::Synced(at) if at >= back && !synced[i] => {
                synced[i] = true;
                count += 1;
            }
            LightEvent::Handshake(at) if at >= back => handshakes.push(at),
            LightEvent::Busy => refused += 1,
            _ => {}
        }
    }
    let healed = back.elapsed();
    tasks.abort_all();
    endpoint.close(0u32.into(), b"");
    // The most handshakes within any second (windows start at each one).
    handshakes.sort();
    let mut most = 0;
    let mut j = 0;
    for k in 0..handshakes.len() {
        while handshakes[k].duration_since(handshakes[j]) >= Duration::from_secs(1) {
            j += 1;
        }
        most = most.max(k - j + 1);
    }
    Ok(StormReport {
        agents: n,
        first_sync,
        healed,
        synced_again: count,
        handshakes_max_per_sec: most,
        refused,
        budget,
    })
}

/// The coordinator's store file, its flushes skipped: for enrolling a
/// bench's fleet in bulk (the file is flushed once at the end).
#[derive(Debug)]
struct UnflushedFile(redb::backends::FileBackend);

impl UnflushedFile {
    fn open(path: &Path) -> anyhow::Result<UnflushedFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(UnflushedFile(
            redb::backends::FileBackend::new(file)
                .with_context(|| format!("locking {}", path.display()))?,
        ))
    }
}

impl redb::StorageBackend for UnflushedFile {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.0.close()
    }
}
