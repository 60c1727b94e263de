//! The coordinator's HTTP listeners: `/metrics` in the Prometheus text
//! format, `/healthz` (the process answers), `/readyz` (the store answers
//! and the node runs) and the read-only dashboard.
//!
//! `serve --http ADDR` is plain HTTP without credentials: metrics and
//! health to anyone who reaches it (loopback, or a monitoring network), the
//! dashboard to loopback only. `serve --https ADDR` is the same over TLS
//! with a client certificate: a live admin credential of any role (a
//! viewer's is enough), checked in the handshake and again at every
//! request, so a revoked or expired credential stops at its next request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::serve::IncomingStream;
use axum::Router;

use sundial_core::coord_store::CertRole;

use super::metrics::Metrics;
use super::{ServeError, Shared};

/// The longest `/readyz` waits for the store.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn serve(
    shared: Arc<Shared>,
    addr: SocketAddr,
    task_series_max: usize,
) -> Result<SocketAddr, ServeError> {
    let metrics = shared
        .metrics
        .get_or_init(|| Arc::new(Metrics::new(task_series_max)))
        .clone();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Tls(format!("--http {addr}: cannot listen: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| ServeError::Tls(format!("--http {addr}: {e}")))?;
    if !bound.ip().is_loopback() {
        tracing::warn!(%bound, "the HTTP listener (metrics, health) takes no credentials: only a monitoring network should reach it");
    }
    let app = router(shared, metrics).into_make_service_with_connect_info::<Peer>();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz and the dashboard (/, to loopback only)");
    Ok(bound)
}

type AppState = (Arc<Shared>, Arc<Metrics>);

fn router(shared: Arc<Shared>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/", get(dashboard_page))
        .route("/dashboard.js", get(dashboard_js))
        .route("/api/fleet", get(fleet))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            credential_check,
        ))
        .with_state((shared, metrics))
}

/// Who is at the other end of an HTTP connection: its address, and on the
/// TLS listener the SHA-256 of its client certificate.
#[derive(Clone, Copy, Debug)]
pub(super) struct Peer {
    addr: SocketAddr,
    cert: Option<[u8; 32]>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer {
            addr: *stream.remote_addr(),
            cert: None,
        }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Peer {
        *stream.remote_addr()
    }
}

/// Every request on the TLS listener: its credential must still be a live
/// admin's (revoked or expired since the handshake: refused now).
async fn credential_check(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Some(fp) = peer.cert else {
        return next.run(req).await;
    };
    let now = shared.now().wall;
    let role = shared.node.lock().ok().and_then(|n| n.cert_role(&fp));
    match role {
        Some(CertRole::Admin(a)) if a.expires_at > now => next.run(req).await,
        Some(CertRole::Admin(a)) => (
            StatusCode::FORBIDDEN,
            format!(
                "the credential of admin \"{}\" expired at {}: renew it with `sundialctl admin renew`\n",
                a.name, a.expires_at
            ),
        )
            .into_response(),
        _ => (
            StatusCode::FORBIDDEN,
            "this credential was revoked or replaced\n",
        )
            .into_response(),
    }
}

/// Handshakes going at once on the TLS listener; further connections are
/// closed at once until some finish.
const TLS_HANDSHAKES_MAX: usize = 64;
/// A TLS handshake must be done within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose TLS handshake is done, for `axum::serve`: handshakes
/// run beside each other (a slow one holds no other), bounded.
pub(super) struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Peer)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Peer) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accepting task ended: no more connections, ever.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.local,
            cert: None,
        })
    }
}

/// Serves the same routes over TLS with client certificates (`--https`).
pub(super) async fn serve_tls(
    shared: Arc<Shared>,
    addr: SocketAddr,
    task_series_max: usize,
    tls: rustls::ServerConfig,
) -> Result<SocketAddr, ServeError> {
    let metrics = shared
        .metrics
        .get_or_init(|| Arc::new(Metrics::new(task_series_max)))
        .clone();
    let tcp = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Tls(format!("--https {addr}: cannot listen: {e}")))?;
    let bound = tcp
        .local_addr()
        .map_err(|e| ServeError::Tls(format!("--https {addr}: {e}")))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let (tx, rx) = tokio::sync::mpsc::channel(TLS_HANDSHAKES_MAX);
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(TLS_HANDSHAKES_MAX));
        loop {
            let (conn, from) = match tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "--https: accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%from, "--https: too many handshakes at once; closed");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let done = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await;
                drop(slot);
                match done {
                    Ok(Ok(stream)) => {
                        let cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| sundial_protocol::token::sha256(c.as_ref()));
                        let _ = tx.send((stream, Peer { addr: from, cert })).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%from, error = %e, "--https: handshake refused"),
                    Err(_) => tracing::debug!(%from, "--https: handshake timed out"),
                }
            });
        }
    });
    let app = router(shared, metrics).into_make_service_with_connect_info::<Peer>();
    let listener = TlsListener { rx, local: bound };
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTPS listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz, /readyz and the dashboard over TLS to admin credentials (a viewer's is enough)");
    Ok(bound)
}

async fn scrape(
    State((shared, metrics)): State<AppState>,
    headers: axum::http::HeaderMap,
) -> impl IntoResponse {
    // Prometheus asks for OpenMetrics; anything else gets the classic
    // text format (`curl`, `promtool check metrics`).
    let open = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let now = shared.now().wall;
    let (sessions, figures) = match shared.node.lock() {
        Ok(n) => (n.sessions_open(), n.fleet_figures(now)),
        Err(_) => (0, Default::default()),
    };
    metrics.set_node(sessions, &figures);
    if !shared.shared_store {
        metrics.set_online(sessions);
    }
    let store = shared.store.clone();
    let shared_store = shared.shared_store;
    let m = metrics.clone();
    let text = tokio::task::spawn_blocking(move || {
        m.read_fleet(store.as_ref(), now, shared_store);
        if open {
            m.encode()
        } else {
            m.encode_classic()
        }
    })
    .await
    .unwrap_or_default();
    let kind = if open {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    ([(header::CONTENT_TYPE, kind)], text)
}

async fn ready(State((shared, _)): State<AppState>) -> impl IntoResponse {
    let broken = shared.node.lock().map(|n| n.is_broken()).unwrap_or(true);
    if broken || shared.stopped.load(std::sync::atomic::Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping: the store failed\n",
        )
            .into_response();
    }
    let store = shared.store.clone();
    let probe = tokio::task::spawn_blocking(move || store.revision());
    match tokio::time::timeout(READY_TIMEOUT, probe).await {
        Ok(Ok(Ok(_))) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Ok(Err(e))) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store does not answer: {e}\n"),
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the store did not answer within {} s\n",
                READY_TIMEOUT.as_secs()
            ),
        )
            .into_response(),
    }
}

/// The dashboard (read-only) is shown without credentials to this
/// machine only; elsewhere over `--https`, whose every request carries a
/// live admin credential (checked by [`credential_check`]).
pub(super) fn dashboard_allowed(peer: Peer) -> bool {
    let ip = peer.addr.ip();
    peer.cert.is_some()
        || ip.is_loopback()
        || matches!(ip, std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()))
}

fn refused() -> axum::response::Response {
    (
        StatusCode::FORBIDDEN,
        "without credentials the dashboard is served to this machine only (loopback): use serve --https with an admin credential (sundialctl admin create dash --role viewer), or an SSH tunnel (ssh -L 9447:127.0.0.1:9447 HOST)\n",
    )
        .into_response()
}

async fn dashboard_page(ConnectInfo(peer): ConnectInfo<Peer>) -> axum::response::Response {
    if !dashboard_allowed(peer) {
        return refused();
    }
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("dashboard/index.html"),
    )
        .into_response()
}

async fn dashboard_js(ConnectInfo(peer): ConnectInfo<Peer>) -> axum::response::Response {
    if !dashboard_allowed(peer) {
        return refused();
    }
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("dashboard/dashboard.js"),
    )
        .into_response()
}

/// Runs the dashboard shows, the newest.
const DASHBOARD_RUNS_MAX: usize = 500;

/// The fleet as the dashboard draws it: agents, tasks with their latest
/// run per agent, and the newest runs. Read from the store (a page at a
/// time), with the node's view of who is online.
async fn fleet(
    State((shared, _)): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
) -> axum::response::Response {
    if !dashboard_allowed(peer) {
        return refused();
    }
    let store = shared.store.clone();
    let node = shared.node.clone();
    let now = shared.now().wall;
    let shared_store = shared.shared_store;
    let answer = tokio::task::spawn_blocking(move || -> Result<serde_json::Value, String> {
        use sundial_core::coord::admin::{all_agents, all_tasks, SESSION_MARK_FRESH_MS};
        let agents = all_agents(store.as_ref()).map_err(|e| e.to_string())?;
        let tasks = all_tasks(store.as_ref()).map_err(|e| e.to_string())?;
        let runs = store
            .runs(&sundial_core::coord_store::RunQuery {
                task: None,
                agent: None,
                since: None,
                limit: DASHBOARD_RUNS_MAX,
                page: sundial_core::coord_store::Page::Latest,
                forward_from_since: false,
            })
            .map_err(|e| e.to_string())?
            .runs;
        let online = |a: &sundial_core::coord_store::Agent| {
            let here = node.lock().map(|n| n.is_online(a.id)).unwrap_or(false);
            let elsewhere = shared_store
                && a.in_session
                && a.last_seen
                    .is_some_and(|t| now.millis_since(t) < SESSION_MARK_FRESH_MS);
            !a.revoked && (here || elsewhere)
        };
        let ts = |t: Option<sundial_protocol::Timestamp>| t.map(|t| t.to_string());
        let agents_json: Vec<serde_json::Value> = agents
            .iter()
            .filter(|a| !a.forgotten)
            .map(|a| {
                let seen = node.lock().ok().and_then(|n| n.seen(a.id));
                let seen = seen.unwrap_or_default();
                let report = seen.report.as_ref().map(|(r, _)| r);
                serde_json::json!({
                    "agent_id": a.id.to_string(),
                    "name": a.name,
                    "labels": a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                    "online": online(a),
                    "revoked": a.revoked,
                    "last_seen": ts(a.last_seen),
                    "clock_offset_ms": a.clock_offset_ms,
                    "version": seen.version,
                    "outbox_len": seen.outbox_len,
                    "oldest_unsynced": ts(report.and_then(|r| r.oldest_unsynced)),
                    "tasks": report.map(|r| r.tasks_held),
                    "clock": report.map(|r| if r.clock_held { "held" } else if r.clock_vouched { "vouched" } else { "unvouched" }),
                })
            })
            .collect();
        let mut tasks_json = Vec::new();
        for t in tasks.iter().filter(|t| !t.cancelled) {
            let last = store
                .last_runs(t.spec.id, sundial_core::coord_store::PAGE_MAX)
                .map_err(|e| e.to_string())?;
            tasks_json.push(serde_json::json!({
                "task_id": t.spec.id.to_string(),
                "name": t.spec.name,
                "schedule": t.spec.schedule.to_string(),
                "paused": t.paused,
                "next": if t.paused { None } else { ts(t.spec.schedule.next_after(now)) },
                "last_runs": last.iter().map(|l| serde_json::json!({
                    "agent_id": l.agent_id.to_string(),
                    "scheduled_at": l.scheduled_at.to_string(),
                    "outcome": l.outcome.as_str(),
                    "detail": l.detail,
                })).collect::<Vec<_>>(),
            }));
        }
        let runs_json: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "task_id": r.task_id.to_string(),
                    "agent_id": r.agent_id.to_string(),
                    "scheduled_at": r.scheduled_at.to_string(),
                    "attempt": r.attempt,
                    "outcome": r.outcome.as_str(),
                    "lateness_ms": r.fired_at.filter(|_| r.attempt == 1).map(|f| f.millis_since(r.scheduled_at)),
                    "duration_ms": r.fired_at.zip(r.finished_at).map(|(f, e)| e.millis_since(f)),
                    "offline": r.offline,
                    "why": r.why(),
                })
            })
            .collect();
        Ok(serde_json::json!({
            "now": now.to_string(),
            "agents": agents_json,
            "tasks": tasks_json,
            "runs": runs_json,
        }))
    })
    .await;
    match answer {
        Ok(Ok(v)) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            v.to_string(),
        )
            .into_response(),
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("the store: {e}\n")).into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the read failed\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_dashboard_is_for_loopback_only() {
        for (addr, ok) in [
            ("127.0.0.1:5", true),
            ("127.3.2.1:5", true),
            ("[::1]:5", true),
            ("[::ffff:127.0.0.1]:5", true),
            ("192.0.2.7:5", false),
            ("[2001:db8::1]:5", false),
            ("[::ffff:192.0.2.7]:5", false),
        ] {
            let a: std::net::SocketAddr = addr.parse().expect("an address");
            let plain = super::Peer {
                addr: a,
                cert: None,
            };
            assert_eq!(super::dashboard_allowed(plain), ok, "{addr}");
            // Over --https, a credential (checked per request) is what counts.
            let credential = super::Peer {
                addr: a,
                cert: Some([1; 32]),
            };
            assert!(super::dashboard_allowed(credential), "{addr}");
        }
    }
}
