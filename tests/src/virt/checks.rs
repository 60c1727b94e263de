//! What must hold: the checks run at the quiesce point and at the end.

use super::*;

impl World {
    /// After the settle time: every agent holds exactly the tasks the
    /// coordinator assigns it, at a revision covering every change for it.
    pub(super) fn check_converged(&mut self) {
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
            // (Placed tasks' plans move on all the time: their newest
            // window may be on its way.)
            let latest = tasks
                .iter()
                .filter(|t| self.assigns(&t.spec, i) && t.spec.placement.is_none())
                .map(|t| t.spec.revision)
                .max()
                .unwrap_or(0);
            let at = node.store().revision();
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
    pub(super) fn check_every_occurrence_decided(&mut self) {
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
                if spec.placement.is_some() {
                    // Not every member's: `check_placement`.
                    continue;
                }
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
    pub(super) fn check_on_time(&mut self) {
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
            let outbox = node.store().outbox_keys();
            for t in &tasks {
                let spec = &t.spec;
                if t.removed()
                    || spec.placement.is_some()
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
                        || outbox.contains(&key);
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
    pub(super) fn check_retries(&mut self) {
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

    pub(super) fn check_drained(&mut self) {
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
            let outbox = store.outbox_keys();
            let lost: Vec<RunKey> = store
                .ledger
                .iter()
                .map(RunRecord::key)
                .filter(|k| !runs.contains(&(agent.id, *k)) && !outbox.contains(k))
                .collect();
            if let Some(first) = lost.first() {
                found.push(format!(
                    "agent {i}: {} records lost, e.g. {first:?}",
                    lost.len()
                ));
            }
            if store.outbox_count() > 0 {
                found.push(format!(
                    "agent {i}: {} records not synced by the end",
                    store.outbox_count()
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

    /// Triggered tasks: every final end carried the decision of each
    /// triggered task stored after it, in its own transaction (checked as
    /// it was committed); every triggered run committed pending, due
    /// before its agent gave the task up, was run or recorded (a crash or
    /// a stop between the upstream's end and the start loses nothing);
    /// each ran at most once (the fired-twice check).
    pub(super) fn check_triggers(&mut self) {
        let mut found = Vec::new();
        let runs = self.stored_runs();
        for (i, agent) in self.agents.iter().enumerate() {
            if agent.revoked {
                continue;
            }
            let Some(store) = agent.node.as_ref().map(|n| n.store()) else {
                continue;
            };
            for f in store.triggers.faults.iter().take(3) {
                found.push(format!("agent {i}: {f}"));
            }
            let ledger: BTreeSet<RunKey> = store.ledger.iter().map(RunRecord::key).collect();
            for (key, due) in &store.triggers.pending {
                let Some(Some(until)) = agent.decided.get(&key.task_id) else {
                    continue;
                };
                if *until <= *due {
                    continue;
                }
                if !ledger.contains(key) && !runs.contains(&(agent.id, *key)) {
                    found.push(format!(
                        "agent {i}: the triggered run {key:?}, pending from {} (agent time), has no record though the agent decided up to {}",
                        due.as_millis() - self.t0,
                        until.as_millis() - self.t0
                    ));
                }
            }
        }
        for f in found.into_iter().take(5) {
            self.fail(f);
        }
    }

    /// At the quiesce point, long after the last fault: every occurrence of
    /// a live placed task due 5–20 s ago was planned ahead and run or
    /// recorded by the members its window gave it to.
    pub(super) fn check_placement_on_time(&mut self) {
        if self.placement_excused {
            return;
        }
        let q = self.now;
        let (from, to) = (
            Timestamp::from_millis_saturating(q - 20_000),
            Timestamp::from_millis_saturating(q - 5_000),
        );
        let runs = self.stored_runs();
        let mut found = Vec::new();
        for t in self.stored_tasks() {
            let spec = &t.spec;
            if t.removed() || spec.placement.is_none() || spec.created_at.as_millis() > q - 30_000 {
                continue;
            }
            let reached: Vec<AgentId> = (0..self.agents.len())
                .filter(|i| self.assigns(spec, *i) && !self.agents[*i].revoked)
                .map(|i| self.agents[i].id)
                .collect();
            if reached.is_empty() {
                // Nobody to run it: nothing is planned.
                continue;
            }
            for at in crate::oracle::occurrences(&spec.schedule, from, to) {
                let key = RunKey {
                    task_id: spec.id,
                    scheduled_at: at,
                    attempt: 1,
                };
                let Some(owners) = spec.placement.as_ref().and_then(|p| p.owners(spec.id, at))
                else {
                    let plan: Vec<(i64, i64, u32)> = spec
                        .placement
                        .iter()
                        .flat_map(|p| &p.windows)
                        .map(|w| {
                            (
                                w.from.as_millis() - self.t0,
                                w.until.as_millis() - self.t0,
                                w.count,
                            )
                        })
                        .collect();
                    found.push(format!(
                        "{key:?}, due {} ms before the quiesce point, has no lease window (created {}, reaching {reached:?}, windows {plan:?})",
                        q - at.as_millis(),
                        spec.created_at.as_millis() - self.t0,
                    ));
                    break;
                };
                for owner in owners {
                    let agent = self.agents.iter().find(|a| a.id == owner);
                    let done = runs.contains(&(owner, key))
                        || agent.is_some_and(|a| {
                            a.excused
                                || a.revoked
                                || a.excused_tasks.contains(&spec.id)
                                || a.fired.contains_key(&key)
                                || a.node
                                    .as_ref()
                                    .is_some_and(|n| n.store().outbox_keys().contains(&key))
                        });
                    if !done {
                        found.push(format!(
                            "{key:?} ({}), due {} ms before the quiesce point, was neither run nor recorded by {owner}, whose lease held it",
                            spec.placement.as_ref().map_or("", |p| p.mode.as_str()),
                            q - at.as_millis()
                        ));
                    }
                }
            }
        }
        for f in found.into_iter().take(5) {
            self.fail(f);
        }
    }

    /// At the end: no occurrence of a task placed `one` ran on two agents
    /// (nor twice on one: the fired-twice check), and every occurrence its
    /// owner decided is recorded by it.
    pub(super) fn check_placement(&mut self) {
        use sundial_protocol::placement::PlacementMode;
        let mut found = Vec::new();
        let runs = self.stored_runs();
        let tasks = self.stored_tasks();
        let mut ran: HashMap<RunKey, BTreeSet<AgentId>> = HashMap::new();
        for a in &self.agents {
            for key in a.fired.keys() {
                ran.entry(*key).or_default().insert(a.id);
            }
        }
        for r in self.store.all_runs().unwrap_or_default() {
            if r.fired_at.is_some() {
                ran.entry(r.key()).or_default().insert(r.agent_id);
            }
        }
        for t in &tasks {
            let Some(p) = &t.spec.placement else {
                continue;
            };
            if p.mode == PlacementMode::One {
                let twice = ran.iter().find(|(k, agents)| {
                    k.task_id == t.spec.id
                        && agents.len() > 1
                        && self
                            .agents
                            .iter()
                            .all(|a| !a.run_now.contains(&(k.task_id, k.scheduled_at)))
                });
                if let Some((k, agents)) = twice {
                    found.push(format!(
                        "{} placed one: occurrence {} ran on {} agents: {agents:?}",
                        t.spec.id,
                        k.scheduled_at.as_millis() - self.t0,
                        agents.len()
                    ));
                }
            }
            // Every occurrence in the windows kept, up to where its owner
            // had decided when the task was cancelled, has its owner's
            // record: run, or skipped (its lease ended while it was down).
            for w in &p.windows {
                let mut all = crate::oracle::occurrences(&t.spec.schedule, w.from, w.until);
                all.retain(|at| *at < w.until);
                for at in all {
                    for owner in p.owners(t.spec.id, at).into_iter().flatten() {
                        let Some(agent) = self.agents.iter().find(|a| a.id == owner) else {
                            continue;
                        };
                        if agent.revoked
                            || agent.excused
                            || agent.excused_tasks.contains(&t.spec.id)
                            || at < t.spec.created_at.max(self.enrolled_at(owner))
                        {
                            continue;
                        }
                        let Some(Some(until)) = agent.decided.get(&t.spec.id) else {
                            continue;
                        };
                        // It decides a placed task only as far as its plan.
                        let planned = agent.plan_until.get(&t.spec.id).copied().flatten();
                        if at >= *until || planned.is_none_or(|p| at >= p) {
                            continue;
                        }
                        let key = RunKey {
                            task_id: t.spec.id,
                            scheduled_at: at,
                            attempt: 1,
                        };
                        if !runs.contains(&(owner, key)) {
                            found.push(format!(
                                "{} placed {}: occurrence {} has no record from {owner}, whose window [{}, {}) gave it (decided up to {})",
                                t.spec.id,
                                p.mode,
                                at.as_millis() - self.t0,
                                w.from.as_millis() - self.t0,
                                w.until.as_millis() - self.t0,
                                until.as_millis() - self.t0,
                            ));
                        }
                    }
                }
            }
        }
        for f in found.into_iter().take(5) {
            self.fail(f);
        }
    }
}
