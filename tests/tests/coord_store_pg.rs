//! The coordinator's store on PostgreSQL: the same conformance bodies the
//! redb store passes, on a throw-away cluster this test starts, and what
//! only a shared store must keep — a token raced through two stores is
//! spent once, revisions are never seen out of order by a reader while
//! writers race, and a store reconnects by itself after the server was
//! stopped.

use std::sync::Arc;
use std::time::Duration;

use sundial_coordinator::pg::{PgOptions, PgStore};
use sundial_coordinator::store::{CoordStore, Enrollment, JoinToken};
use sundial_core::coord_store::conformance;
use sundial_protocol::task::Target;
use sundial_protocol::{AgentId, Outcome, Timestamp};
use sundial_tests::pg::PgCluster;

fn cluster() -> Option<PgCluster> {
    PgCluster::start().expect("a PostgreSQL cluster starts")
}

fn open(url: String) -> PgStore {
    PgStore::open(&PgOptions {
        url,
        password: None,
        pool_size: 4,
    })
    .expect("the PostgreSQL store opens")
}

fn t(ms: i64) -> Timestamp {
    Timestamp::from_millis_saturating(1_800_000_000_000 + ms)
}

#[test]
fn the_postgres_store_passes_the_conformance_suite() {
    let Some(pg) = cluster() else { return };
    for (i, (name, body)) in conformance::ALL.iter().enumerate() {
        let store = open(pg.url_for(&format!("conformance{i}")).expect("a database"));
        eprintln!("conformance on PostgreSQL: {name}");
        body(&store);
    }
}

#[test]
fn migrations_apply_once_and_a_second_store_sees_the_first_ones_writes() {
    let Some(pg) = cluster() else { return };
    let a = open(pg.url());
    let b = open(pg.url());
    assert!(
        a.migrate().expect("migrate again").is_empty(),
        "nothing left to apply"
    );
    let spec = a
        .create_task(
            conformance::draft(Some("x"), Target::Agent(AgentId(1))),
            t(0),
            None,
        )
        .expect("create");
    assert_eq!(b.revision().expect("revision"), spec.revision);
    let page = b.task_changes(0, 10).expect("changes");
    assert_eq!(page.changes.len(), 1);
    assert_eq!(page.upto, spec.revision);
}

#[test]
fn a_token_raced_through_two_stores_is_spent_once() {
    let Some(pg) = cluster() else { return };
    let a = Arc::new(open(pg.url()));
    let b = Arc::new(open(pg.url()));
    for round in 0..20u8 {
        let secret = [round; 32];
        a.put_token(
            &JoinToken {
                secret_sha256: secret,
                expires_at: t(3_600_000),
                uses_left: 1,
                labels: vec![],
            },
            None,
        )
        .expect("token");
        let ids = [
            a.reserve_agent_id().expect("id"),
            b.reserve_agent_id().expect("id"),
        ];
        let handles: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .zip(ids)
            .map(|(s, id)| {
                std::thread::spawn(move || {
                    s.enroll(&Enrollment {
                        token_sha256: secret,
                        agent: id,
                        name: None,
                        labels: vec![],
                        cert_sha256: [id.0 as u8; 32],
                        now: t(0),
                    })
                    .expect("enroll answers")
                })
            })
            .collect();
        let accepted = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .filter(Result::is_ok)
            .count();
        assert_eq!(accepted, 1, "round {round}: one use, one enrollment");
    }
}

#[test]
fn a_reader_never_sees_a_revision_before_every_earlier_one_committed() {
    let Some(pg) = cluster() else { return };
    let url = pg.url();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let url = url.clone();
            std::thread::spawn(move || {
                let s = open(url);
                for i in 0..40 {
                    let name = format!("w{w}-{i}");
                    s.create_task(
                        conformance::draft(Some(&name), Target::Agent(AgentId(1))),
                        t(0),
                        None,
                    )
                    .expect("create");
                }
            })
        })
        .collect();
    let reader = open(url);
    let mut since = 0;
    let mut seen = Vec::new();
    let mut idle = 0;
    while seen.len() < 120 && idle < 400 {
        let page = reader.task_changes(since, 7).expect("changes");
        if page.changes.is_empty() && page.upto == since {
            idle += 1;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        seen.extend(page.changes.iter().map(|(s, _)| s.revision));
        since = page.upto;
    }
    for w in writers {
        w.join().expect("writer");
    }
    let want: Vec<u64> = (1..=120).collect();
    assert_eq!(seen, want, "every revision once, in order, none skipped");
}

#[test]
fn the_store_reconnects_after_postgres_was_stopped() {
    let Some(mut pg) = cluster() else { return };
    let s = open(pg.url());
    let task = s
        .create_task(
            conformance::draft(None, Target::Agent(AgentId(1))),
            t(0),
            None,
        )
        .expect("create");
    s.put_runs(&[conformance::run(task.id.0, 1, 0, Outcome::Succeeded)])
        .expect("put");
    pg.stop().expect("stop");
    let down = s.put_runs(&[conformance::run(task.id.0, 1, 1_000, Outcome::Succeeded)]);
    assert!(
        matches!(&down, Err(e) if e.is_unavailable()),
        "a stopped server is Unavailable: {down:?}"
    );
    pg.start_server().expect("start again");
    pg.wait_ready(Duration::from_secs(30)).expect("up");
    let mut back = None;
    for _ in 0..100 {
        match s.put_runs(&[conformance::run(task.id.0, 1, 1_000, Outcome::Succeeded)]) {
            Ok(c) => {
                back = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    assert_eq!(back, Some(vec![]), "stored once the server is back");
    assert_eq!(s.run_count().expect("count"), 2);
}

#[test]
fn a_session_mark_is_cleared_only_by_the_coordinator_that_holds_it() {
    use sundial_core::coord_store::{AgentSeen, SessionMark};
    let Some(pg) = cluster() else { return };
    let s = open(pg.url());
    s.put_token(
        &JoinToken {
            secret_sha256: [1; 32],
            expires_at: t(3_600_000),
            uses_left: 1,
            labels: vec![],
        },
        None,
    )
    .expect("token");
    let id = s.reserve_agent_id().expect("id");
    s.enroll(&Enrollment {
        token_sha256: [1; 32],
        agent: id,
        name: None,
        labels: vec![],
        cert_sha256: [7; 32],
        now: t(0),
    })
    .expect("store")
    .expect("enrolled");
    let mark = |session| {
        s.agent_seen(
            id,
            AgentSeen {
                at: t(10),
                clock: None,
                session,
            },
        )
        .expect("seen");
        s.agent(id).expect("read").expect("there").in_session
    };
    assert!(!mark(None), "not in session before a Hello");
    assert!(mark(Some(SessionMark::Up { holder: 1 })));
    assert!(mark(None), "a clock report keeps the mark");
    // The agent moved to coordinator 2; coordinator 1 notices its loss later.
    assert!(mark(Some(SessionMark::Up { holder: 2 })));
    assert!(
        mark(Some(SessionMark::Down { holder: 1 })),
        "an older holder's end leaves the newer session marked"
    );
    assert!(!mark(Some(SessionMark::Down { holder: 2 })));
}
