//! One connection's tasks: the handshake, then reading frames into the node
//! and, for an agent's session, a writer that pulls the node's messages.
//! What to read, how much, until when, and what a frame means are the
//! node's; these only move bytes.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use sundial_core::coord::{Alpn, ConnId, Outgoing, Route, ENTROPY_BYTES};
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    AdminRequest, AgentMsg, EnrollRequest, ALPN, ALPN_ADMIN, ALPN_ENROLL,
};
use tokio::sync::{oneshot, Notify};

use super::{Handle, Shared};
use sundial_protocol::wire::{AdminResponse, LinkTiming};

/// Pushes of a follow waiting for its client; beyond, it reads too slowly
/// and the follow ends.
const FOLLOW_BACKLOG_MAX: usize = 64;
use crate::net::{self, FramedRecv, NetError};

/// Serves one admitted connection until it ends, then tells the node.
pub(super) async fn serve(
    shared: Arc<Shared>,
    id: ConnId,
    incoming: quinn::Incoming,
    config: Arc<quinn::ServerConfig>,
    link: LinkTiming,
) {
    let remote = incoming.remote_address();
    // How long the peer had been silent when the connection ended: the
    // idle timeout when it timed out (a killed agent, a cut link), so that
    // it is recorded last seen when it was last heard.
    let mut quiet_ms = 0;
    match incoming.accept_with(config) {
        Ok(connecting) => match connecting.await {
            Ok(conn) => {
                let watch = conn.clone();
                if let Err(e) = handshaken(&shared, id, conn).await {
                    tracing::debug!(%remote, error = %e, "connection ended");
                }
                if matches!(watch.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
                    // The node shortens it for an older agent, whose own
                    // idle timeout (5 s) QUIC took instead.
                    quiet_ms = i64::from(link.idle_ms);
                }
            }
            Err(e) => tracing::debug!(%remote, error = %e, "handshake failed"),
        },
        Err(e) => tracing::debug!(%remote, error = %e, "accept failed"),
    }
    if let Ok(mut h) = shared.handles.lock() {
        h.remove(&id);
    }
    shared.drive(|n, now| n.handle_closed_quiet(now, id, quiet_ms));
}

async fn handshaken(
    shared: &Arc<Shared>,
    id: ConnId,
    conn: quinn::Connection,
) -> Result<(), NetError> {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .unwrap_or_default();
    let alpn = match alpn.as_slice() {
        a if a == ALPN => Alpn::Session,
        a if a == ALPN_ENROLL => Alpn::Enroll,
        a if a == ALPN_ADMIN => Alpn::Admin,
        _ => Alpn::Other,
    };
    let cert = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|c| sha256(c.as_ref())));
    let writer = Arc::new(Notify::new());
    if let Ok(mut h) = shared.handles.lock() {
        h.insert(
            id,
            Handle {
                conn: conn.clone(),
                writer: writer.clone(),
                admin: Default::default(),
                follow: Default::default(),
                enroll: None,
            },
        );
    }
    let route = shared.drive(|n, now| n.handle_handshaken(now, id, alpn, cert));
    let result = match route {
        Route::Refused => Ok(()),
        Route::Enroll => enroll(shared, id, &conn).await,
        Route::Admin(_) => admin(shared, id, &conn).await,
        Route::Session(_) => session(shared, id, &conn, writer).await,
    };
    match &result {
        Err(NetError::Frame(f)) => {
            let why = f.to_string();
            tracing::warn!(error = %why, remote = %conn.remote_address(), "bad frame; closing the connection");
            shared.drive(|n, now| n.handle_bad_frame(now, id, &why));
        }
        Err(NetError::Eof) => conn.close(sundial_protocol::wire::close::DONE.into(), b""),
        _ => {}
    }
    // Whatever the node closes it with, or the peer did: wait for the end.
    conn.closed().await;
    result
}

fn limit(shared: &Arc<Shared>, id: ConnId) -> usize {
    shared
        .node
        .lock()
        .map(|n| n.frame_limit(id))
        .unwrap_or(sundial_protocol::wire::HELLO_FRAME_BYTES_MAX)
}

async fn enroll(
    shared: &Arc<Shared>,
    id: ConnId,
    conn: &quinn::Connection,
) -> Result<(), NetError> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut recv = FramedRecv::with_limit(recv, limit(shared, id));
    let req: EnrollRequest = recv.next().await?;
    let (tx, rx) = oneshot::channel();
    if let Ok(mut h) = shared.handles.lock() {
        if let Some(h) = h.get_mut(&id) {
            h.enroll = Some(tx);
        }
    }
    shared.drive(|n, now| n.handle_enroll(now, id, req));
    let Ok(response) = rx.await else {
        return Ok(());
    };
    net::send(&mut send, &response).await?;
    send.finish()?;
    Ok(())
}

async fn admin(shared: &Arc<Shared>, id: ConnId, conn: &quinn::Connection) -> Result<(), NetError> {
    loop {
        let Ok((mut send, recv)) = conn.accept_bi().await else {
            return Ok(());
        };
        let mut recv = FramedRecv::with_limit(recv, limit(shared, id));
        let request: AdminRequest = recv.next().await?;
        let req = shared
            .next_req
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let follows = matches!(request, AdminRequest::RunFollow { .. });
        let (push_tx, mut push_rx) = tokio::sync::mpsc::channel(FOLLOW_BACKLOG_MAX);
        if let Ok(mut h) = shared.handles.lock() {
            if let Some(h) = h.get_mut(&id) {
                h.admin.insert(req, tx);
                if follows {
                    h.follow.insert(req, push_tx);
                }
            }
        }
        let Some(entropy) = entropy() else {
            tracing::error!("no randomness available from the system");
            let refused = sundial_protocol::wire::AdminResponse::Error(
                "the coordinator has no randomness available".into(),
            );
            net::send(&mut send, &refused).await?;
            send.finish()?;
            continue;
        };
        shared.drive(|n, now| n.handle_admin(now, id, req, request, entropy));
        if follows {
            // Pushed until the client goes or reads too slowly; a refusal
            // comes as a reply.
            let result = follow(&mut send, rx, &mut push_rx).await;
            if let Ok(mut h) = shared.handles.lock() {
                if let Some(h) = h.get_mut(&id) {
                    h.follow.remove(&req);
                    h.admin.remove(&req);
                }
            }
            shared.drive(|n, now| n.handle_follow_end(now, id, req));
            result?;
            continue;
        }
        let Ok(answers) = rx.await else {
            return Ok(());
        };
        for a in &answers {
            net::send(&mut send, a).await?;
        }
        send.finish()?;
    }
}

/// Pushes a follow's answers until it ends: the client stops the stream
/// or closes, the node refuses (a reply), or the pushes stop (the client
/// read too slowly: it is told).
async fn follow(
    send: &mut quinn::SendStream,
    reply: oneshot::Receiver<Vec<AdminResponse>>,
    pushes: &mut tokio::sync::mpsc::Receiver<Vec<AdminResponse>>,
) -> Result<(), NetError> {
    tokio::pin!(reply);
    loop {
        tokio::select! {
            answers = &mut reply => {
                for a in answers.unwrap_or_default() {
                    net::send(send, &a).await?;
                }
                send.finish()?;
                return Ok(());
            }
            pushed = pushes.recv() => {
                let Some(answers) = pushed else {
                    let slow = AdminResponse::Error(
                        "the follow ended: this client read too slowly; follow again".into(),
                    );
                    net::send(send, &slow).await?;
                    send.finish()?;
                    return Ok(());
                };
                for a in &answers {
                    net::send(send, a).await?;
                }
            }
            _ = send.stopped() => return Ok(()),
        }
    }
}

/// Fresh randomness for the node (a join token's secret).
fn entropy() -> Option<[u8; ENTROPY_BYTES]> {
    let mut bytes = [0u8; ENTROPY_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(bytes)
}

async fn session(
    shared: &Arc<Shared>,
    id: ConnId,
    conn: &quinn::Connection,
    writer: Arc<Notify>,
) -> Result<(), NetError> {
    let (send, recv) = conn.accept_bi().await?;
    // Writing runs on its own, so reading never stops while a long
    // assignment goes out: an agent blocked writing its result batches
    // (a bounded number unacknowledged) always gets them through.
    let write = tokio::spawn(write_session(
        shared.clone(),
        id,
        conn.clone(),
        send,
        writer,
    ));
    let mut recv = FramedRecv::with_limit(recv, limit(shared, id));
    let result = loop {
        let msg: AgentMsg = match recv.next().await {
            Ok(m) => m,
            Err(NetError::Eof) => {
                conn.close(sundial_protocol::wire::close::DONE.into(), b"");
                break Ok(());
            }
            Err(e) => break Err(e),
        };
        shared.drive(|n, now| n.handle_agent_msg(now, id, msg));
        recv.set_limit(limit(shared, id));
    };
    write.abort();
    result
}

/// Sends what the node has for this session, waiting when it has nothing.
async fn write_session(
    shared: Arc<Shared>,
    id: ConnId,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    writer: Arc<Notify>,
) {
    loop {
        match shared.drive(|n, now| n.poll_transmit(now, id)) {
            Some(Outgoing::Msg(m)) => {
                if net::send(&mut send, &m).await.is_err() {
                    return;
                }
            }
            Some(Outgoing::Close { code, reason }) => {
                let _ = send.finish();
                conn.close(code.into(), reason.as_bytes());
                return;
            }
            None => writer.notified().await,
        }
    }
}
