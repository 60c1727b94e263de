//! `sundial-agent join`: enrollment with a join token.
//!
//! The agent pins the coordinator by the CA fingerprint in the token before
//! it sends anything, and verifies the coordinator's certificate by the name
//! in the token (not by the address dialed). It generates its key here and
//! sends only a CSR: the private key never leaves the device.

use std::path::Path;

use rcgen::{CertificateParams, KeyPair};
use sundial_net::tls::ServerTrust;
use sundial_protocol::token::{sha256, JoinToken};
use sundial_protocol::wire::{EnrollRequest, EnrollResponse, ALPN_ENROLL};
use sundial_protocol::AgentId;

use crate::runtime::store_path;
use crate::session::{self, FramedRecv, CA_FILE, CERT_FILE, KEY_FILE};
use crate::store::{meta, AgentStore};

/// What `join` needs.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// `HOST:PORT`s to enroll through (the first that answers); `None`:
    /// the token's.
    pub coordinator: Option<String>,
    pub token: String,
    pub name: Option<String>,
    pub labels: Vec<(String, String)>,
    pub allow_exec: Vec<String>,
    /// `--allow-env` names, kept for `run`.
    pub allow_env: Vec<String>,
    /// `--allow-wasm` and `--allow-wasm-dir`, kept for `run`.
    pub allow_wasm: bool,
    pub allow_wasm_dirs: Vec<String>,
}

fn write_file(path: &Path, data: &[u8], private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Enrolls the agent whose data lives in `data_dir`.
pub async fn join(data_dir: &Path, req: JoinRequest) -> Result<AgentId, String> {
    let token = JoinToken::decode(&req.token).map_err(|e| e.to_string())?;
    let mut coordinators = match &req.coordinator {
        Some(list) => sundial_protocol::token::coordinator_list(list)
            .map_err(|e| format!("--coordinator: {e}"))?,
        None if token.addresses.is_empty() => {
            return Err("this token carries no coordinator address (an older coordinator made it): pass --coordinator HOST:PORT".into())
        }
        None => token.addresses.clone(),
    };
    if let Some(name) = &req.name {
        if name.parse::<AgentId>().is_ok() {
            return Err(format!(
                "the name `{name}` reads as an agent id (ids are a1, a2, ...): choose a name that does not"
            ));
        }
    }
    if !data_dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| format!("{}: {e}", data_dir.display()))?;
    }
    let store = AgentStore::open(&store_path(data_dir)).map_err(|e| {
        if e.is_already_open() {
            format!(
                "an agent is running with {} (it holds the store); it has joined already — \
                 to enroll a second agent on this device, use another --data-dir",
                data_dir.display()
            )
        } else {
            e.to_string()
        }
    })?;
    crate::runtime::restrict_file(&store_path(data_dir));
    if let Some(id) = store
        .get_meta::<u64>(meta::AGENT_ID)
        .map_err(|e| e.to_string())?
    {
        return Err(format!(
            "{} is already enrolled as {}; use another --data-dir for a new agent",
            data_dir.display(),
            AgentId(id)
        ));
    }
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    // The sealing key is its own pair, made here beside the signing key.
    let seal_seed = crate::sealing::random_seed()?;
    let seal_key = sundial_protocol::seal::SealKeyPair::from_seed(&seal_seed)
        .map_err(|e| e.to_string())?
        .public();
    let csr = CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| format!("making a CSR: {e}"))?;

    // The first coordinator that answers enrolls the agent, and stays its
    // first: the others learn of its certificate within a second.
    let mut unreachable = Vec::new();
    let mut connected = None;
    for (i, address) in coordinators.iter().enumerate() {
        match session::connect(
            address,
            &token.server_name,
            ServerTrust::Pinned(token.ca_sha256),
            None,
            ALPN_ENROLL,
        )
        .await
        {
            Ok(c) => {
                connected = Some((i, c));
                break;
            }
            Err(e) => unreachable.push(format!("cannot reach the coordinator at {address}: {e}")),
        }
    }
    let Some((first, (endpoint, conn))) = connected else {
        return Err(unreachable.join("; "));
    };
    coordinators[..=first].rotate_right(1);
    let exchange = async {
        let (mut tx, rx) = conn.open_bi().await?;
        session::send(
            &mut tx,
            &EnrollRequest {
                token_secret: token.secret.clone(),
                csr_der: csr.der().to_vec(),
                name: req.name.clone(),
                labels: req.labels.clone(),
                seal_key: Some(seal_key).into(),
            },
        )
        .await?;
        let _ = tx.finish();
        FramedRecv::new(rx).next::<EnrollResponse>().await
    };
    let resp = tokio::time::timeout(session::CONNECT_TIMEOUT, exchange)
        .await
        .map_err(|_| "the coordinator did not answer the enrollment in time".to_string())?
        .map_err(|e| format!("enrollment failed: {e}"));
    conn.close(0u32.into(), b"enrolled");
    endpoint.wait_idle().await;
    let (agent_id, cert_der, ca_der) = match resp? {
        EnrollResponse::Enrolled {
            agent_id,
            cert_der,
            ca_der,
        } => (agent_id, cert_der, ca_der),
        EnrollResponse::Refused { reason } => {
            return Err(format!("the coordinator refused: {reason}"))
        }
    };
    if sha256(&ca_der) != token.ca_sha256 {
        return Err("the CA the coordinator sent does not match the token".into());
    }
    let pem = |label: &str, der: &[u8]| {
        use base64_pem::encode;
        encode(label, der)
    };
    write_file(
        &data_dir.join(KEY_FILE),
        key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(
        &data_dir.join(crate::sealing::SEAL_KEY_FILE),
        &seal_seed,
        true,
    )?;
    write_file(
        &data_dir.join(CERT_FILE),
        pem("CERTIFICATE", &cert_der).as_bytes(),
        false,
    )?;
    write_file(
        &data_dir.join(CA_FILE),
        pem("CERTIFICATE", &ca_der).as_bytes(),
        false,
    )?;
    store
        .put_meta(&[
            (meta::COORDINATOR, coordinators.join(",")),
            (meta::SERVER_NAME, token.server_name.clone()),
        ])
        .and_then(|()| store.put_meta(&[(meta::ALLOW_EXEC, req.allow_exec.clone())]))
        .and_then(|()| store.put_meta(&[(meta::ALLOW_ENV, req.allow_env.clone())]))
        .and_then(|()| store.put_meta(&[(meta::ALLOW_WASM, req.allow_wasm)]))
        .and_then(|()| store.put_meta(&[(meta::ALLOW_WASM_DIRS, req.allow_wasm_dirs.clone())]))
        .and_then(|()| store.put_meta(&[(meta::AGENT_ID, agent_id.0)]))
        .map_err(|e| e.to_string())?;
    Ok(agent_id)
}

/// Minimal PEM writing (RFC 7468), so no extra crate is needed.
mod base64_pem {
    pub fn encode(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }
}
