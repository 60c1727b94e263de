//! The device's own metrics (`sundial-agent run --metrics ADDR`): a local
//! Prometheus scrapes the agent directly, with or without a coordinator.
//!
//! Counters and histograms are fed by the node's events as the driver logs
//! them; gauges are read when scraped — the store's figures from a read
//! transaction beside the running agent, the clock's and the session's from
//! what the driver last set. The HTTP side is deliberately tiny: `GET
//! /metrics` and `GET /healthz` on a TCP listener, one request per
//! connection, a bounded request head, a deadline, and a bound on
//! connections at once, so nothing a peer sends can hold the agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sundial_core::session::Event;
use sundial_protocol::{RunKey, Timestamp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::store::AgentStore;

/// Connections served at once; more wait in the kernel's backlog.
const CONNECTIONS_MAX: usize = 8;
/// The largest request head read.
const REQUEST_HEAD_MAX: usize = 8 * 1024;
/// A connection gets this long to send its request and take the answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Runs whose start is remembered for their duration (the concurrency
/// limit is far below).
const STARTS_MAX: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OfflineLabel {
    offline: &'static str,
}

/// What the driver knows and the store does not, set as it changes.
#[derive(Debug, Default)]
pub struct Live {
    pub session_up: AtomicBool,
    pub clock_vouched: AtomicBool,
    pub clock_held: AtomicBool,
    pub clock_offset_ms: AtomicI64,
    pub running: AtomicU64,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    runs: Family<OutcomeLabel, Counter>,
    fired: Family<OfflineLabel, Counter>,
    lateness: Histogram,
    duration: Histogram,
    sessions: Counter,
    starts: Mutex<HashMap<RunKey, Instant>>,
    pub live: Live,
    session_up: Gauge,
    running: Gauge,
    clock_vouched: Gauge,
    clock_held: Gauge,
    clock_offset: Gauge<f64, AtomicU64>,
    tasks: Gauge,
    outbox: Gauge,
    oldest: Gauge<f64, AtomicU64>,
    store_bytes: Gauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut r = Registry::default();
        let runs = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "sundial_agent_runs_recorded",
            "Run records this agent made, by outcome, since it started",
            runs.clone(),
        );
        let fired = Family::<OfflineLabel, Counter>::default();
        r.register(
            "sundial_agent_runs_fired",
            "Runs this agent started since it started, by whether it had a session",
            fired.clone(),
        );
        let lateness = Histogram::new(sundial_net::shell::LATENESS_BUCKETS);
        r.register_with_unit(
            "sundial_agent_run_start_lateness",
            "How late runs started after their due time, on the agent's trusted time",
            Unit::Seconds,
            lateness.clone(),
        );
        let duration = Histogram::new(sundial_net::shell::DURATION_BUCKETS);
        r.register_with_unit(
            "sundial_agent_run_duration",
            "How long runs took, start to record",
            Unit::Seconds,
            duration.clone(),
        );
        let sessions = Counter::default();
        r.register(
            "sundial_agent_sessions",
            "Sessions with a coordinator begun since the agent started",
            sessions.clone(),
        );
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let session_up = gauge(
            &mut r,
            "sundial_agent_session_up",
            "1 while the agent has a session with a coordinator",
        );
        let running = gauge(&mut r, "sundial_agent_runs_running", "Runs going now");
        let clock_vouched = gauge(
            &mut r,
            "sundial_agent_clock_vouched",
            "1 once a coordinator vouched for the clock in this boot",
        );
        let clock_held = gauge(
            &mut r,
            "sundial_agent_clock_held",
            "1 while firing is held: the clock went back behind the last known-good instant",
        );
        let clock_offset = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "sundial_agent_clock_offset",
            "The offset applied to the wall clock to get trusted time",
            Unit::Seconds,
            clock_offset.clone(),
        );
        let tasks = gauge(&mut r, "sundial_agent_tasks", "Tasks in the agent's store");
        let outbox = gauge(
            &mut r,
            "sundial_agent_outbox_runs",
            "Run records waiting to be synced to a coordinator",
        );
        let oldest = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "sundial_agent_outbox_oldest_run_age",
            "How long ago the oldest unsynced run ended (0: none waits)",
            Unit::Seconds,
            oldest.clone(),
        );
        let store_bytes = Gauge::default();
        r.register_with_unit(
            "sundial_agent_store_size",
            "The agent's store on disk",
            Unit::Bytes,
            store_bytes.clone(),
        );
        AgentMetrics {
            registry: r,
            runs,
            fired,
            lateness,
            duration,
            sessions,
            starts: Mutex::new(HashMap::new()),
            live: Live::default(),
            session_up,
            running,
            clock_vouched,
            clock_held,
            clock_offset,
            tasks,
            outbox,
            oldest,
            store_bytes,
        }
    }

    /// Counts what an event of the node says; `now` is trusted time.
    pub fn observe(&self, e: &Event, now: Timestamp) {
        match e {
            Event::RunFired { key, offline } => {
                let offline = if *offline { "true" } else { "false" };
                self.fired.get_or_create(&OfflineLabel { offline }).inc();
                if key.attempt == 1 {
                    let late = now.millis_since(key.scheduled_at).max(0);
                    self.lateness.observe(late as f64 / 1000.0);
                }
                if let Ok(mut s) = self.starts.lock() {
                    if s.len() < STARTS_MAX {
                        s.insert(*key, Instant::now());
                    }
                }
            }
            Event::RunRecorded { key, outcome } => {
                self.runs
                    .get_or_create(&OutcomeLabel {
                        outcome: outcome.as_str(),
                    })
                    .inc();
                let started = self.starts.lock().ok().and_then(|mut s| s.remove(key));
                if let Some(at) = started {
                    self.duration.observe(at.elapsed().as_secs_f64());
                }
            }
            Event::SessionUp { .. } => {
                self.sessions.inc();
                self.live.session_up.store(true, Ordering::Relaxed);
            }
            Event::SessionDown { .. } => self.live.session_up.store(false, Ordering::Relaxed),
            _ => {}
        }
    }

    /// The OpenMetrics text, with the gauges read now. A store read that
    /// fails leaves its gauges as they were (and says so in the log).
    pub fn encode(&self, store: &AgentStore, now: Timestamp) -> String {
        let l = &self.live;
        let flag = |b: &AtomicBool| i64::from(b.load(Ordering::Relaxed));
        self.session_up.set(flag(&l.session_up));
        self.clock_vouched.set(flag(&l.clock_vouched));
        self.clock_held.set(flag(&l.clock_held));
        self.clock_offset
            .set(l.clock_offset_ms.load(Ordering::Relaxed) as f64 / 1000.0);
        self.running
            .set(i64::try_from(l.running.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        match store.task_count() {
            Ok(t) => {
                self.tasks.set(n(t));
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot count the tasks"),
        }
        match store.outbox_len() {
            Ok(len) => {
                self.outbox.set(n(len));
                let oldest = if len == 0 {
                    None
                } else {
                    store
                        .outbox_batch(1, usize::MAX)
                        .ok()
                        .and_then(|b| b.into_iter().next())
                        .map(|r| r.finished_at.unwrap_or(r.scheduled_at))
                };
                self.oldest
                    .set(oldest.map_or(0.0, |t| now.millis_since(t).max(0) as f64 / 1000.0));
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot read the outbox"),
        }
        if let Some(b) = store.size_bytes() {
            self.store_bytes.set(n(b));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the runtime ends.
pub fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    store: Arc<AgentStore>,
    now: fn() -> Timestamp,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (metrics, store) = (metrics.clone(), store.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let served =
                    tokio::time::timeout(CONNECTION_DEADLINE, answer(conn, &metrics, &store, now))
                        .await;
                if let Ok(Err(e)) = served {
                    tracing::debug!(%peer, error = %e, "metrics: connection ended");
                }
            });
        }
    });
}

async fn answer(
    mut conn: tokio::net::TcpStream,
    metrics: &AgentMetrics,
    store: &AgentStore,
    now: fn() -> Timestamp,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= REQUEST_HEAD_MAX {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let open = String::from_utf8_lossy(&head)
        .to_ascii_lowercase()
        .contains("application/openmetrics-text");
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let text = metrics.encode(store, now());
            if open {
                let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
                respond(&mut conn, "200 OK", kind, &text).await
            } else {
                let text = sundial_net::shell::openmetrics_to_classic(&text);
                respond(
                    &mut conn,
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    &text,
                )
                .await
            }
        }
        ("GET", "/healthz") => respond(&mut conn, "200 OK", "text/plain", "ok\n").await,
        ("GET", _) => {
            respond(
                &mut conn,
                "404 Not Found",
                "text/plain",
                "not found: try /metrics\n",
            )
            .await
        }
        _ => {
            respond(
                &mut conn,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    }
}

async fn respond(
    conn: &mut tokio::net::TcpStream,
    status: &str,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

/// Binds the metrics listener; one off loopback is allowed but said.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    if bound.ip().is_loopback() {
        tracing::info!(addr = %bound, "serving the agent's metrics (/metrics, /healthz)");
    } else {
        tracing::warn!(addr = %bound, "serving the agent's metrics off loopback, without credentials: anyone who reaches it sees the device's task and run counts");
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_and_runs_are_counted_once_each() {
        let m = AgentMetrics::new();
        let store = AgentStore::open_in_memory_volatile().expect("store");
        let key = RunKey {
            task_id: sundial_protocol::TaskId(1),
            scheduled_at: Timestamp::from_millis_saturating(1_000),
            attempt: 1,
        };
        m.observe(
            &Event::RunFired { key, offline: true },
            Timestamp::from_millis_saturating(1_004),
        );
        m.observe(
            &Event::RunRecorded {
                key,
                outcome: sundial_protocol::Outcome::Failed,
            },
            Timestamp::from_millis_saturating(1_010),
        );
        m.live.clock_offset_ms.store(-1_500, Ordering::Relaxed);
        let text = sundial_net::shell::openmetrics_to_classic(
            &m.encode(&store, Timestamp::from_millis_saturating(2_000)),
        );
        for want in [
            "sundial_agent_runs_recorded_total{outcome=\"failed\"} 1",
            "sundial_agent_runs_fired_total{offline=\"true\"} 1",
            "sundial_agent_run_start_lateness_seconds_count 1",
            "sundial_agent_run_start_lateness_seconds_bucket{le=\"0.005\"} 1",
            "sundial_agent_run_duration_seconds_count 1",
            "sundial_agent_clock_offset_seconds -1.5",
            "sundial_agent_outbox_runs 0",
            "sundial_agent_tasks 0",
            "sundial_agent_session_up 0",
        ] {
            assert!(text.contains(want), "missing `{want}` in\n{text}");
        }
    }
}
