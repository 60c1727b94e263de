//! The conformance suite every [`CoordStore`] passes: test bodies that take
//! any store, fresh and empty. An implementation's tests run [`ALL`], each
//! on a new store:
//!
//! ```ignore
//! for (name, body) in sundial_core::coord_store::conformance::ALL {
//!     let store = fresh_store();
//!     body(&store); // panics with the name of the rule broken
//! }
//! ```
//!
//! The bodies panic (they are tests); they are built only with the
//! `conformance` feature, which implementations enable for their tests.

use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::wire::{AdminInfo, AuditEntry, AuditQuery, Role, TaskDraft};
use sundial_protocol::{AgentId, Outcome, RunRecord, Schedule, TaskId, TaskSpec, Timestamp};

use super::*;

/// One body of the suite: run it on a fresh, empty store.
pub type Body = fn(&dyn CoordStore);

/// Every body, by name.
pub const ALL: &[(&str, Body)] = &[
    (
        "feeds_tell_of_certificates_tasks_and_run_nows",
        feeds_tell_of_certificates_tasks_and_run_nows,
    ),
    (
        "revisions_rise_by_one_and_tasks_carry_them",
        revisions_rise_by_one_and_tasks_carry_them,
    ),
    (
        "names_are_unique_among_live_tasks",
        names_are_unique_among_live_tasks,
    ),
    ("update_is_compare_and_set", update_is_compare_and_set),
    (
        "changes_for_is_bounded_and_resumable",
        changes_for_is_bounded_and_resumable,
    ),
    (
        "selectors_match_labels_and_removed_tasks_reach_agents",
        selectors_match_labels_and_removed_tasks_reach_agents,
    ),
    (
        "pause_and_resume_take_revisions",
        pause_and_resume_take_revisions,
    ),
    (
        "enrollment_spends_tokens_and_merges_labels",
        enrollment_spends_tokens_and_merges_labels,
    ),
    (
        "revocation_removes_the_certificate",
        revocation_removes_the_certificate,
    ),
    (
        "the_first_record_of_a_run_wins",
        the_first_record_of_a_run_wins,
    ),
    (
        "run_pages_cover_every_run_once_in_order",
        run_pages_cover_every_run_once_in_order,
    ),
    (
        "purge_deletes_the_oldest_in_batches",
        purge_deletes_the_oldest_in_batches,
    ),
    (
        "arrival_order_meets_late_runs_once",
        arrival_order_meets_late_runs_once,
    ),
    (
        "listings_are_paged_and_cover_everything_once",
        listings_are_paged_and_cover_everything_once,
    ),
    (
        "a_restore_never_reuses_ids_or_revisions",
        a_restore_never_reuses_ids_or_revisions,
    ),
    ("settings_round_trip", settings_round_trip),
    (
        "sealed_variables_survive_every_change",
        sealed_variables_survive_every_change,
    ),
    (
        "admins_have_names_roles_and_one_live_credential",
        admins_have_names_roles_and_one_live_credential,
    ),
    (
        "audited_changes_write_their_entry_in_their_transaction",
        audited_changes_write_their_entry_in_their_transaction,
    ),
    ("audit_pages_filter_and_purge", audit_pages_filter_and_purge),
    (
        "functions_and_their_modules_round_trip",
        functions_and_their_modules_round_trip,
    ),
];

const T0: i64 = 1_800_000_000_000;

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis_saturating(T0 + ms)
}

fn ok<T>(r: StoreResult<T>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

/// A draft of a one-shot task.
pub fn draft(name: Option<&str>, target: Target) -> TaskDraft {
    TaskDraft {
        name: name.map(str::to_owned),
        target,
        schedule: Schedule::at(t(3_600_000)),
        action: Action::Exec(ExecSpec {
            program: "/bin/true".into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            sealed_env: Vec::new(),
        }),
        policies: Policies::default(),
        anchor_at_creation: false,
        placement: Default::default(),
    }
}

fn create(s: &dyn CoordStore, name: Option<&str>, agent: u64) -> TaskSpec {
    ok(
        s.create_task(draft(name, Target::Agent(AgentId(agent))), t(0), None),
        "create a task",
    )
}

/// A run record.
pub fn run(task: u64, agent: u64, scheduled_ms: i64, outcome: Outcome) -> RunRecord {
    RunRecord {
        task_id: TaskId(task),
        agent_id: AgentId(agent),
        scheduled_at: t(scheduled_ms),
        attempt: 1,
        fired_at: Some(t(scheduled_ms)),
        finished_at: Some(t(scheduled_ms + 5)),
        outcome,
        exit_code: Some(0),
        offline: false,
        detail: None,
        stdout_tail: b"out".to_vec(),
        stderr_tail: Vec::new(),
    }
}

fn enroll_one(s: &dyn CoordStore, token: [u8; 32], labels: &[(&str, &str)]) -> Agent {
    let agent = ok(s.reserve_agent_id(), "reserve an id");
    let mut fp = [0u8; 32];
    fp[..8].copy_from_slice(&agent.0.to_be_bytes());
    fp[31] = 0xa5;
    let e = Enrollment {
        token_sha256: token,
        agent,
        name: Some(format!("dev-{}", agent.0)),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        cert_sha256: fp,
        now: t(0),
    };
    match ok(s.enroll(&e), "enroll") {
        Ok(a) => a,
        Err(why) => panic!("enrollment refused: {why}"),
    }
}

fn token(s: &dyn CoordStore, n: u8, uses: u32, labels: &[(&str, &str)]) -> [u8; 32] {
    let hash = [n; 32];
    ok(
        s.put_token(
            &JoinToken {
                secret_sha256: hash,
                expires_at: t(60_000),
                uses_left: uses,
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            },
            None,
        ),
        "put a token",
    );
    hash
}

fn all_changes(
    s: &dyn CoordStore,
    agent: AgentId,
    labels: &[(String, String)],
    since: u64,
    limit: usize,
) -> Vec<(TaskSpec, bool)> {
    let mut out = Vec::new();
    let mut since = since;
    for _ in 0..10_000 {
        let page = ok(s.changes_for(agent, labels, since, limit), "changes_for");
        assert!(page.upto >= since, "a page moves forward");
        assert!(
            page.changes.len() <= limit,
            "a page holds at most `limit` changes"
        );
        out.extend(page.changes);
        if !page.more {
            return out;
        }
        assert!(page.upto > since, "a page with more moves forward");
        since = page.upto;
    }
    panic!("changes_for never ended");
}

pub fn revisions_rise_by_one_and_tasks_carry_them(s: &dyn CoordStore) {
    assert_eq!(ok(s.revision(), "revision"), 0);
    let a = create(s, Some("a"), 1);
    let b = create(s, None, 1);
    assert_eq!((a.revision, b.revision), (1, 2));
    assert_ne!(a.id, b.id);
    let r = ok(s.update_task(&a, a.revision, None), "update");
    assert_eq!(r, 3);
    let r = ok(s.cancel_task(b.id, None), "cancel");
    assert_eq!(r, 4);
    assert_eq!(ok(s.revision(), "revision"), 4);
    let a2 = ok(s.task(a.id), "task").expect("a exists");
    assert_eq!(a2.spec.revision, 3);
    let b2 = ok(s.task(b.id), "task").expect("a cancelled task stays");
    assert!(b2.cancelled && b2.spec.revision == 4);
    assert!(matches!(
        s.cancel_task(b.id, None),
        Err(StoreError::Refused(_))
    ));
    assert!(matches!(
        s.cancel_task(TaskId(999), None),
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        ok(s.revision(), "revision"),
        4,
        "a refusal takes no revision"
    );
}

pub fn names_are_unique_among_live_tasks(s: &dyn CoordStore) {
    let a = create(s, Some("backup"), 1);
    assert!(matches!(
        s.create_task(draft(Some("backup"), Target::Agent(AgentId(2))), t(0), None),
        Err(StoreError::Refused(_))
    ));
    ok(s.cancel_task(a.id, None), "cancel");
    let again = create(s, Some("backup"), 2);
    assert_ne!(again.id, a.id, "ids are never reused");
}

pub fn update_is_compare_and_set(s: &dyn CoordStore) {
    let a = create(s, Some("a"), 1);
    let mut first = a.clone();
    first.schedule = Schedule::at(t(7_200_000));
    let r1 = ok(s.update_task(&first, a.revision, None), "first update");
    // A second writer that read the task before the first update.
    let mut second = a.clone();
    second.name = Some("renamed".into());
    assert!(
        matches!(
            s.update_task(&second, a.revision, None),
            Err(StoreError::Conflict(_))
        ),
        "a stale revision is a conflict"
    );
    let now = ok(s.task(a.id), "task").expect("exists");
    assert_eq!(now.spec.revision, r1);
    assert_eq!(now.spec.schedule, first.schedule, "the first update stands");
    assert_eq!(
        ok(s.revision(), "revision"),
        r1,
        "the conflict took no revision"
    );
    let mut ghost = a.clone();
    ghost.id = TaskId(4242);
    assert!(matches!(
        s.update_task(&ghost, 1, None),
        Err(StoreError::NotFound(_))
    ));
    ok(s.cancel_task(a.id, None), "cancel");
    let latest = ok(s.revision(), "revision");
    assert!(matches!(
        s.update_task(&first, latest, None),
        Err(StoreError::Refused(_))
    ));
}

pub fn changes_for_is_bounded_and_resumable(s: &dyn CoordStore) {
    let mut mine = Vec::new();
    for i in 0..25 {
        mine.push(create(s, None, 1).id);
        create(s, None, 2);
        if i % 5 == 0 {
            create(s, None, 3);
        }
    }
    let none: Vec<(String, String)> = Vec::new();
    let got = all_changes(s, AgentId(1), &none, 0, 7);
    let ids: Vec<TaskId> = got.iter().map(|(t, _)| t.id).collect();
    assert_eq!(
        ids, mine,
        "every change of agent 1, in revision order, once"
    );
    assert!(got.iter().all(|(_, removed)| !removed));
    // A limit of 1 still ends, and from the middle too.
    let half = got[12].0.revision;
    let rest = all_changes(s, AgentId(1), &none, half, 1);
    assert_eq!(rest.len(), 12);
    // Nothing after the latest.
    let latest = ok(s.revision(), "revision");
    let page = ok(s.changes_for(AgentId(1), &none, latest, 100), "changes");
    assert!(page.changes.is_empty() && !page.more && page.upto == latest);
}

pub fn selectors_match_labels_and_removed_tasks_reach_agents(s: &dyn CoordStore) {
    let sel = Target::Selector(vec![("site".into(), "north".into())]);
    let shop = ok(s.create_task(draft(Some("n"), sel), t(0), None), "create");
    let other = ok(
        s.create_task(
            draft(
                None,
                Target::Selector(vec![("site".into(), "south".into())]),
            ),
            t(0),
            None,
        ),
        "create",
    );
    let labels = vec![
        ("site".to_owned(), "north".to_owned()),
        ("role".to_owned(), "till".to_owned()),
    ];
    let got = all_changes(s, AgentId(9), &labels, 0, 100);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.id, shop.id);
    let after = ok(s.revision(), "revision");
    ok(s.cancel_task(shop.id, None), "cancel");
    ok(s.cancel_task(other.id, None), "cancel");
    // An agent in sync hears of the cancel; a first sync leaves it out.
    let got = all_changes(s, AgentId(9), &labels, after, 100);
    assert_eq!(got.len(), 1);
    assert!(got[0].1, "the cancel reaches the agent as removed");
    assert!(all_changes(s, AgentId(9), &labels, 0, 100).is_empty());
}

pub fn pause_and_resume_take_revisions(s: &dyn CoordStore) {
    let a = create(s, Some("a"), 1);
    let r = ok(s.set_paused(a.id, true, t(10), None), "pause");
    assert_eq!(r, a.revision + 1);
    assert!(ok(s.task(a.id), "task").expect("exists").paused);
    assert!(matches!(
        s.set_paused(a.id, true, t(10), None),
        Err(StoreError::Refused(_))
    ));
    let none: Vec<(String, String)> = Vec::new();
    let got = all_changes(s, AgentId(1), &none, a.revision, 100);
    assert!(got.len() == 1 && got[0].1, "paused: removed for the agent");
    assert!(all_changes(s, AgentId(1), &none, 0, 100).is_empty());
    let r2 = ok(s.set_paused(a.id, false, t(5_000), None), "resume");
    assert_eq!(r2, r + 1);
    let back = ok(s.task(a.id), "task").expect("exists");
    assert!(!back.paused);
    assert!(
        back.spec.created_at >= t(5_000),
        "a resumed task counts from its resume"
    );
    assert_eq!(
        back.created_at, a.created_at,
        "its creation stays where it was"
    );
    // A second pause and resume moves the count again, never the creation;
    // so do an update and a listing.
    ok(s.set_paused(a.id, true, t(6_000), None), "pause again");
    ok(s.set_paused(a.id, false, t(9_000), None), "resume again");
    let again = ok(s.task(a.id), "task").expect("exists");
    assert!(again.spec.created_at >= t(9_000));
    assert_eq!(again.created_at, a.created_at);
    let listed = ok(s.tasks(None, 100), "tasks");
    let mine = listed.iter().find(|x| x.spec.id == a.id).expect("listed");
    assert_eq!(mine.created_at, a.created_at);
    let b = create(s, Some("b"), 1);
    let fresh = ok(s.task(b.id), "task").expect("exists");
    assert_eq!(fresh.created_at, fresh.spec.created_at, "never resumed");
    assert!(matches!(
        s.set_paused(TaskId(999), true, t(0), None),
        Err(StoreError::NotFound(_))
    ));
}

pub fn sealed_variables_survive_every_change(s: &dyn CoordStore) {
    use sundial_protocol::seal::SealedEnv;
    let sealed = vec![SealedEnv {
        name: "TASK_TOKEN".into(),
        sealed: vec![(AgentId(1), vec![7; 60]), (AgentId(2), vec![8; 61])],
    }];
    let mut d = draft(Some("sealed"), Target::Agent(AgentId(1)));
    d.action.set_sealed_env(sealed.clone());
    let a = ok(s.create_task(d, t(0), None), "create");
    let read = |what: &str| ok(s.task(a.id), what).expect("exists").spec;
    assert_eq!(read("read").action.sealed_env(), sealed.as_slice());
    let mut spec = read("read");
    spec.name = Some("renamed".into());
    ok(s.update_task(&spec, spec.revision, None), "update");
    assert_eq!(read("updated").action.sealed_env(), sealed.as_slice());
    ok(s.set_paused(a.id, true, t(10), None), "pause");
    assert_eq!(read("paused").action.sealed_env(), sealed.as_slice());
    let none: Vec<(String, String)> = Vec::new();
    ok(s.set_paused(a.id, false, t(20), None), "resume");
    let changes = all_changes(s, AgentId(1), &none, 0, 100);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].0.action.sealed_env(), sealed.as_slice());
    ok(s.cancel_task(a.id, None), "cancel");
    assert_eq!(read("cancelled").action.sealed_env(), sealed.as_slice());
    let listed = ok(s.tasks(None, 10), "list");
    assert!(listed
        .iter()
        .any(|t| t.spec.id == a.id && t.spec.action.sealed_env() == sealed.as_slice()));
}

pub fn functions_and_their_modules_round_trip(s: &dyn CoordStore) {
    use sundial_protocol::wasm::{ModuleHash, WasmSpec};
    let bytes = b"\0asm\x01\0\0\0 a module's bytes".to_vec();
    let hash = ModuleHash::of(&bytes);
    assert_eq!(ok(s.module(hash), "read a missing module"), None);
    ok(s.put_module(hash, &bytes), "put a module");
    ok(s.put_module(hash, &bytes), "put it again");
    assert_eq!(ok(s.module(hash), "read a module"), Some(bytes.clone()));
    let mut d = draft(Some("function"), Target::Agent(AgentId(1)));
    let w = WasmSpec {
        module: hash,
        module_bytes: bytes.len() as u64,
        args: vec!["--verbose".into()],
        env: vec![("GREETING".into(), "hi".into())],
        sealed_env: Vec::new(),
        fuel: Some(5_000),
        memory_bytes: Some(1 << 20),
    };
    d.action = Action::Wasm(w.clone());
    let a = ok(s.create_task(d, t(0), None), "create a function task");
    let read = ok(s.task(a.id), "read").expect("exists").spec;
    assert_eq!(read.action, Action::Wasm(w));
    let changes = all_changes(s, AgentId(1), &[], 0, 100);
    assert!(changes
        .iter()
        .any(|(t, _)| t.id == a.id && t.action == read.action));
}

pub fn enrollment_spends_tokens_and_merges_labels(s: &dyn CoordStore) {
    let tok = token(s, 7, 2, &[("site", "north"), ("role", "till")]);
    assert!(ok(s.check_token(tok, t(0)), "check").is_ok());
    let a = enroll_one(s, tok, &[("role", "camera")]);
    let b = enroll_one(s, tok, &[]);
    assert!(b.id > a.id, "ids rise");
    let mut labels = a.labels.clone();
    labels.sort();
    assert_eq!(
        labels,
        vec![
            ("role".to_owned(), "camera".to_owned()),
            ("site".to_owned(), "north".to_owned())
        ],
        "the agent's own labels win"
    );
    let stored = ok(s.agent(a.id), "agent").expect("stored");
    assert_eq!(stored, a);
    // Used up: refused, and nothing stored.
    let c = ok(s.reserve_agent_id(), "reserve");
    let e = Enrollment {
        token_sha256: tok,
        agent: c,
        name: None,
        labels: Vec::new(),
        cert_sha256: [9; 32],
        now: t(0),
    };
    assert_eq!(ok(s.enroll(&e), "enroll"), Err(TokenRefusal::UsedUp));
    assert_eq!(ok(s.agent(c), "agent"), None);
    let unknown = Enrollment {
        token_sha256: [1; 32],
        ..e.clone()
    };
    assert_eq!(ok(s.enroll(&unknown), "enroll"), Err(TokenRefusal::Unknown));
    let late = token(s, 8, 5, &[]);
    assert!(matches!(
        ok(s.check_token(late, t(60_000)), "check"),
        Err(TokenRefusal::Expired(_))
    ));
    let expired = Enrollment {
        token_sha256: late,
        now: t(60_000),
        ..e
    };
    assert!(matches!(
        ok(s.enroll(&expired), "enroll"),
        Err(TokenRefusal::Expired(_))
    ));
    // The agents' certificates are known.
    let certs = ok(s.known_certs(None, 100), "certs");
    assert!(certs.contains(&(a.cert_sha256, CertRole::Agent(a.id))));
    assert!(certs.contains(&(b.cert_sha256, CertRole::Agent(b.id))));
    // What sessions see is kept.
    ok(
        s.agent_seen(
            a.id,
            AgentSeen {
                at: t(99),
                clock: Some((-12, 3)),
                session: None,
            },
        ),
        "seen",
    );
    let seen = ok(s.agent(a.id), "agent").expect("stored");
    assert_eq!(
        (seen.last_seen, seen.clock_offset_ms, seen.rtt_ms),
        (Some(t(99)), Some(-12), Some(3))
    );
    assert!(matches!(
        s.agent_seen(
            AgentId(9_999),
            AgentSeen {
                at: t(1),
                clock: None,
                session: None,
            }
        ),
        Err(StoreError::NotFound(_))
    ));
}

pub fn revocation_removes_the_certificate(s: &dyn CoordStore) {
    let boss = admin(s, "boss", Role::Owner, 0xad);
    let tok = token(s, 3, 1, &[]);
    let a = enroll_one(s, tok, &[]);
    assert!(matches!(
        s.forget_agent(a.id, None),
        Err(StoreError::Refused(_))
    ));
    let r = ok(s.revoke_agent(a.id, None), "revoke");
    assert!(r.revoked);
    let again = ok(s.revoke_agent(a.id, None), "revoke twice");
    assert!(again.revoked, "revoking twice is a no-op");
    let certs = ok(s.known_certs(None, 100), "certs");
    assert!(!certs.iter().any(|(fp, _)| *fp == a.cert_sha256));
    assert!(certs.contains(&([0xad; 32], CertRole::Admin(cert_of(&boss)))));
    ok(s.forget_agent(a.id, None), "forget");
    let listed = ok(s.agents(None, 100), "agents");
    assert!(listed.iter().any(|x| x.id == a.id && x.forgotten));
    assert!(matches!(
        s.revoke_agent(AgentId(555), None),
        Err(StoreError::NotFound(_))
    ));
}

pub fn the_first_record_of_a_run_wins(s: &dyn CoordStore) {
    let a = create(s, None, 1);
    let r = run(a.id.0, 1, 1_000, Outcome::Succeeded);
    let key = (a.id.0, 1, T0 + 1_000, 1);
    // Stored once, counted once: a resend is neither fresh nor refused.
    assert_eq!(
        ok(s.store_runs(&[r.clone(), r.clone()]), "put"),
        StoredRuns {
            conflicts: Vec::new(),
            fresh: vec![key]
        }
    );
    assert_eq!(
        ok(s.store_runs(std::slice::from_ref(&r)), "resend"),
        StoredRuns::default()
    );
    let mut other = r.clone();
    other.outcome = Outcome::Failed;
    let conflicts = ok(s.put_runs(std::slice::from_ref(&other)), "different");
    assert_eq!(conflicts, vec![key]);
    assert_eq!(ok(s.run_count(), "count"), 1);
    let page = ok(
        s.runs(&RunQuery {
            task: None,
            agent: None,
            since: None,
            limit: 10,
            page: Page::Latest,
            forward_from_since: false,
        }),
        "runs",
    );
    assert_eq!(page.runs, vec![r.clone()]);
    // The latest run per agent.
    ok(
        s.put_runs(&[
            run(a.id.0, 1, 2_000, Outcome::Failed),
            run(a.id.0, 2, 500, Outcome::Skipped),
        ]),
        "put",
    );
    let mut last = ok(s.last_runs(a.id, 100), "last runs");
    last.sort_by_key(|l| l.agent_id);
    assert_eq!(last.len(), 2);
    assert_eq!(
        (last[0].agent_id, last[0].scheduled_at, last[0].outcome),
        (AgentId(1), t(2_000), Outcome::Failed)
    );
    assert_eq!(last[1].outcome, Outcome::Skipped);
    // In one batch the newest is the last run, in whatever order it came.
    ok(
        s.put_runs(&[
            run(a.id.0, 1, 4_000, Outcome::Succeeded),
            run(a.id.0, 1, 3_000, Outcome::Failed),
        ]),
        "put",
    );
    let last = ok(s.last_runs(a.id, 100), "last runs");
    let one: Vec<_> = last.iter().filter(|l| l.agent_id == AgentId(1)).collect();
    assert_eq!(
        one.iter()
            .map(|l| (l.scheduled_at, l.outcome))
            .collect::<Vec<_>>(),
        vec![(t(4_000), Outcome::Succeeded)]
    );
    // In one batch: the refused and the fresh apart.
    let stored = ok(
        s.store_runs(&[other, run(a.id.0, 3, 1_000, Outcome::Failed)]),
        "mixed",
    );
    assert_eq!(stored.conflicts, vec![key]);
    assert_eq!(stored.fresh, vec![(a.id.0, 3, T0 + 1_000, 1)]);
    assert_eq!(ok(s.store_runs(&[r]), "resend"), StoredRuns::default());
}

pub fn run_pages_cover_every_run_once_in_order(s: &dyn CoordStore) {
    let a = create(s, None, 1);
    let b = create(s, None, 2);
    let mut runs = Vec::new();
    for i in 0..30 {
        runs.push(run(a.id.0, 1, i * 1_000, Outcome::Succeeded));
        runs.push(run(b.id.0, 2, i * 1_000 + 500, Outcome::Failed));
    }
    ok(s.put_runs(&runs), "put");
    let query = |task, page, limit| RunQuery {
        task,
        agent: None,
        since: None,
        limit,
        page,
        forward_from_since: false,
    };
    // Forward from the start in pages of 7: all 60, in time order, once.
    let mut seen = Vec::new();
    let mut page = Page::After(RunCursor {
        scheduled_at_ms: i64::MIN,
        task: 0,
        agent: 0,
        attempt: 0,
    });
    loop {
        let p = ok(s.runs(&query(None, page, 7)), "runs");
        assert!(p.runs.len() <= 7);
        seen.extend(p.runs.iter().map(|r| r.scheduled_at));
        match (p.more, p.last) {
            (true, Some(last)) => page = Page::After(last),
            _ => break,
        }
    }
    let mut want: Vec<Timestamp> = runs.iter().map(|r| r.scheduled_at).collect();
    want.sort();
    assert_eq!(seen, want);
    // The latest page, then back from it.
    let latest = ok(s.runs(&query(None, Page::Latest, 5)), "latest");
    assert_eq!(latest.runs.len(), 5);
    assert_eq!(latest.runs.last().map(|r| r.scheduled_at), Some(t(29_500)));
    assert!(latest.more);
    let first = latest.first.expect("a cursor");
    let before = ok(s.runs(&query(None, Page::Before(first), 5)), "before");
    assert_eq!(before.runs.last().map(|r| r.scheduled_at), Some(t(27_000)));
    // Of one task.
    let of_b = ok(s.runs(&query(Some(b.id), Page::Latest, 100)), "of b");
    assert_eq!(of_b.runs.len(), 30);
    assert!(of_b.runs.iter().all(|r| r.task_id == b.id));
    assert!(!of_b.more);
    // Of one agent, since an instant.
    let of_1 = ok(
        s.runs(&RunQuery {
            task: None,
            agent: Some(AgentId(1)),
            since: Some(t(20_000)),
            limit: 100,
            page: Page::Latest,
            forward_from_since: true,
        }),
        "of agent 1",
    );
    assert_eq!(of_1.runs.len(), 10);
    assert!(of_1.runs.iter().all(|r| r.agent_id == AgentId(1)));
}

pub fn arrival_order_meets_late_runs_once(s: &dyn CoordStore) {
    let a = create(s, None, 1);
    let b = create(s, None, 2);
    let query = |task, after, limit| ArrivalQuery {
        task,
        agent: None,
        limit,
        after,
    };
    // Nothing stored: an empty page that starts from the beginning.
    let empty = ok(s.runs_arrived(&query(None, None, 10)), "empty");
    assert!(empty.runs.is_empty() && !empty.more);
    let start = empty.next;
    // Agent 1 reports its runs as they happen; a follower reads along.
    let online: Vec<RunRecord> = (10..20)
        .map(|i| run(a.id.0, 1, i * 1_000, Outcome::Succeeded))
        .collect();
    ok(s.put_runs(&online), "online");
    let mut seen: Vec<(u64, i64)> = Vec::new();
    let mut cursor = start;
    let follow = |cursor: &mut ArrivalCursor, seen: &mut Vec<(u64, i64)>| loop {
        let p = ok(s.runs_arrived(&query(None, Some(*cursor), 4)), "follow");
        assert!(p.runs.len() <= 4);
        assert!(p.next >= *cursor, "the cursor never goes back");
        seen.extend(
            p.runs
                .iter()
                .map(|r| (r.task_id.0, r.scheduled_at.as_millis() - T0)),
        );
        *cursor = p.next;
        if !p.more {
            break;
        }
    };
    follow(&mut cursor, &mut seen);
    assert_eq!(seen.len(), 10);
    // Agent 2 comes back with a backlog scheduled before all of them, and a
    // resend of one run already stored: the follower gets the backlog, once.
    let backlog: Vec<RunRecord> = (0..7)
        .map(|i| run(b.id.0, 2, i * 1_000, Outcome::Failed))
        .collect();
    ok(s.put_runs(&backlog), "backlog");
    ok(s.put_runs(&online[..3]), "resent");
    follow(&mut cursor, &mut seen);
    assert_eq!(seen.len(), 17, "{seen:?}");
    assert_eq!(
        &seen[10..],
        (0..7).map(|i| (b.id.0, i * 1_000)).collect::<Vec<_>>(),
        "the late runs in the order they arrived"
    );
    // Nothing new: an empty page, the cursor where it was.
    let idle = ok(s.runs_arrived(&query(None, Some(cursor), 4)), "idle");
    assert!(idle.runs.is_empty() && !idle.more);
    assert_eq!(idle.next, cursor);
    // The latest page: the newest arrivals, and the cursor at the end.
    let latest = ok(s.runs_arrived(&query(None, None, 3)), "latest");
    assert_eq!(
        latest
            .runs
            .iter()
            .map(|r| r.scheduled_at.as_millis() - T0)
            .collect::<Vec<_>>(),
        vec![4_000, 5_000, 6_000]
    );
    assert_eq!(latest.next, cursor);
    // Of one task: only its runs, and a cursor past what was looked at.
    let of_a = ok(s.runs_arrived(&query(Some(a.id), Some(start), 100)), "of a");
    assert_eq!(of_a.runs.len(), 10);
    assert!(of_a.runs.iter().all(|r| r.task_id == a.id));
    assert_eq!(of_a.next, cursor);
    // Purged runs leave the order; the rest stays where it was.
    ok(s.purge_runs_before(t(5_000), 100), "purge");
    let mut after_purge = Vec::new();
    let mut c = start;
    follow(&mut c, &mut after_purge);
    assert_eq!(after_purge.len(), 12, "{after_purge:?}");
    assert!(after_purge.iter().all(|&(_, at)| at >= 5_000));
    // A cursor written and read back is the same place.
    assert_eq!(cursor.to_string().parse::<ArrivalCursor>(), Ok(cursor));
    assert!("arrival.x.1".parse::<ArrivalCursor>().is_err());
    assert!("12.1.1.0".parse::<ArrivalCursor>().is_err());
}

pub fn purge_deletes_the_oldest_in_batches(s: &dyn CoordStore) {
    let a = create(s, None, 1);
    let runs: Vec<RunRecord> = (0..20)
        .map(|i| run(a.id.0, 1, i * 1_000, Outcome::Succeeded))
        .collect();
    ok(s.put_runs(&runs), "put");
    assert_eq!(ok(s.purge_runs_before(t(12_000), 5), "purge"), 5);
    assert_eq!(ok(s.purge_runs_before(t(12_000), 5), "purge"), 5);
    assert_eq!(ok(s.purge_runs_before(t(12_000), 5), "purge"), 2);
    assert_eq!(ok(s.purge_runs_before(t(12_000), 5), "purge"), 0);
    assert_eq!(ok(s.run_count(), "count"), 8);
    let left = ok(
        s.runs(&RunQuery {
            task: Some(a.id),
            agent: None,
            since: None,
            limit: 100,
            page: Page::Latest,
            forward_from_since: false,
        }),
        "runs",
    );
    assert_eq!(left.runs.first().map(|r| r.scheduled_at), Some(t(12_000)));
    // A purged run may be uploaded again: it is stored again.
    assert!(ok(s.put_runs(&runs[..1]), "again").is_empty());
    assert_eq!(ok(s.run_count(), "count"), 9);
}

pub fn listings_are_paged_and_cover_everything_once(s: &dyn CoordStore) {
    let tok = token(s, 5, 100, &[]);
    let mut agents = Vec::new();
    for _ in 0..23 {
        agents.push(enroll_one(s, tok, &[]).id);
    }
    for n in 10..30u8 {
        token(s, n, 1, &[]);
    }
    let mut tasks = Vec::new();
    for _ in 0..31 {
        tasks.push(create(s, None, 1).id);
    }
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = ok(s.agents(after, 4), "agents");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        got.extend(page.iter().map(|a| a.id));
    }
    assert_eq!(got, agents);
    let mut got = Vec::new();
    let mut after = None;
    loop {
        let page = ok(s.tasks(after, 6), "tasks");
        assert!(page.len() <= 6);
        let Some(last) = page.last() else { break };
        after = Some(last.spec.id);
        got.extend(page.iter().map(|t| t.spec.id));
    }
    assert_eq!(got, tasks);
    let mut n = 0;
    let mut after = None;
    loop {
        let page = ok(s.tokens(after, 3), "tokens");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        assert!(after.is_none_or(|a| a < last.secret_sha256));
        after = Some(last.secret_sha256);
        n += page.len();
    }
    assert_eq!(n, 21);
    let mut certs = 0;
    let mut after = None;
    loop {
        let page = ok(s.known_certs(after, 5), "certs");
        let Some(last) = page.last() else { break };
        after = Some(last.0);
        certs += page.len();
    }
    assert_eq!(certs, 23);
    ok(s.delete_token([10; 32], None), "delete a token");
    assert!(matches!(
        s.delete_token([10; 32], None),
        Err(StoreError::NotFound(_))
    ));
}

pub fn a_restore_never_reuses_ids_or_revisions(s: &dyn CoordStore) {
    let a = create(s, None, 1);
    create(s, None, 1);
    let revision = ok(s.revision(), "revision");
    assert_eq!(ok(s.catch_up_restored(revision), "in step"), None);
    assert_eq!(
        ok(
            s.catch_up_restored(revision + RESTORE_GAP_MAX + 1),
            "too far"
        ),
        None,
        "a claim too far ahead is not believed"
    );
    let (lost, news) = ok(s.catch_up_restored(revision + 5), "ahead").expect("caught up");
    assert!(news > revision + 5);
    assert!(lost.start > a.id.0);
    assert!(lost.end - lost.start >= 5);
    let next = create(s, None, 1);
    assert!(next.id.0 >= lost.end, "no id an agent may hold is reused");
    assert!(next.revision > news);
}

pub fn settings_round_trip(s: &dyn CoordStore) {
    assert_eq!(ok(s.setting("server_name"), "get"), None);
    ok(s.put_setting("server_name", "coord.example"), "put");
    ok(s.put_setting("advertise", "192.0.2.1:7400"), "put");
    ok(s.put_setting("server_name", "coord2.example"), "put");
    assert_eq!(
        ok(s.setting("server_name"), "get").as_deref(),
        Some("coord2.example")
    );
}

pub fn feeds_tell_of_certificates_tasks_and_run_nows(s: &dyn CoordStore) {
    // Certificates: every addition and revocation, in order, resumable.
    let seq0 = ok(s.cert_seq(), "cert seq");
    let seven = admin(s, "seven", Role::Viewer, 7);
    let tok = token(s, 3, 10, &[]);
    let a = enroll_one(s, tok, &[]);
    let b = enroll_one(s, tok, &[]);
    ok(s.revoke_agent(a.id, None), "revoke");
    ok(s.revoke_agent(a.id, None), "revoke again (no news)");
    let mut changes = Vec::new();
    let mut since = seq0;
    loop {
        let page = ok(s.cert_changes(since, 2), "cert changes");
        assert!(page.changes.len() <= 2);
        changes.extend(page.changes);
        assert!(page.upto >= since);
        since = page.upto;
        if !page.more {
            break;
        }
    }
    // Applied in order, the changes leave each certificate's last state (a
    // store may report a certificate changed twice once, as it is now).
    let mut state = std::collections::BTreeMap::new();
    for (fp, role) in &changes {
        state.insert(*fp, role.clone());
    }
    let want: std::collections::BTreeMap<[u8; 32], Option<CertRole>> = [
        ([7; 32], Some(CertRole::Admin(cert_of(&seven)))),
        (a.cert_sha256, None),
        (b.cert_sha256, Some(CertRole::Agent(b.id))),
    ]
    .into_iter()
    .collect();
    assert_eq!(state, want);
    assert_eq!(
        changes.last(),
        Some(&(a.cert_sha256, None)),
        "the revocation is the latest news"
    );
    assert_eq!(ok(s.cert_seq(), "cert seq"), since);
    assert!(ok(s.cert_changes(since, 10), "none after")
        .changes
        .is_empty());
    // Tasks: every change of every task, removed ones included.
    let r0 = ok(s.revision(), "revision");
    let x = create(s, None, 1);
    let y = create(s, None, 2);
    ok(s.cancel_task(x.id, None), "cancel");
    let page = ok(s.task_changes(r0, 100), "task changes");
    let got: Vec<(TaskId, bool)> = page.changes.iter().map(|(t, r)| (t.id, *r)).collect();
    assert_eq!(got, vec![(y.id, false), (x.id, true)]);
    assert_eq!(page.upto, ok(s.revision(), "revision"));
    assert!(!page.more);
    let first = ok(s.task_changes(r0, 1), "one");
    assert_eq!(first.changes.len(), 1);
    assert!(first.more);
    // Run-nows: taken once by the coordinator holding the agent; expired
    // ones go.
    let q = |agent: u64, at| QueuedRunNow {
        agent: AgentId(agent),
        task: y.id,
        at: t(at),
    };
    ok(s.queue_run_now(&[q(1, 0), q(2, 0)], t(0)), "queue");
    ok(
        s.queue_run_now(&[q(3, 0)], t(-RUN_NOW_QUEUE_TTL_MS - 1)),
        "queue old",
    );
    assert_eq!(
        ok(s.take_run_now(&[AgentId(2)], t(1)), "take"),
        vec![q(2, 0)]
    );
    assert!(ok(s.take_run_now(&[AgentId(2)], t(1)), "again").is_empty());
    assert!(
        ok(s.take_run_now(&[AgentId(3)], t(1)), "expired").is_empty(),
        "an expired run-now is not delivered"
    );
    assert_eq!(
        ok(s.take_run_now(&[AgentId(1)], t(2)), "take"),
        vec![q(1, 0)]
    );
}

/// Adds admin `name` with certificate `[fp; 32]`, valid for a day.
fn admin(s: &dyn CoordStore, name: &str, role: Role, fp: u8) -> AdminInfo {
    let a = AdminInfo {
        name: name.into(),
        role,
        cert_sha256: [fp; 32],
        created_at: t(0),
        created_by: "init".into(),
        expires_at: t(86_400_000),
        revoked_at: None,
        last_used: None,
    };
    ok(s.create_admin(&a, None), "create an admin");
    a
}

fn cert_of(a: &AdminInfo) -> AdminCert {
    AdminCert {
        name: a.name.clone(),
        role: a.role,
        expires_at: a.expires_at,
    }
}

fn entry(admin: &str, action: &str, at: i64) -> AuditEntry {
    AuditEntry {
        seq: 0,
        at: t(at),
        admin: admin.into(),
        cert_sha256: [0xee; 32],
        from: Some("192.0.2.7".into()),
        action: action.into(),
        subject: None,
        revision: None,
        refused: None,
    }
}

fn whole_audit(s: &dyn CoordStore) -> Vec<AuditEntry> {
    ok(
        s.audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        }),
        "audit",
    )
    .entries
}

pub fn admins_have_names_roles_and_one_live_credential(s: &dyn CoordStore) {
    let owner = admin(s, "owner", Role::Owner, 1);
    let alice = admin(s, "alice", Role::Operator, 2);
    // One live admin per name.
    assert!(matches!(
        s.create_admin(
            &AdminInfo {
                cert_sha256: [3; 32],
                ..alice.clone()
            },
            None
        ),
        Err(StoreError::Refused(_))
    ));
    let certs = ok(s.known_certs(None, 100), "certs");
    assert!(certs.contains(&([2; 32], CertRole::Admin(cert_of(&alice)))));
    // Renewal: the new certificate replaces the old one, also in the feed.
    let seq = ok(s.cert_seq(), "cert seq");
    let old = ok(
        s.renew_admin("alice", [4; 32], t(2 * 86_400_000), None),
        "renew",
    );
    assert_eq!(old.cert_sha256, [2; 32]);
    let certs = ok(s.known_certs(None, 100), "certs");
    assert!(
        !certs.iter().any(|(fp, _)| *fp == [2; 32]),
        "the old certificate is gone"
    );
    let renewed = AdminCert {
        expires_at: t(2 * 86_400_000),
        ..cert_of(&alice)
    };
    assert!(certs.contains(&([4; 32], CertRole::Admin(renewed.clone()))));
    let news = ok(s.cert_changes(seq, 100), "feed").changes;
    assert!(news.contains(&([2; 32], None)));
    assert!(news.contains(&([4; 32], Some(CertRole::Admin(renewed)))));
    assert!(matches!(
        s.renew_admin("nobody", [5; 32], t(1), None),
        Err(StoreError::NotFound(_))
    ));
    // The last owner stays; others go, and their names can be taken again.
    assert!(matches!(
        s.revoke_admin("owner", t(1), None),
        Err(StoreError::Refused(_))
    ));
    let gone = ok(s.revoke_admin("alice", t(1), None), "revoke");
    assert_eq!(gone.cert_sha256, [4; 32]);
    assert!(matches!(
        s.revoke_admin("alice", t(2), None),
        Err(StoreError::Refused(_))
    ));
    assert!(matches!(
        s.renew_admin("alice", [6; 32], t(9), None),
        Err(StoreError::Refused(_))
    ));
    let certs = ok(s.known_certs(None, 100), "certs");
    assert!(
        !certs.iter().any(|(fp, _)| *fp == [4; 32]),
        "revoked: refused"
    );
    let listed = ok(s.admins(None, 100), "admins");
    let a = listed
        .iter()
        .find(|a| a.name == "alice")
        .expect("alice listed");
    assert_eq!(a.revoked_at, Some(t(1)));
    let back = admin(s, "alice", Role::Viewer, 7);
    assert_eq!(
        ok(s.admins(Some("alice"), 100), "after alice")
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        vec!["owner"]
    );
    // A second owner lets the first go; an expired owner does not count.
    let _late = AdminInfo {
        expires_at: t(0),
        ..admin(s, "late", Role::Owner, 8)
    };
    assert!(
        matches!(
            s.revoke_admin("owner", t(86_400_001), None),
            Err(StoreError::Refused(_))
        ),
        "the other owners have expired by then"
    );
    admin(s, "second", Role::Owner, 9);
    ok(
        s.revoke_admin("owner", t(5), None),
        "revoke the first owner",
    );
    // Last use, never going back.
    ok(s.admin_used(back.cert_sha256, t(50)), "used");
    ok(s.admin_used(back.cert_sha256, t(40)), "used earlier");
    let listed = ok(s.admins(None, 100), "admins");
    let a = listed.iter().find(|a| a.name == "alice").expect("alice");
    assert_eq!((a.role, a.last_used), (Role::Viewer, Some(t(50))));
    assert_eq!(owner.role, Role::Owner);
}

pub fn audited_changes_write_their_entry_in_their_transaction(s: &dyn CoordStore) {
    let who = entry("alice", "task create", 0);
    let a = ok(
        s.create_task(
            draft(Some("x"), Target::Agent(AgentId(1))),
            t(0),
            Some(&who),
        ),
        "create",
    );
    let rev = ok(
        s.cancel_task(
            a.id,
            Some(&AuditEntry {
                action: "task cancel".into(),
                ..who.clone()
            }),
        ),
        "cancel",
    );
    // Refused changes write nothing.
    assert!(s.cancel_task(a.id, Some(&who)).is_err());
    assert!(s.cancel_task(TaskId(999), Some(&who)).is_err());
    assert!(s
        .create_task(draft(None, Target::Agent(AgentId(1))), t(0), None)
        .is_ok());
    let tok = AuditEntry {
        action: "token create".into(),
        subject: Some("token 01010101".into()),
        ..who.clone()
    };
    ok(
        s.put_token(
            &JoinToken {
                secret_sha256: [1; 32],
                expires_at: t(1_000),
                uses_left: 1,
                labels: Vec::new(),
            },
            Some(&tok),
        ),
        "token",
    );
    let log = whole_audit(s);
    let got: Vec<(&str, Option<&str>, Option<u64>)> = log
        .iter()
        .map(|e| (e.action.as_str(), e.subject.as_deref(), e.revision))
        .collect();
    let task = format!("task {}", a.id);
    assert_eq!(
        got,
        vec![
            ("task create", Some(task.as_str()), Some(a.revision)),
            ("task cancel", Some(task.as_str()), Some(rev)),
            ("token create", Some("token 01010101"), None),
        ]
    );
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq), "in order");
    assert!(log
        .iter()
        .all(|e| e.admin == "alice" && e.from.as_deref() == Some("192.0.2.7")));
    // Admin changes too.
    let mk = AuditEntry {
        action: "admin create".into(),
        ..who.clone()
    };
    ok(
        s.create_admin(
            &AdminInfo {
                name: "bob".into(),
                role: Role::Viewer,
                cert_sha256: [0xb0; 32],
                created_at: t(0),
                created_by: "alice".into(),
                expires_at: t(86_400_000),
                revoked_at: None,
                last_used: None,
            },
            Some(&mk),
        ),
        "admin",
    );
    assert!(s
        .create_admin(
            &AdminInfo {
                name: "bob".into(),
                role: Role::Owner,
                cert_sha256: [0xb1; 32],
                created_at: t(0),
                created_by: "alice".into(),
                expires_at: t(86_400_000),
                revoked_at: None,
                last_used: None,
            },
            Some(&mk),
        )
        .is_err());
    assert_eq!(whole_audit(s).len(), 4, "the refused create left no entry");
}

pub fn audit_pages_filter_and_purge(s: &dyn CoordStore) {
    for i in 0..25 {
        let mut e = entry(
            if i % 2 == 0 { "alice" } else { "bob" },
            "task pause",
            i * 1_000,
        );
        e.subject = Some(format!("task t{}", i % 3));
        if i % 5 == 0 {
            e.refused = Some("no".into());
        }
        ok(s.append_audit(&e), "append");
    }
    let q = |f: &dyn Fn(&mut AuditQuery)| {
        let mut q = AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        };
        f(&mut q);
        ok(s.audit(&q), "audit")
    };
    // The latest page, oldest first, and more behind it.
    let latest = q(&|_| {});
    assert_eq!(latest.entries.len(), 10);
    assert!(latest.more);
    assert_eq!(latest.entries.last().map(|e| e.at), Some(t(24_000)));
    assert!(latest.entries.windows(2).all(|w| w[0].seq < w[1].seq));
    // Back to the start with --before, forward again with --after: every
    // entry once.
    let mut seen: Vec<u64> = latest.entries.iter().map(|e| e.seq).collect();
    let mut before = latest.entries.first().map(|e| e.seq);
    loop {
        let p = q(&|q| q.before = before);
        let mut page: Vec<u64> = p.entries.iter().map(|e| e.seq).collect();
        before = page.first().copied();
        page.extend(seen);
        seen = page;
        if !p.more {
            break;
        }
    }
    assert_eq!(seen.len(), 25);
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
    let first = seen[0];
    let fwd = q(&|q| q.after = Some(first));
    assert_eq!(fwd.entries.first().map(|e| e.seq), Some(seen[1]));
    // Filters.
    let bob = q(&|q| {
        q.admin = Some("bob".into());
        q.limit = 100;
    });
    assert_eq!(bob.entries.len(), 12);
    assert!(!bob.more);
    let refused = q(&|q| {
        q.refused = true;
        q.limit = 100;
    });
    assert_eq!(refused.entries.len(), 5);
    let about = q(&|q| {
        q.subject = Some("task t1".into());
        q.since = Some(t(10_000));
        q.limit = 100;
    });
    assert!(about
        .entries
        .iter()
        .all(|e| e.subject.as_deref() == Some("task t1") && e.at >= t(10_000)));
    assert_eq!(about.entries.len(), 5);
    // Retention: the oldest go, in batches.
    assert_eq!(ok(s.purge_audit_before(t(10_000), 4), "purge"), 4);
    assert_eq!(ok(s.purge_audit_before(t(10_000), 100), "purge"), 6);
    assert_eq!(ok(s.purge_audit_before(t(10_000), 100), "purge"), 0);
    let rest = whole_audit(s);
    assert_eq!(rest.len(), 15);
    assert!(rest.iter().all(|e| e.at >= t(10_000)));
}
