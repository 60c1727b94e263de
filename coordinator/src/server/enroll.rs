//! The enrollment ALPN: a join token and a CSR in, a certificate out.

use super::*;

pub(super) async fn handle_enroll(
    state: &Arc<State>,
    conn: quinn::Connection,
) -> Result<(), NetError> {
    let (mut send, recv) = tokio::time::timeout(EXCHANGE_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| NetError::Eof)??;
    let mut recv = FramedRecv::with_limit(recv, ENROLL_FRAME_BYTES_MAX);
    let req: EnrollRequest = match tokio::time::timeout(EXCHANGE_TIMEOUT, recv.next()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(close_for(&conn, e)),
        Err(_) => {
            conn.close(close::PROTOCOL.into(), b"no enrollment request in time");
            return Err(NetError::Eof);
        }
    };
    let resp = blocking(state, move |s| enroll(s, req))
        .await
        .unwrap_or_else(|| EnrollResponse::Refused {
            reason: "the coordinator could not process the enrollment".into(),
        });
    net::send(&mut send, &resp).await?;
    send.finish()?;
    // Let the agent read the answer and close.
    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, conn.closed()).await;
    Ok(())
}

fn enroll(state: &State, req: EnrollRequest) -> EnrollResponse {
    let refused = |reason: String| EnrollResponse::Refused { reason };
    if let Some(why) = req.name.as_deref().and_then(name_refusal) {
        return refused(why);
    }
    let secret_hash = sha256(&req.token_secret);
    let failed = |e: StoreError| {
        if e.is_refusal() {
            return refused(e.to_string());
        }
        tracing::error!(error = %e, "enrollment failed");
        state.note_store_error(&e);
        refused("the coordinator could not store the enrollment".into())
    };
    let told = |refusal: TokenRefusal| {
        tracing::warn!(reason = %refusal, "enrollment refused");
        refused(refusal.to_string())
    };
    // The token is checked first, the certificate issued outside any store
    // transaction, and the token spent with the agent stored (checked again
    // there: another enrollment may have used it up meanwhile; the id
    // reserved is then left unused).
    match state.store.check_token(secret_hash, now()) {
        Ok(Ok(_)) => {}
        Ok(Err(refusal)) => return told(refusal),
        Err(e) => return failed(e),
    }
    let agent_id = match state.store.reserve_agent_id() {
        Ok(id) => id,
        Err(e) => return failed(e),
    };
    let cert_der = match state.pki.sign_agent_csr(&req.csr_der, agent_id) {
        Ok(c) => c,
        Err(why) => return refused(why),
    };
    let enrollment = Enrollment {
        token_sha256: secret_hash,
        agent: agent_id,
        name: req.name.clone(),
        labels: req.labels.clone(),
        cert_sha256: sha256(&cert_der),
        now: now(),
    };
    match state.store.enroll(&enrollment) {
        Ok(Ok(_)) => {
            if let Ok(mut k) = state.known.write() {
                k.insert(sha256(&cert_der), CertRole::Agent(agent_id));
            }
            tracing::info!(agent = %agent_id, name = ?req.name, "agent enrolled");
            EnrollResponse::Enrolled {
                agent_id,
                cert_der,
                ca_der: state.pki.ca_der.to_vec(),
            }
        }
        Ok(Err(refusal)) => told(refusal),
        Err(e) => failed(e),
    }
}

/// Why an agent may not take this name: one that reads as an agent id
/// (`a1`, `7`) would shadow that agent wherever names and ids are accepted.
pub fn name_refusal(name: &str) -> Option<String> {
    name.parse::<sundial_protocol::AgentId>().is_ok().then(|| {
        format!("the name `{name}` reads as an agent id (ids are a1, a2, ...): choose a name that does not")
    })
}
