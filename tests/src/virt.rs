//! `sundial-sim virtual`: a coordinator and a fleet of agent nodes in one
//! thread on virtual time, deterministic from a seed.
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
//! and so does the coordinator.
//!
//! Checked: nothing fired twice; nothing fired early (beyond the clock
//! sampling error); nothing fired for a task after its cancel reached the
//! agent; after the last fault every record the agents wrote is stored at
//! the coordinator, outboxes are empty, and every agent holds exactly the
//! tasks the coordinator assigns it, at its revision.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::ops::Bound;

use sundial_coordinator::store::CoordinatorStore;
use sundial_core::clock::Reading;
use sundial_core::coord::{
    Alpn, ConnId, CoordBugs, CoordConfig, CoordEvent, CoordNode, Effect, Limits, Outgoing, Route,
    StoreDone, StoreJob, ENTROPY_BYTES,
};
use sundial_core::coord_store::{targets, CertRole, CoordStore, StoreError};
use sundial_core::node::{
    AgentNode, ClockState, Horizon, NodeConfig, NodeEffect, NodeStore, SeededBugs, Started, Step,
    StoreResult, StoredTask,
};
use sundial_core::scheduler::{first_occurrence, DueKey};
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
    AgentId, DurationMs, Outcome, RunKey, RunRecord, Schedule, TaskId, TaskSpec, Timestamp,
};

/// True time at the start of a run (2027-01-15), unless the seed starts
/// it just before a DST change ([`start_of`]).
const T0: i64 = 1_800_000_000_000;
/// 2001-01-01: where a device without a real-time clock boots.
const Y2001: i64 = 978_307_200_000;
/// One way delay on a link, ms.
const DELAY_MIN_MS: i64 = 1;
const DELAY_MAX_MS: i64 = 40;
/// QUIC's keep-alive and idle timeout, as configured in `sundial-net`.
const KEEP_ALIVE_MS: i64 = 1_000;
const IDLE_MS: i64 = 5_000;
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
}

impl Default for VirtOptions {
    fn default() -> Self {
        VirtOptions {
            agents: 0,
            duration_ms: 5 * 60_000,
            bugs: SeededBugs::default(),
            coord_bugs: CoordBugs::default(),
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

// ---- the store ---------------------------------------------------------------

#[derive(Debug, Default)]
struct MemStore {
    tasks: BTreeMap<TaskId, TaskSpec>,
    states: HashMap<TaskId, Option<Timestamp>>,
    /// (next due, id) of every task with one.
    due: BTreeSet<DueKey>,
    started: BTreeMap<RunKey, Started>,
    outbox: BTreeMap<u64, RunRecord>,
    outbox_keys: HashMap<RunKey, u64>,
    next_seq: u64,
    last_revision: u64,
    clock: ClockState,
    retries: BTreeMap<RunKey, Timestamp>,
    /// Every record ever committed to the outbox (for the checks).
    ledger: Vec<RunRecord>,
}

impl MemStore {
    fn set_state(&mut self, id: TaskId, next: Option<Timestamp>) {
        if let Some(Some(old)) = self.states.insert(id, next) {
            self.due.remove(&(old, id));
        }
        if let Some(t) = next {
            self.due.insert((t, id));
        }
    }

    /// The tasks stored, by id.
    fn task_ids(&self) -> Vec<TaskId> {
        self.tasks.keys().copied().collect()
    }

    fn outbox_put(&mut self, r: &RunRecord) {
        let key = r.key();
        if self.outbox_keys.contains_key(&key) {
            return;
        }
        self.next_seq += 1;
        self.outbox.insert(self.next_seq, r.clone());
        self.outbox_keys.insert(key, self.next_seq);
        self.ledger.push(r.clone());
    }
}

impl NodeStore for MemStore {
    fn due_tasks(
        &self,
        after: Option<DueKey>,
        until: Timestamp,
        max: usize,
    ) -> StoreResult<Vec<(TaskSpec, Timestamp)>> {
        let end = Bound::Included((until, TaskId(u64::MAX)));
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(self
            .due
            .range((start, end))
            .take(max)
            .filter_map(|(t, id)| self.tasks.get(id).map(|task| (task.clone(), *t)))
            .collect())
    }
    fn tasks_by_id(&self, ids: &[TaskId]) -> StoreResult<Vec<Option<StoredTask>>> {
        Ok(ids
            .iter()
            .map(|id| {
                self.tasks.get(id).map(|t| {
                    let due = self
                        .states
                        .get(id)
                        .copied()
                        .unwrap_or_else(|| first_occurrence(&t.schedule, t.created_at));
                    (t.clone(), due)
                })
            })
            .collect())
    }
    fn apply_changes(
        &mut self,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        states: &[(TaskId, Option<Timestamp>)],
        revision: Option<u64>,
    ) -> StoreResult<()> {
        for id in removed {
            self.tasks.remove(id);
            self.retries.retain(|k, _| k.task_id != *id);
            if let Some(Some(t)) = self.states.remove(id) {
                self.due.remove(&(t, *id));
            }
        }
        for t in upserts {
            self.tasks.insert(t.id, t.clone());
            if !self.states.contains_key(&t.id) && !states.iter().any(|(id, _)| *id == t.id) {
                self.set_state(t.id, first_occurrence(&t.schedule, t.created_at));
            }
        }
        for (id, due) in states {
            self.set_state(*id, *due);
        }
        if let Some(r) = revision {
            self.last_revision = r;
        }
        Ok(())
    }
    fn apply_step(&mut self, step: &Step) -> StoreResult<()> {
        for (id, due) in &step.states {
            if self.tasks.contains_key(id) {
                self.set_state(*id, *due);
            }
        }
        for (key, s) in &step.started {
            self.started.insert(*key, *s);
            self.retries.remove(key);
        }
        for r in &step.records {
            self.retries.remove(&r.key());
            self.outbox_put(r);
        }
        for (key, when) in &step.retries {
            if self.tasks.contains_key(&key.task_id) {
                self.retries.insert(*key, *when);
            }
        }
        Ok(())
    }
    fn finish_run(
        &mut self,
        record: &RunRecord,
        retry: Option<(RunKey, Timestamp)>,
    ) -> StoreResult<()> {
        self.started.remove(&record.key());
        self.retries.remove(&record.key());
        if let Some((key, when)) = retry.filter(|(k, _)| self.tasks.contains_key(&k.task_id)) {
            self.retries.insert(key, when);
        }
        self.outbox_put(record);
        Ok(())
    }
    fn pending_retries(&self) -> StoreResult<Vec<(RunKey, Timestamp)>> {
        Ok(self.retries.iter().map(|(k, t)| (*k, *t)).collect())
    }
    fn recover_interrupted(&mut self, agent: AgentId) -> StoreResult<Vec<RunRecord>> {
        let started = std::mem::take(&mut self.started);
        let records: Vec<RunRecord> = started
            .into_iter()
            .map(|(key, s)| RunRecord {
                task_id: key.task_id,
                agent_id: agent,
                scheduled_at: key.scheduled_at,
                attempt: key.attempt,
                fired_at: Some(s.fired_at),
                finished_at: None,
                outcome: Outcome::Interrupted,
                exit_code: None,
                offline: s.offline,
                detail: Some("the agent stopped while the run was going".into()),
                stdout_tail: Vec::new(),
                stderr_tail: Vec::new(),
            })
            .collect();
        for r in &records {
            self.outbox_put(r);
        }
        Ok(records)
    }
    fn outbox_after(
        &self,
        after: u64,
        runs_max: usize,
        _bytes_max: usize,
    ) -> StoreResult<Vec<(u64, RunRecord)>> {
        Ok(self
            .outbox
            .range(after + 1..)
            .take(runs_max)
            .map(|(s, r)| (*s, r.clone()))
            .collect())
    }
    fn outbox_ack(&mut self, keys: &[RunKey]) -> StoreResult<usize> {
        let mut n = 0;
        for k in keys {
            if let Some(seq) = self.outbox_keys.remove(k) {
                self.outbox.remove(&seq);
                n += 1;
            }
        }
        Ok(n)
    }
    fn outbox_len(&self) -> StoreResult<u64> {
        Ok(self.outbox.len() as u64)
    }
    fn last_revision(&self) -> StoreResult<u64> {
        Ok(self.last_revision)
    }
    fn set_last_revision(&mut self, revision: u64) -> StoreResult<()> {
        self.last_revision = revision;
        Ok(())
    }
    fn clock_state(&self) -> StoreResult<ClockState> {
        Ok(self.clock)
    }
    fn set_clock_state(&mut self, state: &ClockState) -> StoreResult<()> {
        self.clock = *state;
        Ok(())
    }
}

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
    /// The node's name for it, and the coordinator incarnation it is of.
    node_conn: Option<(u64, ConnId)>,
}

#[derive(Debug)]
struct Agent {
    id: AgentId,
    node: Option<AgentNode<MemStore>>,
    /// The store while the agent is down.
    parked: Option<MemStore>,
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
    /// Tasks it held while its excused clock had decided into the future:
    /// their occurrences up to that future were decided (early, or skipped)
    /// and are not run again, so they stall until true time gets there.
    excused_tasks: BTreeSet<TaskId>,
    /// Its decided-until when each task first reached it.
    assigned_at: HashMap<TaskId, Timestamp>,
    /// Its certificate (the simulator's "signature": the CSR's bytes).
    cert: Vec<u8>,
    labels: Vec<(String, String)>,
    enrolled: bool,
    revoked: bool,
}

#[derive(Debug)]
enum Ev {
    Wake(usize, u64),
    ActionDone(usize, u64, RunKey, Outcome),
    ConnectDone(usize, u64, bool),
    Deliver(u64, usize),
    KeepAlive(u64),
    /// The coordinator node's timeout (incarnation, instant).
    CoordWake(u64, i64),
    /// A store job completes (incarnation): it commits now, or fails.
    StoreJob(u64, Box<StoreJob>),
    /// An agent enrolls (then starts).
    Enroll(usize),
    /// Two seconds after an agent was revoked: it has no live session.
    RevokeCheck(usize),
    Crash(usize),
    Restart(usize, bool),
    CoordCrash,
    CoordRestart,
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
    coord_up: bool,
    /// The coordinator's store: redb on its in-memory backend, the real
    /// store's code. It outlives coordinator crashes, as a file does.
    store: CoordinatorStore,
    /// The coordinator node while it is up.
    coord: Option<Coord>,
    /// Coordinator incarnations: what an old one started is dropped.
    coord_inc: u64,
    /// The join token's secret.
    join_secret: [u8; ENTROPY_BYTES],
    coord_bugs: CoordBugs,
    /// Admin requests sent, for their ids.
    admin_reqs: u64,
    /// Revoked agents, and when.
    revoked_at: HashMap<AgentId, i64>,
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
    /// Stops and crashes aimed into retry backoffs, so far.
    backoff_restarts: u32,
    /// Early fires by a clock nothing could correct (see `Agent::excused`).
    pub excused_early: u64,
}

/// The coordinator node of one incarnation.
#[derive(Debug)]
struct Coord {
    node: CoordNode,
    /// True time at its start: its monotonic clock reads from here.
    boot_at: i64,
    /// Its admin connection (the operator's).
    admin: Option<ConnId>,
    /// Node connection → the simulator's.
    conns: HashMap<ConnId, u64>,
    /// Enrollment connections → the agent enrolling.
    enrolling: BTreeMap<ConnId, usize>,
    /// The instant its timeout event is set for.
    wake_at: Option<i64>,
}

/// The admin's certificate, as the store knows it.
const ADMIN_CERT: &[u8] = b"sim-admin";
/// The CA, as the node sends it to enrolled agents.
const CA_CERT: &[u8] = b"sim-ca";
/// Chance that a store job fails (a write error) while faults are on.
const STORE_FAULT_CHANCE: f64 = 0.002;

/// A store job failed as a write error fails it: nothing committed.
fn failed(job: StoreJob) -> StoreDone {
    let e = || StoreError::unavailable("simulated write", "the disk failed");
    match job {
        StoreJob::Hello { conn, agent, .. } => StoreDone::Hello {
            conn,
            agent,
            result: Err(e()),
        },
        StoreJob::Changes { conn, .. } => StoreDone::Changes {
            conn,
            result: Err(e()),
        },
        StoreJob::Runs {
            conn,
            batch_id,
            cache,
            ..
        } => StoreDone::Runs {
            conn,
            batch_id,
            result: Err(e()),
            cache,
        },
        StoreJob::Seen { .. } => StoreDone::Seen { result: Err(e()) },
        StoreJob::Admin { conn, req, .. } => StoreDone::Admin {
            conn,
            req,
            result: Err(e()),
        },
        StoreJob::EnrollCheck { conn, request, .. } => StoreDone::EnrollCheck {
            conn,
            result: Err(e()),
            request,
        },
        StoreJob::Enroll { conn, cert_der, .. } => StoreDone::Enroll {
            conn,
            result: Err(e()),
            cert_der,
        },
        StoreJob::Purge { before, max } => StoreDone::Purge {
            before,
            max,
            result: Err(e()),
        },
    }
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

/// Agent `i`'s address.
fn agent_ip(i: usize) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        0,
        (i / 250) as u8,
        (i % 250) as u8 + 1,
    ))
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

    // ---- agents

    fn node_call(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut AgentNode<MemStore>, Reading) -> StoreResult<()>,
    ) {
        let r = self.reading(i);
        let Some(node) = self.agents[i].node.as_mut() else {
            return;
        };
        if let Err(e) = f(node, r) {
            self.fail(format!("agent {i}: store fault {e:?}"));
        }
        self.drain_node(i);
    }

    fn drain_node(&mut self, i: usize) {
        loop {
            let Some(node) = self.agents[i].node.as_mut() else {
                return;
            };
            let effect = node.poll_effect();
            let event = node.poll_event();
            if effect.is_none() && event.is_none() {
                break;
            }
            if let Some(e) = event {
                self.node_event(i, e);
            }
            if let Some(e) = effect {
                self.node_effect(i, e);
            }
        }
        // The next wake.
        let r = self.reading(i);
        let Some(node) = self.agents[i].node.as_mut() else {
            return;
        };
        let ahead = node.decided_until().as_millis() > self.now + EARLY_TOLERANCE_MS;
        if self.agents[i].excused && ahead {
            let held: Vec<TaskId> = self.agents[i].decided.keys().copied().collect();
            self.agents[i].excused_tasks.extend(held);
        }
        let Some(node) = self.agents[i].node.as_mut() else {
            return;
        };
        node.precompute();
        let Some(node) = self.agents[i].node.as_ref() else {
            return;
        };
        let wake_boot = node.next_wake(r);
        let t = self.agents[i].boot_at + wake_boot;
        self.agents[i].wake_gen += 1;
        let g = self.agents[i].wake_gen;
        self.at(t.max(self.now + 1), Ev::Wake(i, g));
    }

    fn node_event(&mut self, i: usize, e: Event) {
        if self.verbose
            && !matches!(
                e,
                Event::RunRecorded { .. }
                    | Event::RunFired { .. }
                    | Event::ResultsSent { .. }
                    | Event::ResultsAcked { .. }
            )
        {
            let r = self.reading(i);
            eprintln!(
                "t+{}ms agent {i} (wall {} boot {}): {e:?}",
                self.now - self.t0,
                r.wall_ms - self.t0,
                r.boot_ms
            );
        }
        match e {
            Event::TaskRemoved { task_id } => {
                self.trace(10, i as u64, task_id.0);
                if self.agents[i].removed_at.contains_key(&task_id) {
                    // Not held (paused, then cancelled): nothing more decided.
                    return;
                }
                self.agents[i].removed_at.insert(task_id, self.now);
                // Decided only if the node stepped since the task came: a
                // task that arrives while firing is held has nothing decided.
                let until = self.agents[i]
                    .node
                    .as_ref()
                    .map(|n| n.decided_until())
                    .filter(|u| {
                        self.agents[i]
                            .assigned_at
                            .get(&task_id)
                            .is_none_or(|a| u > a)
                    });
                if let Some(d) = self.agents[i].decided.get_mut(&task_id) {
                    *d = until;
                }
                // Retries due after it gave the task up are not owed.
                self.agents[i].retry_due.retain(|k, due| {
                    k.task_id != task_id || until.is_some_and(|u| u.as_millis() > *due)
                });
            }
            Event::TaskAssigned { task_id, .. } => {
                self.trace(14, i as u64, 0);
                self.agents[i].decided.entry(task_id).or_insert(None);
                let at = self.agents[i].node.as_ref().map(|n| n.decided_until());
                // A task resumed after a pause comes back: from here on it
                // is held again, counting from its resume.
                let back = self.agents[i].removed_at.remove(&task_id).is_some();
                if let Some(at) = at {
                    if back {
                        self.agents[i].assigned_at.insert(task_id, at);
                    } else {
                        self.agents[i].assigned_at.entry(task_id).or_insert(at);
                    }
                }
            }
            Event::RunRecorded { key, outcome } => {
                self.trace(11, i as u64, key.scheduled_at.as_millis() as u64);
                if self.verbose {
                    eprintln!(
                        "t+{}ms agent {i} recorded {}@{}#{} {outcome:?}",
                        self.now - self.t0,
                        key.task_id,
                        key.scheduled_at.as_millis() - self.t0,
                        key.attempt
                    );
                }
                let retryable = matches!(
                    outcome,
                    Outcome::Failed | Outcome::TimedOut | Outcome::Interrupted
                );
                let r = self.reading(i);
                let backoff = self
                    .store
                    .task(key.task_id)
                    .ok()
                    .flatten()
                    .map(|t| t.spec)
                    .filter(|t| retryable && t.policies.retry.allows_after(key.attempt))
                    .map(|t| t.policies.retry.backoff_after(key.attempt).as_millis_i64());
                // A run that ends after its task was cancelled on the agent
                // has no retry.
                let gone = self.agents[i].removed_at.contains_key(&key.task_id);
                if let (Some(backoff), Some(node), false) =
                    (backoff, self.agents[i].node.as_ref(), gone)
                {
                    let at = node.time_of(r).max(node.decided_until());
                    self.agents[i]
                        .retry_due
                        .insert(key, at.as_millis() + backoff);
                }
            }
            Event::SessionUp { last_revision, .. } => {
                self.session_ups += 1;
                self.last_hello_revision = last_revision;
                self.trace(12, i as u64, last_revision)
            }
            Event::SessionDown { .. } => self.trace(13, i as u64, 0),
            Event::ClockVouched { at, confirmed, .. } => {
                self.trace(15, i as u64, 0);
                let err = at.as_millis() - self.now;
                let a = &mut self.agents[i];
                // A sample counts at the low end of its error: late by up
                // to its round trip (retransmissions), never early.
                let rtt_max = sundial_core::session::agent::CLOCK_SAMPLE_RTT_MAX_MS;
                if (-rtt_max - 10..=EARLY_TOLERANCE_MS).contains(&err) {
                    a.excused = false;
                } else if !a.vouched_boot {
                    // The first sample of a boot is the reference: a
                    // coordinator wrong at that moment is followed.
                    a.excused = true;
                } else if !a.excused {
                    self.fail(format!(
                        "agent {i} followed a coordinator clock {err} ms off (confirmed: {confirmed}) after its time was vouched for"
                    ));
                }
                self.agents[i].vouched_boot = true;
            }
            Event::ClockUnvouched { unreachable, .. } => {
                self.trace(16, i as u64, u64::from(unreachable));
                let linked = self.agents[i].conn.is_some()
                    && self.coord_up
                    && !self.cut(i, UP)
                    && !self.cut(i, DOWN);
                if !unreachable && linked {
                    // A link that works but gave no usable sample in the
                    // wait (a clock step between probe and reply): said so.
                    self.trace(17, i as u64, 0);
                }
                self.agents[i].excused = true;
            }
            _ => self.trace(14, i as u64, 0),
        }
    }

    fn node_effect(&mut self, i: usize, e: NodeEffect) {
        match e {
            NodeEffect::Spawn { key, spec } => {
                self.fires += 1;
                self.trace(
                    20,
                    i as u64,
                    key.scheduled_at.as_millis() as u64 ^ key.task_id.0,
                );
                let a = &mut self.agents[i];
                if let Some(first) = a.fired.insert(key, self.now) {
                    self.fail(format!(
                        "agent {i} fired {key:?} twice (first at t+{}ms)",
                        first - self.t0
                    ));
                }
                if self.verbose {
                    let r = self.reading(i);
                    let t = self.agents[i]
                        .node
                        .as_ref()
                        .map(|n| n.time_of(r).as_millis() - self.t0);
                    eprintln!(
                        "t+{}ms agent {i} fires {}@{} wall {} boot {} trusted {t:?}",
                        self.now - self.t0,
                        key.task_id,
                        key.scheduled_at.as_millis() - self.t0,
                        r.wall_ms - self.t0,
                        r.boot_ms
                    );
                }
                let tolerance = if self.agents[i].small_steps {
                    // Forward steps under the jump threshold are taken as
                    // corrections: up to the guard's bound, in all.
                    EARLY_TOLERANCE_MS
                        + sundial_core::clock::JUMP_THRESHOLD_MS
                        + (self.now - self.t0 + 120_000) / 10_000
                } else {
                    EARLY_TOLERANCE_MS
                };
                if self.now < key.scheduled_at.as_millis() - tolerance {
                    if self.agents[i].excused || self.agents[i].excused_tasks.contains(&key.task_id)
                    {
                        self.excused_early += 1;
                    } else {
                        self.fail(format!(
                            "agent {i} fired {key:?} {} ms early",
                            key.scheduled_at.as_millis() - self.now
                        ));
                    }
                }
                if let Some(gone) = self.agents[i].removed_at.get(&key.task_id) {
                    self.fail(format!(
                        "agent {i} fired {key:?} after the cancel reached it (t+{}ms)",
                        gone - self.t0
                    ));
                }
                // The program says how long it runs and how it ends.
                let ms: i64 = spec.args.first().and_then(|a| a.parse().ok()).unwrap_or(50);
                let fails = spec.args.get(1).is_some_and(|a| a == "flaky") && self.rng.chance(0.3);
                let took = 1 + self.rng.below(ms.max(1) as u64) as i64;
                let inc = self.agents[i].incarnation;
                let outcome = if fails {
                    Outcome::Failed
                } else {
                    Outcome::Succeeded
                };
                self.at(self.now + took, Ev::ActionDone(i, inc, key, outcome));
            }
            NodeEffect::Kill { key } => {
                let inc = self.agents[i].incarnation;
                self.at(self.now + 1, Ev::ActionDone(i, inc, key, Outcome::TimedOut));
            }
            NodeEffect::Connect { timeout_ms } => {
                let inc = self.agents[i].incarnation;
                let reachable = self.coord_up && !self.cut(i, UP) && !self.cut(i, DOWN);
                let t = if reachable {
                    self.now + 2 * self.delay()
                } else {
                    self.now + (timeout_ms as i64).min(CONNECT_TIMEOUT_MS)
                };
                self.at(t, Ev::ConnectDone(i, inc, reachable));
            }
            NodeEffect::Transmit(msg) => {
                if let Some(c) = self.agents[i].conn {
                    self.send(c, UP, Msg::Up(msg));
                }
            }
            NodeEffect::Disconnect => {
                if let Some(c) = self.agents[i].conn.take() {
                    self.close_agent_side(c, true);
                }
            }
        }
    }

    fn send(&mut self, c: u64, dir: usize, msg: Msg) {
        let d = self.delay();
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let open = if dir == UP {
            conn.agent_open
        } else {
            conn.coord_open
        };
        if !open {
            return;
        }
        // The link's bandwidth, roughly: a page of assignments takes time
        // to cross (about 100 bytes a change at 10 MB/s).
        let cost = match &msg {
            Msg::Down(CoordMsg::Assignments { changes, .. }) => {
                (changes.len() as i64 * LINK_US_PER_CHANGE) / 1_000
            }
            _ => 0,
        };
        let ready = conn.queue[dir]
            .back()
            .map_or(now + d, |(t, _)| (*t).max(now + d))
            + cost;
        conn.queue[dir].push_back((ready, msg));
        if !conn.pumping[dir] {
            conn.pumping[dir] = true;
            self.at(ready, Ev::Deliver(c, dir));
        }
    }

    /// The agent's end closes; the coordinator hears of it unless told
    /// nothing (a crash) or the way up is cut.
    fn close_agent_side(&mut self, c: u64, tell: bool) {
        let told = tell && self.conns.get(&c).is_some_and(|k| !self.cut(k.agent, UP));
        if let Some(conn) = self.conns.get_mut(&c) {
            conn.agent_open = false;
        }
        if told {
            self.coord_side_gone(c);
        }
        self.gc_conn(c);
    }

    /// The coordinator's end of `c` is gone: the node is told.
    fn coord_side_gone(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        conn.coord_open = false;
        let Some((inc, nc)) = conn.node_conn.take() else {
            return;
        };
        if inc == self.coord_inc {
            if let Some(k) = self.coord.as_mut() {
                k.conns.remove(&nc);
            }
            self.coord_call(|n, now| n.handle_closed(now, nc));
        }
    }

    fn close_coord_side(&mut self, c: u64, tell: bool, closed: Closed) {
        let Some(conn) = self.conns.get(&c) else {
            return;
        };
        let agent = conn.agent;
        let agent_open = conn.agent_open;
        self.coord_side_gone(c);
        let told = tell && agent_open && self.agents[agent].cut_until[DOWN] <= self.now;
        if told {
            if let Some(conn) = self.conns.get_mut(&c) {
                conn.agent_open = false;
            }
            if self.agents[agent].conn == Some(c) {
                self.agents[agent].conn = None;
                self.node_call(agent, |n, r| n.handle_closed(r, closed));
            }
        }
        self.gc_conn(c);
    }

    fn gc_conn(&mut self, c: u64) {
        if self
            .conns
            .get(&c)
            .is_some_and(|k| !k.agent_open && !k.coord_open)
        {
            self.conns.remove(&c);
        }
    }

    // ---- the coordinator

    /// The coordinator node's clock, while it is up.
    fn coord_clock(&self) -> Option<Now> {
        let c = self.coord.as_ref()?;
        Some(self.coord_now(c.boot_at))
    }

    /// Calls into the node without carrying out what follows.
    fn coord_do<R>(&mut self, f: impl FnOnce(&mut CoordNode, Now) -> R) -> Option<R> {
        let now = self.coord_clock()?;
        let c = self.coord.as_mut()?;
        Some(f(&mut c.node, now))
    }

    /// Calls into the node and carries out everything that follows.
    fn coord_call<R>(&mut self, f: impl FnOnce(&mut CoordNode, Now) -> R) -> Option<R> {
        let r = self.coord_do(f);
        self.drain_coord();
        r
    }

    fn coord_start(&mut self) {
        self.coord_inc += 1;
        let revision = self.store.revision();
        let certs = sundial_core::coord::admin::all_pages(
            |c: &([u8; 32], CertRole)| c.0,
            |after| {
                self.store
                    .known_certs(after, sundial_core::coord_store::PAGE_MAX)
            },
        );
        let (revision, known_certs) = match (revision, certs) {
            (Ok(r), Ok(c)) => (r, c),
            (r, c) => {
                self.fail(format!("the coordinator store did not open: {r:?} {c:?}"));
                return;
            }
        };
        let now = self.coord_now(self.now);
        let node = CoordNode::new(
            now,
            CoordConfig {
                limits: Limits::for_cores(4),
                ca_der: CA_CERT.to_vec(),
                revision,
                known_certs,
                bugs: self.coord_bugs,
            },
        );
        self.coord = Some(Coord {
            node,
            boot_at: self.now,
            admin: None,
            conns: HashMap::new(),
            enrolling: BTreeMap::new(),
            wake_at: None,
        });
        self.drain_coord();
    }

    fn drain_coord(&mut self) {
        loop {
            let Some(c) = self.coord.as_mut() else {
                return;
            };
            let event = c.node.poll_event();
            let effect = c.node.poll_effect();
            if event.is_none() && effect.is_none() {
                break;
            }
            if let Some(e) = event {
                self.coord_event(e);
            }
            if let Some(e) = effect {
                self.coord_effect(e);
            }
        }
        let inc = self.coord_inc;
        let now = self.now;
        let Some(c) = self.coord.as_mut() else {
            return;
        };
        if let Some(t) = c.node.poll_timeout() {
            let at = (c.boot_at + t as i64).max(now);
            if c.wake_at.is_none_or(|w| at < w) {
                c.wake_at = Some(at);
                self.at(at, Ev::CoordWake(inc, at));
            }
        }
    }

    fn coord_event(&mut self, e: CoordEvent) {
        if self.verbose
            && !matches!(
                e,
                CoordEvent::Session(_) | CoordEvent::ChangeAnnounced { .. }
            )
        {
            eprintln!("t+{}ms coordinator: {e:?}", self.now - self.t0);
        }
        match e {
            CoordEvent::AgentRevoked {
                agent,
                sessions_closed,
                ..
            } => self.trace(60, agent.0, sessions_closed as u64),
            CoordEvent::Enrolled { agent, .. } => self.trace(61, agent.0, 0),
            CoordEvent::ChangeAnnounced { revision, sessions } => {
                self.trace(62, revision, sessions as u64)
            }
            CoordEvent::Session(Event::ResultsStored { agent, runs, .. }) => {
                self.trace(30, agent.0, runs as u64)
            }
            CoordEvent::StoreFailed { .. } => self.trace(63, 0, 0),
            _ => {}
        }
    }

    fn coord_effect(&mut self, e: Effect) {
        match e {
            Effect::Store(job) => {
                // A store operation takes a little while; a crash before it
                // commits loses it, as a crash loses a transaction.
                let d = 1 + self.rng.below(3) as i64;
                let inc = self.coord_inc;
                self.at(self.now + d, Ev::StoreJob(inc, Box::new(job)));
            }
            Effect::Sign {
                conn,
                agent,
                csr_der,
            } => {
                // The simulator's "certificate" is the request itself.
                self.coord_do(|n, now| n.handle_signed(now, conn, agent, Ok(csr_der)));
            }
            Effect::Transmit(conn) => {
                let Some(c) = self
                    .coord
                    .as_ref()
                    .and_then(|k| k.conns.get(&conn).copied())
                else {
                    return;
                };
                while let Some(out) = self.coord_do(|n, now| n.poll_transmit(now, conn)).flatten() {
                    match out {
                        Outgoing::Msg(m) => self.send(c, DOWN, Msg::Down(m)),
                        Outgoing::Close { code, reason } => {
                            self.coord_closed(c, code, &reason);
                            break;
                        }
                    }
                }
            }
            Effect::Close { conn, code, reason } => {
                let (sim, admin) = match self.coord.as_mut() {
                    Some(k) => (k.conns.get(&conn).copied(), k.admin == Some(conn)),
                    None => return,
                };
                if admin {
                    if let Some(k) = self.coord.as_mut() {
                        k.admin = None;
                    }
                }
                match sim {
                    Some(c) => self.coord_closed(c, code, &reason),
                    None => {
                        self.coord_do(|n, now| n.handle_closed(now, conn));
                    }
                }
            }
            Effect::AdminReply { answers, .. } => {
                for a in answers {
                    if let AdminResponse::Error(why) = a {
                        self.trace(64, 0, 0);
                        if self.verbose {
                            eprintln!("t+{}ms admin refused: {why}", self.now - self.t0);
                        }
                    }
                }
            }
            Effect::EnrollReply { conn, response } => {
                let i = self.coord.as_mut().and_then(|k| k.enrolling.remove(&conn));
                self.coord_do(|n, now| n.handle_closed(now, conn));
                let Some(i) = i else {
                    return;
                };
                match response {
                    EnrollResponse::Enrolled { agent_id, .. } => {
                        self.exercised.enrollments += 1;
                        self.agents[i].id = agent_id;
                        self.agents[i].enrolled = true;
                        self.start_agent(i, MemStore::default());
                    }
                    EnrollResponse::Refused { reason } => {
                        if self.exercised.store_faults == 0 {
                            self.fail(format!("agent {i}'s enrollment was refused: {reason}"));
                        }
                        self.at(self.now + 1_000, Ev::Enroll(i));
                    }
                }
            }
            Effect::Stop => {
                // The store failed: the coordinator stops, and its
                // supervisor starts it again from what was committed.
                self.at(self.now, Ev::CoordCrash);
            }
        }
    }

    /// The coordinator closed a session with `code`: the agent hears it.
    fn coord_closed(&mut self, c: u64, code: u32, reason: &str) {
        let Some(i) = self.conns.get(&c).map(|k| k.agent) else {
            return;
        };
        let expected = match code {
            close::REPLACED | close::BUSY | close::DONE => true,
            close::REVOKED => self.agents[i].revoked,
            close::STORE => self.exercised.store_faults > 0,
            _ => false,
        };
        if !expected {
            self.fail(format!(
                "the coordinator closed agent {i}'s session (code {code}): {reason}"
            ));
        }
        let closed = match code {
            close::REVOKED => Closed::Revoked,
            close::BUSY => Closed::Busy {
                retry_after_ms: sundial_protocol::wire::busy_retry_after_ms(reason.as_bytes()),
            },
            _ => Closed::Lost,
        };
        self.close_coord_side(c, true, closed);
    }

    /// Sends an admin request as the operator; false when the coordinator
    /// cannot take it now.
    fn admin(&mut self, request: AdminRequest) -> bool {
        let conn = match self.coord.as_ref().map(|k| k.admin) {
            None => return false,
            Some(Some(c)) => c,
            Some(None) => {
                let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 1));
                let Some(Ok(c)) = self.coord_do(|n, now| n.handle_incoming(now, ip)) else {
                    return false;
                };
                let cert = sha256(ADMIN_CERT);
                let route =
                    self.coord_do(|n, now| n.handle_handshaken(now, c, Alpn::Admin, Some(cert)));
                if !matches!(route, Some(Route::Admin(_))) {
                    self.fail(format!("the operator's connection was refused: {route:?}"));
                    self.coord_call(|n, now| n.handle_closed(now, c));
                    return false;
                }
                if let Some(k) = self.coord.as_mut() {
                    k.admin = Some(c);
                }
                c
            }
        };
        self.admin_reqs += 1;
        let req = self.admin_reqs;
        let mut entropy = [0u8; ENTROPY_BYTES];
        for b in entropy.iter_mut() {
            *b = self.rng.below(256) as u8;
        }
        self.coord_call(|n, now| n.handle_admin(now, conn, req, request, entropy));
        true
    }

    /// A store job completes: it commits now, or (now and then, while
    /// faults are on) fails as a write error does.
    fn store_job(&mut self, inc: u64, job: StoreJob) {
        if inc != self.coord_inc || self.coord.is_none() {
            return;
        }
        let fails = self.now < self.faults_end && self.rng.chance(STORE_FAULT_CHANCE);
        let done = if fails {
            self.exercised.store_faults += 1;
            self.trace(65, 0, 0);
            failed(job)
        } else {
            job.run(&self.store)
        };
        self.coord_call(|n, now| n.handle_store_done(now, done));
    }

    /// An agent enrolls with the join token, through the node's rules.
    fn enroll(&mut self, i: usize) {
        if self.agents[i].enrolled {
            return;
        }
        let ip = agent_ip(i);
        let Some(Ok(conn)) = self.coord_do(|n, now| n.handle_incoming(now, ip)) else {
            self.at(self.now + 1_000, Ev::Enroll(i));
            return;
        };
        let route = self.coord_do(|n, now| n.handle_handshaken(now, conn, Alpn::Enroll, None));
        if route != Some(Route::Enroll) {
            self.coord_call(|n, now| n.handle_closed(now, conn));
            self.at(self.now + 1_000, Ev::Enroll(i));
            return;
        }
        if let Some(k) = self.coord.as_mut() {
            k.enrolling.insert(conn, i);
        }
        let request = EnrollRequest {
            token_secret: self.join_secret.to_vec(),
            csr_der: self.agents[i].cert.clone(),
            name: Some(format!("device-{i}")),
            labels: self.agents[i].labels.clone(),
        };
        self.coord_call(|n, now| n.handle_enroll(now, conn, request));
    }

    /// The store's tasks (every page).
    fn stored_tasks(&self) -> Vec<sundial_core::coord_store::StoredTask> {
        sundial_core::coord::admin::all_tasks(&self.store).unwrap_or_default()
    }

    /// The store's runs, by agent and key.
    fn stored_runs(&self) -> std::collections::HashSet<(AgentId, RunKey)> {
        self.store
            .all_runs()
            .unwrap_or_default()
            .iter()
            .map(|r| (r.agent_id, r.key()))
            .collect()
    }

    /// When the store says agent `id` enrolled.
    fn enrolled_at(&self, id: AgentId) -> Timestamp {
        self.store
            .agent(id)
            .ok()
            .flatten()
            .map_or(Timestamp::MIN, |a| a.enrolled_at)
    }

    /// Whether the store assigns `spec` to agent `i` now.
    fn assigns(&self, spec: &TaskSpec, i: usize) -> bool {
        let a = &self.agents[i];
        a.enrolled && targets(&spec.target, a.id, &a.labels)
    }

    fn operator(&mut self) {
        if self.coord_clock_off != 0 {
            // The coordinator's clock defines when tasks count from (an
            // `every` anchored at its instant of creation): an operator
            // does not create tasks on a coordinator whose clock is an
            // hour off, and the checks' expectations assume it.
            return;
        }
        let tasks = self.stored_tasks();
        let live: Vec<&sundial_core::coord_store::StoredTask> =
            tasks.iter().filter(|t| !t.cancelled).collect();
        let enrolled: Vec<usize> = (0..self.agents.len())
            .filter(|i| self.agents[*i].enrolled && !self.agents[*i].revoked)
            .collect();
        if enrolled.is_empty() {
            return;
        }
        let roll = self.rng.below(100);
        if live.len() < TASKS_MAX && (roll < 55 || live.is_empty()) {
            let target = if self.rng.chance(0.3) {
                self.exercised.selector_tasks += 1;
                let site = ["north", "south"][self.rng.below(2) as usize];
                Target::Selector(vec![("site".into(), site.into())])
            } else {
                let i = enrolled[self.rng.below(enrolled.len() as u64) as usize];
                Target::Agent(self.agents[i].id)
            };
            let now = Timestamp::from_millis_saturating(self.now);
            let kind = self.rng.below(10);
            let schedule = if kind < 2 {
                Schedule::at(Timestamp::from_millis_saturating(
                    self.now + 500 + self.rng.below(30_000) as i64,
                ))
            } else if kind < 4 {
                self.exercised.cron_tasks += 1;
                let (zone, expr) = match self.dst {
                    // Across the seed's DST change: wildcard and fixed-time
                    // jobs in the hours that are skipped or repeated.
                    Some(d) if self.rng.chance(0.7) => {
                        if self.now < d.at {
                            self.exercised.dst_crossings += 1;
                        }
                        let expr = [
                            "* * * * *",
                            "0-59 1-3 * * *",
                            "0-59 2 * * *",
                            "* 2 * * *",
                            "0-59 1 * * *",
                            "* 1 * * *",
                            "*/2 1-3 * * *",
                        ][self.rng.below(7) as usize];
                        (d.zone, expr)
                    }
                    _ => {
                        let zone = [
                            "UTC",
                            "Europe/Berlin",
                            "America/New_York",
                            "Australia/Lord_Howe",
                        ][self.rng.below(4) as usize];
                        (zone, "* * * * *")
                    }
                };
                match Schedule::cron(expr, zone) {
                    Ok(s) => s,
                    Err(_) => return,
                }
            } else {
                let period = [200u64, 500, 1_000, 2_000, 5_000][self.rng.below(5) as usize];
                match Schedule::every(DurationMs(period), now) {
                    Ok(s) => s,
                    Err(_) => return,
                }
            };
            // Now and then a window: occurrences only in [start, end).
            let schedule = if kind >= 2 && self.rng.chance(0.15) {
                self.exercised.windows += 1;
                let start = self.now + self.rng.below(20_000) as i64;
                let end = start + 5_000 + self.rng.below(60_000) as i64;
                match schedule.with_window(
                    Some(Timestamp::from_millis_saturating(start)),
                    Some(Timestamp::from_millis_saturating(end)),
                ) {
                    Ok(s) => s,
                    Err(_) => return,
                }
            } else {
                schedule
            };
            let runs_ms = [5u64, 50, 300, 1_500][self.rng.below(4) as usize];
            let flaky = self.rng.chance(0.3);
            let policies = Policies {
                misfire: MisfirePolicy {
                    mode: [
                        MisfireMode::Skip,
                        MisfireMode::Once,
                        MisfireMode::All { cap: 3 },
                    ][self.rng.below(3) as usize],
                    grace: DurationMs(1_000),
                },
                retry: RetryPolicy {
                    retries: if flaky { 2 } else { 0 },
                    backoff_initial: DurationMs(100),
                    backoff_max: DurationMs(1_000),
                },
                overlap: if self.rng.chance(0.5) {
                    sundial_protocol::policy::OverlapPolicy::Forbid
                } else {
                    sundial_protocol::policy::OverlapPolicy::Allow
                },
                timeout: self.rng.chance(0.3).then_some(DurationMs(1_000)),
            };
            let draft = TaskDraft {
                name: None,
                target,
                schedule,
                action: Action::Exec(ExecSpec {
                    program: "/bin/sim".into(),
                    args: vec![
                        runs_ms.to_string(),
                        if flaky { "flaky" } else { "steady" }.into(),
                    ],
                    env: Vec::new(),
                    cwd: None,
                }),
                policies,
                // `every` counts from the coordinator's instant of creation.
                anchor_at_creation: true,
            };
            self.trace(40, kind, 0);
            self.admin(AdminRequest::TaskCreate(Box::new(draft)));
        } else if !live.is_empty() {
            let t = live[self.rng.below(live.len() as u64) as usize];
            let id = t.spec.id;
            let request = match roll {
                55..=69 => {
                    self.exercised.updates += 1;
                    let Action::Exec(e) = &t.spec.action;
                    let mut args = e.args.clone();
                    if let Some(a) = args.first_mut() {
                        *a = "20".into();
                    }
                    AdminRequest::TaskUpdate {
                        id,
                        patch: Box::new(TaskPatch {
                            action: Some(Action::Exec(ExecSpec {
                                program: e.program.clone(),
                                args,
                                env: Vec::new(),
                                cwd: None,
                            })),
                            ..TaskPatch::default()
                        }),
                    }
                }
                70..=77 => {
                    if t.paused {
                        AdminRequest::TaskResume(id)
                    } else {
                        self.exercised.pauses += 1;
                        AdminRequest::TaskPause(id)
                    }
                }
                78..=84 if !t.paused => {
                    self.exercised.run_nows += 1;
                    AdminRequest::TaskRunNow(id)
                }
                85..=87 if enrolled.len() >= 2 && self.revoked_at.is_empty() => {
                    // An agent revoked: cut off at once, for good.
                    let i = enrolled[self.rng.below(enrolled.len() as u64) as usize];
                    let agent = self.agents[i].id;
                    if self.admin(AdminRequest::AgentRevoke(agent)) {
                        self.exercised.revokes += 1;
                        self.agents[i].revoked = true;
                        self.revoked_at.insert(agent, self.now);
                        self.trace(42, agent.0, 0);
                        self.at(self.now + 2_000, Ev::RevokeCheck(i));
                    }
                    return;
                }
                _ => AdminRequest::TaskCancel(id),
            };
            self.trace(41, id.0, roll);
            self.admin(request);
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
            Ev::ConnectDone(i, inc, reachable) => {
                if self.agents[i].incarnation != inc || self.agents[i].node.is_none() {
                    return;
                }
                if !(reachable && self.coord_up) {
                    self.node_call(i, |n, r| n.handle_connect_failed(r, Closed::Lost));
                    return;
                }
                let ip = agent_ip(i);
                let nc = match self.coord_do(|n, now| n.handle_incoming(now, ip)) {
                    Some(Ok(nc)) => nc,
                    Some(Err(_)) => {
                        // Refused before the handshake: the budget.
                        self.drain_coord();
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
                        self.node_call(i, |n, r| n.handle_connect_failed(r, Closed::Lost));
                        return;
                    }
                };
                let cert = sha256(&self.agents[i].cert);
                let route =
                    self.coord_do(|n, now| n.handle_handshaken(now, nc, Alpn::Session, Some(cert)));
                if !matches!(route, Some(Route::Session(_))) {
                    // TLS refuses a certificate the coordinator does not know.
                    self.coord_call(|n, now| n.handle_closed(now, nc));
                    self.node_call(i, |n, r| n.handle_connect_failed(r, Closed::RefusedByTls));
                    return;
                }
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
                        node_conn: Some((self.coord_inc, nc)),
                    },
                );
                if let Some(k) = self.coord.as_mut() {
                    k.conns.insert(nc, c);
                }
                self.agents[i].conn = Some(c);
                self.at(self.now + KEEP_ALIVE_MS, Ev::KeepAlive(c));
                self.drain_coord();
                self.node_call(i, |n, r| n.handle_connected(r));
            }
            Ev::Deliver(c, dir) => self.deliver(c, dir),
            Ev::KeepAlive(c) => self.keep_alive(c),
            Ev::CoordWake(inc, at) => {
                let current = inc == self.coord_inc
                    && self.coord.as_ref().is_some_and(|k| k.wake_at == Some(at));
                if current {
                    if let Some(k) = self.coord.as_mut() {
                        k.wake_at = None;
                    }
                    self.coord_call(|n, now| n.handle_timeout(now));
                }
            }
            Ev::StoreJob(inc, job) => self.store_job(inc, *job),
            Ev::Enroll(i) => {
                if self.coord.is_some() {
                    self.enroll(i);
                } else {
                    self.at(self.now + 1_000, Ev::Enroll(i));
                }
            }
            Ev::RevokeCheck(i) => {
                let agent = self.agents[i].id;
                if self.coord.as_ref().is_some_and(|k| k.node.is_online(agent)) {
                    self.fail(format!(
                        "agent {i} was revoked 2 s ago and still has a live session"
                    ));
                }
            }
            Ev::Crash(i) => {
                let Some(node) = self.agents[i].node.take() else {
                    return;
                };
                self.trace(50, i as u64, 0);
                self.agents[i].parked = Some(node.into_store());
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
            Ev::CoordCrash => {
                if !self.coord_up {
                    return;
                }
                self.trace(52, 0, 0);
                self.coord_up = false;
                let enrolling: Vec<usize> = self
                    .coord
                    .take()
                    .map(|k| k.enrolling.into_values().collect())
                    .unwrap_or_default();
                for i in enrolling {
                    // Its enrollment was cut off: the device tries again.
                    self.at(self.now + 1_000, Ev::Enroll(i));
                }
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                for c in ids {
                    self.close_coord_side(c, false, Closed::Lost);
                }
                let down = 500 + self.rng.below(15_000) as i64;
                self.at(self.now + down, Ev::CoordRestart);
            }
            Ev::CoordRestart => {
                self.trace(53, 0, 0);
                self.coord_up = true;
                self.exercised.coordinator_restarts += 1;
                self.coord_start();
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

    fn start_agent(&mut self, i: usize, store: MemStore) {
        let cfg = NodeConfig {
            agent_id: self.agents[i].id,
            agent_version: "sim".into(),
            allow_exec: Vec::new(),
            runs_concurrent_max: 64,
            boot_id: self.agents[i].boot_id,
            seed: self.rng.next_u64(),
            bugs: self.bugs,
            horizon: self.horizon,
            vouch_wait_ms: sundial_core::node::VOUCH_WAIT_MS,
        };
        let r = self.reading(i);
        match AgentNode::start(store, cfg, r) {
            Ok(node) => self.agents[i].node = Some(node),
            Err(e) => self.fail(format!("agent {i} did not start: {e:?}")),
        }
        self.drain_node(i);
    }

    fn deliver(&mut self, c: u64, dir: usize) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let i = conn.agent;
        let receiver_open = if dir == UP {
            conn.coord_open
        } else {
            conn.agent_open
        };
        if !receiver_open {
            conn.queue[dir].clear();
            conn.pumping[dir] = false;
            return;
        }
        if self.agents[i].cut_until[dir] > self.now {
            // Stalled: the transport retransmits.
            self.at(self.now + RETRANSMIT_MS, Ev::Deliver(c, dir));
            return;
        }
        let now = self.now;
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        let Some((ready, _)) = conn.queue[dir].front() else {
            conn.pumping[dir] = false;
            return;
        };
        if *ready > now {
            let t = *ready;
            self.at(t, Ev::Deliver(c, dir));
            return;
        }
        let Some((_, msg)) = conn.queue[dir].pop_front() else {
            return;
        };
        conn.heard[dir] = now;
        match conn.queue[dir].front() {
            Some((t, _)) => {
                let t = *t;
                self.at(t, Ev::Deliver(c, dir));
            }
            None => conn.pumping[dir] = false,
        }
        match msg {
            Msg::Up(m) => self.deliver_up(c, i, m),
            Msg::Down(m) => {
                if self.agents[i].conn == Some(c) {
                    self.node_call(i, |n, r| n.handle_message(r, m));
                }
            }
        }
    }

    fn deliver_up(&mut self, c: u64, _i: usize, m: AgentMsg) {
        let Some((inc, nc)) = self.conns.get(&c).and_then(|k| k.node_conn) else {
            return;
        };
        if inc == self.coord_inc {
            self.coord_call(|n, now| n.handle_agent_msg(now, nc, m));
        }
    }

    fn keep_alive(&mut self, c: u64) {
        let now = self.now;
        let Some(conn) = self.conns.get(&c) else {
            return;
        };
        let i = conn.agent;
        let (agent_open, coord_open) = (conn.agent_open, conn.coord_open);
        let up_ok = agent_open && !self.cut(i, UP);
        let down_ok = coord_open && !self.cut(i, DOWN);
        if let Some(conn) = self.conns.get_mut(&c) {
            if up_ok {
                conn.heard[UP] = now;
            }
            if down_ok {
                conn.heard[DOWN] = now;
            }
        }
        if down_ok && agent_open && self.agents[i].conn == Some(c) {
            self.node_call(i, |n, r| n.handle_heard(r));
        }
        let Some(conn) = self.conns.get(&c) else {
            return;
        };
        let heard = conn.heard;
        if conn.agent_open && now - heard[DOWN] > IDLE_MS {
            if self.agents[i].conn == Some(c) {
                self.agents[i].conn = None;
                self.node_call(i, |n, r| n.handle_closed(r, Closed::Lost));
            }
            self.close_agent_side(c, true);
        }
        if self.conns.get(&c).is_some_and(|k| k.coord_open) && now - heard[UP] > IDLE_MS {
            self.close_coord_side(c, true, Closed::Lost);
        }
        if self.conns.contains_key(&c) {
            self.at(now + KEEP_ALIVE_MS, Ev::KeepAlive(c));
        }
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

    /// After the settle time: every agent holds exactly the tasks the
    /// coordinator assigns it, at a revision covering every change for it.
    fn check_converged(&mut self) {
        let mut found = Vec::new();
        let tasks = self.stored_tasks();
        let revision = self.store.revision().unwrap_or(0);
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.revoked {
                continue;
            }
            let Some(node) = agent.node.as_ref() else {
                found.push(format!("agent {i} is down after the settle time"));
                continue;
            };
            let want: Vec<TaskId> = tasks
                .iter()
                .filter(|t| !t.removed() && self.assigns(&t.spec, i))
                .map(|t| t.spec.id)
                .collect();
            let have = node.store().task_ids();
            if have != want {
                found.push(format!(
                    "agent {i} holds tasks {have:?}, the coordinator assigns {want:?}"
                ));
            }
            // Changes for other agents are not news to it.
            let latest = tasks
                .iter()
                .filter(|t| self.assigns(&t.spec, i))
                .map(|t| t.spec.revision)
                .max()
                .unwrap_or(0);
            let at = node.store().last_revision;
            if at < latest || at > revision {
                found.push(format!(
                    "agent {i} is at revision {at}, its latest change is {latest}, the coordinator at {revision}"
                ));
            }
        }
        for f in found {
            self.fail(f);
        }
    }

    /// At the end, every task cancelled a while ago: every record any
    /// agent wrote is stored at the coordinator and no outbox holds any.
    /// Every occurrence of a task, from its creation up to where its agent
    /// had decided when the task was cancelled, has a record at the
    /// coordinator: run, skipped or refused — none silently dropped.
    fn check_every_occurrence_decided(&mut self) {
        let mut found = Vec::new();
        let tasks: HashMap<TaskId, TaskSpec> = self
            .stored_tasks()
            .into_iter()
            .map(|t| (t.spec.id, t.spec))
            .collect();
        let runs = self.stored_runs();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.revoked {
                continue;
            }
            let enrolled_at = self.enrolled_at(agent.id);
            for (task_id, until) in &agent.decided {
                let (Some(until), Some(spec)) = (until, tasks.get(task_id)) else {
                    continue;
                };
                if agent.excused_tasks.contains(task_id) {
                    // Decided on a clock far ahead: beyond the cap of
                    // skipped records (MISFIRE_RECORDS_MAX) not all are.
                    continue;
                }
                // Expected from the brute-force oracle, not the scheduler.
                let from = spec.created_at.max(enrolled_at);
                for t in crate::oracle::occurrences(&spec.schedule, from, *until) {
                    let key = RunKey {
                        task_id: *task_id,
                        scheduled_at: t,
                        attempt: 1,
                    };
                    if !runs.contains(&(agent.id, key)) {
                        found.push(format!(
                            "agent {i}: occurrence {key:?} has no record (decided up to {})",
                            until.as_millis() - self.t0
                        ));
                        break;
                    }
                }
            }
        }
        for f in found {
            self.fail(f);
        }
    }

    /// At the quiesce point, long after the last fault: every agent whose
    /// clock could be corrected is on time: every occurrence of its live
    /// tasks due 5–20 s ago has been run or recorded. (A scheduler left
    /// ahead by a clock that was ahead, or a schedule stalled by a bad
    /// clock, fails here.)
    fn check_on_time(&mut self) {
        let q = self.now;
        let window = (
            Timestamp::from_millis_saturating(q - 20_000),
            Timestamp::from_millis_saturating(q - 5_000),
        );
        let mut found = Vec::new();
        let tasks = self.stored_tasks();
        let runs = self.stored_runs();
        for (i, agent) in self.agents.iter().enumerate() {
            let Some(node) = agent.node.as_ref() else {
                continue;
            };
            if agent.excused || agent.revoked {
                continue;
            }
            let enrolled_at = self.enrolled_at(agent.id);
            let store = node.store();
            for t in &tasks {
                let spec = &t.spec;
                if t.removed()
                    || !self.assigns(spec, i)
                    || spec.created_at.max(enrolled_at).as_millis() > q - 30_000
                    || agent.excused_tasks.contains(&spec.id)
                {
                    continue;
                }
                for t in crate::oracle::occurrences(&spec.schedule, window.0, window.1) {
                    let key = RunKey {
                        task_id: spec.id,
                        scheduled_at: t,
                        attempt: 1,
                    };
                    let done = agent.fired.contains_key(&key)
                        || runs.contains(&(agent.id, key))
                        || store.outbox_keys.contains_key(&key);
                    if !done {
                        found.push(format!(
                            "agent {i}: {key:?}, due {} ms before the quiesce point, neither ran nor was recorded (decided up to {})",
                            q - t.as_millis(),
                            node.decided_until().as_millis() - self.t0
                        ));
                        break;
                    }
                }
            }
        }
        for f in found.into_iter().take(5) {
            self.fail(f);
        }
    }

    /// Every retryable run whose retry was due before its agent gave up the
    /// task has a record of that retry: pending retries survive stops,
    /// crashes and reboots.
    fn check_retries(&mut self) {
        let mut found = Vec::new();
        let runs = self.stored_runs();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.revoked {
                continue;
            }
            let ledger: BTreeSet<RunKey> = agent
                .node
                .as_ref()
                .map(|n| n.store().ledger.iter().map(RunRecord::key).collect())
                .unwrap_or_default();
            for (key, due) in &agent.retry_due {
                let Some(Some(until)) = agent.decided.get(&key.task_id) else {
                    continue;
                };
                if until.as_millis() <= *due {
                    continue;
                }
                let next = RunKey {
                    attempt: key.attempt + 1,
                    ..*key
                };
                if !ledger.contains(&next) && !runs.contains(&(agent.id, next)) {
                    found.push(format!(
                        "agent {i}: the retry {next:?}, due by {} (agent time), has no record though the agent decided up to {}",
                        due - self.t0,
                        until.as_millis() - self.t0
                    ));
                }
            }
        }
        for f in found.into_iter().take(5) {
            self.fail(f);
        }
    }

    fn check_drained(&mut self) {
        let mut found = Vec::new();
        let runs = self.stored_runs();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.revoked {
                // Cut off: what it had not synced stays with it.
                continue;
            }
            let Some(node) = agent.node.as_ref() else {
                found.push(format!("agent {i} is down at the end"));
                continue;
            };
            let store = node.store();
            let lost: Vec<RunKey> = store
                .ledger
                .iter()
                .map(RunRecord::key)
                .filter(|k| !runs.contains(&(agent.id, *k)) && !store.outbox_keys.contains_key(k))
                .collect();
            if let Some(first) = lost.first() {
                found.push(format!(
                    "agent {i}: {} records lost, e.g. {first:?}",
                    lost.len()
                ));
            }
            if !store.outbox.is_empty() {
                found.push(format!(
                    "agent {i}: {} records not synced by the end",
                    store.outbox.len()
                ));
            }
            if node.running() > 0 {
                found.push(format!(
                    "agent {i}: {} runs still going after every task was cancelled",
                    node.running()
                ));
            }
        }
        for f in found {
            self.fail(f);
        }
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
        let setup = store.add_admin_cert(sha256(ADMIN_CERT)).and_then(|()| {
            store.put_token(&sundial_core::coord_store::JoinToken {
                secret_sha256: sha256(&join_secret),
                expires_at: Timestamp::from_millis_saturating(t0 + 86_400_000),
                uses_left: 10_000,
                labels: Vec::new(),
            })
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
            coord_up: true,
            store,
            coord: None,
            coord_inc: 0,
            join_secret,
            coord_bugs,
            admin_reqs: 0,
            revoked_at: HashMap::new(),
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
            backoff_restarts: 0,
            excused_early: 0,
        };
        w.coord_start();
        w
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
            excused_tasks: BTreeSet::new(),
            assigned_at: HashMap::new(),
            cert: format!("sim-device-{i}").into_bytes(),
            labels: vec![(
                "site".to_string(),
                ["north", "south"][w.rng.below(2) as usize].to_string(),
            )],
            enrolled: false,
            revoked: false,
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
            w.enroll(i);
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
            6 => Ev::CoordCrash,
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
            }),
            policies: Policies::default(),
            anchor_at_creation: false,
        };
        if let Err(e) = w.store.create_task(draft, now) {
            w.fail(format!("task {i} was not created: {e}"));
            break;
        }
    }
    add_agents(&mut w, 1);
    let link_ms = (n as i64 * LINK_US_PER_CHANGE) / 1_000;
    w.at(T0 + 100 + link_ms * 2 / 5, Ev::Cut(0, [true, true], 8_000));
    w.run(T0 + 60_000 + 2 * link_ms);
    let (tasks_held, agent_revision) = w.agents[0].node.as_ref().map_or((0, 0), |node| {
        (node.store().task_ids().len(), node.store().last_revision)
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
