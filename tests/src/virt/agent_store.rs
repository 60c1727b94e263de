//! The agent's store in the simulator: the agent's own redb store code
//! (`sundial_agent::store` behind the node adapter the agent runs,
//! `RedbNode`) over redb's in-memory backend. Beside it, what the checks
//! need and no store keeps: every record ever committed to the outbox.

use std::collections::HashSet;
use std::sync::Arc;

use sundial_agent::runtime::RedbNode;
use sundial_agent::store::AgentStore;

use super::*;

/// An agent's store with the ledger the checks read.
pub(super) struct SimStore {
    node: RedbNode,
    /// Every record committed to the outbox (for the checks).
    pub(super) ledger: Vec<RunRecord>,
    pub(super) triggers: TriggerLedger,
}

/// What the checks need of triggered tasks, kept beside the store: each
/// final end committed must carry the decision of every triggered task
/// stored after it (a run pending, a record, or fan-in progress) in the
/// same transaction; every triggered run committed pending.
#[derive(Debug, Default)]
pub(super) struct TriggerLedger {
    /// Ends committed without the decision of a triggered task.
    pub(super) faults: Vec<String>,
    /// Triggered runs committed as pending, with their time.
    pub(super) pending: Vec<(RunKey, Timestamp)>,
}

/// The store while its agent is down: the database stays (it is the disk),
/// the process-held adapter goes.
pub(super) struct Parked {
    store: Arc<AgentStore>,
    ledger: Vec<RunRecord>,
    triggers: TriggerLedger,
}

impl std::fmt::Debug for SimStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimStore")
            .field("ledger", &self.ledger.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("ledger", &self.ledger.len())
            .finish_non_exhaustive()
    }
}

impl Parked {
    /// A new device's empty store.
    pub(super) fn fresh() -> Result<Parked, String> {
        let store =
            AgentStore::open_in_memory_volatile().map_err(|e| format!("agent store: {e}"))?;
        Ok(Parked {
            store: Arc::new(store),
            ledger: Vec::new(),
            triggers: TriggerLedger::default(),
        })
    }

    /// The store as a process started in boot `boot_id` sees it.
    pub(super) fn open(self, boot_id: u64) -> SimStore {
        SimStore {
            node: RedbNode::plain(self.store, Some(format!("sim-boot-{boot_id}"))),
            ledger: self.ledger,
            triggers: self.triggers,
        }
    }
}

impl SimStore {
    pub(super) fn park(self) -> Parked {
        Parked {
            store: Arc::clone(self.node.store()),
            ledger: self.ledger,
            triggers: self.triggers,
        }
    }

    pub(super) fn boot_hash(&self) -> u64 {
        self.node.boot_hash()
    }

    fn store(&self) -> &AgentStore {
        self.node.store()
    }

    /// The tasks stored, by id.
    pub(super) fn task_ids(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self
            .store()
            .tasks()
            .map(|ts| ts.into_iter().map(|t| t.id).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Where the plan of a placed task, as stored here, ends.
    pub(super) fn plan_until(&self, id: TaskId) -> Option<Timestamp> {
        let stored = self.store().tasks_by_id(&[id]).ok()?;
        let (spec, _) = stored.into_iter().next()??;
        spec.placement?.planned_until()
    }

    pub(super) fn revision(&self) -> u64 {
        NodeStore::last_revision(&self.node).unwrap_or(0)
    }

    /// The keys of the records waiting in the outbox.
    pub(super) fn outbox_keys(&self) -> HashSet<RunKey> {
        let mut keys = HashSet::new();
        let mut after = 0;
        while let Ok(page) = self.store().outbox_after(after, 1_000, usize::MAX) {
            let Some((last, _)) = page.last() else {
                break;
            };
            after = *last;
            keys.extend(page.iter().map(|(_, r)| r.key()));
        }
        keys
    }

    pub(super) fn outbox_count(&self) -> u64 {
        self.store().outbox_len().unwrap_or(0)
    }

    /// Before a commit of `ends` with `then`: every end that is final (no
    /// retry of it in `then`) must carry, in `then`, the decision of each
    /// triggered task stored with it as an upstream.
    fn check_trigger_decisions(&mut self, ends: &[&RunRecord], then: &Step) {
        let stored = match self.node.triggered_tasks() {
            Ok(t) => t,
            Err(e) => {
                self.triggers
                    .faults
                    .push(format!("triggered tasks unreadable: {e:?}"));
                return;
            }
        };
        if stored.is_empty() {
            return;
        }
        for r in ends {
            let retried = then.retries.iter().any(|(k, _)| {
                k.task_id == r.task_id
                    && k.scheduled_at == r.scheduled_at
                    && k.attempt == r.attempt + 1
            });
            if retried {
                continue;
            }
            for (d, _) in &stored {
                if !d
                    .schedule
                    .triggers()
                    .iter()
                    .any(|t| t.upstream == r.task_id)
                {
                    continue;
                }
                let key = RunKey {
                    task_id: d.id,
                    scheduled_at: r.scheduled_at,
                    attempt: 1,
                };
                let decided = then.retries.iter().any(|(k, _)| *k == key)
                    || then.records.iter().any(|x| x.key() == key)
                    || then
                        .fanin
                        .iter()
                        .any(|(t, at, _)| *t == d.id && *at == r.scheduled_at);
                if !decided {
                    self.triggers.faults.push(format!(
                        "{}@{} ended {} for good, and {} (after it) was not decided in the same transaction",
                        r.task_id,
                        r.scheduled_at.as_millis(),
                        r.outcome,
                        d.id
                    ));
                }
            }
        }
    }

    fn note_pending(&mut self, then: &Step) {
        for (k, at) in &then.retries {
            let triggered = self
                .node
                .tasks_by_id(&[k.task_id])
                .ok()
                .and_then(|v| v.into_iter().next().flatten())
                .is_some_and(|(t, _)| !t.schedule.triggers().is_empty());
            if triggered && k.attempt == 1 {
                self.triggers.pending.push((*k, *at));
            }
        }
    }
}

impl NodeStore for SimStore {
    fn put_module(
        &mut self,
        hash: sundial_protocol::wasm::ModuleHash,
        bytes: &[u8],
    ) -> StoreResult<()> {
        self.node.put_module(hash, bytes)
    }
    fn module(&self, hash: sundial_protocol::wasm::ModuleHash) -> StoreResult<Option<Vec<u8>>> {
        self.node.module(hash)
    }
    fn module_hashes(&self, max: usize) -> StoreResult<Vec<sundial_protocol::wasm::ModuleHash>> {
        self.node.module_hashes(max)
    }
    fn due_tasks(
        &self,
        after: Option<DueKey>,
        until: Timestamp,
        max: usize,
    ) -> StoreResult<Vec<(TaskSpec, Timestamp)>> {
        self.node.due_tasks(after, until, max)
    }
    fn tasks_by_id(&self, ids: &[TaskId]) -> StoreResult<Vec<Option<StoredTask>>> {
        self.node.tasks_by_id(ids)
    }
    fn apply_changes(
        &mut self,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        states: &[(TaskId, Option<Timestamp>)],
        revision: Option<u64>,
    ) -> StoreResult<()> {
        self.node.apply_changes(upserts, removed, states, revision)
    }
    fn apply_step(&mut self, step: &Step) -> StoreResult<()> {
        let ends: Vec<&RunRecord> = step.records.iter().collect();
        self.check_trigger_decisions(&ends, step);
        self.node.apply_step(step)?;
        self.note_pending(step);
        self.ledger.extend(step.records.iter().cloned());
        Ok(())
    }
    fn finish_run(&mut self, record: &RunRecord, then: &Step) -> StoreResult<()> {
        let mut ends: Vec<&RunRecord> = vec![record];
        ends.extend(then.records.iter());
        self.check_trigger_decisions(&ends, then);
        self.node.finish_run(record, then)?;
        self.note_pending(then);
        self.ledger.push(record.clone());
        self.ledger.extend(then.records.iter().cloned());
        Ok(())
    }
    fn triggered_tasks(&self) -> StoreResult<Vec<StoredTask>> {
        self.node.triggered_tasks()
    }
    fn fanin_pending(&self) -> StoreResult<Vec<sundial_core::node::FanInState>> {
        self.node.fanin_pending()
    }
    fn pending_retries(&self) -> StoreResult<Vec<(RunKey, Timestamp)>> {
        self.node.pending_retries()
    }
    fn recover_interrupted(&mut self, agent: AgentId) -> StoreResult<Vec<RunRecord>> {
        let records = self.node.recover_interrupted(agent)?;
        self.ledger.extend(records.iter().cloned());
        Ok(records)
    }
    fn outbox_after(
        &self,
        after: u64,
        runs_max: usize,
        bytes_max: usize,
    ) -> StoreResult<Vec<(u64, RunRecord)>> {
        self.node.outbox_after(after, runs_max, bytes_max)
    }
    fn outbox_ack(&mut self, keys: &[RunKey]) -> StoreResult<usize> {
        self.node.outbox_ack(keys)
    }
    fn outbox_len(&self) -> StoreResult<u64> {
        self.node.outbox_len()
    }
    fn task_count(&self) -> StoreResult<u64> {
        self.node.task_count()
    }
    fn last_revision(&self) -> StoreResult<u64> {
        self.node.last_revision()
    }
    fn set_last_revision(&mut self, revision: u64) -> StoreResult<()> {
        self.node.set_last_revision(revision)
    }
    fn clock_state(&self) -> StoreResult<ClockState> {
        self.node.clock_state()
    }
    fn set_clock_state(&mut self, state: &ClockState) -> StoreResult<()> {
        self.node.set_clock_state(state)
    }
    fn set_clock_held(&mut self, held: bool) -> StoreResult<()> {
        self.node.set_clock_held(held)
    }
    fn set_last_sync(&mut self, wall: Timestamp) -> StoreResult<()> {
        self.node.set_last_sync(wall)
    }
    fn set_revoked(&mut self) -> StoreResult<()> {
        self.node.set_revoked()
    }
}
