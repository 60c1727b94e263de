//! `sundial-net`: the QUIC plumbing the agent, the coordinator and the admin
//! client share, written once: the TLS trust rules ([`tls`]), transport
//! settings, framed messages on streams, and connecting.

pub mod at_rest;
pub mod damage;
pub mod private;
pub mod shell;
pub mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sundial_protocol::codec::{encode, FrameDecoder, FrameError};
use sundial_protocol::wire::{LinkTiming, IDLE_MS_MAX};

/// A silent peer is declared gone after this long: an agent killed with
/// `kill -9` is shown offline within about this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alives keep a quiet session open and reveal a dead link.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// The round trip an agent assumes before it measured one.
pub const AGENT_INITIAL_RTT: Duration = Duration::from_millis(100);
/// A connection attempt is abandoned after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a stream at once.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Transport settings of the coordinator for one connection: it sends
/// the keep-alives (one side is enough: the agent's QUIC stack acknowledges
/// each, which the coordinator hears too), as often as the fleet's size
/// allows, and the idle timeout that goes with them.
pub fn server_transport(link: LinkTiming) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(u64::from(link.keep_alive_ms))));
    t.max_idle_timeout(Some(idle(link.idle_ms)));
    // No unreliable datagrams: nothing uses them, and none are buffered.
    t.datagram_receive_buffer_size(None);
    // What a coordinator holds per idle connection (a heap profile of
    // 500 idle sessions, `valgrind --tool=dhat`): QUIC's defaults cost
    // 8.4 KiB for the state of 100 + 100 streams a peer may open, made
    // up front, and 12.9 KiB for a send buffer sized for ten segments at
    // once (GSO). A peer opens one stream (a session, an enrollment) or
    // one per request in turn (an admin; more wait for the credit), none
    // unidirectional; and a coordinator sends little at a time.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(SERVER_BIDI_STREAMS_MAX));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.enable_segmentation_offload(false);
    Arc::new(t)
}

/// Streams a peer of the coordinator may have open at once: a session or
/// an enrollment uses one, an admin client one per request.
pub const SERVER_BIDI_STREAMS_MAX: u32 = 8;

/// Transport settings of clients (the admin client, enrollment): their own
/// keep-alives, the short idle timeout.
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(idle(IDLE_TIMEOUT.as_millis() as u32)));
    Arc::new(t)
}

/// Transport settings of an agent's session: no keep-alives of its own
/// (the coordinator sends them, as often as its fleet allows; an older
/// coordinator that does not is probed by the session instead), and an
/// idle timeout long enough for the largest fleet's — QUIC takes the
/// shorter of the two ends', so the coordinator's applies.
pub fn agent_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(None);
    t.max_idle_timeout(Some(idle(IDLE_MS_MAX)));
    // Before its first answer, QUIC resends the handshake's first packet
    // after three times this: 100 ms (not 333) makes a dial that began
    // during a cut try again within a second of the heal, not three. A
    // slower link only costs a few resent packets of one dial.
    t.initial_rtt(AGENT_INITIAL_RTT);
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// An idle timeout of `ms` (every u32 of milliseconds fits QUIC's range).
fn idle(ms: u32) -> quinn::IdleTimeout {
    quinn::IdleTimeout::from(quinn::VarInt::from_u32(ms))
}

/// Why a framed exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the peer closed the stream")]
    Eof,
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("{0}")]
    Setup(String),
    #[error("timed out")]
    Timeout,
}

/// Reads framed messages from a receive stream.
#[derive(Debug)]
pub struct FramedRecv {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl FramedRecv {
    pub fn new(recv: quinn::RecvStream) -> FramedRecv {
        FramedRecv {
            recv,
            dec: FrameDecoder::new(),
        }
    }

    /// A reader that refuses frames over `frame_bytes_max` before buffering them.
    pub fn with_limit(recv: quinn::RecvStream, frame_bytes_max: usize) -> FramedRecv {
        FramedRecv {
            recv,
            dec: FrameDecoder::with_limit(frame_bytes_max),
        }
    }

    /// Changes the frame limit for what follows.
    pub fn set_limit(&mut self, frame_bytes_max: usize) {
        self.dec.set_limit(frame_bytes_max);
    }

    /// The next message; `Err(Eof)` at a clean end of stream. Cancel-safe:
    /// bytes read are kept in the decoder.
    pub async fn next<M: DeserializeOwned>(&mut self) -> Result<M, NetError> {
        loop {
            if let Some(m) = self.dec.next_message()? {
                return Ok(m);
            }
            match self.recv.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => self.dec.push(&chunk.bytes),
                None => {
                    self.dec.finish()?;
                    return Err(NetError::Eof);
                }
            }
        }
    }
}

/// Writes one framed message.
pub async fn send<M: Serialize>(send: &mut quinn::SendStream, msg: &M) -> Result<(), NetError> {
    send.write_all(&encode(msg)?).await?;
    Ok(())
}

/// A local address to send from towards `peer`: loopback for loopback peers
/// (tests never listen beyond 127.0.0.0/8), any address otherwise.
pub fn client_bind_addr(peer: SocketAddr) -> SocketAddr {
    match peer.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        IpAddr::V6(ip) if ip.is_loopback() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// Resolves HOST:PORT to its first address.
pub async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve `{addr}` (expected HOST:PORT): {e}"))?;
    it.next()
        .ok_or_else(|| format!("`{addr}` resolves to no address"))
}

/// Opens a client endpoint and connects to `addr` (HOST:PORT), trusting the
/// server as told, presenting `identity` if given, speaking `alpn`.
pub async fn connect(
    addr: &str,
    server_name: &str,
    trust: tls::ServerTrust,
    identity: Option<tls::Identity>,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, quinn::Connection), NetError> {
    connect_within(addr, server_name, trust, identity, alpn, CONNECT_TIMEOUT).await
}

/// Every address of every `HOST:PORT` in `names`, in their order (a DNS
/// name with several addresses counts as several), duplicates dropped, at
/// most [`PEERS_MAX`]; the names that did not resolve are returned beside.
pub async fn resolve_all(names: &[String]) -> (Vec<SocketAddr>, Vec<String>) {
    let mut peers: Vec<SocketAddr> = Vec::new();
    let mut failed = Vec::new();
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(it) => {
                for a in it {
                    if !peers.contains(&a) && peers.len() < PEERS_MAX {
                        peers.push(a);
                    }
                }
            }
            Err(e) => failed.push(format!("cannot resolve `{name}`: {e}")),
        }
    }
    (peers, failed)
}

/// The most addresses [`resolve_all`] returns.
pub const PEERS_MAX: usize = 64;

/// [`connect`], giving up after `timeout`.
pub async fn connect_within(
    addr: &str,
    server_name: &str,
    trust: tls::ServerTrust,
    identity: Option<tls::Identity>,
    alpn: &[u8],
    timeout: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), NetError> {
    let peer = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| NetError::Setup(format!("cannot resolve `{addr}`: {e}")))?
        .next()
        .ok_or_else(|| NetError::Setup(format!("`{addr}` resolves to no address")))?;
    connect_peer(peer, server_name, trust, identity, alpn, timeout).await
}

/// Connects to one resolved address, giving up after `timeout`.
pub async fn connect_peer(
    peer: SocketAddr,
    server_name: &str,
    trust: tls::ServerTrust,
    identity: Option<tls::Identity>,
    alpn: &[u8],
    timeout: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), NetError> {
    let tls =
        tls::client_config(trust, identity, alpn).map_err(|e| NetError::Setup(e.to_string()))?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| NetError::Setup(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(if alpn == sundial_protocol::wire::ALPN {
        agent_transport()
    } else {
        transport()
    });
    let mut endpoint = quinn::Endpoint::client(client_bind_addr(peer))
        .map_err(|e| NetError::Setup(format!("cannot open a UDP socket: {e}")))?;
    endpoint.set_default_client_config(config);
    let conn = tokio::time::timeout(timeout, endpoint.connect(peer, server_name)?)
        .await
        .map_err(|_| NetError::Timeout)??;
    Ok((endpoint, conn))
}
