//! A fault-injecting UDP relay, one per agent: the agent dials the relay,
//! the relay forwards to the coordinator, and each direction can be cut,
//! delayed with jitter (which reorders), made lossy, or made to duplicate.
//!
//! Bounds: at most [`DELAYED_PACKETS_MAX`] packets wait in delay at once;
//! beyond that new ones are dropped (as a full router queue would).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::rng::Rng;

/// Packets held for delay at once, per relay.
pub const DELAYED_PACKETS_MAX: usize = 4096;
const PACKET_BYTES_MAX: usize = 65_536;

/// What happens to packets going one way.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Direction {
    /// Drop everything (a cut).
    pub cut: bool,
    /// Probability of losing a packet.
    pub loss: f64,
    /// Probability of sending a packet twice.
    pub duplicate: f64,
    pub delay_ms: u64,
    /// Extra random delay in `[0, jitter_ms]`; reorders packets.
    pub jitter_ms: u64,
}

/// Both directions of a link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkConfig {
    /// Agent → coordinator.
    pub up: Direction,
    /// Coordinator → agent.
    pub down: Direction,
}

impl LinkConfig {
    pub fn pass() -> LinkConfig {
        LinkConfig::default()
    }

    pub fn partition() -> LinkConfig {
        LinkConfig {
            up: Direction {
                cut: true,
                ..Direction::default()
            },
            down: Direction {
                cut: true,
                ..Direction::default()
            },
        }
    }

    pub fn is_cut(&self) -> bool {
        self.up.cut && self.down.cut
    }
}

/// A running relay.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    config: Arc<Mutex<LinkConfig>>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    config: Arc<Mutex<LinkConfig>>,
    rng: Mutex<Rng>,
    delayed: AtomicUsize,
}

impl Shared {
    /// How many copies to send and after what delay; empty = drop.
    fn plan(&self, up: bool) -> Vec<Duration> {
        let cfg = self.config.lock().map(|c| *c).unwrap_or_default();
        let d = if up { cfg.up } else { cfg.down };
        if d.cut {
            return Vec::new();
        }
        let mut rng = match self.rng.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        if d.loss > 0.0 && rng.unit() < d.loss {
            return Vec::new();
        }
        let copies = if d.duplicate > 0.0 && rng.unit() < d.duplicate {
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| Duration::from_millis(d.delay_ms + rng.below(d.jitter_ms + 1)))
            .collect()
    }
}

fn forward(
    shared: &Arc<Shared>,
    sock: &Arc<UdpSocket>,
    data: &[u8],
    to: SocketAddr,
    delays: Vec<Duration>,
) {
    for delay in delays {
        if delay.is_zero() {
            let _ = sock.try_send_to(data, to);
            continue;
        }
        if shared.delayed.fetch_add(1, Ordering::Relaxed) >= DELAYED_PACKETS_MAX {
            shared.delayed.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let (sock, data, shared) = (sock.clone(), data.to_vec(), shared.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = sock.send_to(&data, to).await;
            shared.delayed.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

impl Relay {
    /// Starts a relay towards `target` on a loopback port.
    pub async fn start(target: SocketAddr, rng: Rng) -> std::io::Result<Relay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let config = Arc::new(Mutex::new(LinkConfig::pass()));
        let shared = Arc::new(Shared {
            config: config.clone(),
            rng: Mutex::new(rng),
            delayed: AtomicUsize::new(0),
        });
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut up_buf = vec![0u8; PACKET_BYTES_MAX];
            let mut down_buf = vec![0u8; PACKET_BYTES_MAX];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up_buf) => {
                        let Ok((n, from)) = r else { continue };
                        client = Some(from);
                        let plan = shared.plan(true);
                        forward(&shared, &back, &up_buf[..n], target, plan);
                    }
                    r = back.recv_from(&mut down_buf) => {
                        let Ok((n, _)) = r else { continue };
                        if let Some(to) = client {
                            let plan = shared.plan(false);
                            forward(&shared, &front, &down_buf[..n], to, plan);
                        }
                    }
                }
            }
        });
        Ok(Relay { addr, config, task })
    }

    /// The address agents dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, cfg: LinkConfig) {
        if let Ok(mut c) = self.config.lock() {
            *c = cfg;
        }
    }

    pub fn config(&self) -> LinkConfig {
        self.config.lock().map(|c| *c).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
