//! Crash safety of the agent store.
//!
//! Guards against the bug every durable queue fears: a crash mid-write that
//! loses an acknowledged change, resurrects an acknowledged run, or leaves
//! half a transaction. A storage backend that crashes after N operations,
//! losing everything not yet synced, is placed at every point of a sequence
//! of writes; the reopened store must equal a model's last committed state
//! (or, for the write that was cut, the state just after it).

use sundial_agent::scheduler::first_occurrence;
use sundial_agent::store::{AgentStore, StartedInfo, StepWrite, StoreDump};
use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::{
    AgentId, Outcome, RunKey, RunRecord, Schedule, TaskId, TaskSpec, Timestamp,
};

use sundial_tests::crash_disk::CrashBackend;

fn at(ms: i64) -> Timestamp {
    Timestamp::from_millis(1_780_000_000_000 + ms).expect("in range")
}

fn task(id: u64, revision: u64) -> TaskSpec {
    TaskSpec {
        id: TaskId(id),
        name: Some(format!("task-{id}")),
        target: Target::Agent(AgentId(1)),
        schedule: Schedule::cron("*/5 * * * * *", "Europe/Berlin").expect("valid"),
        action: Action::Exec(ExecSpec {
            program: "/bin/true".into(),
            args: vec![format!("{revision}")],
            env: vec![],
            cwd: None,
            sealed_env: Vec::new(),
        }),
        policies: Policies::default(),
        revision,
        created_at: at(0),
        placement: None,
    }
}

fn key(task: u64, n: i64) -> RunKey {
    RunKey {
        task_id: TaskId(task),
        scheduled_at: at(n * 1000),
        attempt: 1,
    }
}

fn record(k: RunKey, outcome: Outcome) -> RunRecord {
    RunRecord {
        task_id: k.task_id,
        agent_id: AgentId(1),
        scheduled_at: k.scheduled_at,
        attempt: k.attempt,
        fired_at: Some(k.scheduled_at),
        finished_at: Some(k.scheduled_at),
        outcome,
        exit_code: Some(0),
        offline: true,
        detail: None,
        stdout_tail: b"out".to_vec(),
        stderr_tail: vec![],
    }
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a short list in a test
enum Op {
    PutTask(TaskSpec),
    RemoveTask(TaskId),
    Step(StepWrite),
    Finish(RunRecord, Option<(RunKey, Timestamp)>),
    Ack(Vec<RunKey>),
}

fn ops() -> Vec<Op> {
    let mut v = vec![Op::PutTask(task(1, 1)), Op::PutTask(task(2, 2))];
    for n in 0..6 {
        let k = key(1 + (n as u64 % 2), n);
        v.push(Op::Step(StepWrite {
            states: vec![(k.task_id, Some(at((n + 1) * 1000)))],
            started: vec![(
                k,
                StartedInfo {
                    fired_at: k.scheduled_at,
                    offline: true,
                },
            )],
            records: vec![record(key(2, 100 + n), Outcome::Skipped)],
            // The retry the previous round's failure left is started.
            retries: Vec::new(),
            fanin: Vec::new(),
        }));
        // Every other run fails and leaves a retry pending.
        let retry = (n % 2 == 0).then(|| {
            (
                RunKey {
                    attempt: k.attempt + 1,
                    ..k
                },
                at(n * 1000 + 500),
            )
        });
        let outcome = if retry.is_some() {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        };
        v.push(Op::Finish(record(k, outcome), retry));
        if n % 2 == 1 {
            v.push(Op::Ack(vec![key(1 + (n as u64 % 2), n), key(2, 100 + n)]));
        }
    }
    v.push(Op::PutTask(task(1, 3)));
    v.push(Op::RemoveTask(TaskId(2)));
    v
}

fn apply_model(m: &mut StoreDump, op: &Op) {
    match op {
        Op::PutTask(t) => {
            m.tasks.insert(t.id, t.clone());
            // A new task is due at its first occurrence.
            m.states
                .entry(t.id)
                .or_insert_with(|| first_occurrence(&t.schedule, t.created_at));
        }
        Op::RemoveTask(id) => {
            m.tasks.remove(id);
            m.states.remove(id);
            // Pending retries go with their task.
            m.retries.retain(|k, _| k.task_id != *id);
        }
        Op::Step(s) => {
            for (id, n) in &s.states {
                m.states.insert(*id, *n);
            }
            for (k, i) in &s.started {
                m.started.insert(*k, *i);
                m.retries.remove(k);
            }
            for r in &s.records {
                m.outbox.insert(r.key(), r.clone());
                m.retries.remove(&r.key());
            }
            for (k, t) in &s.retries {
                if m.tasks.contains_key(&k.task_id) {
                    m.retries.insert(*k, *t);
                }
            }
        }
        Op::Finish(r, retry) => {
            m.started.remove(&r.key());
            m.retries.remove(&r.key());
            m.outbox.insert(r.key(), r.clone());
            if let Some((k, t)) = retry {
                if m.tasks.contains_key(&k.task_id) {
                    m.retries.insert(*k, *t);
                }
            }
        }
        Op::Ack(keys) => {
            for k in keys {
                m.outbox.remove(k);
            }
        }
    }
}

fn apply_store(s: &AgentStore, op: &Op) -> Result<(), sundial_agent::store::StoreError> {
    match op {
        Op::PutTask(t) => s.put_task(t, Some(t.revision)),
        Op::RemoveTask(id) => s.remove_task(*id, None),
        Op::Step(w) => s.apply_step(w),
        Op::Finish(r, retry) => s.finish_run(r, *retry),
        Op::Ack(keys) => s.outbox_ack(keys).map(|_| ()),
    }
}

#[test]
fn reopened_store_equals_the_model_after_a_crash_at_every_point() {
    let ops = ops();
    // A clean run counts the backend operations of the whole sequence.
    let clean = CrashBackend::new(Vec::new(), None);
    let store = AgentStore::open_with_backend(clean.clone()).expect("open clean");
    let mut model = StoreDump::default();
    for op in &ops {
        apply_store(&store, op).expect("clean run");
        apply_model(&mut model, op);
    }
    assert_eq!(store.dump().expect("dump"), model);
    drop(store);
    let total = clean.ops_done();
    assert!(total > 20, "expected many backend operations, got {total}");

    let mut crashes_mid_op = 0;
    for crash_at in 0..total {
        let disk = CrashBackend::new(Vec::new(), Some(crash_at));
        let mut model = StoreDump::default();
        let mut cut: Option<StoreDump> = None;
        match AgentStore::open_with_backend(disk.clone()) {
            Ok(store) => {
                for op in &ops {
                    let before = model.clone();
                    match apply_store(&store, op) {
                        Ok(()) => apply_model(&mut model, op),
                        Err(_) => {
                            let mut after = before;
                            apply_model(&mut after, op);
                            cut = Some(after);
                            crashes_mid_op += 1;
                            break;
                        }
                    }
                }
                drop(store);
            }
            // Crashed while creating: `AgentStore::open` creates under a
            // temporary name and renames, so on a real disk there is no store yet.
            Err(_) => continue,
        }
        let reopened = AgentStore::open_with_backend(CrashBackend::new(disk.durable_image(), None))
            .unwrap_or_else(|e| panic!("crash at op {crash_at}: store does not reopen: {e}"));
        let got = reopened
            .dump()
            .unwrap_or_else(|e| panic!("crash at op {crash_at}: {e}"));
        assert!(
            got == model || cut.as_ref() == Some(&got),
            "crash at backend op {crash_at}: reopened store matches neither the last committed state nor the cut write\n got: {got:?}\nmodel: {model:?}"
        );
        // And it keeps working.
        reopened
            .put_task(&task(9, 99), None)
            .expect("writable after recovery");
    }
    assert!(
        crashes_mid_op > 10,
        "the crash points should hit the sequence, hit {crashes_mid_op}"
    );
}

#[test]
fn interrupted_runs_become_records_once() {
    let store = AgentStore::open_with_backend(CrashBackend::new(Vec::new(), None)).expect("open");
    let k = key(1, 1);
    store
        .apply_step(&StepWrite {
            started: vec![(
                k,
                StartedInfo {
                    fired_at: at(1500),
                    offline: false,
                },
            )],
            ..StepWrite::default()
        })
        .expect("step");
    let recs = store
        .recover_interrupted(AgentId(4), &Default::default())
        .expect("recover");
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].outcome, Outcome::Interrupted);
    assert_eq!(recs[0].fired_at, Some(at(1500)));
    // When it really ended is unknown: no invented finish time.
    assert_eq!(recs[0].finished_at, None);
    assert!(store.started().expect("read").is_empty());
    assert!(store
        .recover_interrupted(AgentId(4), &Default::default())
        .expect("again")
        .is_empty());
    assert_eq!(store.outbox_len().expect("len"), 1);
}

#[test]
fn outbox_is_idempotent_by_run_key_and_acks_twice_harmlessly() {
    let store = AgentStore::open_with_backend(CrashBackend::new(Vec::new(), None)).expect("open");
    let k = key(1, 1);
    store
        .finish_run(&record(k, Outcome::Failed), None)
        .expect("first");
    store
        .finish_run(&record(k, Outcome::Succeeded), None)
        .expect("second");
    let batch = store.outbox_batch(100, usize::MAX).expect("batch");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].outcome, Outcome::Succeeded);
    assert_eq!(store.outbox_ack(&[k]).expect("ack"), 1);
    assert_eq!(store.outbox_ack(&[k]).expect("ack again"), 0);
    assert_eq!(store.outbox_len().expect("len"), 0);
}

#[test]
fn a_corrupt_file_is_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.redb");
    std::fs::write(&path, vec![0xA5; 64 * 1024]).expect("write garbage");
    let err = AgentStore::open(&path).expect_err("garbage is not a database");
    assert!(err.to_string().contains("agent store"), "{err}");
    // The file is left as it was for inspection.
    assert_eq!(std::fs::read(&path).expect("read").len(), 64 * 1024);
}

#[test]
fn a_record_of_unknown_version_is_reported_with_its_table_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.redb");
    {
        let store = AgentStore::open(&path).expect("open");
        store.put_task(&task(1, 1), None).expect("put");
    }
    {
        let db = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .create(&path)
            .expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn
                .open_table(redb::TableDefinition::<u64, &[u8]>::new("tasks"))
                .expect("table");
            t.insert(7, [42u8, 1, 2, 3].as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let store = AgentStore::open(&path).expect("open");
    let err = store.tasks().expect_err("bad record");
    let text = err.to_string();
    assert!(
        text.contains("`tasks`") && text.contains("key 7") && text.contains("version 42"),
        "{text}"
    );
}

#[test]
fn a_store_from_before_the_due_index_is_indexed_when_opened() {
    use redb::{ReadableDatabase, TableDefinition};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.redb");
    let every_minute = |id: u64| TaskSpec {
        schedule: Schedule::every(sundial_protocol::DurationMs(60_000), at(id as i64 * 1_000))
            .expect("schedule"),
        ..task(id, id)
    };
    {
        let store = AgentStore::open(&path).expect("open");
        store
            .put_tasks(
                &[every_minute(1), every_minute(2), every_minute(3)],
                Some(3),
            )
            .expect("put");
        // Task 2 has fired: its state moved on.
        store
            .apply_step(&StepWrite {
                states: vec![(TaskId(2), Some(at(62_000)))],
                ..StepWrite::default()
            })
            .expect("step");
    }
    // Made old: no index, no marker, and task 3 never got a state (as an
    // older agent could leave it).
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("txn");
        txn.delete_table(TableDefinition::<(i64, u64), ()>::new("due"))
            .expect("drop index");
        {
            let mut meta = txn
                .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
                .expect("meta");
            meta.remove("due_index").expect("unmark");
            let mut state = txn
                .open_table(TableDefinition::<u64, &[u8]>::new("task_state"))
                .expect("state");
            state.remove(3u64).expect("forget");
        }
        txn.commit().expect("commit");
        let r = db.begin_read().expect("read");
        assert!(r
            .open_table(TableDefinition::<(i64, u64), ()>::new("due"))
            .is_err());
    }
    let store = AgentStore::open(&path).expect("reopen builds the index");
    let due: Vec<(TaskId, Timestamp)> = store
        .due_tasks(None, at(10_000_000), 100)
        .expect("due")
        .into_iter()
        .map(|(t, d)| (t.id, d))
        .collect();
    assert_eq!(
        due,
        vec![
            (TaskId(1), at(1_000)),
            (TaskId(3), at(3_000)),
            (TaskId(2), at(62_000)),
        ]
    );
    // The dump checks the index against every state.
    store.dump().expect("consistent");
    // And it pages in (due, id) order from a cursor.
    let next = store
        .due_tasks(Some((at(1_000), TaskId(1))), at(10_000_000), 1)
        .expect("page");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0.id, TaskId(3));
}

#[test]
fn a_due_entry_naming_no_task_is_skipped_and_the_rest_still_load() {
    use redb::TableDefinition;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.redb");
    {
        let store = AgentStore::open(&path).expect("open");
        store.put_tasks(&[task(1, 1)], Some(1)).expect("put");
    }
    {
        let db = redb::Database::create(&path).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut due = txn
                .open_table(TableDefinition::<(i64, u64), ()>::new("due"))
                .expect("due");
            due.insert((at(0).as_millis(), 99u64), ())
                .expect("dangling");
        }
        txn.commit().expect("commit");
    }
    let store = AgentStore::open(&path).expect("reopen");
    let due = store.due_tasks(None, at(60_000), 10).expect("due");
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].0.id, TaskId(1));
}

#[test]
fn a_due_index_that_disagrees_with_the_task_states_is_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.redb");
    {
        let store = AgentStore::open(&path).expect("open");
        for i in 1..=3 {
            store.put_task(&task(i, i), Some(i)).expect("put");
        }
    }
    // Damage the derived index behind the store's back: a stale entry at a
    // time that is no occurrence, one for no task, and a task's entry gone.
    let due_def: redb::TableDefinition<(i64, u64), ()> = redb::TableDefinition::new("due");
    let state_before = {
        let store = AgentStore::open(&path).expect("open");
        store.task_states().expect("states")
    };
    {
        let db = redb::Database::create(&path).expect("redb");
        let txn = db.begin_write().expect("txn");
        {
            let mut due = txn.open_table(due_def).expect("due");
            let t1 = state_before[&TaskId(1)].expect("due").as_millis();
            due.remove((t1, 1)).expect("remove");
            due.insert((12_345, 2), ()).expect("stale");
            due.insert((777, 99), ()).expect("no such task");
        }
        txn.commit().expect("commit");
    }
    let store = AgentStore::open(&path).expect("open");
    assert_eq!(store.check_due_index().expect("check"), (2, 1));
    // Consistent again: a second look finds nothing, and the dump agrees.
    assert_eq!(store.check_due_index().expect("check"), (0, 0));
    let d = store.dump().expect("dump is consistent");
    assert_eq!(d.states, state_before.into_iter().collect());
}

#[test]
fn a_triggered_run_started_in_the_step_that_made_it_pending_is_not_left_pending() {
    // The scheduler may decide a triggered run and start it in one step (it
    // is due at once): the step's start clears what the same step stores.
    let store = AgentStore::open_with_backend(CrashBackend::new(Vec::new(), None)).expect("open");
    store.put_task(&task(1, 1), None).expect("task");
    let k = key(1, 1);
    let step = StepWrite {
        retries: vec![(k, at(1000))],
        started: vec![(
            k,
            StartedInfo {
                fired_at: at(1000),
                offline: false,
            },
        )],
        fanin: vec![(TaskId(1), at(1000), vec![(TaskId(7), Outcome::Failed)])],
        ..StepWrite::default()
    };
    store.apply_step(&step).expect("step");
    assert!(store.pending_retries().expect("read").is_empty());
    assert_eq!(
        store.fanin_pending().expect("read"),
        vec![(TaskId(1), at(1000), vec![(TaskId(7), Outcome::Failed)])]
    );
    // A recorded skip of the same step clears it too; an empty fan-in list
    // forgets the occurrence.
    let k2 = key(1, 2);
    store
        .apply_step(&StepWrite {
            retries: vec![(k2, at(2000))],
            records: vec![record(k2, Outcome::Skipped)],
            fanin: vec![(TaskId(1), at(1000), Vec::new())],
            ..StepWrite::default()
        })
        .expect("step");
    assert!(store.pending_retries().expect("read").is_empty());
    assert!(store.fanin_pending().expect("read").is_empty());
}

#[test]
fn a_plain_store_is_encrypted_in_place_with_nothing_lost_and_a_wrong_key_refused() {
    use std::sync::Arc;
    use sundial_net::at_rest::{Keyring, StoreCipher};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.redb");
    let key_file = dir.path().join("store.key");
    {
        // A store as written before encryption.
        let s = AgentStore::open(&path).expect("open");
        let tasks: Vec<TaskSpec> = (1..=25).map(|i| task(i, 1)).collect();
        s.put_tasks(&tasks, None).expect("tasks");
        let records: Vec<RunRecord> = (0..30)
            .map(|n| record(key(1 + (n % 25) as u64, n), Outcome::Succeeded))
            .collect();
        s.apply_step(&StepWrite {
            records,
            ..StepWrite::default()
        })
        .expect("records");
    }
    let before = AgentStore::open(&path).expect("open").dump().expect("dump");
    let ring = Keyring::generate().expect("ring");
    let cipher = Arc::new(StoreCipher::new(ring.clone()));
    {
        let mut s = AgentStore::open(&path).expect("open");
        assert_eq!(
            s.encrypt_with(cipher.clone(), &key_file).expect("encrypts"),
            55
        );
        assert_eq!(s.dump().expect("dump"), before, "nothing lost or changed");
        // Encrypted once: a second start moves nothing.
        assert_eq!(s.encrypt_with(cipher.clone(), &key_file).expect("again"), 0);
        assert_eq!(s.key_ids().expect("ids"), vec![1]);
    }
    // Without the key, the records no longer read; with another, refused.
    let plain = AgentStore::open(&path).expect("open");
    let e = plain.tasks().expect_err("encrypted").to_string();
    assert!(e.contains("encrypted"), "{e}");
    drop(plain);
    let mut s = AgentStore::open(&path).expect("open");
    let other = Arc::new(StoreCipher::new(Keyring::generate().expect("ring")));
    let e = s
        .encrypt_with(other, &key_file)
        .expect_err("wrong key")
        .to_string();
    assert!(e.contains("not the key this store was written with"), "{e}");
    drop(s);
    // Rotation: key 2 current, key 1's records still read.
    let mut rotated = ring;
    rotated.add(false).expect("add");
    let mut s = AgentStore::open(&path).expect("open");
    s.encrypt_with(Arc::new(StoreCipher::new(rotated)), &key_file)
        .expect("rotated ring");
    s.put_tasks(&[task(99, 1)], None)
        .expect("a task under key 2");
    assert_eq!(s.key_ids().expect("ids"), vec![1, 2]);
    assert_eq!(s.dump().expect("dump").tasks.len(), 26);
}
