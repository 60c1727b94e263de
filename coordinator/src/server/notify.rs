//! The webhook (`serve --notify URL`): a JSON POST for every run that
//! failed, timed out, was rejected, skipped (missed) or interrupted, and
//! for every agent offline longer than a threshold; signed with HMAC-SHA256
//! (`X-Sundial-Signature: sha256=HEX`) when a secret is set; retried with
//! backoff from a bounded queue on disk (`DIR/notify.redb`), so a restart
//! loses nothing; delivered by a task of its own, so a slow or dead
//! receiver never holds a session.
//!
//! Each run is notified once. The queue entry of a run is written *before*
//! its batch is committed (as `pending`), and settled after: `ready` when
//! the batch stored it for the first time, removed when it was stored
//! before (a resend) — unless the entry was left pending by an attempt a
//! crash cut short after its commit, which this attempt finds and makes
//! ready. Pending entries found at start are settled against the store.
//! Receivers get an `X-Sundial-Id` (the run's key) to deduplicate the rare
//! delivery repeated by a crash between a 2xx and its removal.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use sundial_core::coord_store::{CoordStore, Page, RunQuery};
use sundial_protocol::records;
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, Timestamp};

/// Run notifications: run key → entry.
const RUNS: TableDefinition<(u64, u64, i64, u32), &[u8]> = TableDefinition::new("runs");
/// Agent-offline notifications: (agent, last seen ms) → entry; delivered
/// ones stay (as `Delivered`) for a week, so an offline period is told once.
const OFFLINE: TableDefinition<(u64, i64), &[u8]> = TableDefinition::new("offline");

/// Entries waiting at most; beyond, new notifications are dropped (counted
/// and logged): a receiver down for long must not fill the disk.
pub const QUEUE_MAX: usize = 10_000;
/// The longest wait between tries of one notification.
const BACKOFF_MAX_MS: i64 = 300_000;
/// One POST may take this long.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent-offline notification is remembered once delivered.
const OFFLINE_KEEP_MS: i64 = 7 * 86_400_000;
/// How often the agents are looked at for offline ones, at most (a
/// quarter of the threshold, at least a second).
const OFFLINE_CHECK_EVERY: Duration = Duration::from_secs(30);

type Key = (u64, u64, i64, u32);
/// An entry due for delivery: its run key or its offline key, and itself.
type Due = (Option<Key>, Option<(u64, i64)>, Entry);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum State {
    /// Written before its batch's commit; not sent until settled.
    Pending,
    Ready,
    Delivered,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    state: State,
    /// The JSON body.
    body: String,
    tries: u32,
    next_at_ms: i64,
}

/// Whether a run of this outcome is notified.
pub fn notable(outcome: Outcome) -> bool {
    !matches!(outcome, Outcome::Succeeded)
}

fn key_of(r: &RunRecord) -> Key {
    (
        r.task_id.0,
        r.agent_id.0,
        r.scheduled_at.as_millis(),
        r.attempt,
    )
}

fn run_body(r: &RunRecord) -> String {
    serde_json::json!({
        "kind": "run",
        "id": format!("{}/{}/{}/{}", r.task_id, r.agent_id, r.scheduled_at, r.attempt),
        "task_id": r.task_id.to_string(),
        "agent_id": r.agent_id.to_string(),
        "scheduled_at": r.scheduled_at.to_string(),
        "attempt": r.attempt,
        "outcome": r.outcome.as_str(),
        "exit_code": r.exit_code,
        "offline": r.offline,
        "why": r.why(),
        "fired_at": r.fired_at.map(|t| t.to_string()),
        "finished_at": r.finished_at.map(|t| t.to_string()),
    })
    .to_string()
}

fn db_err(context: &'static str) -> impl Fn(redb::Error) -> String {
    move |e| format!("notification queue: {context}: {e}")
}

macro_rules! tried {
    ($e:expr, $cx:expr) => {
        $e.map_err(|e| db_err($cx)(e.into()))?
    };
}

/// Where notifications go, and how they are signed.
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub url: String,
    pub secret: Option<Vec<u8>>,
    /// Agents offline longer than this are notified; `None`: never.
    pub offline_after_ms: Option<i64>,
}

/// The target of a `http://HOST:PORT/PATH` URL.
#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "--notify {url}: only http:// URLs are supported (put a TLS-terminating proxy in front for https)"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h.trim_matches(['[', ']']).to_owned(),
            p.parse::<u16>()
                .map_err(|_| format!("--notify {url}: bad port {p:?}"))?,
        ),
        _ => (authority.trim_matches(['[', ']']).to_owned(), 80),
    };
    if host.is_empty() {
        return Err(format!("--notify {url}: no host"));
    }
    Ok(Target {
        host,
        port,
        path: path.to_owned(),
    })
}

/// The queue and its delivery.
#[derive(Debug)]
pub struct Notifier {
    db: Database,
    config: NotifyConfig,
    target: Target,
    wake: tokio::sync::Notify,
    /// Notifications dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Notifications delivered (a 2xx).
    pub delivered: AtomicU64,
}

impl Notifier {
    pub fn open(dir: &Path, config: NotifyConfig) -> Result<Notifier, String> {
        let target = parse_url(&config.url)?;
        let db = Database::create(dir.join("notify.redb"))
            .map_err(|e| format!("notification queue {}: {e}", dir.display()))?;
        let txn = tried!(db.begin_write(), "open");
        {
            tried!(txn.open_table(RUNS), "open");
            tried!(txn.open_table(OFFLINE), "open");
        }
        tried!(txn.commit(), "open");
        Ok(Notifier {
            db,
            config,
            target,
            wake: tokio::sync::Notify::new(),
            dropped: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        })
    }

    fn queued(&self, txn: &redb::WriteTransaction) -> Result<usize, String> {
        let runs = tried!(txn.open_table(RUNS), "count");
        let offline = tried!(txn.open_table(OFFLINE), "count");
        Ok(tried!(runs.len(), "count") as usize + tried!(offline.len(), "count") as usize)
    }

    /// Before a batch is stored: a pending entry for each notable run
    /// without one. Returns the keys this call wrote.
    pub fn before_store(&self, runs: &[RunRecord]) -> Result<Vec<Key>, String> {
        let notable: Vec<&RunRecord> = runs.iter().filter(|r| notable(r.outcome)).collect();
        if notable.is_empty() {
            return Ok(Vec::new());
        }
        let txn = tried!(self.db.begin_write(), "write");
        let mut written = Vec::new();
        let mut room = QUEUE_MAX.saturating_sub(self.queued(&txn)?);
        {
            let mut t = tried!(txn.open_table(RUNS), "write");
            for r in notable {
                let key = key_of(r);
                if tried!(t.get(key), "write").is_some() {
                    continue;
                }
                if room == 0 {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(task = %r.task_id, agent = %r.agent_id, "the notification queue is full ({QUEUE_MAX}): a notification is dropped");
                    continue;
                }
                room -= 1;
                let e = Entry {
                    state: State::Pending,
                    body: run_body(r),
                    tries: 0,
                    next_at_ms: 0,
                };
                tried!(t.insert(key, records::encode(&e).as_slice()), "write");
                written.push(key);
            }
        }
        tried!(txn.commit(), "write");
        Ok(written)
    }

    /// After the batch: `fresh` were stored now (None: the store failed,
    /// nothing was). Pending entries of `runs` become ready when fresh, or
    /// when an earlier attempt left them (it committed, then crashed);
    /// entries this attempt wrote for runs stored before go.
    pub fn after_store(
        &self,
        runs: &[RunRecord],
        written: &[Key],
        fresh: Option<&[Key]>,
    ) -> Result<(), String> {
        let keys: Vec<Key> = runs
            .iter()
            .filter(|r| notable(r.outcome))
            .map(key_of)
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let txn = tried!(self.db.begin_write(), "settle");
        let mut ready = 0;
        {
            let mut t = tried!(txn.open_table(RUNS), "settle");
            for key in keys {
                let ours = written.contains(&key);
                let Some(mut e) = tried!(t.get(key), "settle")
                    .and_then(|v| records::decode::<Entry>("notify", "run", v.value()).ok())
                else {
                    continue;
                };
                if e.state != State::Pending {
                    continue;
                }
                match fresh {
                    None if ours => {
                        tried!(t.remove(key), "settle");
                    }
                    None => {}
                    Some(fresh) if fresh.contains(&key) || !ours => {
                        e.state = State::Ready;
                        tried!(t.insert(key, records::encode(&e).as_slice()), "settle");
                        ready += 1;
                    }
                    Some(_) => {
                        tried!(t.remove(key), "settle");
                    }
                }
            }
        }
        tried!(txn.commit(), "settle");
        if ready > 0 {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// At start: entries left pending by a crash are ready when their run
    /// is in the store, else dropped (the agent sends the run again).
    pub fn recover(&self, store: &dyn CoordStore) -> Result<(), String> {
        let pending: Vec<Key> = {
            let txn = tried!(self.db.begin_read(), "recover");
            let t = tried!(txn.open_table(RUNS), "recover");
            let mut out = Vec::new();
            for item in tried!(t.iter(), "recover") {
                let (k, v) = tried!(item, "recover");
                if records::decode::<Entry>("notify", "run", v.value())
                    .is_ok_and(|e| e.state == State::Pending)
                {
                    out.push(k.value());
                }
            }
            out
        };
        for key in pending {
            let stored = store
                .runs(&RunQuery {
                    task: Some(TaskId(key.0)),
                    agent: Some(AgentId(key.1)),
                    since: Some(Timestamp::from_millis_saturating(key.2)),
                    limit: 200,
                    page: Page::Latest,
                    forward_from_since: true,
                })
                .map_err(|e| format!("notification queue: reading the store: {e}"))?
                .runs
                .iter()
                .any(|r| key_of(r) == key);
            let txn = tried!(self.db.begin_write(), "recover");
            {
                let mut t = tried!(txn.open_table(RUNS), "recover");
                let entry = tried!(t.get(key), "recover")
                    .and_then(|v| records::decode::<Entry>("notify", "run", v.value()).ok());
                if let Some(mut e) = entry {
                    if stored {
                        e.state = State::Ready;
                        tried!(t.insert(key, records::encode(&e).as_slice()), "recover");
                    } else {
                        tried!(t.remove(key), "recover");
                    }
                }
            }
            tried!(txn.commit(), "recover");
        }
        Ok(())
    }

    /// Queues an agent-offline notification, once per offline period.
    fn offline(&self, agent: AgentId, last_seen: Timestamp, now: Timestamp) -> Result<(), String> {
        let key = (agent.0, last_seen.as_millis());
        let txn = tried!(self.db.begin_write(), "offline");
        let full = self.queued(&txn)? >= QUEUE_MAX;
        let added = {
            let mut t = tried!(txn.open_table(OFFLINE), "offline");
            if tried!(t.get(key), "offline").is_some() {
                false
            } else if full {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            } else {
                let body = serde_json::json!({
                    "kind": "agent_offline",
                    "id": format!("{agent}/{last_seen}"),
                    "agent_id": agent.to_string(),
                    "last_seen": last_seen.to_string(),
                    "offline_ms": now.millis_since(last_seen),
                })
                .to_string();
                let e = Entry {
                    state: State::Ready,
                    body,
                    tries: 0,
                    next_at_ms: 0,
                };
                tried!(t.insert(key, records::encode(&e).as_slice()), "offline");
                true
            }
        };
        tried!(txn.commit(), "offline");
        if added {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Ready entries due by `now`, at most `max`.
    fn due(&self, now_ms: i64, max: usize) -> Result<Vec<Due>, String> {
        let txn = tried!(self.db.begin_read(), "read");
        let mut out = Vec::new();
        let runs = tried!(txn.open_table(RUNS), "read");
        for item in tried!(runs.iter(), "read") {
            let (k, v) = tried!(item, "read");
            if let Ok(e) = records::decode::<Entry>("notify", "run", v.value()) {
                if e.state == State::Ready && e.next_at_ms <= now_ms {
                    out.push((Some(k.value()), None, e));
                    if out.len() >= max {
                        return Ok(out);
                    }
                }
            }
        }
        let offline = tried!(txn.open_table(OFFLINE), "read");
        for item in tried!(offline.iter(), "read") {
            let (k, v) = tried!(item, "read");
            if let Ok(e) = records::decode::<Entry>("notify", "offline", v.value()) {
                if e.state == State::Ready && e.next_at_ms <= now_ms {
                    out.push((None, Some(k.value()), e));
                    if out.len() >= max {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Records a delivery (a 2xx) or a failed try (backoff doubles).
    fn done(
        &self,
        run: Option<Key>,
        offline: Option<(u64, i64)>,
        mut e: Entry,
        ok: bool,
        now_ms: i64,
    ) -> Result<(), String> {
        let txn = tried!(self.db.begin_write(), "deliver");
        {
            if ok {
                self.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                e.tries = e.tries.saturating_add(1);
                let backoff = 1_000i64
                    .saturating_mul(1 << e.tries.min(20))
                    .min(BACKOFF_MAX_MS);
                e.next_at_ms = now_ms.saturating_add(backoff);
            }
            if let Some(k) = run {
                let mut t = tried!(txn.open_table(RUNS), "deliver");
                if ok {
                    tried!(t.remove(k), "deliver");
                } else {
                    tried!(t.insert(k, records::encode(&e).as_slice()), "deliver");
                }
            }
            if let Some(k) = offline {
                let mut t = tried!(txn.open_table(OFFLINE), "deliver");
                if ok {
                    e.state = State::Delivered;
                }
                tried!(t.insert(k, records::encode(&e).as_slice()), "deliver");
            }
        }
        tried!(txn.commit(), "deliver");
        Ok(())
    }

    /// Forgets delivered offline notifications older than a week.
    fn prune(&self, now_ms: i64) -> Result<(), String> {
        let txn = tried!(self.db.begin_write(), "prune");
        {
            let mut t = tried!(txn.open_table(OFFLINE), "prune");
            let old: Vec<(u64, i64)> = tried!(t.iter(), "prune")
                .filter_map(Result::ok)
                .filter(|(k, v)| {
                    k.value().1 < now_ms - OFFLINE_KEEP_MS
                        && records::decode::<Entry>("notify", "offline", v.value())
                            .is_ok_and(|e| e.state == State::Delivered)
                })
                .map(|(k, _)| k.value())
                .collect();
            for k in old {
                tried!(t.remove(k), "prune");
            }
        }
        tried!(txn.commit(), "prune");
        Ok(())
    }

    /// POSTs one body; whether the receiver said 2xx.
    async fn post(&self, id: &str, body: &str) -> Result<(), String> {
        let addr = tokio::net::lookup_host((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.target.host))?
            .next()
            .ok_or_else(|| format!("{} has no address", self.target.host))?;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect::<SocketAddr>(addr)
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("HTTP: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut req = hyper::Request::post(self.target.path.as_str())
                .header(hyper::header::HOST, self.target.host.as_str())
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header("X-Sundial-Id", id);
            if let Some(secret) = &self.config.secret {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                let tag = ring::hmac::sign(&key, body.as_bytes());
                req = req.header(
                    "X-Sundial-Signature",
                    format!("sha256={}", sundial_protocol::token::hex(tag.as_ref())),
                );
            }
            let req = req
                .body(http_body_util::Full::new(bytes::Bytes::from(
                    body.to_owned(),
                )))
                .map_err(|e| format!("HTTP request: {e}"))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {e}"))?;
            // Only the status counts: the body is not read (a receiver
            // cannot make this side hold an answer of any size).
            let status = resp.status();
            drop(resp);
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the receiver answered {status}"))
            }
        };
        tokio::time::timeout(POST_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", POST_TIMEOUT.as_secs()))?
    }

    /// Delivers what is due, then waits for more (or the next retry).
    pub async fn deliver(self: Arc<Self>) {
        let mut said_failing = false;
        loop {
            let now_ms = super::now().as_millis();
            let batch = match self.due(now_ms, 100) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "notifications: cannot read the queue");
                    Vec::new()
                }
            };
            for (run, offline, e) in batch.iter().cloned() {
                let id = serde_json::from_str::<serde_json::Value>(&e.body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                let result = self.post(&id, &e.body).await;
                if let Err(why) = &result {
                    if !said_failing {
                        tracing::warn!(url = %self.config.url, error = %why, "a notification could not be delivered; it is retried with backoff");
                        said_failing = true;
                    }
                } else {
                    said_failing = false;
                }
                if let Err(err) =
                    self.done(run, offline, e, result.is_ok(), super::now().as_millis())
                {
                    tracing::warn!(error = %err, "notifications: cannot update the queue");
                }
            }
            let _ = self.prune(now_ms);
            if batch.len() >= 100 {
                continue;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
        }
    }

    /// Every 30 s: agents not seen for longer than the threshold.
    pub async fn watch_offline(
        self: Arc<Self>,
        store: Arc<dyn CoordStore>,
        node: Arc<std::sync::Mutex<sundial_core::coord::CoordNode>>,
    ) {
        let Some(after) = self.config.offline_after_ms else {
            return;
        };
        let every = Duration::from_millis(u64::try_from(after / 4).unwrap_or(0))
            .clamp(Duration::from_secs(1), OFFLINE_CHECK_EVERY);
        loop {
            tokio::time::sleep(every).await;
            let now = super::now();
            let s = store.clone();
            let agents = tokio::task::spawn_blocking(move || {
                sundial_core::coord::admin::all_agents(s.as_ref())
            })
            .await;
            let Ok(Ok(agents)) = agents else {
                continue;
            };
            for a in agents.iter().filter(|a| !a.revoked && !a.forgotten) {
                let here = node.lock().map(|n| n.is_online(a.id)).unwrap_or(false);
                let Some(seen) = a.last_seen else {
                    continue;
                };
                let quiet = now.millis_since(seen);
                // In session here, or marked with another coordinator and
                // seen within the mark's freshness: not offline.
                let elsewhere =
                    a.in_session && quiet < sundial_core::coord::admin::SESSION_MARK_FRESH_MS;
                if !here && !elsewhere && quiet > after {
                    if let Err(e) = self.offline(a.id, seen, now) {
                        tracing::warn!(error = %e, "notifications: cannot queue");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_or_refused_clearly() {
        let t = parse_url("http://127.0.0.1:8080/hooks/sundial").expect("parses");
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/hooks/sundial")
        );
        let t = parse_url("http://alerts.example").expect("parses");
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        let t = parse_url("http://[::1]:9/x").expect("parses");
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        assert!(parse_url("https://x.example/").is_err_and(|e| e.contains("http://")));
        assert!(parse_url("http://h:notaport/").is_err());
    }
}
