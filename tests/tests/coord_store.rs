//! The coordinator's store on redb: the `CoordStore` conformance suite (the
//! same bodies any other implementation runs), and crash safety — a disk
//! that fails at every write of a sequence of operations in turn, after
//! which the reopened store equals the last committed state.

use sundial_coordinator::store::{
    AgentSeen, CoordStore, CoordinatorStore, Enrollment, JoinToken, Page, RunQuery,
};
use sundial_core::coord_store::conformance;
use sundial_protocol::task::Target;
use sundial_protocol::{AgentId, Outcome, Timestamp};
use sundial_tests::crash_disk::CrashBackend;

#[test]
fn the_redb_store_passes_the_conformance_suite() {
    for (name, body) in conformance::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CoordinatorStore::open(&dir.path().join("coordinator.redb")).expect("opens");
        eprintln!("conformance: {name}");
        body(&store);
    }
}

#[test]
fn the_redb_store_encrypted_at_rest_passes_the_conformance_suite() {
    // A resend's bytes differ from the stored record's (a new nonce each
    // time): the first record must still win, compared in plain.
    for (name, body) in conformance::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store =
            CoordinatorStore::open(&dir.path().join("coordinator.redb")).expect("opens");
        sundial_coordinator::store_key::encrypt(&mut store, &dir.path().join("store.key"))
            .expect("encrypts")
            .expect("a cipher");
        eprintln!("conformance, encrypted: {name}");
        body(&store);
    }
}

#[test]
fn the_conformance_suite_holds_across_a_reopen() {
    // What one store wrote, another process reads: run each body, reopen,
    // and compare what the two see.
    for (name, body) in conformance::ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("coordinator.redb");
        let before = {
            let store = CoordinatorStore::open(&path).expect("opens");
            body(&store);
            dump(&store)
        };
        let store = CoordinatorStore::open(&path).expect("reopens");
        assert_eq!(dump(&store), before, "{name}: the reopened store differs");
    }
}

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis_saturating(1_800_000_000_000 + ms)
}

/// Everything the trait can read, as text.
fn dump(s: &dyn CoordStore) -> String {
    let mut out = format!("revision {:?}\n", s.revision());
    out += &format!("settings {:?}\n", s.setting("server_name"));
    out += &format!("certs {:?}\n", s.known_certs(None, 10_000));
    out += &format!("tokens {:?}\n", s.tokens(None, 10_000));
    out += &format!("agents {:?}\n", s.agents(None, 10_000));
    out += &format!("tasks {:?}\n", s.tasks(None, 10_000));
    out += &format!("runs {:?}\n", s.run_count());
    let page = s.runs(&RunQuery {
        task: None,
        agent: None,
        since: None,
        limit: 10_000,
        page: Page::Latest,
        forward_from_since: false,
    });
    out += &format!("run page {:?}\n", page.map(|p| (p.runs, p.more)));
    out
}

type Op = Box<dyn Fn(&dyn CoordStore) -> Result<(), String>>;

/// A day of a coordinator: init, tokens, enrollments, tasks changed every
/// way, runs stored (one twice), a revocation, a restore catch-up, a purge.
fn ops() -> Vec<Op> {
    let e = |e: sundial_coordinator::store::StoreError| e.to_string();
    let mut v: Vec<Op> = Vec::new();
    v.push(Box::new(move |s| {
        s.create_admin(&sundial_tests::test_owner("owner", [0xad; 32]), None)
            .map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.put_setting("server_name", "coord.example").map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.put_token(
            &JoinToken {
                secret_sha256: [7; 32],
                expires_at: t(3_600_000),
                uses_left: 3,
                labels: vec![("site".into(), "north".into())],
            },
            None,
        )
        .map_err(e)
    }));
    for n in 0..2u8 {
        v.push(Box::new(move |s| {
            let id = s.reserve_agent_id().map_err(e)?;
            let enrolled = s
                .enroll(&Enrollment {
                    token_sha256: [7; 32],
                    agent: id,
                    name: Some(format!("till-{n}")),
                    labels: vec![("role".into(), "till".into())],
                    cert_sha256: [n + 1; 32],
                    now: t(0),
                })
                .map_err(e)?;
            enrolled.map(|_| ()).map_err(|r| r.to_string())
        }));
    }
    for i in 0..3 {
        v.push(Box::new(move |s| {
            let target = if i == 2 {
                Target::Selector(vec![("site".into(), "north".into())])
            } else {
                Target::Agent(AgentId(1))
            };
            s.create_task(
                conformance::draft(Some(&format!("task-{i}")), target),
                t(i),
                None,
            )
            .map(|_| ())
            .map_err(e)
        }));
    }
    v.push(Box::new(move |s| {
        let mut task = s
            .task(sundial_protocol::TaskId(1))
            .map_err(e)?
            .ok_or("no task 1")?;
        let read = task.spec.revision;
        task.spec.name = Some("renamed".into());
        s.update_task(&task.spec, read, None).map(|_| ()).map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.set_paused(sundial_protocol::TaskId(2), true, t(10), None)
            .map(|_| ())
            .map_err(e)
    }));
    v.push(Box::new(move |s| {
        let runs: Vec<_> = (0..20)
            .map(|k| conformance::run(1, 1, k * 1_000, Outcome::Succeeded))
            .collect();
        s.put_runs(&runs).map(|_| ()).map_err(e)
    }));
    v.push(Box::new(move |s| {
        // A resend of a stored batch plus one new record.
        let mut runs: Vec<_> = (15..20)
            .map(|k| conformance::run(1, 1, k * 1_000, Outcome::Succeeded))
            .collect();
        runs.push(conformance::run(3, 2, 500, Outcome::Failed));
        s.put_runs(&runs).map(|_| ()).map_err(e)
    }));
    // An agent's contact: committed without a flush (see `CONTACT_OP`).
    v.push(Box::new(move |s| {
        s.agent_seen(
            AgentId(2),
            AgentSeen {
                at: t(50),
                clock: Some((3, 1)),
                session: None,
            },
        )
        .map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.revoke_agent(AgentId(2), None).map(|_| ()).map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.cancel_task(sundial_protocol::TaskId(3), None)
            .map(|_| ())
            .map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.catch_up_restored(12).map(|_| ()).map_err(e)
    }));
    v.push(Box::new(move |s| {
        s.purge_runs_before(t(8_000), 5).map(|_| ()).map_err(e)
    }));
    v.push(Box::new(move |s| s.delete_token([7; 32], None).map_err(e)));
    v
}

/// Where [`ops`] records an agent's contact: the one operation the store
/// commits without a flush to disk, so that a crash before the next
/// flushed commit loses it, and only it.
const CONTACT_OP: usize = 12;

#[test]
fn a_crash_at_any_write_leaves_the_last_committed_state() {
    let ops = ops();
    // The model: the same operations on a disk that never fails, and what
    // the store holds after each.
    // Every run starts from a created, empty store.
    let empty = {
        let disk = CrashBackend::new(Vec::new(), None);
        drop(CoordinatorStore::open_with_backend(disk.clone()).expect("opens"));
        disk.durable_image()
    };
    let disk = CrashBackend::new(empty.clone(), None);
    let store = CoordinatorStore::open_with_backend(disk.clone()).expect("opens");
    let opened_ops = disk.ops_done();
    let mut states = vec![dump(&store)];
    for (i, op) in ops.iter().enumerate() {
        op(&store).unwrap_or_else(|why| panic!("operation {i} failed without a crash: {why}"));
        states.push(dump(&store));
    }
    let total_ops = disk.ops_done() - opened_ops;
    drop(store);
    let seen = "last_seen: Some(Timestamp(1800000000050))";
    assert!(
        !states[CONTACT_OP].contains(seen) && states[CONTACT_OP + 1].contains(seen),
        "operation {CONTACT_OP} is the contact"
    );
    assert!(
        total_ops > 20,
        "the sequence writes ({total_ops} disk operations)"
    );

    let mut crashes = 0;
    for n in 0..total_ops + opened_ops {
        let disk = CrashBackend::new(empty.clone(), Some(n));
        // Operations that completed before the crash.
        let mut done = 0usize;
        if let Ok(store) = CoordinatorStore::open_with_backend(disk.clone()) {
            for op in &ops {
                if op(&store).is_err() {
                    break;
                }
                done += 1;
            }
            // A failed write stops the coordinator: it writes nothing more.
            drop(store);
        }
        crashes += 1;
        let image = disk.durable_image();
        let reopened = CoordinatorStore::open_with_backend(CrashBackend::new(image, None))
            .unwrap_or_else(|e| panic!("crash at {n}: the store does not reopen: {e}"));
        let got = dump(&reopened);
        // Contacts just before the crash may be gone with it: the state
        // is then the one before them.
        let earliest = if done == CONTACT_OP + 1 {
            CONTACT_OP
        } else {
            done
        };
        let ok = states[earliest..=done].contains(&got)
            || states.get(done + 1).is_some_and(|s| *s == got);
        assert!(
            ok,
            "crash at disk operation {n} after {done} operations: the reopened store is neither the state after operation {done} nor the one after the next\n got: {got}\nwant: {}",
            states[done]
        );
    }
    assert_eq!(crashes, total_ops + opened_ops);
    eprintln!("{crashes} crash points checked");
}

#[test]
fn a_plain_coordinator_store_is_encrypted_at_start_with_nothing_lost() {
    use sundial_coordinator::store::{CoordStore, CoordinatorStore};
    use sundial_core::coord_store::conformance::{draft, run};
    use sundial_protocol::task::Target;
    use sundial_protocol::{AgentId, Outcome, Timestamp};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("coordinator.redb");
    let key_file = dir.path().join("store.key");
    {
        // A store as written before encryption.
        let s = CoordinatorStore::open(&path).expect("open");
        for i in 0..20 {
            s.create_task(
                draft(Some(&format!("task-{i}")), Target::Agent(AgentId(1))),
                Timestamp::from_millis_saturating(1_800_000_000_000),
                None,
            )
            .expect("task");
        }
        let runs: Vec<_> = (0..50)
            .map(|i| run(1 + i % 20, 1, i as i64 * 1000, Outcome::Succeeded))
            .collect();
        s.put_runs(&runs).expect("runs");
    }
    let (tasks, runs) = {
        let s = CoordinatorStore::open(&path).expect("open");
        (
            s.tasks(None, 1000).expect("tasks"),
            s.all_runs().expect("runs"),
        )
    };
    let mut s = CoordinatorStore::open(&path).expect("open");
    sundial_coordinator::store_key::encrypt(&mut s, &key_file)
        .expect("encrypts")
        .expect("a cipher");
    assert_eq!(s.tasks(None, 1000).expect("tasks"), tasks);
    assert_eq!(s.all_runs().expect("runs"), runs);
    drop(s);
    // Without its key the records no longer read (opened with the ring
    // beside it, they do: as above).
    assert!(key_file.exists());
    std::fs::remove_file(&key_file).expect("key moved away");
    let plain = CoordinatorStore::open(&path).expect("open");
    assert!(plain.tasks(None, 1000).is_err());
    assert!(plain.all_runs().is_err());
    drop(plain);
    // `off` is refused for a store now encrypted.
    let mut s = CoordinatorStore::open(&path).expect("open");
    let e = sundial_coordinator::store_key::encrypt(&mut s, std::path::Path::new("off"))
        .expect_err("off on an encrypted store");
    assert!(e.contains("cannot be served plain"), "{e}");
}
