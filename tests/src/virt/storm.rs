//! `sundial-sim storm`: a whole fleet reconnecting to one coordinator at
//! once, in virtual time — sizes no one machine can hold for real.
//!
//! The coordinator is the core's [`CoordNode`] over an in-memory store with
//! every agent enrolled; each agent is the core's [`AgentSession`] alone
//! (reconnect policy, backoff, its place when refused, Hello, silence and
//! idle), as the bench's light agents are: no store, no scheduler, so that
//! 100,000 fit in one process. The network is a fixed one-way delay;
//! handshakes take a round trip and a half; the coordinator's keep-alives
//! reach every agent in session at the interval it chose for the fleet.
//!
//! The plan: every agent comes up; the coordinator is killed (its sessions
//! go silent), stays away for the cut, and comes back on the same store.
//! Measured: from its return to every agent synced again (assignments
//! received in a new session), the most handshakes it admitted in any
//! second against its budget, and how many dials it refused.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use sundial_coordinator::store::CoordinatorStore;
use sundial_core::coord::{
    Alpn, ConnId, CoordConfig, CoordNode, Effect, Limits, Outgoing, Route, StoreJob,
};
use sundial_core::coord_store::{CertRole, CoordStore, Enrollment, JoinToken};
use sundial_core::session::agent::{AgentEffect, AgentSession, Closed, HelloInfo};
use sundial_core::session::Now;
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{AgentMsg, CoordMsg};
use sundial_protocol::{AgentId, Timestamp};

/// True time at the start (2027-01-15).
const T0: i64 = 1_800_000_000_000;
/// One-way delay on every link, ms.
const DELAY_MS: i64 = 5;
/// How long a store job takes, ms.
const STORE_MS: i64 = 1;

/// What a storm is.
#[derive(Debug, Clone)]
pub struct StormOptions {
    pub agents: usize,
    /// How long the coordinator stays away, ms.
    pub cut_ms: i64,
    /// The coordinator's cores: its handshake budget is 250 a second each.
    pub cores: usize,
    /// Drives the agents' jitter.
    pub seed: u64,
    /// Give up on syncing again after this long, ms of virtual time.
    pub deadline_ms: i64,
}

/// What a storm came to.
#[derive(Debug, Clone)]
pub struct StormReport {
    pub agents: usize,
    /// From the start to every agent in session and synced, ms.
    pub first_up_ms: Option<i64>,
    /// From the coordinator's return to every agent synced again, ms.
    pub synced_again_ms: Option<i64>,
    /// Agents synced again by the deadline.
    pub synced_again: usize,
    /// The coordinator's handshake budget, a second.
    pub budget_per_sec: u32,
    /// The most handshakes it admitted in any second after its return
    /// (windows of 1 s, sliding by 100 ms).
    pub handshakes_max_per_sec: usize,
    /// Dials it refused after its return (the budget).
    pub refused: u64,
    /// Events simulated, and the wall time it took.
    pub events: u64,
    pub wall_ms: u128,
}

#[derive(Debug)]
enum Ev {
    /// The agent's session wants its timers looked at.
    AgentWake(usize),
    /// A dial's first packet reaches the coordinator.
    DialArrives(usize, u64),
    /// The dial's answer reaches the agent: refused (busy), or lost.
    DialFailed(usize, u64, Closed),
    /// The handshake completes at the coordinator, then at the agent.
    Handshaken(usize, u64, ConnId),
    ToCoord(ConnId, AgentMsg),
    ToAgent(usize, u64, CoordMsg),
    /// The coordinator closed the session.
    ClosedByCoord(usize, u64, u32),
    /// The agent's end is closed: the coordinator hears it.
    ClosedByAgent(ConnId),
    KeepAlive(usize, u64),
    CoordWake(u64),
    Store(u64, Box<StoreJob>),
    Kill,
    Back,
}

struct Agent {
    session: AgentSession,
    /// The current dial or connection (its generation; a later one makes
    /// events of an older one stale).
    generation: u64,
    conn: Option<ConnId>,
    wake_at: Option<i64>,
    synced_at: Option<i64>,
    cert: [u8; 32],
}

struct Storm {
    now: i64,
    seq: u64,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: HashMap<u64, Ev>,
    store: CoordinatorStore,
    coord: Option<CoordNode>,
    /// The coordinator's incarnation and boot instant.
    inc: u64,
    coord_boot: i64,
    coord_wake: Option<i64>,
    /// Connection of the coordinator → agent.
    conns: HashMap<ConnId, usize>,
    agents: Vec<Agent>,
    limits: Limits,
    back_at: Option<i64>,
    admitted_after_back: Vec<i64>,
    refused_after_back: u64,
    processed: u64,
}

fn ip_of(i: usize) -> IpAddr {
    let n = i as u32 + 1;
    IpAddr::V4(Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8))
}

impl Storm {
    fn at(&mut self, t: i64, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((t, self.seq)));
    }

    fn agent_now(&self) -> Now {
        Now {
            mono_ms: (self.now - T0 + 60_000) as u64,
            wall: Timestamp::from_millis_saturating(self.now),
        }
    }

    fn coord_now(&self) -> Now {
        Now {
            mono_ms: (self.now - self.coord_boot) as u64,
            wall: Timestamp::from_millis_saturating(self.now),
        }
    }

    fn coord_start(&mut self) -> anyhow::Result<()> {
        self.inc += 1;
        self.coord_boot = self.now - 1;
        self.coord_wake = None;
        self.conns.clear();
        let revision = self.store.revision()?;
        let known_certs = sundial_core::coord::admin::all_pages(
            |c: &([u8; 32], CertRole)| c.0,
            |after| {
                self.store
                    .known_certs(after, sundial_core::coord_store::PAGE_MAX)
            },
        )?;
        let now = self.coord_now();
        self.coord = Some(CoordNode::new(
            now,
            CoordConfig {
                limits: self.limits.clone(),
                ca_der: b"storm-ca".to_vec(),
                revision,
                known_certs,
                shared: None,
                bugs: Default::default(),
                placed: Vec::new(),
            },
        ));
        self.drain_coord();
        Ok(())
    }

    fn drain_coord(&mut self) {
        loop {
            let Some(c) = self.coord.as_mut() else {
                return;
            };
            let _ = c.poll_event();
            let Some(effect) = c.poll_effect() else {
                break;
            };
            self.coord_effect(effect);
        }
        let Some(c) = self.coord.as_ref() else {
            return;
        };
        if let Some(t) = c.poll_timeout() {
            let at = (self.coord_boot + t as i64).max(self.now);
            if self.coord_wake.is_none_or(|w| at < w || w <= self.now) {
                self.coord_wake = Some(at);
                let inc = self.inc;
                self.at(at, Ev::CoordWake(inc));
            }
        }
    }

    fn coord_effect(&mut self, e: Effect) {
        let inc = self.inc;
        match e {
            Effect::Store(job) => self.at(self.now + STORE_MS, Ev::Store(inc, Box::new(job))),
            Effect::Transmit(conn) => {
                let Some(&i) = self.conns.get(&conn) else {
                    return;
                };
                let g = self.agents[i].generation;
                loop {
                    let now = self.coord_now();
                    let Some(out) = self.coord.as_mut().and_then(|c| c.poll_transmit(now, conn))
                    else {
                        break;
                    };
                    match out {
                        Outgoing::Msg(m) => self.at(self.now + DELAY_MS, Ev::ToAgent(i, g, m)),
                        Outgoing::Close { code, .. } => {
                            self.conns.remove(&conn);
                            self.at(self.now + DELAY_MS, Ev::ClosedByCoord(i, g, code));
                            let now = self.coord_now();
                            if let Some(c) = self.coord.as_mut() {
                                c.handle_closed(now, conn);
                            }
                            break;
                        }
                    }
                }
            }
            Effect::Close { conn, code, .. } => {
                let now = self.coord_now();
                if let Some(c) = self.coord.as_mut() {
                    c.handle_closed(now, conn);
                }
                if let Some(i) = self.conns.remove(&conn) {
                    let g = self.agents[i].generation;
                    self.at(self.now + DELAY_MS, Ev::ClosedByCoord(i, g, code));
                }
            }
            // No enrollments, no admins here.
            Effect::Sign { .. }
            | Effect::AdminReply { .. }
            | Effect::AdminPush { .. }
            | Effect::EnrollReply { .. } => {}
            Effect::Stop => self.at(self.now, Ev::Kill),
        }
    }

    fn agent_effects(&mut self, i: usize) {
        loop {
            let now = self.agent_now();
            let a = &mut self.agents[i];
            let Some(e) = a.session.poll_effect() else {
                break;
            };
            match e {
                AgentEffect::Connect { timeout_ms } => {
                    a.generation += 1;
                    a.conn = None;
                    let g = a.generation;
                    if self.coord.is_some() {
                        self.at(self.now + DELAY_MS, Ev::DialArrives(i, g));
                    } else {
                        // Nothing answers: the attempt times out.
                        self.at(
                            self.now + timeout_ms as i64,
                            Ev::DialFailed(i, g, Closed::Lost),
                        );
                    }
                }
                AgentEffect::ReadOutbox { .. } => a.session.handle_outbox(now, Vec::new()),
                AgentEffect::Disconnect => {
                    a.generation += 1;
                    if let Some(conn) = a.conn.take() {
                        self.at(self.now + DELAY_MS, Ev::ClosedByAgent(conn));
                    }
                }
                // A light agent holds no tasks and reports nothing.
                _ => {}
            }
        }
        let a = &mut self.agents[i];
        while let Some(m) = a.session.poll_transmit() {
            if let Some(conn) = a.conn {
                self.seq += 1;
                let seq = self.seq;
                self.events.insert(seq, Ev::ToCoord(conn, m));
                self.queue.push(Reverse((self.now + DELAY_MS, seq)));
            }
        }
        let a = &mut self.agents[i];
        if let Some(t) = a.session.poll_timeout() {
            let at = (t as i64 + T0 - 60_000).max(self.now);
            if a.wake_at.is_none_or(|w| at < w || w <= self.now) {
                a.wake_at = Some(at);
                self.at(at, Ev::AgentWake(i));
            }
        }
    }

    fn step(&mut self, ev: Ev) -> anyhow::Result<()> {
        let inc = self.inc;
        match ev {
            Ev::AgentWake(i) => {
                let now = self.agent_now();
                let a = &mut self.agents[i];
                if a.wake_at.is_some_and(|w| w <= self.now) {
                    a.wake_at = None;
                }
                a.session.handle_timeout(now);
                self.agent_effects(i);
            }
            Ev::DialArrives(i, g) => {
                if self.agents[i].generation != g {
                    return Ok(());
                }
                let now = self.coord_now();
                let admitted = match self.coord.as_mut() {
                    Some(c) => c.handle_incoming(now, ip_of(i)).ok(),
                    None => {
                        self.at(self.now, Ev::DialFailed(i, g, Closed::Lost));
                        return Ok(());
                    }
                };
                self.drain_coord();
                match admitted {
                    Some(conn) => {
                        if self.back_at.is_some() {
                            self.admitted_after_back.push(self.now);
                        }
                        self.at(self.now + 2 * DELAY_MS, Ev::Handshaken(i, g, conn));
                    }
                    None => {
                        if self.back_at.is_some() {
                            self.refused_after_back += 1;
                        }
                        self.at(
                            self.now + DELAY_MS,
                            Ev::DialFailed(
                                i,
                                g,
                                Closed::Busy {
                                    retry_after_ms: None,
                                },
                            ),
                        );
                    }
                }
            }
            Ev::DialFailed(i, g, kind) => {
                if self.agents[i].generation != g {
                    return Ok(());
                }
                let now = self.agent_now();
                self.agents[i].session.handle_connect_failed(now, kind);
                self.agent_effects(i);
            }
            Ev::Handshaken(i, g, conn) => {
                let now = self.coord_now();
                let cert = self.agents[i].cert;
                let route = self
                    .coord
                    .as_mut()
                    .map(|c| c.handle_handshaken(now, conn, Alpn::Session, Some(cert)));
                if !matches!(route, Some(Route::Session(_))) {
                    if let Some(c) = self.coord.as_mut() {
                        c.handle_closed(now, conn);
                    }
                    self.drain_coord();
                    if self.agents[i].generation == g {
                        self.at(self.now + DELAY_MS, Ev::DialFailed(i, g, Closed::Lost));
                    }
                    return Ok(());
                }
                if self.agents[i].generation != g {
                    // The agent gave up on this dial meanwhile.
                    if let Some(c) = self.coord.as_mut() {
                        c.handle_closed(now, conn);
                    }
                    self.drain_coord();
                    return Ok(());
                }
                self.conns.insert(conn, i);
                self.drain_coord();
                let now = self.agent_now();
                let a = &mut self.agents[i];
                a.conn = Some(conn);
                a.session.handle_connected(
                    now,
                    HelloInfo {
                        last_revision: 0,
                        outbox_len: 0,
                        agent_version: env!("CARGO_PKG_VERSION").into(),
                        allow_exec: vec![],
                        allow_env: vec![],
                        seal_key: None,
                        functions: None,
                    },
                );
                self.agent_effects(i);
                let keep = self
                    .coord
                    .as_ref()
                    .and_then(|c| c.link_timing(conn))
                    .map_or(1_000, |l| i64::from(l.keep_alive_ms));
                self.at(self.now + keep, Ev::KeepAlive(i, g));
            }
            Ev::ToCoord(conn, m) => {
                if !self.conns.contains_key(&conn) {
                    return Ok(());
                }
                let now = self.coord_now();
                if let Some(c) = self.coord.as_mut() {
                    c.handle_agent_msg(now, conn, m);
                }
                self.drain_coord();
            }
            Ev::ToAgent(i, g, m) => {
                if self.agents[i].generation != g {
                    return Ok(());
                }
                let now = self.agent_now();
                let a = &mut self.agents[i];
                if matches!(m, CoordMsg::Assignments { .. }) && a.synced_at.is_none() {
                    a.synced_at = Some(self.now);
                }
                a.session.handle_heard(now);
                a.session.handle_message(now, m);
                self.agent_effects(i);
            }
            Ev::ClosedByCoord(i, g, code) => {
                if self.agents[i].generation != g {
                    return Ok(());
                }
                let now = self.agent_now();
                let a = &mut self.agents[i];
                a.conn = None;
                let kind = if code == sundial_protocol::wire::close::BUSY {
                    Closed::Busy {
                        retry_after_ms: None,
                    }
                } else {
                    Closed::Lost
                };
                a.session.handle_closed(now, kind);
                self.agent_effects(i);
            }
            Ev::ClosedByAgent(conn) => {
                if self.conns.remove(&conn).is_some() {
                    let now = self.coord_now();
                    if let Some(c) = self.coord.as_mut() {
                        c.handle_closed(now, conn);
                    }
                    self.drain_coord();
                }
            }
            Ev::KeepAlive(i, g) => {
                // The coordinator's PING, while it is up and the session
                // is this one.
                let a = &self.agents[i];
                if a.generation != g || self.coord.is_none() {
                    return Ok(());
                }
                let Some(conn) = a.conn else {
                    return Ok(());
                };
                if !self.conns.contains_key(&conn) {
                    return Ok(());
                }
                let now = self.agent_now();
                self.agents[i].session.handle_heard(now);
                self.agent_effects(i);
                let keep = self
                    .coord
                    .as_ref()
                    .and_then(|c| c.link_timing(conn))
                    .map_or(1_000, |l| i64::from(l.keep_alive_ms));
                self.at(self.now + keep, Ev::KeepAlive(i, g));
            }
            Ev::CoordWake(k) => {
                if k != inc {
                    return Ok(());
                }
                if self.coord_wake.is_some_and(|w| w <= self.now) {
                    self.coord_wake = None;
                }
                let now = self.coord_now();
                if let Some(c) = self.coord.as_mut() {
                    c.handle_timeout(now);
                }
                self.drain_coord();
            }
            Ev::Store(k, job) => {
                if k != inc || self.coord.is_none() {
                    return Ok(());
                }
                let done = job.run(&self.store);
                let now = self.coord_now();
                if let Some(c) = self.coord.as_mut() {
                    c.handle_store_done(now, done);
                }
                self.drain_coord();
            }
            Ev::Kill => {
                // Killed: its sessions go silent (nothing is sent on them
                // again); the agents find out by the silence.
                self.coord = None;
                self.conns.clear();
                self.inc += 1;
            }
            Ev::Back => {
                self.back_at = Some(self.now);
                for a in &mut self.agents {
                    a.synced_at = None;
                }
                self.coord_start()?;
            }
        }
        Ok(())
    }

    /// Runs events until `until`, or until `done` says so (checked every
    /// 100 ms of virtual time).
    fn run_until(
        &mut self,
        until: i64,
        mut done: impl FnMut(&Storm) -> bool,
    ) -> anyhow::Result<bool> {
        let mut next_check = self.now;
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > until {
                break;
            }
            if t >= next_check {
                if done(self) {
                    return Ok(true);
                }
                next_check = t + 100;
            }
            self.queue.pop();
            self.now = t;
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            self.processed += 1;
            self.step(ev)?;
        }
        self.now = self.now.max(until.min(self.now));
        Ok(done(self))
    }

    fn all_synced(&self) -> bool {
        self.agents.iter().all(|a| a.synced_at.is_some())
    }
}

/// Runs a storm.
pub fn storm(opts: &StormOptions) -> anyhow::Result<StormReport> {
    let wall = std::time::Instant::now();
    let n = opts.agents.max(1);
    let store = CoordinatorStore::open_with_backend(redb::backends::InMemoryBackend::new())?;
    let secret = b"storm-join-token";
    let token = sha256(secret);
    store.put_token(
        &JoinToken {
            secret_sha256: token,
            expires_at: Timestamp::MAX,
            uses_left: u32::try_from(n).unwrap_or(u32::MAX),
            labels: Vec::new(),
        },
        None,
    )?;
    let mut agents = Vec::with_capacity(n);
    let mut rng = sundial_core::session::Rng::new(opts.seed);
    for i in 0..n {
        let cert = sha256(format!("storm-agent-{i}").as_bytes());
        let id = store.reserve_agent_id()?;
        store
            .enroll(&Enrollment {
                token_sha256: token,
                agent: id,
                name: None,
                labels: Vec::new(),
                cert_sha256: cert,
                now: Timestamp::from_millis_saturating(T0),
            })?
            .map_err(|e| anyhow::anyhow!("agent {i} not enrolled: {e}"))?;
        let mut session = AgentSession::new(rng.next_u64());
        // Its place when refused for load: its number, as a real agent's.
        session.set_place(id.0);
        agents.push(Agent {
            session,
            generation: 0,
            conn: None,
            wake_at: None,
            synced_at: None,
            cert,
        });
        debug_assert_eq!(id, AgentId(id.0));
    }
    let mut limits = Limits::for_cores(opts.cores);
    limits.sessions_max = limits.sessions_max.max(n * 2);
    let budget_per_sec = limits.handshakes_per_sec;
    let mut s = Storm {
        now: T0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: HashMap::new(),
        store,
        coord: None,
        inc: 0,
        coord_boot: T0,
        coord_wake: None,
        conns: HashMap::new(),
        agents,
        limits,
        back_at: None,
        admitted_after_back: Vec::new(),
        refused_after_back: 0,
        processed: 0,
    };
    s.coord_start()?;
    // Every agent starts within its first second, at random.
    for i in 0..n {
        let t = T0 + rng.below(1_000) as i64;
        s.at(t, Ev::AgentWake(i));
    }
    let up_deadline = T0 + opts.deadline_ms;
    let first_up = s.run_until(up_deadline, Storm::all_synced)?;
    let first_up_ms = first_up.then(|| s.now - T0);
    let kill_at = s.now + 5_000;
    s.run_until(kill_at, |_| false)?;
    s.now = kill_at;
    s.step(Ev::Kill)?;
    let back = kill_at + opts.cut_ms;
    s.run_until(back, |_| false)?;
    s.now = back;
    s.step(Ev::Back)?;
    let synced = s.run_until(back + opts.deadline_ms, Storm::all_synced)?;
    let synced_again_ms = synced.then(|| {
        s.agents
            .iter()
            .filter_map(|a| a.synced_at)
            .max()
            .unwrap_or(back)
            - back
    });
    let mut admitted = s.admitted_after_back.clone();
    admitted.sort_unstable();
    let mut most = 0;
    let mut lo = 0;
    let mut start = back;
    let end = admitted.last().copied().unwrap_or(back);
    while start <= end {
        while lo < admitted.len() && admitted[lo] < start {
            lo += 1;
        }
        let hi = admitted.partition_point(|&t| t < start + 1_000);
        most = most.max(hi - lo);
        start += 100;
    }
    Ok(StormReport {
        agents: n,
        first_up_ms,
        synced_again_ms,
        synced_again: s.agents.iter().filter(|a| a.synced_at.is_some()).count(),
        budget_per_sec,
        handshakes_max_per_sec: most,
        refused: s.refused_after_back,
        events: s.processed,
        wall_ms: wall.elapsed().as_millis(),
    })
}
