//! `sundial-sim virtual`: a coordinator (or, in half the seeds, two or
//! three sharing one store) and a fleet of agent nodes in one thread on
//! virtual time, deterministic from a seed.
//!
//! The agents are `sundial-core`'s [`AgentNode`] (clock guard, scheduler,
//! session machine) over an in-memory store whose every write is one atomic
//! commit, as redb's are; the coordinator side is the core's
//! [`CoordSession`] per connection over an in-memory store. The network is
//! modelled as the session sees it through QUIC: each connection is two
//! reliable, ordered directions with jittered delay (loss shows as
//! retransmission delay, reordering and duplicate datagrams are absorbed by
//! the transport); a partition, both ways or one way, stalls a direction,
//! and a side that hears nothing for the idle timeout closes. Device clocks
//! have an offset, a drift, steps forward and back, and may boot at 2001.
//! Agents crash (running actions die with them; a restart may be a reboot)
//! and so do coordinators. Several coordinators share the store as several
//! share PostgreSQL: each reads the others' changes from the store's feeds
//! (late by its poll and its store jobs), agents dial them in turn, moving
//! on after a failed dial or a lost session.
//!
//! Checked: nothing fired twice; nothing fired early (beyond the clock
//! sampling error); nothing fired for a task after its cancel reached the
//! agent; after the last fault every record the agents wrote is stored at
//! the coordinator, outboxes are empty, and every agent holds exactly the
//! tasks the coordinator assigns it, at its revision.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use sundial_coordinator::store::CoordinatorStore;
use sundial_core::clock::Reading;
use sundial_core::coord::{
    Alpn, ConnId, CoordBugs, CoordConfig, CoordEvent, CoordNode, Effect, Limits, Outgoing, Route,
    StoreDone, StoreJob, ENTROPY_BYTES,
};
use sundial_core::coord_store::{targets, CertRole, CoordStore, StoreError};
use sundial_core::node::{
    AgentNode, ClockState, Horizon, NodeConfig, NodeEffect, NodeStore, SeededBugs, Step,
    StoreResult, StoredTask,
};
use sundial_core::scheduler::DueKey;
use sundial_core::session::agent::Closed;
use sundial_core::session::{Event, Now, Rng};
use sundial_protocol::policy::{MisfireMode, MisfirePolicy, Policies, RetryPolicy};
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    close, AdminRequest, AdminResponse, AgentMsg, CoordMsg, EnrollRequest, EnrollResponse,
    TaskDraft, TaskPatch,
};
use sundial_protocol::{
    AgentId, DurationMs, Outcome, OutcomeSet, RunKey, RunRecord, Schedule, TaskId, TaskSpec,
    Timestamp, Trigger,
};

/// True time at the start of a run (2027-01-15), unless the seed starts
/// it just before a DST change ([`start_of`]).
const T0: i64 = 1_800_000_000_000;
/// 2001-01-01: where a device without a real-time clock boots.
const Y2001: i64 = 978_307_200_000;
/// One way delay on a link, ms.
const DELAY_MIN_MS: i64 = 1;
const DELAY_MAX_MS: i64 = 40;
// Keep-alives and the idle timeout are the coordinator's, per connection
// (`link_for_fleet`), as in `sundial-net`.
/// A dial to an unreachable coordinator gives up after this long.
const CONNECT_TIMEOUT_MS: i64 = 10_000;
/// A stalled direction is retried this often (retransmission).
const RETRANSMIT_MS: i64 = 200;
/// How early a run may fire against true time: the clock sampling error
/// (half a round trip at most) and rounding.
const EARLY_TOLERANCE_MS: i64 = 2 * DELAY_MAX_MS + 10;
/// Quiet time after the last fault, before the final checks.
const SETTLE_MS: i64 = 90_000;
/// Link time of one assignment change, µs.
const LINK_US_PER_CHANGE: i64 = 10;
/// The last stretch: every task cancelled, the records drain.
const DRAIN_MS: i64 = 20_000;
/// Tasks alive at once in one run.
const TASKS_MAX: usize = 24;

/// Options of a virtual run.
#[derive(Clone, Debug)]
pub struct VirtOptions {
    /// Agents per run (0: 2–5, chosen by the seed).
    pub agents: usize,
    /// Simulated length of each run, ms.
    pub duration_ms: i64,
    pub bugs: SeededBugs,
    /// Bugs seeded into the coordinator node.
    pub coord_bugs: CoordBugs,
    /// Coordinators on the one store (0: one, or in half the seeds two or
    /// three, chosen by the seed).
    pub coordinators: usize,
}

impl Default for VirtOptions {
    fn default() -> Self {
        VirtOptions {
            agents: 0,
            duration_ms: 5 * 60_000,
            bugs: SeededBugs::default(),
            coord_bugs: CoordBugs::default(),
            coordinators: 0,
        }
    }
}

/// What a seed exercised, beyond fires and records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exercised {
    pub enrollments: u64,
    pub revokes: u64,
    pub pauses: u64,
    pub run_nows: u64,
    pub updates: u64,
    pub selector_tasks: u64,
    pub cron_tasks: u64,
    /// Tasks with a window `[start, end)`.
    pub windows: u64,
    /// Cron tasks in zones whose DST changes within the run.
    pub dst_crossings: u64,
    pub store_faults: u64,
    pub coordinator_restarts: u64,
    /// Seeds run with several coordinators on one store.
    pub shared_stores: u64,
    /// Agents that moved to another coordinator.
    pub moves: u64,
    /// Tasks triggered by another's runs.
    pub triggered_tasks: u64,
    /// Selector tasks placed `one` or `shard`.
    pub placed_tasks: u64,
    /// Tasks whose action is a function (its module sent beside them).
    pub function_tasks: u64,
    /// Function runs started, each with its module in the agent's store.
    pub function_runs: u64,
}

/// What one seed did.
#[derive(Clone, Debug)]
pub struct SeedReport {
    pub seed: u64,
    pub failures: Vec<String>,
    pub simulated_ms: i64,
    pub digest: u64,
    pub fires: u64,
    pub stored: u64,
    pub events: u64,
    pub exercised: Exercised,
}

mod agent_store;
mod agents;
mod checks;
mod coord;
mod links;
pub mod storm;

use agent_store::{Parked, SimStore};
use coord::{agent_ip, Coord, ADMIN_CERT};

// ---- the world ---------------------------------------------------------------

/// A message on a connection, either way.
#[derive(Debug)]
enum Msg {
    Up(AgentMsg),
    Down(CoordMsg),
}

/// Directions: agent → coordinator, coordinator → agent.
const UP: usize = 0;
const DOWN: usize = 1;

#[derive(Debug)]
struct Conn {
    agent: usize,
    queue: [std::collections::VecDeque<(i64, Msg)>; 2],
    pumping: [bool; 2],
    agent_open: bool,
    coord_open: bool,
    heard: [i64; 2],
    /// The coordinator's keep-alive interval and the idle timeout on this
    /// connection, as it chose them when it accepted it.
    keep_ms: i64,
    idle_ms: i64,
    /// The coordinator it is with, that coordinator's incarnation, and the
    /// node's name for it.
    node_conn: Option<(usize, u64, ConnId)>,
}

#[derive(Debug)]
struct Agent {
    id: AgentId,
    node: Option<AgentNode<SimStore>>,
    /// The store while the agent is down.
    parked: Option<Parked>,
    boot_id: u64,
    /// True time at boot: the boot clock reads `now - boot_at`.
    boot_at: i64,
    /// The wall clock reads `now + wall_offset + drift`.
    wall_offset: i64,
    drift_ppm: i64,
    incarnation: u64,
    conn: Option<u64>,
    wake_gen: u64,
    /// When a cancel reached this agent, by task.
    removed_at: HashMap<TaskId, i64>,
    /// Tasks this agent was assigned, and for those it gave up, the time up
    /// to which it had decided their occurrences (its scheduler's now).
    decided: HashMap<TaskId, Option<Timestamp>>,
    /// Runs fired, by key: when (true time).
    fired: HashMap<RunKey, i64>,
    /// Until when each direction of its link is cut.
    cut_until: [i64; 2],
    /// The coordinator vouched for its time in this boot.
    vouched_boot: bool,
    /// Fires by a clock nothing could correct (a boot with no coordinator
    /// reachable, or a first sample from a coordinator whose clock was
    /// wrong): early fires are counted, not failed, until a good vouching.
    excused: bool,
    /// Its wall clock took small forward steps (each under the jump
    /// threshold): it may fire up to the guard's bound early.
    small_steps: bool,
    /// The net of the big steps its wall clock took in this boot.
    stepped_ms: i64,
    /// When each retryable run's retry is due at the latest, in its time.
    retry_due: HashMap<RunKey, i64>,
    /// The run-nows it was sent: (task, instant).
    run_now: BTreeSet<(TaskId, Timestamp)>,
    /// Tasks it held while its excused clock had decided into the future:
    /// their occurrences up to that future were decided (early, or skipped)
    /// and are not run again, so they stall until true time gets there.
    excused_tasks: BTreeSet<TaskId>,
    /// Its decided-until when each task first reached it.
    assigned_at: HashMap<TaskId, Timestamp>,
    /// Where the plan of each placed task it was sent last ended: it
    /// decides that task's occurrences only so far.
    plan_until: HashMap<TaskId, Option<Timestamp>>,
    /// Its certificate (the simulator's "signature": the CSR's bytes).
    cert: Vec<u8>,
    labels: Vec<(String, String)>,
    enrolled: bool,
    revoked: bool,
    /// Which coordinator it dials next (modulo their number); it moves on
    /// after a failed dial or a lost session, as the agent's dial does.
    dial: usize,
    /// The coordinator of its last session.
    last_coord: Option<usize>,
}

/// One coordinator: up or down, its incarnation, its node while up.
#[derive(Debug, Default)]
struct Slot {
    up: bool,
    inc: u64,
    node: Option<Coord>,
}

#[derive(Debug)]
enum Ev {
    Wake(usize, u64),
    ActionDone(usize, u64, RunKey, Outcome),
    /// A dial ends: agent, its incarnation, the coordinator, reachable.
    ConnectDone(usize, u64, usize, bool),
    Deliver(u64, usize),
    KeepAlive(u64),
    /// A coordinator node's timeout (coordinator, incarnation, instant).
    CoordWake(usize, u64, i64),
    /// A store job completes (coordinator, incarnation): it commits now,
    /// or fails.
    StoreJob(usize, u64, Box<StoreJob>),
    /// An agent enrolls (then starts).
    Enroll(usize),
    /// Two seconds after an agent was revoked: it has no live session.
    RevokeCheck(usize),
    Crash(usize),
    Restart(usize, bool),
    CoordCrash(usize),
    CoordRestart(usize),
    Cut(usize, [bool; 2], i64),
    /// The fleet should have converged: check, then cancel every task so
    /// that the last records drain.
    Quiesce,
    ClockStep(usize, i64),
    /// The wall clock steps 0.9 s forward; this many more times, 2 s apart.
    SmallSteps(usize, u32),
    /// An agent joins the fleet (its first start) with this wall offset.
    Join(usize, i64),
    /// The coordinator's clock is off by this much for this long.
    CoordClock(i64, i64),
    /// A graceful stop (SIGTERM): running actions are killed and recorded
    /// interrupted, then the agent is down.
    Stop(usize),
    Operator,
}

struct World {
    /// True time at the start of the run.
    t0: i64,
    /// The DST change the run crosses, if it is one of those seeds.
    dst: Option<Dst>,
    now: i64,
    rng: Rng,
    seq: u64,
    queue: BinaryHeap<Reverse<(i64, u64)>>,
    events: HashMap<u64, Ev>,
    agents: Vec<Agent>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// The coordinator's store: redb on its in-memory backend, the real
    /// store's code. It outlives coordinator crashes, as a file does.
    store: CoordinatorStore,
    /// The coordinators (their incarnations: what an old one started is
    /// dropped).
    coords: Vec<Slot>,
    /// The join token's secret.
    join_secret: [u8; ENTROPY_BYTES],
    coord_bugs: CoordBugs,
    /// Admin requests sent, for their ids.
    admin_reqs: u64,
    /// Revoked agents, and when.
    revoked_at: HashMap<AgentId, i64>,
    /// Revocations asked and not yet answered: request → agent index (a
    /// revocation whose store write failed did not happen).
    pending_revokes: HashMap<u64, usize>,
    /// The function module the operator uploaded, once a coordinator
    /// said it stored it; tasks made, counted (every fourth a function).
    module: Option<(sundial_protocol::wasm::ModuleHash, u64)>,
    tasks_made: u64,
    exercised: Exercised,
    bugs: SeededBugs,
    /// The agents' near horizon: per seed, often tiny, so that loading
    /// tasks from the store as time moves on is exercised hard.
    horizon: Horizon,
    failures: Vec<String>,
    digest: u64,
    fires: u64,
    processed: u64,
    faults_end: i64,
    /// Prints faults and clock decisions (`SUNDIAL_SIM_VERBOSE=1`).
    verbose: bool,
    /// Sessions that came up, in all, and the revision the latest began at.
    session_ups: u64,
    last_hello_revision: u64,
    /// The coordinator's wall clock reads true time plus this.
    coord_clock_off: i64,
    /// A coordinator started while its clock was wrong (see
    /// `check_placement_on_time`).
    placement_excused: bool,
    /// Stops and crashes aimed into retry backoffs, so far.
    backoff_restarts: u32,
    /// Early fires by a clock nothing could correct (see `Agent::excused`).
    pub excused_early: u64,
}

/// A DST change a seed runs across: the zone, and the instant (UTC ms).
#[derive(Clone, Copy, Debug)]
struct Dst {
    zone: &'static str,
    at: i64,
}

/// The DST changes seeds may start before: spring and autumn of 2027 in
/// three zones (Lord Howe's are half an hour).
fn dst_changes() -> &'static [Dst] {
    static CHANGES: std::sync::OnceLock<Vec<Dst>> = std::sync::OnceLock::new();
    CHANGES.get_or_init(|| {
        let mut out = Vec::new();
        for zone in ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"] {
            let Ok(tz) = sundial_protocol::cron::parse_tz(zone) else {
                continue;
            };
            let mut after = T0;
            for _ in 0..2 {
                let Some(at) = crate::oracle::next_transition(tz, after) else {
                    break;
                };
                out.push(Dst { zone, at });
                after = at + 3_600_000;
            }
        }
        out
    })
}

/// Where a seed starts: one seed in four two minutes before one of the
/// [`dst_changes`] (its cron tasks run across it), the rest at [`T0`].
fn start_of(seed: u64) -> (i64, Option<Dst>) {
    let mut r = Rng::new(seed ^ 0xD570_0000_0000_0000);
    let changes = dst_changes();
    if changes.is_empty() || r.below(4) != 0 {
        return (T0, None);
    }
    let dst = changes[r.below(changes.len() as u64) as usize];
    (dst.at - 120_000, Some(dst))
}

fn mix(h: u64, x: u64) -> u64 {
    let mut z = (h ^ x).wrapping_mul(0x100_0000_01B3);
    z ^= z >> 29;
    z.wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

impl World {
    fn at(&mut self, t: i64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t.max(self.now), self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn trace(&mut self, code: u64, a: u64, b: u64) {
        self.digest = mix(mix(mix(mix(self.digest, self.now as u64), code), a), b);
    }

    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures
                .push(format!("t+{}ms: {what}", self.now - self.t0));
        }
    }

    fn delay(&mut self) -> i64 {
        DELAY_MIN_MS + self.rng.below((DELAY_MAX_MS - DELAY_MIN_MS) as u64 + 1) as i64
    }

    fn reading(&self, i: usize) -> Reading {
        let a = &self.agents[i];
        let drift = (self.now - self.t0) * a.drift_ppm / 1_000_000;
        Reading {
            wall_ms: self.now + a.wall_offset + drift,
            boot_ms: self.now - a.boot_at,
        }
    }

    fn cut(&self, i: usize, dir: usize) -> bool {
        self.agents[i].cut_until[dir] > self.now
    }

    fn coord_now(&self, origin: i64) -> Now {
        Now {
            mono_ms: (self.now - origin).max(0) as u64,
            wall: Timestamp::from_millis_saturating(self.now + self.coord_clock_off),
        }
    }

    // ---- the event loop

    fn step(&mut self, ev: Ev) {
        if self.verbose
            && !matches!(
                ev,
                Ev::Wake(..)
                    | Ev::Deliver(..)
                    | Ev::KeepAlive(..)
                    | Ev::ActionDone(..)
                    | Ev::CoordWake(..)
            )
        {
            eprintln!("t+{}ms {ev:?}", self.now - self.t0);
        }
        match ev {
            Ev::Wake(i, g) => {
                if self.agents[i].wake_gen == g {
                    self.node_call(i, |n, r| n.handle_wake(r));
                }
            }
            Ev::ActionDone(i, inc, key, outcome) => {
                if self.agents[i].incarnation == inc {
                    let code = (outcome == Outcome::Failed).then_some(1);
                    self.node_call(i, |n, r| {
                        n.handle_finished(r, key, sundial_core::node::Finished::of(outcome, code))
                    });
                    // Now and then a stop or a crash inside the retry's
                    // backoff: the retry must survive it.
                    let retried = self.agents[i].retry_due.contains_key(&key);
                    if retried
                        && self.now < self.faults_end
                        && self.backoff_restarts < 4
                        && self.rng.chance(0.05)
                    {
                        self.backoff_restarts += 1;
                        let ev = if self.rng.chance(0.5) {
                            Ev::Stop(i)
                        } else {
                            Ev::Crash(i)
                        };
                        self.at(self.now + 20, ev);
                    }
                }
            }
            Ev::ConnectDone(i, inc, k, reachable) => {
                if self.agents[i].incarnation != inc || self.agents[i].node.is_none() {
                    return;
                }
                if !(reachable && self.coords[k].up) {
                    self.agents[i].dial += 1;
                    self.node_call(i, |n, r| n.handle_connect_failed(r, Closed::Lost));
                    return;
                }
                let ip = agent_ip(i);
                let nc = match self.coord_do(k, |n, now| n.handle_incoming(now, ip)) {
                    Some(Ok(nc)) => nc,
                    Some(Err(_)) => {
                        // Refused before the handshake: the budget.
                        self.drain_coord(k);
                        self.agents[i].dial += 1;
                        self.node_call(i, |n, r| {
                            n.handle_connect_failed(
                                r,
                                Closed::Busy {
                                    retry_after_ms: None,
                                },
                            )
                        });
                        return;
                    }
                    None => {
                        self.agents[i].dial += 1;
                        self.node_call(i, |n, r| n.handle_connect_failed(r, Closed::Lost));
                        return;
                    }
                };
                let link = self
                    .coord_do(k, |n, _| n.link_timing(nc))
                    .flatten()
                    .unwrap_or_else(|| sundial_core::coord::link_for_fleet(0));
                let cert = sha256(&self.agents[i].cert);
                let route = self.coord_do(k, |n, now| {
                    n.handle_handshaken(now, nc, Alpn::Session, Some(cert))
                });
                if !matches!(route, Some(Route::Session(_))) {
                    // TLS refuses a certificate the coordinator does not
                    // know (revoked, or not yet read from the store's feed).
                    self.coord_call(k, |n, now| n.handle_closed(now, nc));
                    self.agents[i].dial += 1;
                    self.node_call(i, |n, r| n.handle_connect_failed(r, Closed::RefusedByTls));
                    return;
                }
                if self.agents[i].last_coord.is_some_and(|l| l != k) {
                    self.exercised.moves += 1;
                }
                self.agents[i].last_coord = Some(k);
                self.next_conn += 1;
                let c = self.next_conn;
                self.conns.insert(
                    c,
                    Conn {
                        agent: i,
                        queue: Default::default(),
                        pumping: [false; 2],
                        agent_open: true,
                        coord_open: true,
                        heard: [self.now; 2],
                        keep_ms: i64::from(link.keep_alive_ms),
                        idle_ms: i64::from(link.idle_ms),
                        node_conn: Some((k, self.coords[k].inc, nc)),
                    },
                );
                if let Some(node) = self.coords[k].node.as_mut() {
                    node.conns.insert(nc, c);
                }
                self.agents[i].conn = Some(c);
                self.at(self.now + i64::from(link.keep_alive_ms), Ev::KeepAlive(c));
                self.drain_coord(k);
                self.node_call(i, |n, r| n.handle_connected(r));
            }
            Ev::Deliver(c, dir) => self.deliver(c, dir),
            Ev::KeepAlive(c) => self.keep_alive(c),
            Ev::CoordWake(k, inc, at) => {
                let slot = &mut self.coords[k];
                let current =
                    inc == slot.inc && slot.node.as_ref().is_some_and(|c| c.wake_at == Some(at));
                if current {
                    if let Some(c) = slot.node.as_mut() {
                        c.wake_at = None;
                    }
                    self.coord_call(k, |n, now| n.handle_timeout(now));
                }
            }
            Ev::StoreJob(k, inc, job) => self.store_job(k, inc, *job),
            Ev::Enroll(i) => match self.any_coord() {
                Some(k) => self.enroll(k, i),
                None => self.at(self.now + 1_000, Ev::Enroll(i)),
            },
            Ev::RevokeCheck(i) => {
                if !self.agents[i].revoked {
                    // The revocation failed (its store write did): no check.
                    return;
                }
                let agent = self.agents[i].id;
                let live: Vec<usize> = (0..self.coords.len())
                    .filter(|k| {
                        self.coords[*k]
                            .node
                            .as_ref()
                            .is_some_and(|c| c.node.is_online(agent))
                    })
                    .collect();
                if !live.is_empty() {
                    self.fail(format!(
                        "agent {i} was revoked 2 s ago and still has a live session with coordinator(s) {live:?}"
                    ));
                }
            }
            Ev::Crash(i) => {
                let Some(node) = self.agents[i].node.take() else {
                    return;
                };
                self.trace(50, i as u64, 0);
                self.agents[i].parked = Some(node.into_store().park());
                self.agents[i].incarnation += 1;
                if let Some(c) = self.agents[i].conn.take() {
                    // A crash says nothing: the coordinator finds out by
                    // its idle timeout.
                    self.close_agent_side(c, false);
                }
                let reboot = self.rng.chance(0.5);
                let down = 200 + self.rng.below(20_000) as i64;
                self.at(self.now + down, Ev::Restart(i, reboot));
            }
            Ev::Restart(i, reboot) => {
                let Some(store) = self.agents[i].parked.take() else {
                    return;
                };
                self.trace(51, i as u64, u64::from(reboot));
                if reboot {
                    // A reboot resets the wall clock: from a good RTC, to
                    // 2001 on a device without one, or ahead (an RTC that
                    // keeps local time).
                    let roll = self.rng.below(10);
                    let ahead = 30_000 + self.rng.below(3_600_000) as i64;
                    let a = &mut self.agents[i];
                    a.boot_id += 1;
                    a.boot_at = self.now;
                    a.stepped_ms = 0;
                    a.vouched_boot = false;
                    a.excused = false;
                    a.wall_offset = match roll {
                        0..=2 => Y2001 - self.now,
                        3 | 4 => ahead,
                        _ => 0,
                    };
                }
                self.start_agent(i, store);
            }
            Ev::CoordCrash(k) => {
                if !self.coords[k].up {
                    return;
                }
                self.trace(52, k as u64, 0);
                self.coords[k].up = false;
                let enrolling: Vec<usize> = self.coords[k]
                    .node
                    .take()
                    .map(|c| c.enrolling.into_values().collect())
                    .unwrap_or_default();
                for i in enrolling {
                    // Its enrollment was cut off: the device tries again.
                    self.at(self.now + 1_000, Ev::Enroll(i));
                }
                let ids: Vec<u64> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.node_conn.is_some_and(|n| n.0 == k))
                    .map(|(id, _)| *id)
                    .collect();
                for c in ids {
                    self.close_coord_side(c, false, Closed::Lost);
                }
                let down = 500 + self.rng.below(15_000) as i64;
                self.at(self.now + down, Ev::CoordRestart(k));
            }
            Ev::CoordRestart(k) => {
                self.trace(53, k as u64, 0);
                self.coords[k].up = true;
                self.exercised.coordinator_restarts += 1;
                self.coord_start(k);
            }
            Ev::Cut(i, dirs, ms) => {
                self.trace(54, i as u64, ms as u64);
                for (d, on) in dirs.iter().enumerate() {
                    if *on {
                        let until = self.now + ms;
                        let a = &mut self.agents[i];
                        a.cut_until[d] = a.cut_until[d].max(until);
                    }
                }
            }
            Ev::SmallSteps(i, left) => {
                self.trace(56, i as u64, u64::from(left));
                self.agents[i].wall_offset += 900;
                self.agents[i].small_steps = true;
                self.node_call(i, |n, r| n.handle_wake(r));
                if left > 0 {
                    self.at(self.now + 2_000, Ev::SmallSteps(i, left - 1));
                }
            }
            Ev::Join(i, offset) => {
                self.trace(57, i as u64, offset as u64);
                let a = &mut self.agents[i];
                a.boot_at = self.now - 30_000;
                a.wall_offset = offset;
                // Joining is enrolling first (the coordinator must be up),
                // then the agent's first start.
                self.at(self.now, Ev::Enroll(i));
            }
            Ev::CoordClock(off, ms) => {
                self.trace(58, off as u64, ms as u64);
                self.coord_clock_off = off;
                if ms > 0 {
                    self.at(self.now + ms, Ev::CoordClock(0, 0));
                }
            }
            Ev::Stop(i) => {
                if self.agents[i].node.is_none() {
                    return;
                }
                self.trace(59, i as u64, 0);
                let Some(node) = self.agents[i].node.as_mut() else {
                    return;
                };
                node.begin_stop();
                node.kill_all_for_stop();
                self.drain_node(i);
                // The kills end within a millisecond; then it is down.
                self.at(self.now + 5, Ev::Crash(i));
            }
            Ev::ClockStep(i, by) => {
                // Steps while the agent runs (a step while it is down and
                // then a reboot is undetectable; a reboot resets the clock).
                self.trace(55, i as u64, by as u64);
                self.agents[i].wall_offset += by;
                // Big steps that add up to a small one forward are, for the
                // guard, a small step: believed within its bound.
                let a = &mut self.agents[i];
                a.stepped_ms += by;
                if (1..=sundial_core::clock::JUMP_THRESHOLD_MS).contains(&a.stepped_ms) {
                    a.small_steps = true;
                }
                self.node_call(i, |n, r| n.handle_wake(r));
            }
            Ev::Quiesce => {
                self.check_converged();
                self.check_on_time();
                self.check_placement_on_time();
                let live: Vec<TaskId> = self
                    .stored_tasks()
                    .iter()
                    .filter(|t| !t.cancelled)
                    .map(|t| t.spec.id)
                    .collect();
                for id in live {
                    if !self.admin(AdminRequest::TaskCancel(id)) {
                        self.fail(format!("the coordinator could not take the cancel of {id} at the quiesce point"));
                    }
                }
            }
            Ev::Operator => {
                self.operator();
                if self.now < self.faults_end {
                    let next = self.now + 1_000 + self.rng.below(15_000) as i64;
                    self.at(next, Ev::Operator);
                }
            }
        }
    }

    fn start_agent(&mut self, i: usize, parked: Parked) {
        let store = parked.open(self.agents[i].boot_id);
        let cfg = NodeConfig {
            agent_id: self.agents[i].id,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            allow_exec: Vec::new(),
            allow_env: Vec::new(),
            runs_concurrent_max: 64,
            boot_id: store.boot_hash(),
            seed: self.rng.next_u64(),
            bugs: self.bugs,
            horizon: self.horizon,
            vouch_wait_ms: sundial_core::node::VOUCH_WAIT_MS,
            coordinators: self.coords.len(),
            seal_key: None,
            functions: sundial_protocol::wire::FunctionsHello {
                allowed: true,
                fuel_max: sundial_protocol::wasm::FUEL_CEILING_DEFAULT,
                memory_max: sundial_protocol::wasm::MEMORY_CEILING_DEFAULT,
                module_max: sundial_protocol::wasm::MODULE_BYTES_DEFAULT,
                modules: Vec::new(),
            },
        };
        let r = self.reading(i);
        match AgentNode::start(store, cfg, r) {
            Ok(node) => self.agents[i].node = Some(node),
            Err(e) => self.fail(format!("agent {i} did not start: {e:?}")),
        }
        self.drain_node(i);
    }

    fn run(&mut self, end: i64) {
        while let Some(Reverse((t, seq))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.now = t;
            self.processed += 1;
            let Some(ev) = self.events.remove(&seq) else {
                continue;
            };
            self.step(ev);
        }
        self.now = end;
    }
}

/// Runs one seed.
pub fn run_seed(seed: u64, opts: &VirtOptions) -> SeedReport {
    let mut rng = Rng::new(seed ^ 0x5EED_0000_0000_0000);
    let n = if opts.agents == 0 {
        2 + rng.below(4) as usize
    } else {
        opts.agents
    };
    let duration = opts.duration_ms.max(SETTLE_MS + 10_000);
    let (t0, dst) = start_of(seed);
    let mut w = World::new(
        seed,
        rng,
        opts.bugs,
        opts.coord_bugs,
        (t0, dst),
        t0 + duration - SETTLE_MS,
        match opts.coordinators {
            0 => coordinators_of(seed),
            n => n,
        },
    );
    add_agents(&mut w, n);
    run_plan(w, seed, n, duration)
}

impl World {
    fn new(
        seed: u64,
        rng: Rng,
        bugs: SeededBugs,
        coord_bugs: CoordBugs,
        (t0, dst): (i64, Option<Dst>),
        faults_end: i64,
        coordinators: usize,
    ) -> World {
        let store = match CoordinatorStore::open_with_backend(redb::backends::InMemoryBackend::new())
        {
            Ok(s) => s,
            Err(e) => panic!("an in-memory store does not open: {e}"),
        };
        let mut join_secret = [0u8; ENTROPY_BYTES];
        let mut r = Rng::new(seed ^ 0x70CE_0000_0000_0000);
        for b in join_secret.iter_mut() {
            *b = r.below(256) as u8;
        }
        let setup = store
            .create_admin(&crate::test_owner("sim-owner", sha256(ADMIN_CERT)), None)
            .and_then(|()| {
                store.put_token(
                    &sundial_core::coord_store::JoinToken {
                        secret_sha256: sha256(&join_secret),
                        expires_at: Timestamp::from_millis_saturating(t0 + 86_400_000),
                        uses_left: 10_000,
                        labels: Vec::new(),
                    },
                    None,
                )
            });
        if let Err(e) = setup {
            panic!("an in-memory store does not take its first records: {e}");
        }
        let mut w = World {
            t0,
            dst,
            now: t0,
            rng,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            agents: Vec::new(),
            conns: BTreeMap::new(),
            next_conn: 0,
            store,
            coords: (0..coordinators.max(1))
                .map(|_| Slot {
                    up: true,
                    ..Slot::default()
                })
                .collect(),
            join_secret,
            coord_bugs,
            admin_reqs: 0,
            revoked_at: HashMap::new(),
            pending_revokes: HashMap::new(),
            module: None,
            tasks_made: 0,
            exercised: Exercised::default(),
            bugs,
            horizon: horizon_of(seed),
            failures: Vec::new(),
            digest: seed,
            fires: 0,
            processed: 0,
            faults_end,
            verbose: std::env::var_os("SUNDIAL_SIM_VERBOSE").is_some(),
            session_ups: 0,
            last_hello_revision: 0,
            coord_clock_off: 0,
            placement_excused: false,
            backoff_restarts: 0,
            excused_early: 0,
        };
        if w.coords.len() > 1 {
            w.exercised.shared_stores += 1;
        }
        for k in 0..w.coords.len() {
            w.coord_start(k);
        }
        w
    }

    /// A coordinator that is up, chosen at random (the operator's, or an
    /// enrolling device's, pick of the addresses).
    fn any_coord(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.coords.len())
            .filter(|k| self.coords[*k].node.is_some())
            .collect();
        match up.len() {
            0 => None,
            1 => Some(up[0]),
            n => Some(up[self.rng.below(n as u64) as usize]),
        }
    }
}

/// How many coordinators share the store in a seed (from its own stream):
/// one in half the seeds, else two or three.
fn coordinators_of(seed: u64) -> usize {
    let mut r = Rng::new(seed ^ 0xC00D_0000_0000_0000);
    if r.below(2) == 0 {
        1
    } else {
        2 + r.below(2) as usize
    }
}

/// The agents' horizon for a seed (from its own stream, so the seed's other
/// choices do not move): the default for a third of the seeds, else short
/// horizons holding a few tasks, loaded a few at a time.
fn horizon_of(seed: u64) -> Horizon {
    let mut r = Rng::new(seed ^ 0x4802_1205_0000_0000);
    if r.below(3) == 0 {
        return Horizon::default();
    }
    Horizon {
        ms: [500, 5_000, 30_000][r.below(3) as usize],
        held_max: [1, 3, 8][r.below(3) as usize],
        batch: [1, 2, 5][r.below(3) as usize],
    }
}

fn add_agents(w: &mut World, n: usize) {
    for i in 0..n {
        let boots_2001 = w.rng.chance(0.2);
        let drift = w.rng.below(101) as i64 - 50;
        let offset = if boots_2001 {
            Y2001 - w.t0
        } else {
            // A device clock a little behind (never ahead at its very
            // first start: nothing could tell).
            -(w.rng.below(2_000) as i64)
        };
        w.agents.push(Agent {
            id: AgentId(i as u64 + 1),
            node: None,
            parked: None,
            boot_id: 1,
            boot_at: w.t0 - 60_000,
            wall_offset: offset,
            drift_ppm: drift,
            incarnation: 0,
            conn: None,
            wake_gen: 0,
            removed_at: HashMap::new(),
            decided: HashMap::new(),
            fired: HashMap::new(),
            cut_until: [i64::MIN; 2],
            vouched_boot: false,
            excused: false,
            small_steps: false,
            stepped_ms: 0,
            retry_due: HashMap::new(),
            run_now: BTreeSet::new(),
            excused_tasks: BTreeSet::new(),
            assigned_at: HashMap::new(),
            plan_until: HashMap::new(),
            cert: format!("sim-device-{i}").into_bytes(),
            labels: vec![(
                "site".to_string(),
                ["north", "south"][w.rng.below(2) as usize].to_string(),
            )],
            enrolled: false,
            revoked: false,
            dial: i,
            last_coord: None,
        });
        // Some devices join later, their clocks anywhere (an RTC keeping
        // local time is hours ahead at its very first start).
        if i > 0 && w.rng.chance(0.3) {
            let span = (w.faults_end - w.t0 - 30_000).max(1) as u64;
            let t = w.t0 + w.rng.below(span) as i64;
            let offset = if w.rng.chance(0.5) {
                30_000 + w.rng.below(3_600_000) as i64
            } else {
                -(w.rng.below(2_000) as i64)
            };
            w.at(t, Ev::Join(i, offset));
        } else {
            match w.any_coord() {
                Some(k) => w.enroll(k, i),
                None => w.at(w.t0, Ev::Enroll(i)),
            }
        }
    }
}

fn run_plan(mut w: World, seed: u64, n: usize, duration: i64) -> SeedReport {
    // The fault plan, all before the settle time.
    let faults = 5 + w.rng.below(20);
    let t0 = w.t0;
    let span = (w.faults_end - t0).max(1) as u64;
    for _ in 0..faults {
        let t = t0 + w.rng.below(span) as i64;
        let i = w.rng.below(n as u64) as usize;
        let ev = match w.rng.below(10) {
            0..=3 => {
                let dirs = match w.rng.below(3) {
                    0 => [true, true],
                    1 => [true, false],
                    _ => [false, true],
                };
                Ev::Cut(i, dirs, 500 + w.rng.below(30_000) as i64)
            }
            4 => Ev::Crash(i),
            5 => match w.rng.below(3) {
                0 => Ev::SmallSteps(i, 5 + w.rng.below(20) as u32),
                // The coordinator's clock wrong for up to a minute.
                1 => {
                    let by = 30_000 + w.rng.below(3_600_000) as i64;
                    let by = if w.rng.chance(0.5) { by } else { -by };
                    Ev::CoordClock(by, 5_000 + w.rng.below(55_000) as i64)
                }
                _ => Ev::Stop(i),
            },
            6 => Ev::CoordCrash(w.rng.below(w.coords.len() as u64) as usize),
            _ => {
                // A step: 1.5 s to an hour, either way. (Steps under the
                // guard's 1 s jump threshold are taken as corrections, by
                // design; drift and offsets model the small errors.)
                let size = 1_500 + w.rng.below(3_600_000) as i64;
                let by = if w.rng.chance(0.5) { size } else { -size };
                Ev::ClockStep(i, by)
            }
        };
        w.at(t.min(w.faults_end), ev);
    }
    w.at(t0 + 100, Ev::Operator);
    w.at(t0 + duration - DRAIN_MS, Ev::Quiesce);
    w.run(t0 + duration);
    w.check_drained();
    w.check_every_occurrence_decided();
    w.check_retries();
    w.check_triggers();
    w.check_placement();
    SeedReport {
        seed,
        failures: w.failures,
        simulated_ms: duration,
        digest: w.digest,
        fires: w.fires,
        stored: w.store.run_count().unwrap_or(0),
        events: w.processed,
        exercised: w.exercised,
    }
}

/// What a large assignment came to.
#[derive(Debug)]
pub struct BulkReport {
    pub tasks_held: usize,
    pub agent_revision: u64,
    pub coordinator_revision: u64,
    /// Sessions it took (more than one: the cut one was resumed).
    pub sessions: u64,
    /// The revision the last session began at (between 0 and the
    /// coordinator's: it resumed after the pages the cut one delivered).
    pub resumed_from: u64,
    pub failures: Vec<String>,
}

/// One agent with `n` tasks assigned before it first connects; both ways
/// of its link are cut for 8 s while the pages are crossing it. The agent
/// must end with every task at the coordinator's revision, the cut
/// session's pages resumed after the last one it applied.
pub fn bulk_assignment(n: u64, seed: u64) -> BulkReport {
    let mut w = World::new(
        seed,
        Rng::new(seed),
        SeededBugs::default(),
        CoordBugs::default(),
        (T0, None),
        T0,
        1,
    );
    let far = Timestamp::from_millis_saturating(T0 + 10 * 86_400_000);
    let now = Timestamp::from_millis_saturating(T0);
    for i in 1..=n {
        let draft = TaskDraft {
            name: Some(format!("bulk-{i}")),
            // The first agent to enroll is a1.
            target: Target::Agent(AgentId(1)),
            schedule: Schedule::at(far),
            action: Action::Exec(ExecSpec {
                program: "/bin/sim".into(),
                args: vec!["5".into(), "steady".into()],
                env: Vec::new(),
                cwd: None,
                sealed_env: Vec::new(),
            }),
            policies: Policies::default(),
            anchor_at_creation: false,
            placement: Default::default(),
        };
        if let Err(e) = w.store.create_task(draft, now, None) {
            w.fail(format!("task {i} was not created: {e}"));
            break;
        }
    }
    add_agents(&mut w, 1);
    let link_ms = (n as i64 * LINK_US_PER_CHANGE) / 1_000;
    w.at(T0 + 100 + link_ms * 2 / 5, Ev::Cut(0, [true, true], 8_000));
    w.run(T0 + 60_000 + 2 * link_ms);
    let (tasks_held, agent_revision) = w.agents[0].node.as_ref().map_or((0, 0), |node| {
        (node.store().task_ids().len(), node.store().revision())
    });
    BulkReport {
        tasks_held,
        agent_revision,
        coordinator_revision: w.store.revision().unwrap_or(0),
        sessions: w.session_ups,
        resumed_from: w.last_hello_revision,
        failures: w.failures,
    }
}

/// The seeds `A..B` — A to B, both included, as in "seeds 1 to 1000"
/// (`A..=B` means the same) — or one number.
pub fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>, String> {
    let num = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|e| format!("'{x}' is not a seed: {e}"))
    };
    let bounds = s.split_once("..=").or_else(|| s.split_once(".."));
    if let Some((a, b)) = bounds {
        let (a, b) = (num(a)?, num(b)?);
        return (a <= b && b < u64::MAX)
            .then(|| a..b + 1)
            .ok_or_else(|| format!("empty range {s}"));
    }
    let a = num(s)?;
    (a < u64::MAX)
        .then(|| a..a + 1)
        .ok_or_else(|| format!("seed {a} is too large"))
}

/// Runs `seeds` on `threads` threads; reports in seed order.
pub fn run_seeds(
    seeds: std::ops::Range<u64>,
    opts: &VirtOptions,
    threads: usize,
) -> Vec<SeedReport> {
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds.end {
                    return;
                }
                let r = run_seed(seed, opts);
                if let Ok(mut o) = out.lock() {
                    o.push(r);
                }
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_default();
    v.sort_by_key(|r| r.seed);
    v
}
