//! The node's store on redb (`RedbNode`), and the lazy writer that
//! deletes acknowledged records off the firing path.

use super::*;

/// Writes that may lag: deleting acknowledged records (a record deleted
/// late is at worst sent again, and the coordinator keeps the first) and
/// the last sync. They run on their own thread, so their fsyncs never
/// delay a firing.
pub(super) enum LazyWrite {
    Ack(Vec<RunKey>),
    LastSync(i64),
}

/// Bound of the lazy writes waiting; beyond it they are done in place.
pub(super) const LAZY_WRITES_MAX: usize = 1_024;

pub(super) type LazyWriter = (
    std::sync::mpsc::SyncSender<LazyWrite>,
    std::thread::JoinHandle<()>,
);

pub(super) fn lazy_writer(store: Arc<AgentStore>) -> Option<LazyWriter> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<LazyWrite>(LAZY_WRITES_MAX);
    let spawned = std::thread::Builder::new()
        .name("store-lazy".into())
        .spawn(move || {
            while let Ok(w) = rx.recv() {
                let r = match w {
                    LazyWrite::Ack(keys) => store.outbox_ack(&keys).map(drop),
                    LazyWrite::LastSync(ms) => store.put_meta(&[(meta::LAST_SYNC_MS, ms)]),
                };
                if let Err(e) = r {
                    // The records stay and are sent again; the firing path
                    // meets a broken disk on its own next write.
                    tracing::warn!(error = %e, "a lazy store write failed");
                }
            }
        });
    match spawned {
        Ok(handle) => Some((tx, handle)),
        Err(e) => {
            tracing::warn!(error = %e, "no thread for lazy store writes; doing them in place");
            None
        }
    }
}

/// The node's view of the redb store. Each method is one transaction; a
/// failure is kept (so the agent exits with it) and reported to the node.
/// The agent runs it over a file; the virtual simulator over redb's
/// in-memory backend ([`RedbNode::plain`]), so both run the same store code.
pub struct RedbNode {
    pub(super) store: Arc<AgentStore>,
    pub(super) lazy: Option<std::sync::mpsc::SyncSender<LazyWrite>>,
    pub(super) lazy_thread: Option<std::thread::JoinHandle<()>>,
    /// What the previous agent process left running, by run key.
    pub(super) leftovers: HashMap<(u64, i64, u32), String>,
    /// This boot's id (the kernel's), and its hash as the node knows it.
    pub(super) boot: Option<String>,
    pub(super) boot_hash: u64,
    pub(super) error: Mutex<Option<StoreError>>,
}

pub(super) fn boot_hash(boot: Option<&str>) -> u64 {
    // FNV-1a: stable across runs (std's hasher is seeded per process).
    boot.map_or(0, |b| {
        b.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
        })
    })
}

impl std::fmt::Debug for RedbNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbNode")
            .field("boot", &self.boot)
            .field("lazy", &self.lazy.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for RedbNode {
    /// Lets the lazy writes finish and the store close cleanly (a store
    /// still open in another thread at exit would need a repair).
    fn drop(&mut self) {
        self.lazy.take();
        if let Some(h) = self.lazy_thread.take() {
            let _ = h.join();
        }
    }
}

impl RedbNode {
    /// The store without what only a process has: no lazy writer (every
    /// write in place), nothing left running by a previous process. `boot`
    /// names the boot the node runs in (the clock offset and anchor are
    /// kept for it alone).
    pub fn plain(store: Arc<AgentStore>, boot: Option<String>) -> RedbNode {
        RedbNode {
            store,
            lazy: None,
            lazy_thread: None,
            leftovers: HashMap::new(),
            boot_hash: boot_hash(boot.as_deref()),
            boot,
            error: Mutex::new(None),
        }
    }

    /// The boot's hash, as [`NodeConfig::boot_id`](sundial_core::node::NodeConfig) wants it.
    pub fn boot_hash(&self) -> u64 {
        self.boot_hash
    }

    pub fn store(&self) -> &Arc<AgentStore> {
        &self.store
    }

    pub(super) fn keep<T>(&self, r: Result<T, StoreError>) -> StoreResult<T> {
        r.map_err(|e| {
            let fault = StoreFault(e.to_string());
            if let Ok(mut slot) = self.error.lock() {
                slot.get_or_insert(e);
            }
            fault
        })
    }

    pub(super) fn take_error(&self) -> Option<StoreError> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

impl NodeStore for RedbNode {
    fn due_tasks(
        &self,
        after: Option<DueKey>,
        until: Timestamp,
        max: usize,
    ) -> StoreResult<Vec<(TaskSpec, Timestamp)>> {
        self.keep(self.store.due_tasks(after, until, max))
    }
    fn tasks_by_id(&self, ids: &[TaskId]) -> StoreResult<Vec<Option<StoredTask>>> {
        self.keep(self.store.tasks_by_id(ids))
    }
    fn apply_changes(
        &mut self,
        upserts: &[TaskSpec],
        removed: &[TaskId],
        states: &[(TaskId, Option<Timestamp>)],
        revision: Option<u64>,
    ) -> StoreResult<()> {
        self.keep(self.store.apply_changes(upserts, removed, states, revision))
    }
    fn apply_step(&mut self, step: &Step) -> StoreResult<()> {
        self.keep(self.store.apply_step(&step_write(step)))
    }
    fn finish_run(&mut self, record: &RunRecord, then: &Step) -> StoreResult<()> {
        self.keep(self.store.finish_run_then(record, &step_write(then)))
    }
    fn triggered_tasks(&self) -> StoreResult<Vec<StoredTask>> {
        self.keep(self.store.triggered_tasks())
    }
    fn fanin_pending(&self) -> StoreResult<Vec<sundial_core::node::FanInState>> {
        self.keep(self.store.fanin_pending())
    }
    fn pending_retries(&self) -> StoreResult<Vec<(RunKey, Timestamp)>> {
        self.keep(self.store.pending_retries())
    }
    fn recover_interrupted(&mut self, agent: AgentId) -> StoreResult<Vec<RunRecord>> {
        let r = self.store.recover_interrupted(agent, &self.leftovers);
        self.keep(r)
    }
    fn outbox_after(
        &self,
        after: u64,
        runs_max: usize,
        bytes_max: usize,
    ) -> StoreResult<Vec<(u64, RunRecord)>> {
        self.keep(self.store.outbox_after(after, runs_max, bytes_max))
    }
    fn outbox_ack(&mut self, keys: &[RunKey]) -> StoreResult<usize> {
        if let Some(lazy) = &self.lazy {
            if lazy.try_send(LazyWrite::Ack(keys.to_vec())).is_ok() {
                return Ok(keys.len());
            }
        }
        self.keep(self.store.outbox_ack(keys))
    }
    fn outbox_len(&self) -> StoreResult<u64> {
        self.keep(self.store.outbox_len())
    }
    fn task_count(&self) -> StoreResult<u64> {
        self.keep(self.store.task_count())
    }
    fn size_bytes(&self) -> Option<u64> {
        self.store.size_bytes()
    }
    fn last_revision(&self) -> StoreResult<u64> {
        self.keep(self.store.get_meta::<u64>(meta::LAST_REVISION))
            .map(Option::unwrap_or_default)
    }
    fn set_last_revision(&mut self, revision: u64) -> StoreResult<()> {
        self.keep(self.store.put_meta(&[(meta::LAST_REVISION, revision)]))
    }
    fn clock_state(&self) -> StoreResult<ClockState> {
        let offset_ms = self
            .keep(self.store.get_meta::<i64>(meta::CLOCK_OFFSET_MS))?
            .unwrap_or(0);
        let offset_boot = self
            .keep(self.store.get_meta::<String>(meta::CLOCK_OFFSET_BOOT))?
            .map_or(u64::MAX, |b| boot_hash(Some(&b)));
        let last_known_good = self
            .keep(self.store.get_meta::<i64>(meta::LAST_KNOWN_GOOD_MS))?
            .and_then(|ms| Timestamp::from_millis(ms).ok());
        let anchor = self
            .keep(self.store.get_meta::<(String, i64, i64)>(meta::BOOT_ANCHOR))?
            .map(|(b, boot_ms, time_ms)| (boot_hash(Some(&b)), Anchor { boot_ms, time_ms }));
        Ok(ClockState {
            offset_ms,
            offset_boot,
            last_known_good,
            anchor,
        })
    }
    fn set_clock_state(&mut self, cs: &ClockState) -> StoreResult<()> {
        let mut ints = vec![(meta::CLOCK_OFFSET_MS, cs.offset_ms)];
        if let Some(g) = cs.last_known_good {
            ints.push((meta::LAST_KNOWN_GOOD_MS, g.as_millis()));
        }
        self.keep(self.store.put_meta(&ints))?;
        // After the offset: a crash between the two leaves an older boot's
        // id, and the offset is then not applied (safe).
        if let Some(boot) = self.boot.clone() {
            if cs.offset_boot == self.boot_hash {
                self.keep(
                    self.store
                        .put_meta(&[(meta::CLOCK_OFFSET_BOOT, boot.clone())]),
                )?;
            }
            if let Some((b, a)) = cs.anchor {
                if b == self.boot_hash {
                    self.keep(
                        self.store
                            .put_meta(&[(meta::BOOT_ANCHOR, (boot, a.boot_ms, a.time_ms))]),
                    )?;
                }
            }
        }
        Ok(())
    }
    fn set_clock_held(&mut self, held: bool) -> StoreResult<()> {
        self.keep(self.store.put_meta(&[(meta::CLOCK_HELD, held)]))
    }
    fn set_last_sync(&mut self, wall: Timestamp) -> StoreResult<()> {
        if let Some(lazy) = &self.lazy {
            if lazy.try_send(LazyWrite::LastSync(wall.as_millis())).is_ok() {
                return Ok(());
            }
        }
        self.keep(
            self.store
                .put_meta(&[(meta::LAST_SYNC_MS, wall.as_millis())]),
        )
    }
    fn set_revoked(&mut self) -> StoreResult<()> {
        self.keep(self.store.put_meta(&[(meta::REVOKED, true)]))
    }
    fn put_module(
        &mut self,
        hash: sundial_protocol::wasm::ModuleHash,
        bytes: &[u8],
    ) -> StoreResult<()> {
        self.keep(self.store.put_module(hash, bytes))
    }
    fn module(&self, hash: sundial_protocol::wasm::ModuleHash) -> StoreResult<Option<Vec<u8>>> {
        self.keep(self.store.module(hash))
    }
    fn module_hashes(&self, max: usize) -> StoreResult<Vec<sundial_protocol::wasm::ModuleHash>> {
        self.keep(self.store.modules(max).map(|(m, _)| m))
    }
}

/// The store's form of a node step.
fn step_write(step: &Step) -> StepWrite {
    StepWrite {
        states: step.states.clone(),
        started: step
            .started
            .iter()
            .map(|(k, s)| {
                (
                    *k,
                    StartedInfo {
                        fired_at: s.fired_at,
                        offline: s.offline,
                    },
                )
            })
            .collect(),
        records: step.records.clone(),
        retries: step.retries.clone(),
        fanin: step.fanin.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_core::clock::Reading;
    use sundial_core::node::{AgentNode, NodeConfig};
    use sundial_protocol::task::{Action, ExecSpec, Target};
    use sundial_protocol::{AgentId, Schedule, TaskId, TaskSpec, Timestamp};

    fn one_task(store: &AgentStore, id: u64, schedule: Schedule) {
        let at = Timestamp::from_millis_saturating(1_000_000);
        store
            .put_tasks(
                &[TaskSpec {
                    id: TaskId(id),
                    name: None,
                    target: Target::Agent(AgentId(1)),
                    schedule,
                    action: Action::Exec(ExecSpec {
                        program: "/bin/true".into(),
                        ..ExecSpec::default()
                    }),
                    policies: Default::default(),
                    revision: id,
                    created_at: at,
                    placement: None,
                }],
                Some(id),
            )
            .expect("put");
    }

    /// Wall clock 1,000,000 ms + `ms`, boot clock 5,000 ms + `ms`.
    fn r(ms: i64) -> Reading {
        Reading {
            wall_ms: 1_000_000 + ms,
            boot_ms: 5_000 + ms,
        }
    }

    fn config() -> NodeConfig {
        NodeConfig {
            agent_id: AgentId(1),
            agent_version: "test".into(),
            allow_exec: vec![],
            allow_env: vec![],
            runs_concurrent_max: 4,
            boot_id: 1,
            seed: 1,
            bugs: Default::default(),
            horizon: Default::default(),
            vouch_wait_ms: 0,
            coordinators: 1,
            seal_key: None,
            functions: Default::default(),
        }
    }

    fn spawns(node: &mut AgentNode<RedbNode>) -> Vec<RunKey> {
        let mut out = Vec::new();
        while let Some(e) = node.poll_effect() {
            if let sundial_core::node::NodeEffect::Spawn { key, .. } = e {
                out.push(key);
            }
        }
        out
    }

    #[test]
    fn starts_decided_ahead_are_committed_before_their_instant_and_handed_out_at_it() {
        let store = Arc::new(AgentStore::open_in_memory_volatile().expect("store"));
        let at = Timestamp::from_millis_saturating(1_000_500);
        one_task(&store, 1, Schedule::at(at));
        let mut node = AgentNode::start(RedbNode::plain(Arc::clone(&store), None), config(), r(0))
            .expect("node");
        node.set_start_lead(20);
        // The first wake dials (the session is down); then only the task
        // wakes the node: the lead before its instant.
        node.handle_wake(r(0)).expect("wake");
        assert!(spawns(&mut node).is_empty());
        assert_eq!(node.held_until(), None);
        // Driven as the shell does, from wake to wake: decided at 480 ms,
        // the lead before the instant, and not before.
        let mut t = 0;
        while node.held_until().is_none() {
            t = node.next_wake(r(t)) - r(0).boot_ms;
            assert!(t <= 480, "not decided by the lead before its instant");
            node.handle_wake(r(t)).expect("wake");
            assert!(spawns(&mut node).is_empty());
        }
        assert_eq!(t, 480, "decided the lead before its instant");
        assert_eq!(node.held_until(), Some(at));
        assert!(
            spawns(&mut node).is_empty(),
            "nothing starts before its instant"
        );
        let marks = store.started().expect("started");
        assert_eq!(marks.len(), 1, "the mark is committed ahead");
        assert_eq!(marks[0].0.scheduled_at, at);
        assert_eq!(marks[0].1.fired_at, at, "fired at its instant");
        // Woken again before the instant (a message, a timer): still held,
        // and the next wake is the instant itself, not sooner and again.
        node.handle_wake(r(490)).expect("wake");
        assert!(spawns(&mut node).is_empty());
        assert_eq!(node.next_wake(r(490)), r(500).boot_ms);
        node.handle_wake(r(499)).expect("wake");
        assert!(spawns(&mut node).is_empty(), "1 ms early is early");
        node.handle_wake(r(500)).expect("wake");
        assert_eq!(node.held_until(), None);
        let keys = spawns(&mut node);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].scheduled_at, at);
    }

    #[test]
    fn a_crash_between_the_commit_ahead_and_the_instant_reads_interrupted_and_fires_nothing_twice()
    {
        let store = Arc::new(AgentStore::open_in_memory_volatile().expect("store"));
        let at = Timestamp::from_millis_saturating(1_000_500);
        one_task(&store, 1, Schedule::at(at));
        let mut node = AgentNode::start(RedbNode::plain(Arc::clone(&store), None), config(), r(0))
            .expect("node");
        node.set_start_lead(20);
        node.handle_wake(r(490)).expect("wake");
        assert_eq!(node.held_until(), Some(at));
        assert!(spawns(&mut node).is_empty());
        // The agent dies here: the batch held in memory is gone.
        drop(node);
        let mut node =
            AgentNode::start(RedbNode::plain(Arc::clone(&store), None), config(), r(700))
                .expect("restart");
        node.set_start_lead(20);
        let records = store.outbox_batch(usize::MAX, usize::MAX).expect("outbox");
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].scheduled_at, at);
        assert_eq!(records[0].outcome, sundial_protocol::Outcome::Interrupted);
        assert!(store.started().expect("started").is_empty());
        for ms in [700, 800, 2_000] {
            node.handle_wake(r(ms)).expect("wake");
            assert!(spawns(&mut node).is_empty(), "fired again at +{ms} ms");
        }
    }

    #[test]
    fn a_kill_decided_while_a_batch_is_held_does_not_overtake_its_spawn() {
        let store = Arc::new(AgentStore::open_in_memory_volatile().expect("store"));
        let at = Timestamp::from_millis_saturating(1_000_500);
        one_task(&store, 1, Schedule::at(at));
        let mut node = AgentNode::start(RedbNode::plain(Arc::clone(&store), None), config(), r(0))
            .expect("node");
        node.set_start_lead(20);
        node.handle_wake(r(490)).expect("wake");
        node.kill_all_for_stop();
        let mut early = Vec::new();
        while let Some(e) = node.poll_effect() {
            early.push(e);
        }
        assert!(
            !early.iter().any(|e| matches!(
                e,
                sundial_core::node::NodeEffect::Spawn { .. }
                    | sundial_core::node::NodeEffect::Kill { .. }
            )),
            "{early:?}"
        );
        node.release_starts();
        let mut order = Vec::new();
        while let Some(e) = node.poll_effect() {
            match e {
                sundial_core::node::NodeEffect::Spawn { .. } => order.push("spawn"),
                sundial_core::node::NodeEffect::Kill { .. } => order.push("kill"),
                _ => {}
            }
        }
        assert_eq!(order, ["spawn", "kill"]);
    }

    #[test]
    fn a_stopped_or_revoked_node_does_not_wake_at_once_for_what_it_will_not_fire() {
        let store = Arc::new(AgentStore::open_in_memory_volatile().expect("store"));
        let at = Timestamp::from_millis_saturating(1_000_000);
        one_task(
            &store,
            1,
            Schedule::every(sundial_protocol::DurationMs(100), at).expect("schedule"),
        );
        let mut node =
            AgentNode::start(RedbNode::plain(store, None), config(), r(0)).expect("node");
        node.begin_stop();
        // Every 100 ms is due, and a stopped node fires none of it: the
        // driver must not be told to wake at once, again and again.
        let _ = node.handle_wake(r(1_000));
        while node.poll_effect().is_some() {}
        assert!(
            node.next_wake(r(1_000)) > r(1_000).boot_ms,
            "a stopped node would spin"
        );
    }
}
