//! The agents: calls into their nodes, what their events and effects
//! mean for the world, and their ends of the links.

use super::*;

impl World {
    pub(super) fn node_call(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut AgentNode<SimStore>, Reading) -> StoreResult<()>,
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

    pub(super) fn drain_node(&mut self, i: usize) {
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

    pub(super) fn node_event(&mut self, i: usize, e: Event) {
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
                let plan = self.agents[i]
                    .node
                    .as_ref()
                    .and_then(|n| n.store().plan_until(task_id));
                self.agents[i].plan_until.insert(task_id, plan);
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
                let coord_up = self.agents[i]
                    .conn
                    .and_then(|c| self.conns.get(&c))
                    .and_then(|c| c.node_conn)
                    .is_some_and(|(k, _, _)| self.coords[k].up);
                let linked = self.agents[i].conn.is_some()
                    && coord_up
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

    pub(super) fn node_effect(&mut self, i: usize, e: NodeEffect) {
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
                // A triggered run takes its upstream's occurrence: it is
                // due when that ended, not at the instant (which a clock
                // ahead may have decided early). It must not fire before.
                let upstreams: Vec<TaskId> = self
                    .store
                    .task(key.task_id)
                    .ok()
                    .flatten()
                    .map(|t| {
                        t.spec
                            .schedule
                            .triggers()
                            .iter()
                            .map(|u| u.upstream)
                            .collect()
                    })
                    .unwrap_or_default();
                let manual = self.agents[i]
                    .run_now
                    .contains(&(key.task_id, key.scheduled_at));
                if !upstreams.is_empty() && !manual {
                    let ended = self.agents[i].node.as_ref().is_some_and(|n| {
                        n.store().ledger.iter().any(|r| {
                            upstreams.contains(&r.task_id) && r.scheduled_at == key.scheduled_at
                        })
                    });
                    if !ended {
                        self.fail(format!(
                            "agent {i} fired the triggered {key:?} before any upstream run of that occurrence ended"
                        ));
                    }
                } else if upstreams.is_empty()
                    && self.now < key.scheduled_at.as_millis() - tolerance
                {
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
                // A function's module is in the store before it can fire.
                let args = match &spec {
                    Action::Exec(e) => &e.args,
                    Action::Wasm(w) => {
                        self.exercised.function_runs += 1;
                        let held = self.agents[i]
                            .node
                            .as_ref()
                            .map(|n| n.store().module(w.module));
                        if !matches!(held, Some(Ok(Some(_)))) {
                            self.fail(format!(
                                "agent {i} fired the function {key:?} without its module {} in its store",
                                w.module.short()
                            ));
                        }
                        &w.args
                    }
                };
                // The program says how long it runs and how it ends.
                let ms: i64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(50);
                let fails = args.get(1).is_some_and(|a| a == "flaky") && self.rng.chance(0.3);
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
                let k = self.agents[i].dial % self.coords.len();
                let reachable = self.coords[k].up && !self.cut(i, UP) && !self.cut(i, DOWN);
                let t = if reachable {
                    self.now + 2 * self.delay()
                } else {
                    self.now + (timeout_ms as i64).min(CONNECT_TIMEOUT_MS)
                };
                self.at(t, Ev::ConnectDone(i, inc, k, reachable));
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

    pub(super) fn send(&mut self, c: u64, dir: usize, msg: Msg) {
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
    pub(super) fn close_agent_side(&mut self, c: u64, tell: bool) {
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
    pub(super) fn coord_side_gone(&mut self, c: u64) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        conn.coord_open = false;
        let Some((k, inc, nc)) = conn.node_conn.take() else {
            return;
        };
        if inc == self.coords[k].inc {
            if let Some(n) = self.coords[k].node.as_mut() {
                n.conns.remove(&nc);
            }
            self.coord_call(k, |n, now| n.handle_closed(now, nc));
        }
    }

    pub(super) fn close_coord_side(&mut self, c: u64, tell: bool, closed: Closed) {
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
                // A lost session: the next dial tries the next coordinator.
                self.agents[agent].dial += 1;
                self.node_call(agent, |n, r| n.handle_closed(r, closed));
            }
        }
        self.gc_conn(c);
    }

    pub(super) fn gc_conn(&mut self, c: u64) {
        if self
            .conns
            .get(&c)
            .is_some_and(|k| !k.agent_open && !k.coord_open)
        {
            self.conns.remove(&c);
        }
    }
}
