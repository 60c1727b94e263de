//! The coordinator's HTTP listener (`serve --http ADDR`): `/metrics` in
//! the Prometheus text format, `/healthz` (the process answers) and
//! `/readyz` (the store answers and the node runs). Read-only, with no
//! credentials: bind it to loopback, or to an address only the monitoring
//! network reaches.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

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
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state((shared, metrics));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP listener stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    Ok(bound)
}

type AppState = (Arc<Shared>, Arc<Metrics>);

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
    let (sessions, outbox) = match shared.node.lock() {
        Ok(n) => (n.sessions_open(), n.outbox_backlog()),
        Err(_) => (0, (0, 0)),
    };
    metrics.set_node(sessions, outbox);
    if !shared.shared_store {
        metrics.set_online(sessions);
    }
    let store = shared.store.clone();
    let now = shared.now().wall;
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
