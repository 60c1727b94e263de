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
            let latest = tasks
                .iter()
                .filter(|t| self.assigns(&t.spec, i))
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
}
