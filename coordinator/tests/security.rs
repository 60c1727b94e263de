//! Who may talk to the coordinator, and what bad input does: certificates
//! refused at the handshake, tokens refused with a clear error, identities
//! taken from certificates only, CSRs that ask for too much, and garbage or
//! oversized frames that close one connection while everyone else is served.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{join, wait_for, Agent, Coordinator};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sundial_agent::session::{self, FramedRecv, SessionError};
use sundial_net::tls::{Identity, ServerTrust};
use sundial_protocol::codec::FRAME_BYTES_MAX;
use sundial_protocol::wire::{
    close, AgentMsg, CoordMsg, EnrollRequest, EnrollResponse, ALPN, ALPN_ADMIN, ALPN_ENROLL,
};
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, Timestamp};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn ca(coord: &Coordinator) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(coord.dir.join("ca.pem")).expect("ca.pem")
}

fn agent_identity(dir: &Path) -> Identity {
    Identity {
        chain: vec![CertificateDer::from_pem_file(dir.join("agent.pem")).expect("agent.pem")],
        key: PrivateKeyDer::from_pem_file(dir.join("agent.key")).expect("agent.key"),
    }
}

fn self_signed() -> Identity {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["mallory".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    Identity {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
    }
}

/// Connects on `alpn` and tries one exchange; returns how it ended.
fn try_session(
    coord: &Coordinator,
    identity: Option<Identity>,
    alpn: &[u8],
) -> Result<(), SessionError> {
    rt().block_on(async {
        let (_ep, conn) = session::connect(
            &coord.addr.to_string(),
            "sundial-coordinator",
            ServerTrust::Ca(ca(coord)),
            identity,
            alpn,
        )
        .await?;
        let (mut tx, rx) = conn.open_bi().await?;
        session::send(
            &mut tx,
            &AgentMsg::Hello {
                last_revision: 0,
                outbox_len: 0,
                agent_version: "test".into(),
                allow_exec: vec![],
                seal_key: Default::default(),
                functions: Default::default(),
                allow_env: Default::default(),
            },
        )
        .await?;
        let mut rx = FramedRecv::new(rx);
        let _: CoordMsg = rx.next().await?;
        Ok(())
    })
}

/// Whether the connection was refused by TLS (an alert during the
/// handshake, which in QUIC may reach the client just after it sent its
/// first stream data), with `reason` in the alert text.
fn refused_by_tls(r: &Result<(), SessionError>, reason: &str) -> bool {
    let text = format!("{r:?}");
    text.contains("Code::crypto") && text.contains(reason)
}

fn closed_with(r: &Result<(), SessionError>, code: u32) -> bool {
    let text = format!("{r:?}");
    matches!(r, Err(SessionError::Connection(quinn::ConnectionError::ApplicationClosed(c))) if c.error_code == quinn::VarInt::from_u32(code))
        || matches!(r, Err(SessionError::Read(quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(c)))) if c.error_code == quinn::VarInt::from_u32(code))
        || text.contains(&format!("error_code: {code}"))
}

#[test]
fn certificates_that_are_missing_foreign_or_revoked_are_refused() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let dir = root.path().join("a");
    let id = join(&coord.addr.to_string(), &coord.token(&[]), &dir, "a", &[]).expect("joins");
    assert!(
        try_session(&coord, Some(agent_identity(&dir)), ALPN).is_ok(),
        "a good agent is served"
    );

    // No certificate: TLS completes only for enrollment; the session is closed at once.
    let r = try_session(&coord, None, ALPN);
    assert!(
        closed_with(&r, close::CERT_REQUIRED),
        "no certificate: {r:?}"
    );
    let r = try_session(&coord, None, ALPN_ADMIN);
    assert!(
        closed_with(&r, close::CERT_REQUIRED),
        "no certificate on admin: {r:?}"
    );

    // Self-signed and another CA's: refused in the handshake.
    let r = try_session(&coord, Some(self_signed()), ALPN);
    assert!(refused_by_tls(&r, "UnknownIssuer"), "self-signed: {r:?}");
    let other_root = tempfile::tempdir().expect("tempdir");
    let other = Coordinator::start(other_root.path());
    let other_dir = other_root.path().join("x");
    join(
        &other.addr.to_string(),
        &other.token(&[]),
        &other_dir,
        "x",
        &[],
    )
    .expect("joins other");
    let r = try_session(&coord, Some(agent_identity(&other_dir)), ALPN);
    assert!(
        refused_by_tls(&r, "invalid peer certificate"),
        "other CA: {r:?}"
    );
    // An agent certificate is not an admin certificate.
    let r = try_session(&coord, Some(agent_identity(&dir)), ALPN_ADMIN);
    assert!(r.is_err(), "agent cert on the admin API: {r:?}");

    // Revoked: refused from then on.
    coord.ctl_ok(&["agent", "revoke", &id]);
    let r = try_session(&coord, Some(agent_identity(&dir)), ALPN);
    assert!(refused_by_tls(&r, "revoked or unknown"), "revoked: {r:?}");
    assert_eq!(coord.json(&["agent", "get", &id])["revoked"], true);
    // The refusal shows in the coordinator's log, and it still serves others.
    assert!(coord.ctl(&["agent", "list"]).0);
}

#[test]
fn reused_expired_and_unknown_tokens_get_a_clear_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let addr = coord.addr.to_string();
    let token = coord.token(&[]);
    join(&addr, &token, &root.path().join("a"), "a", &[]).expect("first use");
    let err = join(&addr, &token, &root.path().join("b"), "b", &[]).expect_err("second use");
    assert!(err.contains("used up"), "{err}");

    let short = coord.token(&["--ttl", "1ms"]);
    std::thread::sleep(Duration::from_millis(20));
    let err = join(&addr, &short, &root.path().join("c"), "c", &[]).expect_err("expired");
    assert!(err.contains("expired"), "{err}");

    // Right CA pin, unknown secret.
    let mut forged = sundial_protocol::token::JoinToken::decode(&token).expect("decodes");
    forged.secret = vec![1; sundial_protocol::token::SECRET_BYTES];
    let err = join(&addr, &forged.encode(), &root.path().join("d"), "d", &[]).expect_err("unknown");
    assert!(err.contains("unknown join token"), "{err}");

    // A token pinning another CA: the agent refuses the coordinator before sending anything.
    let mut wrong_pin =
        sundial_protocol::token::JoinToken::decode(&coord.token(&[])).expect("decodes");
    wrong_pin.ca_sha256 = [0; 32];
    let err =
        join(&addr, &wrong_pin.encode(), &root.path().join("e"), "e", &[]).expect_err("wrong pin");
    assert!(err.contains("cannot reach the coordinator"), "{err}");

    let err = join(&addr, "not-a-token", &root.path().join("f"), "f", &[]).expect_err("garbage");
    assert!(err.contains("not a Sundial join token"), "{err}");

    let many = coord.token(&["--uses", "2", "--label", "zone=x"]);
    join(&addr, &many, &root.path().join("g"), "g", &[]).expect("use 1");
    join(&addr, &many, &root.path().join("h"), "h", &[]).expect("use 2");
    let agents = coord.json(&["agent", "list"]);
    let labelled = agents
        .as_array()
        .expect("array")
        .iter()
        .filter(|a| a["labels"]["zone"] == "x")
        .count();
    assert_eq!(labelled, 2);
}

#[test]
fn identity_comes_from_the_certificate_only() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let addr = coord.addr.to_string();
    let a_dir = root.path().join("a");
    let b_dir = root.path().join("b");
    let a = join(&addr, &coord.token(&[]), &a_dir, "a", &[]).expect("a");
    let b = join(&addr, &coord.token(&[]), &b_dir, "b", &[]).expect("b");
    let b_task = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &b,
        "--at",
        "2099-01-01T00:00:00Z",
        "--",
        "/bin/true",
    ]);

    // A's session receives no task of B's.
    let got = rt().block_on(async {
        let (_ep, conn) = session::connect(
            &addr,
            "sundial-coordinator",
            ServerTrust::Ca(ca(&coord)),
            Some(agent_identity(&a_dir)),
            ALPN,
        )
        .await
        .expect("connects");
        let (mut tx, rx) = conn.open_bi().await.expect("stream");
        session::send(
            &mut tx,
            &AgentMsg::Hello {
                last_revision: 0,
                outbox_len: 0,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                allow_exec: vec![],
                seal_key: Default::default(),
                functions: Default::default(),
                allow_env: Default::default(),
            },
        )
        .await
        .expect("hello");
        let mut rx = FramedRecv::new(rx);
        // The session opens with the reconnect policy and the report
        // interval (an agent of this version knows both), then the
        // assignments.
        let policy: CoordMsg = rx.next().await.expect("policy");
        assert!(matches!(policy, CoordMsg::Policy(_)), "{policy:?}");
        let ask: CoordMsg = rx.next().await.expect("report interval");
        assert!(matches!(ask, CoordMsg::ReportEvery { .. }), "{ask:?}");
        let first: CoordMsg = rx.next().await.expect("assignments");
        // A forged record claiming to be B's.
        let forged = RunRecord {
            task_id: b_task.parse::<TaskId>().expect("id"),
            agent_id: b.parse::<AgentId>().expect("id"),
            scheduled_at: Timestamp::parse("2099-01-01T00:00:00Z").expect("ts"),
            attempt: 1,
            fired_at: None,
            finished_at: None,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            offline: false,
            detail: None,
            stdout_tail: vec![],
            stderr_tail: vec![],
        };
        session::send(
            &mut tx,
            &AgentMsg::Results {
                batch_id: 1,
                runs: vec![forged],
            },
        )
        .await
        .expect("send");
        // It is refused: B's task is not assigned to A, whoever A claims to be.
        let refused = rx.next::<CoordMsg>().await;
        (first, refused)
    });
    match got.0 {
        CoordMsg::Assignments { changes, .. } => {
            assert!(changes.is_empty(), "A saw B's tasks: {changes:?}")
        }
        other => panic!("expected assignments, got {other:?}"),
    }
    assert!(
        closed_with(&got.1.map(|_| ()), close::PROTOCOL),
        "a record for another agent's task must close the session"
    );
    assert!(
        coord.runs(&["--agent", &b]).is_empty(),
        "A wrote a run as B"
    );
    assert!(
        coord.runs(&["--agent", &a]).is_empty(),
        "A wrote a run of B's task"
    );
}

#[test]
fn a_csr_asking_for_more_yields_a_plain_client_certificate() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let token = sundial_protocol::token::JoinToken::decode(&coord.token(&[])).expect("token");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![
        "evil.example".to_string(),
        "sundial-coordinator".to_string(),
    ])
    .expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params.serialize_request(&key).expect("csr");
    let resp = rt().block_on(async {
        let (_ep, conn) = session::connect(
            &coord.addr.to_string(),
            &token.server_name,
            ServerTrust::Pinned(token.ca_sha256),
            None,
            ALPN_ENROLL,
        )
        .await
        .expect("connects");
        let (mut tx, rx) = conn.open_bi().await.expect("stream");
        session::send(
            &mut tx,
            &EnrollRequest {
                token_secret: token.secret.clone(),
                csr_der: csr.der().to_vec(),
                name: None,
                labels: vec![],
                seal_key: Default::default(),
            },
        )
        .await
        .expect("send");
        let _ = tx.finish();
        FramedRecv::new(rx)
            .next::<EnrollResponse>()
            .await
            .expect("answer")
    });
    let EnrollResponse::Enrolled { cert_der, .. } = resp else {
        panic!("refused: {resp:?}");
    };
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(&cert_der).expect("parses");
    let bc = cert
        .basic_constraints()
        .expect("ext")
        .map(|b| b.value.ca)
        .unwrap_or(false);
    assert!(!bc, "the agent got a CA certificate");
    assert!(
        cert.subject_alternative_name().expect("ext").is_none(),
        "the agent got the names it asked for"
    );
    let eku = cert
        .extended_key_usage()
        .expect("ext")
        .expect("eku present")
        .value;
    assert!(eku.client_auth && !eku.server_auth, "usage: {eku:?}");
    let ku = cert.key_usage().expect("ext").expect("ku present").value;
    assert!(!ku.key_cert_sign(), "the agent may sign certificates");
    assert!(
        cert.subject().to_string().contains("sundial-agent a1"),
        "{}",
        cert.subject()
    );
}

#[test]
fn garbage_and_oversized_frames_close_that_connection_only() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let addr = coord.addr.to_string();
    let a_dir = root.path().join("a");
    let b_dir = root.path().join("b");
    join(&addr, &coord.token(&[]), &a_dir, "a", &[]).expect("a");
    let b = join(&addr, &coord.token(&[]), &b_dir, "b", &[]).expect("b");
    let mut good = Agent::start(&b_dir);
    let task = coord.ctl_ok(&[
        "task",
        "create",
        "--agent",
        &b,
        "--every",
        "300ms",
        "--",
        "/bin/true",
    ]);
    wait_for("b runs", || !coord.runs(&["--task", &task]).is_empty());

    for bytes in [
        b"\x00\x00\x00\x05\x01garbage-garbage".to_vec(),
        ((FRAME_BYTES_MAX as u32) + 1).to_be_bytes().to_vec(),
        b"\x00\x00\x00\x03\x63ab".to_vec(),
    ] {
        let r: Result<(), SessionError> = rt().block_on(async {
            let (_ep, conn) = session::connect(
                &addr,
                "sundial-coordinator",
                ServerTrust::Ca(ca(&coord)),
                Some(agent_identity(&a_dir)),
                ALPN,
            )
            .await?;
            let (mut tx, rx) = conn.open_bi().await?;
            tx.write_all(&bytes).await?;
            let mut rx = FramedRecv::new(rx);
            let ended = loop {
                if let Err(e) = rx.next::<CoordMsg>().await {
                    break e;
                }
            };
            // The stream's end may be read before the connection's close
            // arrives: the close (with its code) is what is checked.
            match ended {
                SessionError::Eof => Err(SessionError::Connection(
                    tokio::time::timeout(Duration::from_secs(10), conn.closed())
                        .await
                        .map_err(|_| SessionError::Eof)?,
                )),
                other => Err(other),
            }
        });
        assert!(closed_with(&r, close::BAD_FRAME), "{bytes:?}: {r:?}");
    }
    // The good agent is still served.
    let n = coord.runs(&["--task", &task]).len();
    wait_for("b keeps syncing", || {
        coord.runs(&["--task", &task]).len() > n + 2
    });
    good.stop();
}

#[test]
fn the_data_directory_is_private_to_its_owner_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    let check = |dir: &Path| {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            if e.file_type().expect("type").is_file() {
                assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
            }
        }
    };
    let root = tempfile::tempdir().expect("tempdir");
    // init under the usual umask (022): the store and keys are not world-readable.
    let mut coord = Coordinator::start(root.path());
    coord.kill9();
    check(&coord.dir);
    // A data directory made readable by hand is closed again by serve.
    std::fs::set_permissions(&coord.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let store = coord.dir.join("coordinator.redb");
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    coord.restart();
    wait_for("serve to tighten the directory", || {
        mode(&coord.dir) == 0o700 && mode(&store) == 0o600
    });
    coord.kill9();
    check(&coord.dir);
}

#[test]
fn an_agent_may_not_take_a_name_that_reads_as_an_id() {
    let root = tempfile::tempdir().expect("tempdir");
    let coord = Coordinator::start(root.path());
    let token = coord.token(&["--uses", "3"]);
    join(
        &coord.addr.to_string(),
        &token,
        &root.path().join("x"),
        "edge",
        &[],
    )
    .expect("joins");
    for name in ["a1", "7"] {
        let err = join(
            &coord.addr.to_string(),
            &token,
            &root.path().join(name),
            name,
            &[],
        )
        .expect_err("an id-shaped name is refused");
        assert!(err.contains("reads as an agent id"), "{name}: {err}");
    }
    // The coordinator refuses it too, whatever the client checks.
    assert!(sundial_coordinator::server::name_refusal("a12").is_some());
    assert!(sundial_coordinator::server::name_refusal("edge-1").is_none());
}
