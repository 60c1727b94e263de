//! Two coordinator nodes on one store, as several coordinators share one
//! PostgreSQL: what one is told reaches the sessions the other holds through
//! the store's feeds alone (task changes, certificates, run-nows), and a
//! shared store's outage closes sessions without stopping the node. The
//! nodes are the core's `CoordNode`, stepped by hand on one redb store on
//! its in-memory backend; the same feeds of PostgreSQL are in the
//! conformance suite.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use sundial_coordinator::store::CoordinatorStore;
use sundial_core::coord::{
    Alpn, ConnId, CoordConfig, CoordEvent, CoordNode, Effect, Limits, Outgoing, Route, Shared,
    StoreDone, FEED_INTERVAL_MS,
};
use sundial_core::coord_store::{CertRole, CoordStore, Enrollment, JoinToken, StoreError};
use sundial_core::session::Now;
use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::token::sha256;
use sundial_protocol::wire::{
    close, AdminRequest, AdminResponse, AgentMsg, AssignmentChange, CoordMsg, TaskDraft,
};
use sundial_protocol::{AgentId, Schedule, TaskId, Timestamp};

const ADMIN: [u8; 32] = [9; 32];
const WALL0: i64 = 1_800_000_000_000;

fn now(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        wall: Timestamp::from_millis_saturating(WALL0 + ms as i64),
    }
}

fn store() -> Arc<dyn CoordStore> {
    let s = CoordinatorStore::open_with_backend(redb::backends::InMemoryBackend::new())
        .expect("an in-memory store opens");
    s.create_admin(&sundial_tests::test_owner("owner", ADMIN), None)
        .expect("admin added");
    Arc::new(s)
}

/// Enrolls an agent straight into the store; its certificate is [n; 32].
fn enroll(store: &dyn CoordStore, n: u8, labels: &[(&str, &str)]) -> AgentId {
    let secret = [n; 32];
    store
        .put_token(
            &JoinToken {
                secret_sha256: sha256(&secret),
                expires_at: Timestamp::from_millis_saturating(WALL0 + 3_600_000),
                uses_left: 1,
                labels: Vec::new(),
            },
            None,
        )
        .expect("token stored");
    let agent = store.reserve_agent_id().expect("an id");
    store
        .enroll(&Enrollment {
            token_sha256: sha256(&secret),
            agent,
            name: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cert_sha256: [n; 32],
            now: Timestamp::from_millis_saturating(WALL0),
        })
        .expect("store works")
        .expect("token accepted");
    agent
}

/// A node on `store`, its store jobs run inline, its messages kept per
/// connection.
struct Node {
    node: CoordNode,
    store: Arc<dyn CoordStore>,
    /// Fails every store job while set (the server is down).
    down: bool,
    sent: std::collections::HashMap<ConnId, Vec<Outgoing>>,
    closed: Vec<(ConnId, u32)>,
    stopped: bool,
    events: Vec<CoordEvent>,
    admin: VecDeque<Vec<AdminResponse>>,
}

impl Node {
    fn new(store: Arc<dyn CoordStore>, at: u64) -> Node {
        let cert_seq = store.cert_seq().expect("cert seq");
        let mut known = Vec::new();
        let mut after = None;
        loop {
            let page = store.known_certs(after, 100).expect("certs");
            after = page.last().map(|c| c.0);
            let done = page.len() < 100;
            known.extend(page);
            if done {
                break;
            }
        }
        let node = CoordNode::new(
            now(at),
            CoordConfig {
                limits: Limits::for_cores(4),
                ca_der: b"ca".to_vec(),
                revision: store.revision().expect("revision"),
                known_certs: known,
                shared: Some(Shared {
                    cert_seq,
                    feed_interval_ms: FEED_INTERVAL_MS,
                    holder: at + 1,
                }),
                bugs: Default::default(),
                placed: Vec::new(),
            },
        );
        Node {
            node,
            store,
            down: false,
            sent: Default::default(),
            closed: Vec::new(),
            stopped: false,
            events: Vec::new(),
            admin: VecDeque::new(),
        }
    }

    /// Carries out everything the node asked for, until it asks for nothing.
    fn settle(&mut self, at: u64) {
        loop {
            let mut busy = false;
            while let Some(e) = self.node.poll_event() {
                self.events.push(e);
            }
            while let Some(effect) = self.node.poll_effect() {
                busy = true;
                match effect {
                    Effect::Store(job) => {
                        let done: StoreDone = if self.down {
                            job.fail(StoreError::unavailable("a test", "the server is down"))
                        } else {
                            job.run(self.store.as_ref())
                        };
                        self.node.handle_store_done(now(at), done);
                    }
                    Effect::Transmit(conn) => {
                        while let Some(out) = self.node.poll_transmit(now(at), conn) {
                            self.sent.entry(conn).or_default().push(out);
                        }
                    }
                    Effect::Close { conn, code, .. } => {
                        self.closed.push((conn, code));
                        self.node.handle_closed(now(at), conn);
                    }
                    Effect::AdminReply { answers, .. } => self.admin.push_back(answers),
                    Effect::Stop => self.stopped = true,
                    Effect::Sign { .. } | Effect::EnrollReply { .. } | Effect::AdminPush { .. } => {
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// Time passes to `at` (ms), timers included.
    fn tick(&mut self, at: u64) {
        self.node.handle_timeout(now(at));
        self.settle(at);
    }

    /// An agent with certificate [n; 32] connects and says Hello.
    fn session(&mut self, n: u8, at: u64) -> ConnId {
        let conn = self
            .node
            .handle_incoming(now(at), IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)))
            .expect("admitted");
        let route = self
            .node
            .handle_handshaken(now(at), conn, Alpn::Session, Some([n; 32]));
        assert!(matches!(route, Route::Session(_)), "{route:?}");
        self.node.handle_agent_msg(
            now(at),
            conn,
            AgentMsg::Hello {
                last_revision: 0,
                outbox_len: 0,
                agent_version: "0.2.0".into(),
                allow_exec: Vec::new(),
                seal_key: Default::default(),
                functions: Default::default(),
                allow_env: Default::default(),
            },
        );
        self.settle(at);
        conn
    }

    fn ask(&mut self, request: AdminRequest, at: u64) -> Vec<AdminResponse> {
        let conn = self
            .node
            .handle_incoming(now(at), IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)))
            .expect("admitted");
        let route = self
            .node
            .handle_handshaken(now(at), conn, Alpn::Admin, Some(ADMIN));
        assert!(matches!(route, Route::Admin(_)), "{route:?}");
        self.node.handle_admin(now(at), conn, 1, request, [7; 32]);
        self.settle(at);
        self.admin.pop_front().expect("an answer")
    }

    /// The tasks upserted on `conn` so far.
    fn upserts(&self, conn: ConnId) -> Vec<TaskId> {
        self.sent
            .get(&conn)
            .into_iter()
            .flatten()
            .filter_map(|o| match o {
                Outgoing::Msg(CoordMsg::Assignments { changes, .. }) => Some(changes),
                _ => None,
            })
            .flatten()
            .filter_map(|c| match c {
                AssignmentChange::Upsert(t) => Some(t.id),
                _ => None,
            })
            .collect()
    }

    fn run_nows(&self, conn: ConnId) -> Vec<TaskId> {
        self.sent
            .get(&conn)
            .into_iter()
            .flatten()
            .filter_map(|o| match o {
                Outgoing::Msg(CoordMsg::RunNow { task_id, .. }) => Some(*task_id),
                _ => None,
            })
            .collect()
    }
}

fn draft(target: Target) -> TaskDraft {
    TaskDraft {
        name: None,
        target,
        schedule: Schedule::at(Timestamp::from_millis_saturating(WALL0 + 3_600_000)),
        action: Action::Exec(ExecSpec {
            program: "/bin/true".into(),
            ..Default::default()
        }),
        policies: Policies::default(),
        anchor_at_creation: false,
        placement: Default::default(),
    }
}

fn created(answers: &[AdminResponse]) -> TaskId {
    match answers.first() {
        Some(AdminResponse::TaskCreated(id)) | Some(AdminResponse::TaskCreatedWarn { id, .. }) => {
            *id
        }
        other => panic!("no task created: {other:?}"),
    }
}

#[test]
fn a_task_created_through_one_coordinator_reaches_a_session_held_by_the_other() {
    let store = store();
    let a1 = enroll(store.as_ref(), 1, &[("site", "north")]);
    let mut a = Node::new(store.clone(), 0);
    let mut b = Node::new(store.clone(), 0);
    let conn = b.session(1, 10);
    assert!(b.node.is_online(a1));

    let direct = created(&a.ask(
        AdminRequest::TaskCreate(Box::new(draft(Target::Agent(a1)))),
        20,
    ));
    let selected = created(&a.ask(
        AdminRequest::TaskCreate(Box::new(draft(Target::Selector(vec![(
            "site".into(),
            "north".into(),
        )])))),
        30,
    ));
    assert!(
        b.upserts(conn).is_empty(),
        "nothing reaches b before it reads the feed"
    );
    b.tick(FEED_INTERVAL_MS + 10);
    let got = b.upserts(conn);
    assert!(got.contains(&direct), "{got:?}");
    assert!(got.contains(&selected), "{got:?}");

    // A change made through b itself is not sent twice by the feed.
    let mine = created(&b.ask(
        AdminRequest::TaskCreate(Box::new(draft(Target::Agent(a1)))),
        600,
    ));
    b.tick(2 * FEED_INTERVAL_MS + 20);
    let got = b.upserts(conn);
    assert_eq!(got.iter().filter(|t| **t == mine).count(), 1, "{got:?}");
    assert_eq!(got.iter().filter(|t| **t == direct).count(), 1, "{got:?}");
}

#[test]
fn an_agent_enrolled_through_one_coordinator_is_known_to_the_other_after_one_feed() {
    let store = store();
    let mut a = Node::new(store.clone(), 0);
    let _ = &mut a;
    let mut b = Node::new(store.clone(), 0);
    let agent = enroll(store.as_ref(), 5, &[]);
    assert_eq!(b.node.cert_role(&[5; 32]), None);
    b.tick(FEED_INTERVAL_MS);
    assert_eq!(b.node.cert_role(&[5; 32]), Some(CertRole::Agent(agent)));
}

#[test]
fn a_revoke_through_one_coordinator_closes_the_session_the_other_holds() {
    let store = store();
    let a1 = enroll(store.as_ref(), 1, &[]);
    let mut a = Node::new(store.clone(), 0);
    let mut b = Node::new(store.clone(), 0);
    let conn = b.session(1, 10);
    let answers = a.ask(AdminRequest::AgentRevoke(a1), 20);
    assert!(
        !answers.iter().any(|r| matches!(r, AdminResponse::Error(_))),
        "{answers:?}"
    );
    assert!(b.node.is_online(a1), "b learns of it from the feed");
    b.tick(FEED_INTERVAL_MS + 10);
    assert!(b.closed.contains(&(conn, close::REVOKED)), "{:?}", b.closed);
    assert!(!b.node.is_online(a1));
    assert_eq!(b.node.cert_role(&[1; 32]), None, "refused at the handshake");
    assert!(b.events.iter().any(
        |e| matches!(e, CoordEvent::AgentRevokedElsewhere { agent, sessions_closed: 1 } if *agent == a1)
    ));
}

#[test]
fn a_run_now_through_one_coordinator_reaches_the_agent_on_the_other_once() {
    let store = store();
    let a1 = enroll(store.as_ref(), 1, &[]);
    let mut a = Node::new(store.clone(), 0);
    let mut b = Node::new(store.clone(), 0);
    let conn = b.session(1, 10);
    let task = created(&a.ask(
        AdminRequest::TaskCreate(Box::new(draft(Target::Agent(a1)))),
        20,
    ));
    let answers = a.ask(AdminRequest::TaskRunNow(task), 30);
    match answers.first() {
        Some(AdminResponse::RunNowSent { sent, offline, .. }) => {
            assert!(sent.is_empty());
            assert_eq!(offline, &vec![a1], "not in session with a: queued");
        }
        other => panic!("{other:?}"),
    }
    b.tick(FEED_INTERVAL_MS + 10);
    assert_eq!(b.run_nows(conn), vec![task]);
    b.tick(2 * FEED_INTERVAL_MS + 20);
    assert_eq!(b.run_nows(conn), vec![task], "taken once");
}

#[test]
fn a_shared_store_that_is_down_closes_sessions_but_does_not_stop_the_node() {
    let store = store();
    let a1 = enroll(store.as_ref(), 1, &[]);
    let mut b = Node::new(store.clone(), 0);
    b.down = true;
    let conn = b.session(1, 10);
    assert!(b.closed.contains(&(conn, close::STORE)), "{:?}", b.closed);
    b.tick(FEED_INTERVAL_MS + 10);
    assert!(!b.stopped, "a shared store reconnects by itself");
    b.down = false;
    let conn = b.session(1, 2 * FEED_INTERVAL_MS);
    assert!(b.node.is_online(a1), "served again once the store is back");
    assert!(!b.closed.iter().any(|(c, _)| *c == conn));
}
