//! The coordinator: the core's `CoordNode` over the redb store on its
//! in-memory backend, its store jobs (which take time, and sometimes fail),
//! enrollment, and the operator's admin requests.

use super::*;
use sundial_protocol::placement::{PlacementAsk, PlacementMode};

/// The coordinator node of one incarnation.
#[derive(Debug)]
pub(super) struct Coord {
    pub(super) node: CoordNode,
    /// True time at its start: its monotonic clock reads from here.
    pub(super) boot_at: i64,
    /// Its admin connection (the operator's).
    pub(super) admin: Option<ConnId>,
    /// Node connection → the simulator's.
    pub(super) conns: HashMap<ConnId, u64>,
    /// Enrollment connections → the agent enrolling.
    pub(super) enrolling: BTreeMap<ConnId, usize>,
    /// The instant its timeout event is set for.
    pub(super) wake_at: Option<i64>,
}

/// The admin's certificate, as the store knows it.
pub(super) const ADMIN_CERT: &[u8] = b"sim-admin";
/// The CA, as the node sends it to enrolled agents.
pub(super) const CA_CERT: &[u8] = b"sim-ca";
/// Chance that a store job fails (a write error) while faults are on.
pub(super) const STORE_FAULT_CHANCE: f64 = 0.002;

/// A store job failed as a write error fails it: nothing committed.
pub(super) fn failed(job: StoreJob) -> StoreDone {
    job.fail(StoreError::unavailable(
        "simulated write",
        "the disk failed",
    ))
}

/// Agent `i`'s address.
pub(super) fn agent_ip(i: usize) -> std::net::IpAddr {
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(
        10,
        0,
        (i / 250) as u8,
        (i % 250) as u8 + 1,
    ))
}

impl World {
    /// Coordinator `k`'s node's clock, while it is up.
    pub(super) fn coord_clock(&self, k: usize) -> Option<Now> {
        let c = self.coords[k].node.as_ref()?;
        Some(self.coord_now(c.boot_at))
    }

    /// Calls into coordinator `k`'s node without carrying out what follows.
    pub(super) fn coord_do<R>(
        &mut self,
        k: usize,
        f: impl FnOnce(&mut CoordNode, Now) -> R,
    ) -> Option<R> {
        let now = self.coord_clock(k)?;
        let c = self.coords[k].node.as_mut()?;
        Some(f(&mut c.node, now))
    }

    /// Calls into coordinator `k`'s node and carries out everything that
    /// follows.
    pub(super) fn coord_call<R>(
        &mut self,
        k: usize,
        f: impl FnOnce(&mut CoordNode, Now) -> R,
    ) -> Option<R> {
        let r = self.coord_do(k, f);
        self.drain_coord(k);
        r
    }

    pub(super) fn coord_start(&mut self, k: usize) {
        self.coords[k].inc += 1;
        // Read before the certificates, so that none added meanwhile is
        // missed by the feed.
        let cert_seq = self.store.cert_seq();
        let revision = self.store.revision();
        let certs = sundial_core::coord::admin::all_pages(
            |c: &([u8; 32], CertRole)| c.0,
            |after| {
                self.store
                    .known_certs(after, sundial_core::coord_store::PAGE_MAX)
            },
        );
        let (revision, known_certs, cert_seq) = match (revision, certs, cert_seq) {
            (Ok(r), Ok(c), Ok(s)) => (r, c, s),
            (r, c, s) => {
                self.fail(format!(
                    "the coordinator store did not open: {r:?} {c:?} {s:?}"
                ));
                return;
            }
        };
        let shared = (self.coords.len() > 1).then_some(sundial_core::coord::Shared {
            cert_seq,
            feed_interval_ms: sundial_core::coord::FEED_INTERVAL_MS,
            // Each incarnation draws its own.
            holder: (k as u64 + 1) << 32 | self.coords[k].inc,
        });
        if self.coord_clock_off != 0 {
            // Started with its clock wrong: it plans placed tasks by that
            // clock (with it behind, members wait; ahead, a window is
            // planned over the gap) — at most once holds, on time does not.
            self.placement_excused = true;
        }
        let now = self.coord_now(self.now);
        let node = CoordNode::new(
            now,
            CoordConfig {
                limits: Limits::for_cores(4),
                ca_der: CA_CERT.to_vec(),
                revision,
                known_certs,
                shared,
                bugs: self.coord_bugs,
                placed: sundial_core::coord::placement::placed_tasks(&self.store)
                    .unwrap_or_default(),
            },
        );
        self.coords[k].node = Some(Coord {
            node,
            boot_at: self.now,
            admin: None,
            conns: HashMap::new(),
            enrolling: BTreeMap::new(),
            wake_at: None,
        });
        self.drain_coord(k);
    }

    pub(super) fn drain_coord(&mut self, k: usize) {
        loop {
            let Some(c) = self.coords[k].node.as_mut() else {
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
                self.coord_effect(k, e);
            }
        }
        let inc = self.coords[k].inc;
        let now = self.now;
        let Some(c) = self.coords[k].node.as_mut() else {
            return;
        };
        if let Some(t) = c.node.poll_timeout() {
            let at = (c.boot_at + t as i64).max(now);
            if c.wake_at.is_none_or(|w| at < w) {
                c.wake_at = Some(at);
                self.at(at, Ev::CoordWake(k, inc, at));
            }
        }
    }

    pub(super) fn coord_event(&mut self, e: CoordEvent) {
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

    pub(super) fn coord_effect(&mut self, k: usize, e: Effect) {
        match e {
            Effect::Store(job) => {
                // A store operation takes a little while; a crash before it
                // commits loses it, as a crash loses a transaction.
                let d = 1 + self.rng.below(3) as i64;
                let inc = self.coords[k].inc;
                self.at(self.now + d, Ev::StoreJob(k, inc, Box::new(job)));
            }
            Effect::Sign {
                conn,
                signee,
                csr_der,
            } => {
                // The simulator's "certificate" is the request itself.
                self.coord_do(k, |n, now| n.handle_signed(now, conn, signee, Ok(csr_der)));
            }
            Effect::Transmit(conn) => {
                let Some(c) = self.coords[k]
                    .node
                    .as_ref()
                    .and_then(|n| n.conns.get(&conn).copied())
                else {
                    return;
                };
                while let Some(out) = self
                    .coord_do(k, |n, now| n.poll_transmit(now, conn))
                    .flatten()
                {
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
                let (sim, admin) = match self.coords[k].node.as_mut() {
                    Some(n) => (n.conns.get(&conn).copied(), n.admin == Some(conn)),
                    None => return,
                };
                if admin {
                    if let Some(n) = self.coords[k].node.as_mut() {
                        n.admin = None;
                    }
                }
                match sim {
                    Some(c) => self.coord_closed(c, code, &reason),
                    None => {
                        self.coord_do(k, |n, now| n.handle_closed(now, conn));
                    }
                }
            }
            // The simulated operator follows no runs.
            Effect::AdminPush { .. } => {}
            Effect::AdminReply { req, answers, .. } => {
                let revoke = self.pending_revokes.remove(&req);
                for a in answers {
                    if let AdminResponse::Module(Some(info)) = &a {
                        self.module = Some((info.hash, info.size));
                    }
                    if let AdminResponse::Error(why) = a {
                        self.trace(64, 0, 0);
                        if self.verbose {
                            eprintln!("t+{}ms admin refused: {why}", self.now - self.t0);
                        }
                        if let Some(i) = revoke {
                            // Not revoked: the store did not take it.
                            self.agents[i].revoked = false;
                            self.revoked_at.remove(&self.agents[i].id);
                        }
                    }
                }
            }
            Effect::EnrollReply { conn, response } => {
                let i = self.coords[k]
                    .node
                    .as_mut()
                    .and_then(|n| n.enrolling.remove(&conn));
                self.coord_do(k, |n, now| n.handle_closed(now, conn));
                let Some(i) = i else {
                    return;
                };
                match response {
                    EnrollResponse::Enrolled { agent_id, .. } => {
                        self.exercised.enrollments += 1;
                        self.agents[i].id = agent_id;
                        self.agents[i].enrolled = true;
                        match Parked::fresh() {
                            Ok(store) => self.start_agent(i, store),
                            Err(e) => self.fail(format!("agent {i}: {e}")),
                        }
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
                self.at(self.now, Ev::CoordCrash(k));
            }
        }
    }

    /// The coordinator closed a session with `code`: the agent hears it.
    pub(super) fn coord_closed(&mut self, c: u64, code: u32, reason: &str) {
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
    pub(super) fn admin(&mut self, request: AdminRequest) -> bool {
        // The operator asks any coordinator that is up.
        let Some(k) = self.any_coord() else {
            return false;
        };
        let conn = match self.coords[k].node.as_ref().map(|n| n.admin) {
            None => return false,
            Some(Some(c)) => c,
            Some(None) => {
                let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, 1));
                let Some(Ok(c)) = self.coord_do(k, |n, now| n.handle_incoming(now, ip)) else {
                    return false;
                };
                let cert = sha256(ADMIN_CERT);
                let route = self.coord_do(k, |n, now| {
                    n.handle_handshaken(now, c, Alpn::Admin, Some(cert))
                });
                if !matches!(route, Some(Route::Admin(_))) {
                    self.fail(format!("the operator's connection was refused: {route:?}"));
                    self.coord_call(k, |n, now| n.handle_closed(now, c));
                    return false;
                }
                if let Some(n) = self.coords[k].node.as_mut() {
                    n.admin = Some(c);
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
        self.coord_call(k, |n, now| n.handle_admin(now, conn, req, request, entropy));
        true
    }

    /// A store job completes: it commits now, or (now and then, while
    /// faults are on) fails as a write error does.
    pub(super) fn store_job(&mut self, k: usize, inc: u64, job: StoreJob) {
        if inc != self.coords[k].inc || self.coords[k].node.is_none() {
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
        self.coord_call(k, |n, now| n.handle_store_done(now, done));
    }

    /// An agent enrolls with the join token through coordinator `k`, by the
    /// node's rules.
    pub(super) fn enroll(&mut self, k: usize, i: usize) {
        if self.agents[i].enrolled {
            return;
        }
        let ip = agent_ip(i);
        let Some(Ok(conn)) = self.coord_do(k, |n, now| n.handle_incoming(now, ip)) else {
            self.at(self.now + 1_000, Ev::Enroll(i));
            return;
        };
        let route = self.coord_do(k, |n, now| {
            n.handle_handshaken(now, conn, Alpn::Enroll, None)
        });
        if route != Some(Route::Enroll) {
            self.coord_call(k, |n, now| n.handle_closed(now, conn));
            self.at(self.now + 1_000, Ev::Enroll(i));
            return;
        }
        if let Some(n) = self.coords[k].node.as_mut() {
            n.enrolling.insert(conn, i);
        }
        // The coordinator that enrolls it is the one it dials first.
        self.agents[i].dial = k;
        let request = EnrollRequest {
            token_secret: self.join_secret.to_vec(),
            csr_der: self.agents[i].cert.clone(),
            name: Some(format!("device-{i}")),
            labels: self.agents[i].labels.clone(),
            seal_key: Default::default(),
        };
        self.coord_call(k, |n, now| n.handle_enroll(now, conn, request));
    }

    /// The store's tasks (every page).
    pub(super) fn stored_tasks(&self) -> Vec<sundial_core::coord_store::StoredTask> {
        sundial_core::coord::admin::all_tasks(&self.store).unwrap_or_default()
    }

    /// The store's runs, by agent and key.
    pub(super) fn stored_runs(&self) -> std::collections::HashSet<(AgentId, RunKey)> {
        self.store
            .all_runs()
            .unwrap_or_default()
            .iter()
            .map(|r| (r.agent_id, r.key()))
            .collect()
    }

    /// When the store says agent `id` enrolled.
    pub(super) fn enrolled_at(&self, id: AgentId) -> Timestamp {
        self.store
            .agent(id)
            .ok()
            .flatten()
            .map_or(Timestamp::MIN, |a| a.enrolled_at)
    }

    /// Whether the store assigns `spec` to agent `i` now.
    pub(super) fn assigns(&self, spec: &TaskSpec, i: usize) -> bool {
        let a = &self.agents[i];
        a.enrolled && targets(&spec.target, a.id, &a.labels)
    }

    /// The action of a task the operator makes: a program that runs
    /// `runs_ms` and fails now and then if `flaky`; every fourth task,
    /// once the module is stored, the same as a function.
    fn sim_action(&mut self, runs_ms: u64, flaky: bool) -> Action {
        self.tasks_made += 1;
        let args = vec![
            runs_ms.to_string(),
            if flaky { "flaky" } else { "steady" }.into(),
        ];
        match self.module {
            Some((module, module_bytes)) if self.tasks_made % 4 == 0 => {
                self.exercised.function_tasks += 1;
                Action::Wasm(sundial_protocol::wasm::WasmSpec {
                    module,
                    module_bytes,
                    args,
                    env: Vec::new(),
                    sealed_env: Vec::new(),
                    fuel: None,
                    memory_bytes: None,
                })
            }
            _ => Action::Exec(ExecSpec {
                program: "/bin/sim".into(),
                args,
                env: Vec::new(),
                cwd: None,
                sealed_env: Vec::new(),
            }),
        }
    }

    /// The function module the simulated operator uploads: a WASI command
    /// that returns at once (the simulator decides how long a run takes).
    fn sim_module() -> Vec<u8> {
        wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
            .unwrap_or_default()
    }

    pub(super) fn operator(&mut self) {
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
        if self.module.is_none() {
            // Uploaded (again, until a coordinator says it is stored: the
            // store keeps one copy however often it comes).
            let bytes = Self::sim_module();
            self.admin(AdminRequest::ModuleUpload {
                hash: sundial_protocol::wasm::ModuleHash::of(&bytes),
                size: bytes.len() as u64,
                offset: 0,
                chunk: bytes,
            });
        }
        let roll = self.rng.below(100);
        if live.len() < TASKS_MAX && (roll < 55 || live.is_empty()) {
            // Now and then a task triggered by a live one (a time task or
            // a triggered one: chains), on its agents, on some outcomes.
            let upstreams: Vec<&sundial_core::coord_store::StoredTask> =
                live.iter().copied().filter(|t| !t.paused).collect();
            if !upstreams.is_empty() && self.rng.chance(0.25) {
                let up = upstreams[self.rng.below(upstreams.len() as u64) as usize];
                let on = [
                    OutcomeSet::SUCCEEDED,
                    OutcomeSet::ANY,
                    OutcomeSet::FAILED,
                    OutcomeSet::parse("failed,timed_out,skipped").unwrap_or(OutcomeSet::ANY),
                ][self.rng.below(4) as usize];
                let Ok(schedule) = Schedule::after(vec![Trigger {
                    upstream: up.spec.id,
                    on,
                }]) else {
                    return;
                };
                let runs_ms = [5u64, 50, 300][self.rng.below(3) as usize];
                let flaky = self.rng.chance(0.3);
                let draft = TaskDraft {
                    name: None,
                    target: up.spec.target.clone(),
                    schedule,
                    action: self.sim_action(runs_ms, flaky),
                    policies: Policies {
                        retry: RetryPolicy {
                            retries: if flaky { 1 } else { 0 },
                            backoff_initial: DurationMs(100),
                            backoff_max: DurationMs(1_000),
                        },
                        overlap: if self.rng.chance(0.5) {
                            sundial_protocol::policy::OverlapPolicy::Forbid
                        } else {
                            sundial_protocol::policy::OverlapPolicy::Allow
                        },
                        timeout: self.rng.chance(0.3).then_some(DurationMs(1_000)),
                        ..Policies::default()
                    },
                    anchor_at_creation: false,
                    placement: Default::default(),
                };
                self.exercised.triggered_tasks += 1;
                self.trace(43, up.spec.id.0, 0);
                self.admin(AdminRequest::TaskCreate(Box::new(draft)));
                return;
            }
            // Placement for two selector tasks in three, taken from a count
            // (no draw of the generator: seeds keep their other choices).
            let mut placement = None;
            let target = if self.rng.chance(0.3) {
                self.exercised.selector_tasks += 1;
                let n = self.exercised.selector_tasks;
                let lease = DurationMs([2_000, 5_000, 10_000][(n / 3 % 3) as usize]);
                placement = match n % 3 {
                    1 => Some(PlacementAsk::new(PlacementMode::One, lease)),
                    2 => Some(PlacementAsk::new(PlacementMode::Shard, lease)),
                    _ => None,
                };
                if placement.is_some() {
                    self.exercised.placed_tasks += 1;
                }
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
                action: self.sim_action(runs_ms, flaky),
                policies,
                // `every` counts from the coordinator's instant of creation.
                anchor_at_creation: true,
                placement: placement.into(),
            };
            self.trace(40, kind, 0);
            self.admin(AdminRequest::TaskCreate(Box::new(draft)));
        } else if !live.is_empty() {
            let t = live[self.rng.below(live.len() as u64) as usize];
            let id = t.spec.id;
            let request = match roll {
                55..=69 => {
                    self.exercised.updates += 1;
                    let mut action = t.spec.action.clone();
                    let args = match &mut action {
                        Action::Exec(e) => &mut e.args,
                        Action::Wasm(w) => &mut w.args,
                    };
                    if let Some(a) = args.first_mut() {
                        *a = "20".into();
                    }
                    action.set_sealed_env(Vec::new());
                    AdminRequest::TaskUpdate {
                        id,
                        patch: Box::new(TaskPatch {
                            action: Some(action),
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
                    let req = self.admin_reqs + 1;
                    self.pending_revokes.insert(req, i);
                    if self.admin(AdminRequest::AgentRevoke(agent)) {
                        self.exercised.revokes += 1;
                        self.agents[i].revoked = true;
                        self.revoked_at.insert(agent, self.now);
                        self.trace(42, agent.0, 0);
                        self.at(self.now + 2_000, Ev::RevokeCheck(i));
                    } else {
                        self.pending_revokes.remove(&req);
                    }
                    return;
                }
                _ => AdminRequest::TaskCancel(id),
            };
            self.trace(41, id.0, roll);
            self.admin(request);
        }
    }
}
