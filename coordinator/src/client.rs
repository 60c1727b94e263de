//! The admin client behind `sundialctl`: one QUIC connection with the admin
//! certificate, one stream per request.

use std::sync::Arc;
use std::time::Duration;

use sundial_net::tls::{client_config, ServerTrust};
use sundial_protocol::wire::{AdminRequest, AdminResponse, ALPN_ADMIN};

use sundial_protocol::RunRecord;

use crate::net::{self, FramedRecv, NetError};
use crate::pki::AdminCreds;

/// An unreachable coordinator is reported after this long, not a hang.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an admin keeps trying a coordinator that refuses connections
/// for load, in all.
pub const BUSY_WAIT_MAX: Duration = Duration::from_secs(30);
/// The first wait after such a refusal; each further one doubles, up to
/// [`BUSY_RETRY_MAX`].
const BUSY_RETRY_FIRST: Duration = Duration::from_millis(100);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(2);

/// The coordinator refused the connection for load: at its handshake
/// budget or behind (CONNECTION_REFUSED, before any cryptography), or at
/// its limit of sessions (closed with BUSY).
fn refused_for_load(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            c.error_code == quinn::VarInt::from_u32(sundial_protocol::wire::close::BUSY)
        }
        _ => false,
    }
}
/// The longest wait for one answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// One page of `run list`.
#[derive(Debug, Default, Clone)]
pub struct RunListAnswer {
    /// Oldest first.
    pub runs: Vec<RunRecord>,
    /// Runs stored in all, when no filter applied.
    pub matched: Option<u64>,
    /// Stored records the coordinator could not read (skipped).
    pub unreadable: u64,
    /// More runs match beyond this page.
    pub more: bool,
    /// Cursors of the first and last run of the page.
    pub first: Option<String>,
    pub last: Option<String>,
}

/// A connection to the coordinator's admin API.
#[derive(Debug)]
pub struct AdminClient {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl AdminClient {
    /// Connects with the credentials written by `sundial-coordinator init`.
    pub async fn connect(creds: &AdminCreds) -> Result<AdminClient, String> {
        // Several coordinators (one store): the first that answers.
        let list = sundial_protocol::token::coordinator_list(&creds.coordinator)
            .unwrap_or_else(|_| vec![creds.coordinator.clone()]);
        let mut failed = Vec::new();
        for address in &list {
            match AdminClient::connect_to(creds, address).await {
                Ok(c) => return Ok(c),
                Err(e) => failed.push(e),
            }
        }
        Err(failed.join("; "))
    }

    async fn connect_to(creds: &AdminCreds, address: &str) -> Result<AdminClient, String> {
        let addr = net::resolve(address).await?;
        let tls = client_config(
            ServerTrust::Ca(creds.ca_der()?),
            Some(creds.identity()?),
            ALPN_ADMIN,
        )
        .map_err(|e| format!("TLS setup: {e}"))?;
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("TLS setup: {e}"))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(net::transport());
        let mut endpoint = quinn::Endpoint::client(net::client_bind_addr(addr))
            .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        endpoint.set_default_client_config(config);
        // A coordinator at its handshake budget (a fleet reconnecting at
        // once) refuses new connections before any cryptography, admins'
        // too: the operator is let in as the budget allows, not turned away.
        let started = std::time::Instant::now();
        let mut wait = BUSY_RETRY_FIRST;
        let conn = loop {
            let connecting = endpoint
                .connect(addr, &creds.server_name)
                .map_err(|e| format!("cannot connect to {address}: {e}"))?;
            match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if refused_for_load(&e) && started.elapsed() + wait < BUSY_WAIT_MAX => {
                    if wait == BUSY_RETRY_FIRST {
                        tracing::info!(%address, "the coordinator is busy (refusing connections for load); trying again");
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BUSY_RETRY_MAX);
                }
                Ok(Err(e)) if refused_for_load(&e) => {
                    return Err(format!(
                        "the coordinator at {address} is busy: it refused connections for load for {} s (a fleet reconnecting at once?); try again",
                        started.elapsed().as_secs()
                    ))
                }
                Ok(Err(e)) => return Err(format!("cannot connect to the coordinator at {address}: {e}")),
                Err(_) => {
                    return Err(format!(
                        "no answer from the coordinator at {address} within {} s (is `sundial-coordinator serve` running there?)",
                        CONNECT_TIMEOUT.as_secs()
                    ))
                }
            }
        };
        Ok(AdminClient {
            conn,
            _endpoint: endpoint,
        })
    }

    /// Sends one request and waits for its whole answer: one message, or
    /// the pages of a list (merged here), up to the end of the stream.
    pub async fn request(&self, req: &AdminRequest) -> Result<AdminResponse, String> {
        let mut answers = self.request_all(req).await?.into_iter();
        let Some(first) = answers.next() else {
            return Err("coordinator: empty answer".into());
        };
        // The pages of a list, in order, make one answer.
        macro_rules! merged {
            ($variant:ident, $first:expr) => {{
                let mut all = $first;
                for a in answers {
                    if let AdminResponse::$variant(more) = a {
                        all.extend(more);
                    }
                }
                AdminResponse::$variant(all)
            }};
        }
        Ok(match first {
            AdminResponse::Tokens(all) => merged!(Tokens, all),
            AdminResponse::Agents(all) => merged!(Agents, all),
            AdminResponse::Tasks(all) => merged!(Tasks, all),
            AdminResponse::Runs(all) => merged!(Runs, all),
            AdminResponse::Admins(all) => merged!(Admins, all),
            other => other,
        })
    }

    /// A run list: one page of runs and what the coordinator says of it.
    pub async fn run_list(&self, req: &AdminRequest) -> Result<RunListAnswer, String> {
        let mut answer = RunListAnswer::default();
        for a in self.request_all(req).await? {
            match a {
                AdminResponse::Runs(more) => answer.runs.extend(more),
                AdminResponse::RunsSummary {
                    matched,
                    unreadable,
                    more,
                    first,
                    last,
                } => {
                    answer.matched = matched;
                    answer.unreadable = unreadable;
                    answer.more = more;
                    answer.first = first;
                    answer.last = last;
                }
                other => return Err(format!("unexpected answer from the coordinator: {other:?}")),
            }
        }
        Ok(answer)
    }

    /// An audit list: one page of entries, and whether more match.
    pub async fn audit_list(
        &self,
        req: &AdminRequest,
    ) -> Result<(Vec<sundial_protocol::wire::AuditEntry>, bool), String> {
        let mut entries = Vec::new();
        let mut more = false;
        for a in self.request_all(req).await? {
            match a {
                AdminResponse::Audit(page) => entries.extend(page),
                AdminResponse::AuditSummary { more: m } => more = m,
                other => return Err(format!("unexpected answer from the coordinator: {other:?}")),
            }
        }
        Ok((entries, more))
    }

    /// Starts a run follow: runs are read from the returned stream as the
    /// coordinator stores them.
    pub async fn follow(&self, req: &AdminRequest) -> Result<FollowStream, String> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| self.explain(e.to_string()))?;
        net::send(&mut send, req).await.map_err(|e| e.to_string())?;
        let mut recv = FramedRecv::new(recv);
        let first = tokio::time::timeout(REQUEST_TIMEOUT, recv.next::<AdminResponse>())
            .await
            .map_err(|_| "the coordinator did not answer in time".to_string())?;
        match first {
            Ok(AdminResponse::Following) => Ok(FollowStream { recv, _send: send }),
            Ok(AdminResponse::Error(e)) => Err(e),
            Ok(other) => Err(format!("unexpected answer from the coordinator: {other:?}")),
            Err(e) => Err(self.explain(e.to_string())),
        }
    }

    /// Sends one request and reads every message of its answer.
    pub async fn request_all(&self, req: &AdminRequest) -> Result<Vec<AdminResponse>, String> {
        // Over the coordinator's limit it would close the stream unread,
        // which reads here as a lost connection: say what is too big.
        let size = sundial_protocol::codec::encode(req)
            .map_err(|e| e.to_string())?
            .len();
        if size > sundial_protocol::wire::ADMIN_REQUEST_BYTES_MAX {
            return Err(format!(
                "the request is {size} bytes, over the {} KiB one admin request may carry (a task may be at most {} KiB: program, arguments, environment; and {} KiB of sealed values, which grow with the agents a secret is sealed to); pass large data in a file on the device, or split a task by label",
                sundial_protocol::wire::ADMIN_REQUEST_BYTES_MAX / 1024,
                sundial_protocol::wire::TASK_SPEC_BYTES_MAX / 1024,
                sundial_protocol::seal::SEALED_BYTES_MAX / 1024
            ));
        }
        let exchange = async {
            let (mut send, recv) = self.conn.open_bi().await.map_err(|e| e.to_string())?;
            net::send(&mut send, req).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let mut recv = FramedRecv::new(recv);
            let mut answers = Vec::new();
            loop {
                match recv.next::<AdminResponse>().await {
                    Ok(a) => answers.push(a),
                    Err(NetError::Eof) if !answers.is_empty() => return Ok(answers),
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(answers)) => {
                if let Some(AdminResponse::Error(e)) = answers.first() {
                    return Err(e.clone());
                }
                Ok(answers)
            }
            Ok(Err(e)) => Err(self.explain(e)),
            Err(_) => Err("the coordinator did not answer in time".into()),
        }
    }

    /// What a failed exchange means, from how the coordinator closed the
    /// connection (a refused credential, an expired one) if it did.
    fn explain(&self, error: String) -> String {
        match self.conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code != 0u32.into() => {
                format!(
                    "the coordinator closed the connection: {}",
                    String::from_utf8_lossy(&c.reason)
                )
            }
            Some(quinn::ConnectionError::ConnectionClosed(c))
                if (0x100..0x200).contains(&u64::from(c.error_code)) =>
            {
                format!(
                    "the coordinator refused this credential ({}): it was revoked or replaced, or this coordinator does not know it; an owner can see the admins with `sundialctl admin list`",
                    c.error_code
                )
            }
            _ => format!("coordinator: {error}"),
        }
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// Runs pushed by the coordinator ([`AdminClient::follow`]).
#[derive(Debug)]
pub struct FollowStream {
    recv: FramedRecv,
    _send: quinn::SendStream,
}

impl FollowStream {
    /// The next runs stored; `Ok(None)` when the coordinator ended it.
    pub async fn next(&mut self) -> Result<Option<Vec<RunRecord>>, String> {
        match self.recv.next::<AdminResponse>().await {
            Ok(AdminResponse::Runs(runs)) => Ok(Some(runs)),
            Ok(AdminResponse::Error(e)) => Err(e),
            Ok(other) => Err(format!("unexpected answer from the coordinator: {other:?}")),
            Err(NetError::Eof) => Ok(None),
            Err(e) => Err(format!("the follow ended: {e}")),
        }
    }
}
