//! `serve --https`: the dashboard, the fleet's JSON and the metrics over
//! TLS to admin credentials only. A viewer's credential (exported with
//! `sundialctl admin pem`) is served; no certificate, an agent's
//! certificate, or a certificate of another CA is refused in the handshake;
//! a credential revoked while its connection is open is refused at its next
//! request on that same connection.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{wait_for, Coordinator};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn free_tcp() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn pem_cert(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("a certificate")
}

/// A TLS client trusting `ca`, showing `client` (certificate, key) if any.
fn tls_client(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pem_cert(ca)).expect("the CA");
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![pem_cert(cert)],
                PrivateKeyDer::from_pem_file(key).expect("a key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Tls {
    let name = ServerName::try_from("127.0.0.1").expect("a name");
    let conn = rustls::ClientConnection::new(config, name).expect("a connection");
    let tcp = TcpStream::connect(addr).expect("connects");
    tcp.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

/// One keep-alive GET on `tls`: (status, body). `None`: the connection or
/// the handshake failed.
fn get(tls: &mut Tls, path: &str) -> Option<(u16, String)> {
    write!(tls, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    tls.flush().ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match tls.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())
                    .flatten()
            })
            .unwrap_or(0);
        if body.len() >= len {
            return Some((status, body[..len].to_owned()));
        }
    }
}

#[test]
fn a_viewer_credential_reaches_the_dashboard_over_tls_until_it_is_revoked() {
    let root = tempfile::tempdir().expect("tempdir");
    let https = free_tcp();
    let coord = Coordinator::start_with(root.path(), &["--https", &https.to_string()]);
    let _agent = coord.agent(&root.path().join("edge-1"), "edge-1");
    wait_for("the agent online", || {
        coord.json(&["agent", "list"])[0]["online"] == true
    });
    let creds = root.path().join("dash.creds");
    coord.ctl_ok(&[
        "admin",
        "create",
        "dash",
        "--role",
        "viewer",
        "--out",
        creds.to_str().expect("utf-8"),
    ]);
    let pem = root.path().join("dash");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sundialctl"))
        .arg("--creds")
        .arg(&creds)
        .args(["admin", "pem", "--out"])
        .arg(&pem)
        .output()
        .expect("sundialctl runs");
    assert!(out.status.success(), "{out:?}");
    let ca = pem.join("ca.pem");
    let viewer = tls_client(&ca, Some((&pem.join("cert.pem"), &pem.join("key.pem"))));

    // The viewer sees the dashboard, the fleet (the same agents as
    // sundialctl) and the metrics, on one kept-alive connection.
    let mut tls = connect(https, viewer.clone());
    let (status, page) = get(&mut tls, "/").expect("the dashboard");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<table id=\"agents\">"), "{page}");
    let (status, fleet) = get(&mut tls, "/api/fleet").expect("the fleet");
    assert_eq!(status, 200, "{fleet}");
    let fleet: serde_json::Value = serde_json::from_str(&fleet).expect("JSON");
    let listed = coord.json(&["agent", "list"]);
    assert_eq!(fleet["agents"][0]["agent_id"], listed[0]["agent_id"]);
    let (status, metrics) = get(&mut tls, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("sundial_sessions 1"), "{metrics}");

    // No certificate, an agent's, or one of another CA: no handshake.
    let refused = |config: Arc<rustls::ClientConfig>| {
        let mut t = connect(https, config);
        get(&mut t, "/api/fleet").is_none()
    };
    assert!(refused(tls_client(&ca, None)), "no certificate");
    let agent_dir = root.path().join("edge-1");
    assert!(
        refused(tls_client(
            &ca,
            Some((&agent_dir.join("agent.pem"), &agent_dir.join("agent.key")))
        )),
        "an agent's certificate"
    );
    let other = tempfile::tempdir().expect("tempdir");
    let other_coord = Coordinator::start_with(other.path(), &[]);
    let other_pem = other.path().join("pem");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sundialctl"))
        .arg("--creds")
        .arg(other_coord.creds())
        .args(["admin", "pem", "--out"])
        .arg(&other_pem)
        .output()
        .expect("sundialctl runs");
    assert!(out.status.success(), "{out:?}");
    assert!(
        refused(tls_client(
            &ca,
            Some((&other_pem.join("cert.pem"), &other_pem.join("key.pem")))
        )),
        "another coordinator's admin"
    );

    // Revoked while the connection is open: its next request is refused.
    coord.ctl_ok(&["admin", "revoke", "dash"]);
    let (status, body) = get(&mut tls, "/api/fleet").expect("an answer");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(
        refused(viewer),
        "a new connection of the revoked credential"
    );
}
