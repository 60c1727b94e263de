//! The agent's store in memory: every write one atomic commit, as redb's
//! are; what the checks read of it (ledger, outbox) is kept beside.

use super::*;

#[derive(Debug, Default)]
pub(super) struct MemStore {
    pub(super) tasks: BTreeMap<TaskId, TaskSpec>,
    pub(super) states: HashMap<TaskId, Option<Timestamp>>,
    /// (next due, id) of every task with one.
    pub(super) due: BTreeSet<DueKey>,
    pub(super) started: BTreeMap<RunKey, Started>,
    pub(super) outbox: BTreeMap<u64, RunRecord>,
    pub(super) outbox_keys: HashMap<RunKey, u64>,
    pub(super) next_seq: u64,
    pub(super) last_revision: u64,
    pub(super) clock: ClockState,
    pub(super) retries: BTreeMap<RunKey, Timestamp>,
    /// Every record ever committed to the outbox (for the checks).
    pub(super) ledger: Vec<RunRecord>,
}

impl MemStore {
    pub(super) fn set_state(&mut self, id: TaskId, next: Option<Timestamp>) {
        if let Some(Some(old)) = self.states.insert(id, next) {
            self.due.remove(&(old, id));
        }
        if let Some(t) = next {
            self.due.insert((t, id));
        }
    }

    /// The tasks stored, by id.
    pub(super) fn task_ids(&self) -> Vec<TaskId> {
        self.tasks.keys().copied().collect()
    }

    pub(super) fn outbox_put(&mut self, r: &RunRecord) {
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
