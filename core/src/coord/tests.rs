//! The node's rules, with the store's answers given by hand (the store work
//! itself is tested in `tests/tests/coord_node.rs` on the redb store).

use std::net::{IpAddr, Ipv4Addr};

use sundial_protocol::task::Target;
use sundial_protocol::wire::{close, AdminRequest, AdminResponse, AgentMsg, CoordMsg};
use sundial_protocol::{AgentId, TaskId, Timestamp};

use super::*;
use crate::coord_store::{AdminCert, Agent, CertRole};
use crate::session::fixtures::record;
use crate::session::Now;

/// The node starts at 0; its handshake budget fills within the first second.
const START: u64 = 1_000;

fn at(ms: u64) -> Now {
    crate::session::fixtures::at(START + ms)
}

const CA: &[u8] = b"ca";

fn fp(n: u8) -> [u8; 32] {
    [n; 32]
}

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// A node that knows agents 1..=3 (certificates [1;32]..) and one admin ([9;32]).
fn node_with(limits: Limits) -> CoordNode {
    let mut known: Vec<([u8; 32], CertRole)> = (1..=3)
        .map(|n| (fp(n), CertRole::Agent(AgentId(u64::from(n)))))
        .collect();
    known.push((
        fp(9),
        CertRole::Admin(crate::coord_store::AdminCert::legacy()),
    ));
    CoordNode::new(
        crate::session::fixtures::at(0),
        CoordConfig {
            limits,
            ca_der: CA.to_vec(),
            revision: 0,
            known_certs: known,
            shared: None,
            bugs: CoordBugs::default(),
            placed: Vec::new(),
        },
    )
}

fn node() -> CoordNode {
    node_with(Limits::for_cores(4))
}

fn effects(n: &mut CoordNode) -> Vec<Effect> {
    std::iter::from_fn(|| n.poll_effect()).collect()
}

fn events(n: &mut CoordNode) -> Vec<CoordEvent> {
    std::iter::from_fn(|| n.poll_event()).collect()
}

fn closes(fx: &[Effect]) -> Vec<(ConnId, u32)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::Close { conn, code, .. } => Some((*conn, *code)),
            _ => None,
        })
        .collect()
}

fn agent_record(id: u64, labels: &[(&str, &str)]) -> Agent {
    Agent {
        id: AgentId(id),
        name: None,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cert_sha256: fp(id as u8),
        revoked: false,
        forgotten: false,
        enrolled_at: Timestamp::from_millis_saturating(0),
        last_seen: None,
        clock_offset_ms: None,
        rtt_ms: None,
        in_session: false,
    }
}

fn hello(last_revision: u64) -> AgentMsg {
    AgentMsg::Hello {
        last_revision,
        outbox_len: 0,
        agent_version: "0.2.0".into(),
        allow_exec: Vec::new(),
        seal_key: Default::default(),
        functions: Default::default(),
        allow_env: Default::default(),
    }
}

/// A session of agent `id` through Hello, its store check answered with
/// `labels`; returns the connection and what followed.
fn live_session(
    n: &mut CoordNode,
    id: u64,
    labels: &[(&str, &str)],
    t: u64,
) -> (ConnId, Vec<Effect>) {
    let conn = n.handle_incoming(at(t), ip(id as u8)).expect("admitted");
    let route = n.handle_handshaken(at(t), conn, Alpn::Session, Some(fp(id as u8)));
    assert_eq!(route, Route::Session(AgentId(id)));
    n.handle_agent_msg(at(t), conn, hello(0));
    let fx = effects(n);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Store(StoreJob::Hello { conn: c, .. }) if *c == conn)),
        "Hello asks the store: {fx:?}"
    );
    n.handle_store_done(
        at(t),
        StoreDone::Hello {
            conn,
            agent: AgentId(id),
            result: Ok(Some((agent_record(id, labels), None))),
        },
    );
    (conn, effects(n))
}

/// Agent `id` in session, its first load of changes answered (none), and
/// what that sent and asked for taken.
fn loaded_session(n: &mut CoordNode, id: u64) -> ConnId {
    let (conn, _) = live_session(n, id, &[], 0);
    n.handle_store_done(
        at(1),
        StoreDone::Changes {
            conn,
            result: Ok((Vec::new(), 0, false, Vec::new())),
        },
    );
    drain_transmit(n, conn);
    effects(n);
    conn
}

fn drain_transmit(n: &mut CoordNode, conn: ConnId) -> Vec<Outgoing> {
    std::iter::from_fn(|| n.poll_transmit(at(0), conn)).collect()
}

/// The `k`-th of many addresses in 10.`net`.0.0/16.
fn ip_in(net: u8, k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, net, (k / 250) as u8, (k % 250) as u8))
}

#[test]
fn a_coordinator_behind_on_its_handshakes_admits_no_more_until_they_are_served() {
    let mut n = node_with(Limits {
        handshakes_per_sec: 100_000,
        ..Limits::for_cores(4)
    });
    let ip_of = |k| ip_in(1, k);
    let first = n.handle_incoming(at(0), ip_of(0)).expect("admitted");
    for k in 1..STARTING_MIN {
        n.handle_incoming(at(0), ip_of(k)).expect("admitted");
    }
    // Many starting, but not for long: not behind.
    for k in 0..100 {
        assert!(n.handle_incoming(at(999), ip_of(1_000 + k)).is_ok());
    }
    // STARTING_MIN of them admitted a second ago and still starting.
    assert_eq!(
        n.handle_incoming(at(1_000), ip_of(2_000)),
        Err(Refusal::Behind)
    );
    // One of them served (in session, or gone): admitted again.
    n.handle_closed(at(1_000), first);
    assert!(n.handle_incoming(at(1_000), ip_of(2_001)).is_ok());
    assert_eq!(
        n.handle_incoming(at(1_999), ip_of(2_002)),
        Err(Refusal::Behind),
        "the ones admitted at 999 ms are now a second old too"
    );
}

#[test]
fn connections_whose_agents_gave_up_do_not_hold_a_coordinator_behind() {
    let mut n = node_with(Limits {
        handshakes_per_sec: 100_000,
        ..Limits::for_cores(4)
    });
    let ip_of = |k| ip_in(2, k);
    // A burst whose agents never say Hello (they gave up, or went).
    for k in 0..STARTING_MIN * 2 {
        n.handle_incoming(at(0), ip_of(k)).expect("admitted");
    }
    let attempt = u64::from(ATTEMPT_TIMEOUT_MS);
    assert_eq!(
        n.handle_incoming(at(attempt), ip_of(500)),
        Err(Refusal::Behind),
        "within an attempt's time they may still come"
    );
    // Past the agents' attempt timeout they dial again if they still want
    // to: the coordinator admits again, well before their Hello deadline.
    let later = n.handle_incoming(at(attempt + 1), ip_of(501));
    assert!(later.is_ok(), "{later:?}");
    // New ones that stall count again, as the first ones did.
    for k in 0..STARTING_MIN {
        n.handle_incoming(at(attempt + 2), ip_of(600 + k))
            .expect("admitted");
    }
    assert_eq!(
        n.handle_incoming(at(attempt + 2 + BEHIND_MS), ip_of(700)),
        Err(Refusal::Behind)
    );
}

#[test]
fn an_address_holds_at_most_its_pending_connections_until_they_are_known() {
    let mut n = node_with(Limits {
        pending_per_address_max: 2,
        ..Limits::for_cores(4)
    });
    let a = n.handle_incoming(at(0), ip(1)).expect("first");
    let _b = n.handle_incoming(at(0), ip(1)).expect("second");
    assert_eq!(
        n.handle_incoming(at(0), ip(1)),
        Err(Refusal::PendingPerAddress)
    );
    assert!(
        n.handle_incoming(at(0), ip(2)).is_ok(),
        "another address is not held up"
    );
    // Known by its certificate, a connection no longer counts.
    assert_eq!(
        n.handle_handshaken(at(1), a, Alpn::Session, Some(fp(1))),
        Route::Session(AgentId(1))
    );
    assert!(n.handle_incoming(at(1), ip(1)).is_ok());
}

#[test]
fn the_session_and_admin_alpns_need_a_known_certificate() {
    let mut n = node();
    for (alpn, cert) in [
        (Alpn::Session, None),
        (Alpn::Session, Some(fp(77))),
        (Alpn::Session, Some(fp(9))),
        (Alpn::Admin, Some(fp(1))),
        (Alpn::Other, Some(fp(1))),
    ] {
        let c = n.handle_incoming(at(0), ip(1)).expect("admitted");
        assert_eq!(n.handle_handshaken(at(0), c, alpn, cert), Route::Refused);
        assert_eq!(closes(&effects(&mut n)), vec![(c, close::CERT_REQUIRED)]);
        n.handle_closed(at(0), c);
    }
    assert_eq!(n.connections(), 0);
}

#[test]
fn enrollment_slots_are_bounded() {
    let mut n = node_with(Limits {
        unauthenticated_max: 1,
        ..Limits::for_cores(4)
    });
    let a = n.handle_incoming(at(0), ip(1)).expect("a");
    assert_eq!(
        n.handle_handshaken(at(0), a, Alpn::Enroll, None),
        Route::Enroll
    );
    let b = n.handle_incoming(at(0), ip(2)).expect("b");
    assert_eq!(
        n.handle_handshaken(at(0), b, Alpn::Enroll, None),
        Route::Refused
    );
    assert_eq!(closes(&effects(&mut n)), vec![(b, close::BUSY)]);
    n.handle_closed(at(1), a);
    let c = n.handle_incoming(at(2), ip(3)).expect("c");
    assert_eq!(
        n.handle_handshaken(at(2), c, Alpn::Enroll, None),
        Route::Enroll
    );
}

#[test]
fn a_session_without_hello_in_time_is_closed_and_the_first_message_must_be_hello() {
    // No retention: the only timer is the Hello's deadline.
    let mut n = node_with(Limits {
        audit_retention: None,
        ..Limits::for_cores(4)
    });
    let c = n.handle_incoming(at(0), ip(1)).expect("admitted");
    n.handle_handshaken(at(0), c, Alpn::Session, Some(fp(1)));
    assert_eq!(
        n.frame_limit(c),
        sundial_protocol::wire::HELLO_FRAME_BYTES_MAX
    );
    assert_eq!(n.poll_timeout(), Some(START + EXCHANGE_TIMEOUT_MS));
    n.handle_timeout(at(EXCHANGE_TIMEOUT_MS - 1));
    assert!(closes(&effects(&mut n)).is_empty());
    n.handle_timeout(at(EXCHANGE_TIMEOUT_MS));
    assert_eq!(closes(&effects(&mut n)), vec![(c, close::PROTOCOL)]);

    let d = n.handle_incoming(at(0), ip(2)).expect("admitted");
    n.handle_handshaken(at(0), d, Alpn::Session, Some(fp(2)));
    n.handle_agent_msg(
        at(1),
        d,
        AgentMsg::ClockProbe {
            t1: Timestamp::from_millis_saturating(0),
        },
    );
    assert_eq!(closes(&effects(&mut n)), vec![(d, close::PROTOCOL)]);
}

#[test]
fn a_revoked_or_unknown_agent_is_closed_at_hello_and_a_store_failure_says_so() {
    let mut n = node();
    let c = n.handle_incoming(at(0), ip(1)).expect("admitted");
    n.handle_handshaken(at(0), c, Alpn::Session, Some(fp(1)));
    n.handle_agent_msg(at(0), c, hello(0));
    effects(&mut n);
    n.handle_store_done(
        at(0),
        StoreDone::Hello {
            conn: c,
            agent: AgentId(1),
            result: Ok(None),
        },
    );
    assert_eq!(closes(&effects(&mut n)), vec![(c, close::REVOKED)]);
    assert_eq!(n.sessions_open(), 0);

    let d = n.handle_incoming(at(0), ip(2)).expect("admitted");
    n.handle_handshaken(at(0), d, Alpn::Session, Some(fp(2)));
    n.handle_agent_msg(at(0), d, hello(0));
    effects(&mut n);
    n.handle_store_done(
        at(0),
        StoreDone::Hello {
            conn: d,
            agent: AgentId(2),
            result: Err(StoreError::unavailable("read agent", "disk gone")),
        },
    );
    let fx = effects(&mut n);
    assert_eq!(closes(&fx), vec![(d, close::STORE)]);
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Stop)),
        "an unavailable store stops the coordinator"
    );
}

#[test]
fn a_live_session_loads_its_changes_and_a_newer_one_replaces_it() {
    let mut n = node();
    let (a, fx) = live_session(&mut n, 1, &[], 0);
    assert!(fx.iter().any(
        |e| matches!(e, Effect::Store(StoreJob::Changes { conn, since: 0, .. }) if *conn == a)
    ));
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Transmit(c) if *c == a)),
        "the policy goes out"
    );
    assert_eq!(n.sessions_open(), 1);
    assert!(n.is_online(AgentId(1)));
    let (b, fx) = live_session(&mut n, 1, &[], 5);
    assert_eq!(closes(&fx), vec![(a, close::REPLACED)]);
    assert_eq!(n.sessions_open(), 1, "one agent, one session");
    assert!(
        drain_transmit(&mut n, a).is_empty(),
        "the replaced session sends nothing more"
    );
    n.handle_closed(at(6), a);
    assert!(
        n.is_online(AgentId(1)),
        "closing the old one leaves the new one"
    );
    assert!(!drain_transmit(&mut n, b).is_empty());
}

#[test]
fn the_session_cap_refuses_with_a_retry_after() {
    let mut n = node_with(Limits {
        sessions_max: 1,
        ..Limits::for_cores(4)
    });
    live_session(&mut n, 1, &[], 0);
    let c = n.handle_incoming(at(0), ip(2)).expect("admitted");
    n.handle_handshaken(at(0), c, Alpn::Session, Some(fp(2)));
    n.handle_agent_msg(at(0), c, hello(0));
    effects(&mut n);
    n.handle_store_done(
        at(0),
        StoreDone::Hello {
            conn: c,
            agent: AgentId(2),
            result: Ok(Some((agent_record(2, &[]), None))),
        },
    );
    let fx = effects(&mut n);
    let reason = fx.iter().find_map(|e| match e {
        Effect::Close { conn, code, reason } if *conn == c && *code == close::BUSY => {
            Some(reason.clone())
        }
        _ => None,
    });
    let reason = reason.expect("BUSY");
    assert!(
        sundial_protocol::wire::busy_retry_after_ms(reason.as_bytes()).is_some(),
        "{reason}"
    );
    assert!(events(&mut n)
        .iter()
        .any(|e| matches!(e, CoordEvent::SessionBusy { agent, .. } if *agent == AgentId(2))));
}

#[test]
fn a_change_wakes_only_the_sessions_it_targets_and_run_now_reaches_only_live_ones() {
    let mut n = node();
    let (a, _) = live_session(&mut n, 1, &[("site", "north")], 0);
    let (b, _) = live_session(&mut n, 2, &[("site", "south")], 0);
    // Both initial loads answered: nothing more to load.
    for c in [a, b] {
        n.handle_store_done(
            at(1),
            StoreDone::Changes {
                conn: c,
                result: Ok((Vec::new(), 0, false, Vec::new())),
            },
        );
        drain_transmit(&mut n, c);
    }
    effects(&mut n);
    let admin = n.handle_incoming(at(2), ip(9)).expect("admin");
    assert_eq!(
        n.handle_handshaken(at(2), admin, Alpn::Admin, Some(fp(9))),
        Route::Admin(AdminId(fp(9)))
    );
    n.handle_admin(at(2), admin, 1, AdminRequest::TaskList, [0; ENTROPY_BYTES]);
    let fx = effects(&mut n);
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::Store(StoreJob::Admin { req: 1, .. }))));
    n.handle_store_done(
        at(3),
        StoreDone::Admin {
            conn: admin,
            req: 1,
            audit: None,
            result: Ok(AdminAnswer {
                answers: vec![AdminResponse::TaskCreated(TaskId(1))],
                follow: vec![
                    FollowUp::Announce {
                        target: Target::Selector(vec![("site".into(), "north".into())]),
                        revision: 1,
                    },
                    FollowUp::RunNow {
                        task: TaskId(1),
                        at: Timestamp::from_millis_saturating(3),
                        agents: vec![AgentId(1), AgentId(3)],
                    },
                ],
            }),
        },
    );
    let fx = effects(&mut n);
    let loads: Vec<ConnId> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Store(StoreJob::Changes { conn, .. }) => Some(*conn),
            _ => None,
        })
        .collect();
    assert_eq!(loads, vec![a], "only the north agent's session loads");
    let reply = fx.iter().find_map(|e| match e {
        Effect::AdminReply { answers, .. } => Some(answers.clone()),
        _ => None,
    });
    let reply = reply.expect("answered");
    assert!(reply.contains(&AdminResponse::RunNowSent {
        at: Timestamp::from_millis_saturating(3),
        sent: vec![AgentId(1)],
        offline: vec![AgentId(3)],
    }));
    assert!(drain_transmit(&mut n, a).iter().any(|m| matches!(
        m,
        Outgoing::Msg(CoordMsg::RunNow {
            task_id: TaskId(1),
            ..
        })
    )));
}

#[test]
fn a_run_now_is_sent_and_answered_only_once_its_audit_entry_is_committed() {
    let mut n = node();
    let a = loaded_session(&mut n, 1);
    let admin = n.handle_incoming(at(2), ip(9)).expect("admin");
    n.handle_handshaken(at(2), admin, Alpn::Admin, Some(fp(9)));
    let entry = AuditEntry {
        seq: 0,
        at: at(2).wall,
        admin: "ops".into(),
        cert_sha256: fp(9),
        from: None,
        action: "task run-now".into(),
        subject: Some("task 1".into()),
        revision: None,
        refused: None,
    };
    let run_now = |n: &mut CoordNode, req: u64| {
        n.handle_admin(
            at(2),
            admin,
            req,
            AdminRequest::TaskRunNow(TaskId(1)),
            [0; ENTROPY_BYTES],
        );
        effects(n);
        n.handle_store_done(
            at(3),
            StoreDone::Admin {
                conn: admin,
                req,
                audit: Some(Box::new(entry.clone())),
                result: Ok(AdminAnswer {
                    answers: Vec::new(),
                    follow: vec![FollowUp::RunNow {
                        task: TaskId(1),
                        at: Timestamp::from_millis_saturating(3),
                        agents: vec![AgentId(1)],
                    }],
                }),
            },
        );
        effects(n)
    };
    let replies = |fx: &[Effect]| -> Vec<Vec<AdminResponse>> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::AdminReply { answers, .. } => Some(answers.clone()),
                _ => None,
            })
            .collect()
    };
    let sent = |n: &mut CoordNode| {
        drain_transmit(n, a)
            .iter()
            .filter(|m| matches!(m, Outgoing::Msg(CoordMsg::RunNow { .. })))
            .count()
    };
    // Logged first: neither sent nor answered before the entry is committed.
    let fx = run_now(&mut n, 1);
    let job = fx.iter().find_map(|e| match e {
        Effect::Store(StoreJob::AuditRunNow { conn, req, run }) => Some((*conn, *req, run.clone())),
        _ => None,
    });
    let (conn, req, run) = job.unwrap_or_else(|| panic!("no audit job: {fx:?}"));
    assert_eq!((conn, req, &run.entry), (admin, 1, &entry));
    assert!(replies(&fx).is_empty(), "answered before logged: {fx:?}");
    assert_eq!(sent(&mut n), 0, "sent before logged");
    n.handle_store_done(
        at(4),
        StoreDone::AuditRunNow {
            conn,
            req,
            run,
            result: Ok(()),
        },
    );
    let fx = effects(&mut n);
    assert_eq!(
        replies(&fx),
        vec![vec![AdminResponse::RunNowSent {
            at: Timestamp::from_millis_saturating(3),
            sent: vec![AgentId(1)],
            offline: Vec::new(),
        }]]
    );
    assert_eq!(sent(&mut n), 1);
    // An entry that cannot be written: the run is not started, and the
    // admin is told so.
    let fx = run_now(&mut n, 2);
    let Some(run) = fx.iter().find_map(|e| match e {
        Effect::Store(StoreJob::AuditRunNow { run, .. }) => Some(run.clone()),
        _ => None,
    }) else {
        panic!("no audit job: {fx:?}")
    };
    n.handle_store_done(
        at(5),
        StoreDone::AuditRunNow {
            conn: admin,
            req: 2,
            run,
            result: Err(StoreError::unavailable("append audit", "disk full")),
        },
    );
    let fx = effects(&mut n);
    match replies(&fx).as_slice() {
        [r] => assert!(
            matches!(r.as_slice(), [AdminResponse::Error(why)] if why.contains("not started")),
            "{r:?}"
        ),
        other => panic!("one answer expected: {other:?}"),
    }
    assert_eq!(sent(&mut n), 0, "sent without its entry");
}

#[test]
fn a_revocation_closes_the_live_session_and_forgets_the_certificate() {
    let mut n = node();
    let (a, _) = live_session(&mut n, 1, &[], 0);
    let admin = n.handle_incoming(at(1), ip(9)).expect("admin");
    n.handle_handshaken(at(1), admin, Alpn::Admin, Some(fp(9)));
    n.handle_admin(
        at(1),
        admin,
        7,
        AdminRequest::AgentRevoke(AgentId(1)),
        [0; ENTROPY_BYTES],
    );
    effects(&mut n);
    n.handle_store_done(
        at(2),
        StoreDone::Admin {
            conn: admin,
            req: 7,
            audit: None,
            result: Ok(AdminAnswer {
                answers: vec![AdminResponse::Done],
                follow: vec![FollowUp::Revoked {
                    agent: AgentId(1),
                    cert_sha256: fp(1),
                }],
            }),
        },
    );
    assert_eq!(closes(&effects(&mut n)), vec![(a, close::REVOKED)]);
    assert!(!n.is_online(AgentId(1)));
    assert_eq!(n.cert_role(&fp(1)), None);
    assert!(events(&mut n).iter().any(|e| matches!(
        e,
        CoordEvent::AgentRevoked { agent, by, sessions_closed: 1 } if *agent == AgentId(1) && *by == AdminId(fp(9))
    )));
}

#[test]
fn results_are_acknowledged_only_after_the_store_says_stored() {
    let mut n = node();
    let a = loaded_session(&mut n, 1);
    let runs = vec![record(1, 1, 1_000)];
    n.handle_agent_msg(
        at(2),
        a,
        AgentMsg::Results {
            batch_id: 4,
            runs: runs.clone(),
        },
    );
    let fx = effects(&mut n);
    let cache = fx.iter().find_map(|e| match e {
        Effect::Store(StoreJob::Runs {
            batch_id: 4, cache, ..
        }) => Some(cache.clone()),
        _ => None,
    });
    let cache = cache.expect("the batch goes to the store");
    assert!(
        !drain_transmit(&mut n, a)
            .iter()
            .any(|m| matches!(m, Outgoing::Msg(CoordMsg::ResultsAck { .. }))),
        "no ack before the commit"
    );
    n.handle_store_done(
        at(3),
        StoreDone::Runs {
            conn: a,
            batch_id: 4,
            result: Ok(RunsVerdict::Stored {
                keys: runs.iter().map(|r| r.key()).collect(),
                unknown: Vec::new(),
                conflicts: Vec::new(),
                recorded: runs.clone(),
            }),
            cache,
        },
    );
    assert!(drain_transmit(&mut n, a)
        .iter()
        .any(|m| matches!(m, Outgoing::Msg(CoordMsg::ResultsAck { batch_id: 4, .. }))));
    assert!(events(&mut n)
        .iter()
        .any(|e| matches!(e, CoordEvent::RunsRecorded { runs: got } if got.len() == runs.len())));
}

#[test]
fn frames_before_the_hello_is_checked_are_bounded() {
    let mut n = node();
    let c = n.handle_incoming(at(0), ip(1)).expect("admitted");
    n.handle_handshaken(at(0), c, Alpn::Session, Some(fp(1)));
    n.handle_agent_msg(at(0), c, hello(0));
    effects(&mut n);
    for _ in 0..SESSION_INBOX_MAX {
        n.handle_agent_msg(
            at(0),
            c,
            AgentMsg::ClockProbe {
                t1: Timestamp::from_millis_saturating(0),
            },
        );
    }
    assert!(closes(&effects(&mut n)).is_empty());
    n.handle_agent_msg(
        at(0),
        c,
        AgentMsg::ClockProbe {
            t1: Timestamp::from_millis_saturating(0),
        },
    );
    assert_eq!(closes(&effects(&mut n)), vec![(c, close::PROTOCOL)]);
}

#[test]
fn admin_requests_beyond_the_slots_wait_and_run_in_turn() {
    let mut n = node_with(Limits {
        admin_concurrent_max: 1,
        ..Limits::for_cores(4)
    });
    let admin = n.handle_incoming(at(0), ip(9)).expect("admin");
    n.handle_handshaken(at(0), admin, Alpn::Admin, Some(fp(9)));
    n.handle_admin(at(0), admin, 1, AdminRequest::TaskList, [0; ENTROPY_BYTES]);
    n.handle_admin(at(0), admin, 2, AdminRequest::TokenList, [0; ENTROPY_BYTES]);
    let jobs = |fx: &[Effect]| {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Store(StoreJob::Admin { req, .. }) => Some(*req),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(jobs(&effects(&mut n)), vec![1]);
    n.handle_store_done(
        at(1),
        StoreDone::Admin {
            conn: admin,
            req: 1,
            audit: None,
            result: Err(StoreError::Refused("no".into())),
        },
    );
    let fx = effects(&mut n);
    assert_eq!(jobs(&fx), vec![2]);
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::AdminReply { req: 1, answers, .. } if answers == &vec![AdminResponse::Error("no".into())]
    )));
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Stop)),
        "a refusal is not a broken store"
    );
}

#[test]
fn retention_purges_in_batches_every_interval() {
    let mut n = node_with(Limits {
        run_retention: Some(sundial_protocol::DurationMs(1_000)),
        ..Limits::for_cores(4)
    });
    assert_eq!(n.poll_timeout(), Some(PURGE_FIRST_MS));
    n.handle_timeout(at(PURGE_FIRST_MS - START));
    let fx = effects(&mut n);
    let Some((before, max)) = fx.iter().find_map(|e| match e {
        Effect::Store(StoreJob::Purge { before, max }) => Some((*before, *max)),
        _ => None,
    }) else {
        panic!("a purge: {fx:?}");
    };
    // The audit log's retention (two years by default) goes with it.
    let two_years = i64::try_from(AUDIT_RETENTION_DEFAULT_MS).expect("fits");
    assert!(
        fx.iter().any(
            |e| matches!(e, Effect::Store(StoreJob::PurgeAudit { before: b, .. })
            if *b == at(PURGE_FIRST_MS - START).wall.saturating_add_ms(-two_years))
        ),
        "{fx:?}"
    );
    assert_eq!(
        before,
        at(PURGE_FIRST_MS - START).wall.saturating_add_ms(-1_000)
    );
    n.handle_store_done(
        at(PURGE_INTERVAL_MS),
        StoreDone::Purge {
            before,
            max,
            result: Ok(max),
        },
    );
    assert!(
        matches!(
            effects(&mut n).as_slice(),
            [Effect::Store(StoreJob::Purge { .. })]
        ),
        "a full batch: another"
    );
    n.handle_store_done(
        at(PURGE_INTERVAL_MS + 5),
        StoreDone::Purge {
            before,
            max,
            result: Ok(3),
        },
    );
    assert!(events(&mut n)
        .iter()
        .any(|e| matches!(e, CoordEvent::RunsPurged { deleted, .. } if *deleted == max + 3)));
    assert_eq!(n.poll_timeout(), Some(START + 2 * PURGE_INTERVAL_MS + 5));
}

#[test]
fn a_run_now_never_takes_the_instant_of_an_occurrence() {
    use super::admin::run_now_instant;
    use sundial_protocol::{DurationMs, Schedule};
    let t = |ms: i64| Timestamp::from_millis_saturating(1_800_000_000_000 + ms);
    let every = Schedule::every(DurationMs(500), t(0)).expect("a schedule");
    // On the grid: moved one millisecond on, so its key is its own.
    assert_eq!(run_now_instant(&every, t(1_000)), t(1_001));
    assert_eq!(run_now_instant(&every, t(1_001)), t(1_001));
    let at = Schedule::at(t(7));
    assert_eq!(run_now_instant(&at, t(7)), t(8));
    assert_eq!(run_now_instant(&at, t(9)), t(9));
}

/// Every admin request, one of each kind. The match below makes adding a
/// request without listing it here (and so without a row in the table of
/// `every_request_is_allowed_exactly_where_the_role_table_says`) a compile
/// error.
fn every_request() -> Vec<AdminRequest> {
    use sundial_protocol::wire::{AuditQuery, Role, TaskPatch};
    let all = vec![
        AdminRequest::TokenCreate {
            ttl_ms: 60_000,
            uses: 1,
            labels: Vec::new(),
        },
        AdminRequest::AgentList,
        AdminRequest::AgentGet(AgentId(1)),
        AdminRequest::AgentRevoke(AgentId(1)),
        AdminRequest::TaskCreate(Box::new(sundial_protocol::wire::TaskDraft {
            name: None,
            target: Target::Agent(AgentId(1)),
            schedule: sundial_protocol::Schedule::at(Timestamp::from_millis_saturating(0)),
            action: sundial_protocol::task::Action::Exec(Default::default()),
            policies: Default::default(),
            anchor_at_creation: false,
            placement: Default::default(),
        })),
        AdminRequest::TaskList,
        AdminRequest::TaskGet(TaskId(1)),
        AdminRequest::TaskCancel(TaskId(1)),
        AdminRequest::TaskUpdate {
            id: TaskId(1),
            patch: Box::new(TaskPatch::default()),
        },
        AdminRequest::TaskRunNow(TaskId(1)),
        AdminRequest::TaskPause(TaskId(1)),
        AdminRequest::TaskResume(TaskId(1)),
        AdminRequest::AgentForget(AgentId(1)),
        AdminRequest::TokenList,
        AdminRequest::TokenRevoke("01234567".into()),
        AdminRequest::RunList {
            task: None,
            agent: None,
            since: None,
            limit: 10,
            after: None,
            before: None,
        },
        AdminRequest::AdminCreate {
            name: "carol".into(),
            role: Role::Viewer,
            ttl_ms: 86_400_000,
            csr_der: vec![1, 2, 3],
        },
        AdminRequest::AdminList,
        AdminRequest::AdminRenew {
            name: "carol".into(),
            ttl_ms: 86_400_000,
            csr_der: vec![1, 2, 3],
        },
        AdminRequest::AdminRevoke("carol".into()),
        AdminRequest::AuditList(AuditQuery {
            limit: 10,
            ..AuditQuery::default()
        }),
        AdminRequest::RunFollow {
            task: None,
            agent: None,
        },
        AdminRequest::SealKeys(Target::Selector(Vec::new())),
        AdminRequest::TaskReseal {
            id: TaskId(1),
            sealed_env: Vec::new(),
        },
        AdminRequest::ModuleGet(sundial_protocol::wasm::ModuleHash([1; 32])),
        AdminRequest::ModuleUpload {
            hash: sundial_protocol::wasm::ModuleHash::of(b"x"),
            size: 1,
            offset: 0,
            chunk: b"x".to_vec(),
        },
    ];
    let mut seen = std::collections::BTreeSet::new();
    for r in &all {
        // Exhaustive on purpose: a new request must be listed above.
        let kind = match r {
            AdminRequest::TokenCreate { .. } => 0,
            AdminRequest::AgentList => 1,
            AdminRequest::AgentGet(_) => 2,
            AdminRequest::AgentRevoke(_) => 3,
            AdminRequest::TaskCreate(_) => 4,
            AdminRequest::TaskList => 5,
            AdminRequest::TaskGet(_) => 6,
            AdminRequest::TaskCancel(_) => 7,
            AdminRequest::TaskUpdate { .. } => 8,
            AdminRequest::TaskRunNow(_) => 9,
            AdminRequest::TaskPause(_) => 10,
            AdminRequest::TaskResume(_) => 11,
            AdminRequest::AgentForget(_) => 12,
            AdminRequest::TokenList => 13,
            AdminRequest::TokenRevoke(_) => 14,
            AdminRequest::RunList { .. } => 15,
            AdminRequest::AdminCreate { .. } => 16,
            AdminRequest::AdminList => 17,
            AdminRequest::AdminRenew { .. } => 18,
            AdminRequest::AdminRevoke(_) => 19,
            AdminRequest::AuditList(_) => 20,
            AdminRequest::RunFollow { .. } => 21,
            AdminRequest::SealKeys(_) => 22,
            AdminRequest::TaskReseal { .. } => 23,
            AdminRequest::ModuleGet(_) => 24,
            AdminRequest::ModuleUpload { .. } => 25,
        };
        seen.insert(kind);
    }
    assert_eq!(seen.len(), 26, "every kind of request once");
    all
}

/// A node with one admin of each role: viewer [21;32], operator [22;32],
/// owner [23;32], valid for a day after the start.
fn node_with_roles() -> CoordNode {
    use sundial_protocol::wire::Role;
    let mut n = node();
    let day = crate::session::fixtures::at(86_400_000).wall;
    for (i, role) in Role::ALL.into_iter().enumerate() {
        n.known.insert(
            fp(21 + i as u8),
            CertRole::Admin(AdminCert {
                name: role.name().into(),
                role,
                expires_at: day,
            }),
        );
    }
    n
}

#[test]
fn every_request_is_allowed_exactly_where_the_role_table_says() {
    use sundial_protocol::wire::Role;
    // The table, as the README states it: the least role each request needs.
    let needs = |r: &AdminRequest| match r {
        AdminRequest::AgentList
        | AdminRequest::AgentGet(_)
        | AdminRequest::TaskList
        | AdminRequest::TaskGet(_)
        | AdminRequest::TokenList
        | AdminRequest::RunList { .. }
        | AdminRequest::AdminList
        | AdminRequest::AuditList(_)
        | AdminRequest::RunFollow { .. }
        | AdminRequest::SealKeys(_)
        | AdminRequest::ModuleGet(_) => Role::Viewer,
        AdminRequest::TokenCreate { .. }
        | AdminRequest::TokenRevoke(_)
        | AdminRequest::TaskCreate(_)
        | AdminRequest::TaskUpdate { .. }
        | AdminRequest::TaskReseal { .. }
        | AdminRequest::TaskCancel(_)
        | AdminRequest::TaskRunNow(_)
        | AdminRequest::TaskPause(_)
        | AdminRequest::TaskResume(_)
        | AdminRequest::ModuleUpload { .. } => Role::Operator,
        AdminRequest::AgentRevoke(_)
        | AdminRequest::AgentForget(_)
        | AdminRequest::AdminCreate { .. }
        | AdminRequest::AdminRenew { .. }
        | AdminRequest::AdminRevoke(_) => Role::Owner,
    };
    let mut checked = 0;
    for (i, role) in Role::ALL.into_iter().enumerate() {
        let mut n = node_with_roles();
        let conn = n.handle_incoming(at(1), ip(30)).expect("admin");
        assert_eq!(
            n.handle_handshaken(at(1), conn, Alpn::Admin, Some(fp(21 + i as u8))),
            Route::Admin(AdminId(fp(21 + i as u8)))
        );
        effects(&mut n);
        for (req_id, req) in every_request().into_iter().enumerate() {
            let allowed = role >= needs(&req);
            let what = format!("{role} asking {}", admin::action(&req));
            n.handle_admin(at(2), conn, req_id as u64, req.clone(), [0; ENTROPY_BYTES]);
            let fx = effects(&mut n);
            let went_on = fx.iter().any(|e| {
                matches!(
                    e,
                    Effect::Store(StoreJob::Admin { .. })
                        | Effect::Sign { .. }
                        | Effect::AdminPush { .. }
                )
            });
            let replied = |fx: &[Effect]| {
                fx.iter().find_map(|e| match e {
                    Effect::AdminReply { answers, .. } => match answers.as_slice() {
                        [AdminResponse::Error(why)] => Some(why.clone()),
                        _ => None,
                    },
                    _ => None,
                })
            };
            // A refusal is logged first and answered once its entry is
            // committed.
            let audited = fx.iter().find_map(|e| match e {
                Effect::Store(StoreJob::AuditRefused { entry, .. })
                    if entry.admin == role.name() =>
                {
                    entry.refused.clone()
                }
                _ => None,
            });
            if allowed {
                assert!(
                    went_on && replied(&fx).is_none() && audited.is_none(),
                    "{what}: allowed, got {fx:?}"
                );
            } else {
                assert!(!went_on, "{what}: refused but carried out");
                assert!(
                    replied(&fx).is_none(),
                    "{what}: answered before the refusal was logged: {fx:?}"
                );
                let logged =
                    audited.unwrap_or_else(|| panic!("{what}: the refusal is not logged: {fx:?}"));
                n.handle_store_done(
                    at(3),
                    StoreDone::AuditRefused {
                        conn,
                        req: req_id as u64,
                        why: logged.clone(),
                        result: Ok(()),
                    },
                );
                let why = replied(&effects(&mut n))
                    .unwrap_or_else(|| panic!("{what}: refused, never answered"));
                assert_eq!(why, logged, "{what}: the answer is the logged refusal");
                assert!(
                    why.contains(&format!("needs the {} role", needs(&req))),
                    "{what}: the refusal names the role needed: {why}"
                );
            }
            // The table in the code agrees with this one.
            assert_eq!(admin::required_role(&req), needs(&req), "{what}");
            checked += 1;
            if allowed {
                // Free the admin slot the job took.
                n.handle_store_done(
                    at(3),
                    StoreDone::Admin {
                        conn,
                        req: req_id as u64,
                        result: Ok(AdminAnswer::default()),
                        audit: None,
                    },
                );
            }
            effects(&mut n);
        }
    }
    assert_eq!(checked, 3 * 26);
}

/// The node's effects, with the refusals among them logged (as the store
/// would commit their audit entries) and what followed: their answers.
fn answered(n: &mut CoordNode) -> Vec<Effect> {
    let mut fx = effects(n);
    let logged: Vec<(ConnId, u64, String)> = fx
        .iter()
        .filter_map(|e| match e {
            Effect::Store(StoreJob::AuditRefused { conn, req, entry }) => {
                Some((*conn, *req, entry.refused.clone().unwrap_or_default()))
            }
            _ => None,
        })
        .collect();
    for (conn, req, why) in logged {
        n.handle_store_done(
            at(2),
            StoreDone::AuditRefused {
                conn,
                req,
                why,
                result: Ok(()),
            },
        );
        fx.extend(effects(n));
    }
    fx
}

#[test]
fn any_admin_may_renew_itself_and_only_itself() {
    use sundial_protocol::wire::AdminRequest as R;
    let mut n = node_with_roles();
    let conn = n.handle_incoming(at(1), ip(30)).expect("admin");
    n.handle_handshaken(at(1), conn, Alpn::Admin, Some(fp(21)));
    effects(&mut n);
    let renew = |name: &str| R::AdminRenew {
        name: name.into(),
        ttl_ms: 86_400_000,
        csr_der: vec![1],
    };
    n.handle_admin(at(2), conn, 1, renew("viewer"), [0; ENTROPY_BYTES]);
    let fx = answered(&mut n);
    assert!(
        fx.iter().any(|e| matches!(e, Effect::Sign { signee: Signee::Admin { name, .. }, .. } if name == "viewer")),
        "{fx:?}"
    );
    n.handle_admin(at(2), conn, 2, renew("owner"), [0; ENTROPY_BYTES]);
    let fx = answered(&mut n);
    assert!(fx.iter().any(|e| matches!(e, Effect::AdminReply { answers, .. }
        if matches!(answers.as_slice(), [AdminResponse::Error(w)] if w.contains("needs the owner role")))));
    // A lifetime out of bounds is refused before anything is signed.
    let mut long = renew("viewer");
    if let R::AdminRenew { ttl_ms, .. } = &mut long {
        *ttl_ms = admin::ADMIN_TTL_MAX_MS + 1;
    }
    n.handle_admin(at(2), conn, 3, long, [0; ENTROPY_BYTES]);
    let fx = answered(&mut n);
    assert!(
        !fx.iter().any(|e| matches!(e, Effect::Sign { .. })),
        "{fx:?}"
    );
}

#[test]
fn a_revoked_admin_is_cut_off_mid_connection_and_an_expired_one_is_told_so() {
    let mut n = node_with_roles();
    let op = n.handle_incoming(at(1), ip(30)).expect("operator");
    n.handle_handshaken(at(1), op, Alpn::Admin, Some(fp(22)));
    let owner = n.handle_incoming(at(1), ip(31)).expect("owner");
    n.handle_handshaken(at(1), owner, Alpn::Admin, Some(fp(23)));
    effects(&mut n);
    // The owner revokes the operator: the store answers with the follow-up.
    n.handle_admin(
        at(2),
        owner,
        1,
        AdminRequest::AdminRevoke("operator".into()),
        [0; ENTROPY_BYTES],
    );
    effects(&mut n);
    n.handle_store_done(
        at(3),
        StoreDone::Admin {
            conn: owner,
            req: 1,
            result: Ok(AdminAnswer {
                answers: vec![AdminResponse::Done],
                follow: vec![FollowUp::AdminCert {
                    removed: Some(fp(22)),
                    added: None,
                    why: "the credential of admin \"operator\" was revoked".into(),
                }],
            }),
            audit: None,
        },
    );
    let fx = effects(&mut n);
    assert_eq!(closes(&fx), vec![(op, close::REVOKED)], "{fx:?}");
    assert_eq!(n.cert_role(&fp(22)), None, "refused at the next handshake");
    // A request already on its way is refused, not carried out.
    n.handle_admin(at(4), op, 2, AdminRequest::TaskList, [0; ENTROPY_BYTES]);
    let fx = effects(&mut n);
    assert!(!fx
        .iter()
        .any(|e| matches!(e, Effect::Store(StoreJob::Admin { .. }))));
    // A credential past its end: refused with a close that says so.
    let late = n.handle_incoming(at(86_400_001), ip(32)).expect("late");
    assert_eq!(
        n.handle_handshaken(at(86_400_001), late, Alpn::Admin, Some(fp(21))),
        Route::Refused
    );
    let fx = effects(&mut n);
    let reason = fx.iter().find_map(|e| match e {
        Effect::Close { code, reason, .. } if *code == close::EXPIRED => Some(reason.clone()),
        _ => None,
    });
    let reason = reason.expect("closed as expired");
    assert!(
        reason.contains("expired") && reason.contains("admin renew viewer"),
        "{reason}"
    );
}

#[test]
fn an_admin_renewing_itself_gets_its_answer_and_its_old_connections_close() {
    use sundial_protocol::wire::Role;
    let mut n = node_with_roles();
    let asking = n.handle_incoming(at(1), ip(30)).expect("viewer");
    n.handle_handshaken(at(1), asking, Alpn::Admin, Some(fp(21)));
    let other = n.handle_incoming(at(1), ip(31)).expect("viewer elsewhere");
    n.handle_handshaken(at(1), other, Alpn::Admin, Some(fp(21)));
    effects(&mut n);
    n.handle_store_done(
        at(3),
        StoreDone::Admin {
            conn: asking,
            req: 1,
            result: Ok(AdminAnswer {
                answers: vec![AdminResponse::Done],
                follow: vec![FollowUp::AdminCert {
                    removed: Some(fp(21)),
                    added: Some((
                        fp(41),
                        AdminCert {
                            name: "viewer".into(),
                            role: Role::Viewer,
                            expires_at: at(1_000_000).wall,
                        },
                    )),
                    why: "renewed".into(),
                }],
            }),
            audit: None,
        },
    );
    let fx = effects(&mut n);
    assert_eq!(closes(&fx), vec![(other, close::REVOKED)], "{fx:?}");
    assert!(fx
        .iter()
        .any(|e| matches!(e, Effect::AdminReply { conn, .. } if *conn == asking)));
    assert!(matches!(n.cert_role(&fp(41)), Some(CertRole::Admin(_))));
    assert_eq!(n.cert_role(&fp(21)), None);
    // The asking connection's next request is refused.
    n.handle_admin(at(4), asking, 2, AdminRequest::TaskList, [0; ENTROPY_BYTES]);
    assert!(!effects(&mut n)
        .iter()
        .any(|e| matches!(e, Effect::Store(StoreJob::Admin { .. }))));
}

#[test]
fn a_run_follow_gets_the_runs_it_asks_for_once_each_until_it_ends() {
    let mut n = node_with_roles();
    let (a, _) = live_session(&mut n, 1, &[], 0);
    let viewer = n.handle_incoming(at(1), ip(30)).expect("viewer");
    n.handle_handshaken(at(1), viewer, Alpn::Admin, Some(fp(21)));
    effects(&mut n);
    n.handle_admin(
        at(2),
        viewer,
        5,
        AdminRequest::RunFollow {
            task: Some(TaskId(1)),
            agent: None,
        },
        [0; ENTROPY_BYTES],
    );
    let fx = effects(&mut n);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::AdminPush { req: 5, answers, .. }
        if answers == &vec![AdminResponse::Following])),
        "{fx:?}"
    );
    let stored = |n: &mut CoordNode, batch_id, runs: Vec<sundial_protocol::RunRecord>| {
        n.handle_store_done(
            at(3),
            StoreDone::Runs {
                conn: a,
                batch_id,
                result: Ok(RunsVerdict::Stored {
                    keys: runs.iter().map(|r| r.key()).collect(),
                    unknown: Vec::new(),
                    conflicts: Vec::new(),
                    recorded: runs,
                }),
                cache: Default::default(),
            },
        );
        effects(n)
            .into_iter()
            .filter_map(|e| match e {
                Effect::AdminPush { conn, answers, .. } if conn == viewer => Some(answers),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // Task 1's run is pushed; task 2's is not.
    let pushed = stored(&mut n, 1, vec![record(1, 1, 1_000), record(2, 1, 1_000)]);
    assert_eq!(
        pushed,
        vec![vec![AdminResponse::Runs(vec![record(1, 1, 1_000)])]]
    );
    // A resend (nothing recorded anew) pushes nothing.
    assert!(stored(&mut n, 2, Vec::new()).is_empty());
    // Ended by the shell: nothing more.
    n.handle_follow_end(at(4), viewer, 5);
    assert!(stored(&mut n, 3, vec![record(1, 1, 2_000)]).is_empty());
}

/// A session of agent `id` whose Hello says version `version`.
fn live_session_of(n: &mut CoordNode, id: u64, version: &str, t: u64) -> ConnId {
    let conn = n.handle_incoming(at(t), ip(id as u8)).expect("admitted");
    n.handle_handshaken(at(t), conn, Alpn::Session, Some(fp(id as u8)));
    n.handle_agent_msg(
        at(t),
        conn,
        AgentMsg::Hello {
            last_revision: 0,
            outbox_len: 3,
            agent_version: version.into(),
            allow_exec: Vec::new(),
            seal_key: Default::default(),
            functions: Default::default(),
            allow_env: Default::default(),
        },
    );
    n.handle_store_done(
        at(t),
        StoreDone::Hello {
            conn,
            agent: AgentId(id),
            result: Ok(Some((agent_record(id, &[]), None))),
        },
    );
    n.handle_store_done(
        at(t),
        StoreDone::Changes {
            conn,
            result: Ok((Vec::new(), 0, false, Vec::new())),
        },
    );
    conn
}

#[test]
fn agents_from_0_3_are_asked_for_reports_which_give_the_fleet_figures_and_the_assignment_lag() {
    let mut n = node();
    let new = live_session_of(&mut n, 1, "0.3.0", 0);
    let old = live_session_of(&mut n, 2, "0.2.0", 0);
    let asked = |n: &mut CoordNode, c| {
        drain_transmit(n, c)
            .iter()
            .any(|m| matches!(m, Outgoing::Msg(CoordMsg::ReportEvery { every_ms: 15_000 })))
    };
    assert!(asked(&mut n, new), "a 0.3 agent is asked to report");
    assert!(!asked(&mut n, old), "a 0.2 agent would not understand");
    effects(&mut n);
    // Before any report: the Hello's backlogs.
    let f = n.fleet_figures(Timestamp::from_millis_saturating(0));
    assert_eq!((f.reporting, f.outbox_runs), (0, 6));

    // A change at revision 1 for every agent, announced at +100 ms.
    let admin = n.handle_incoming(at(100), ip(9)).expect("admin");
    n.handle_handshaken(at(100), admin, Alpn::Admin, Some(fp(9)));
    n.handle_admin(
        at(100),
        admin,
        1,
        AdminRequest::TaskList,
        [0; ENTROPY_BYTES],
    );
    effects(&mut n);
    n.handle_store_done(
        at(100),
        StoreDone::Admin {
            conn: admin,
            req: 1,
            audit: None,
            result: Ok(AdminAnswer {
                answers: vec![AdminResponse::TaskCreated(TaskId(1))],
                follow: vec![FollowUp::Announce {
                    target: Target::Selector(Vec::new()),
                    revision: 1,
                }],
            }),
        },
    );
    effects(&mut n);
    events(&mut n);
    // The agent applied it 250 ms later and says so.
    let ended = Timestamp::from_millis_saturating(40_000);
    let report = sundial_protocol::wire::AgentReport {
        outbox_len: 5,
        oldest_unsynced: Some(ended),
        applied_revision: 1,
        tasks_held: 7,
        running: 1,
        store_bytes: Some(4096),
        clock_vouched: false,
        clock_offset_ms: 12,
        clock_held: false,
        late_max_ms: Some(3),
    };
    n.handle_agent_msg(at(350), new, AgentMsg::Report(report.clone()));
    let ev = events(&mut n);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            CoordEvent::AssignmentApplied {
                agent: AgentId(1),
                revision: 1,
                lag_ms: 250
            }
        )),
        "{ev:?}"
    );
    let f = n.fleet_figures(Timestamp::from_millis_saturating(41_000));
    assert_eq!(f.reporting, 1);
    assert_eq!(
        f.outbox_runs,
        5 + 3,
        "the report's figure, and the old agent's Hello"
    );
    assert_eq!(f.outbox_max_runs, 5);
    assert_eq!(f.oldest_unsynced_age_ms, Some(1_000));
    assert_eq!((f.tasks_stored, f.running, f.store_bytes), (7, 1, 4096));
    assert_eq!((f.clock_unvouched, f.clock_held), (1, 0));
    assert_eq!(
        n.agent_report(AgentId(1)).map(|(r, _)| r),
        Some(report.clone())
    );
    // The same revision again measures nothing more.
    n.handle_agent_msg(at(400), new, AgentMsg::Report(report.clone()));
    assert!(!events(&mut n)
        .iter()
        .any(|e| matches!(e, CoordEvent::AssignmentApplied { .. })));

    // A report no agent could make closes the session.
    let lie = sundial_protocol::wire::AgentReport {
        outbox_len: 0,
        ..report
    };
    n.handle_agent_msg(at(500), new, AgentMsg::Report(lie));
    let out = drain_transmit(&mut n, new);
    assert!(
        out.iter().any(|m| matches!(
            m,
            Outgoing::Close { code, reason } if *code == close::PROTOCOL && reason.contains("report")
        )),
        "{out:?}"
    );
}

#[test]
fn keep_alives_grow_with_the_fleet_and_the_session_is_told_its_own() {
    let t = |fleet| {
        let l = super::link_for_fleet(fleet);
        (l.keep_alive_ms, l.silent_ms, l.idle_ms)
    };
    assert_eq!(t(0), (1_000, 2_500, 5_000));
    assert_eq!(t(5_000), (1_000, 2_500, 5_000));
    assert_eq!(t(5_001), (2_000, 3_500, 6_000));
    assert_eq!(t(10_000), (2_000, 3_500, 6_000));
    assert_eq!(t(50_000), (10_000, 15_000, 30_000));
    assert_eq!(t(100_000), (20_000, 30_000, 60_000));
    assert_eq!(t(150_000), (30_000, 45_000, 90_000));
    assert_eq!(t(u64::MAX), (30_000, 45_000, 90_000));
    for fleet in [0, 999, 1_500, 7_777, 29_999, 1 << 40] {
        let l = super::link_for_fleet(fleet);
        assert_eq!(l.sanitized(), l, "agents keep what the coordinator chose");
    }

    // A node of three agents: each connection is pinged every second, and
    // the session's policy says so (an agent 0.2 and later is sent one).
    let mut n = node();
    let (conn, _) = live_session(&mut n, 1, &[], 0);
    assert_eq!(n.link_timing(conn), Some(super::link_for_fleet(3)));
    let policy = drain_transmit(&mut n, conn)
        .into_iter()
        .find_map(|m| match m {
            Outgoing::Msg(CoordMsg::Policy(p)) => Some(p),
            _ => None,
        })
        .expect("a policy is sent");
    assert_eq!(policy.link.0, n.link_timing(conn));
    assert_eq!(n.link_timing(conn + 1000), None);
}

#[test]
fn clock_reports_are_stored_together_once_a_second_the_latest_of_each_agent() {
    let mut n = node();
    let a = live_session_of(&mut n, 1, env!("CARGO_PKG_VERSION"), 0);
    let b = live_session_of(&mut n, 2, env!("CARGO_PKG_VERSION"), 0);
    effects(&mut n);
    let clocks = |fx: &[Effect]| -> Vec<Vec<(AgentId, AgentSeen)>> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Store(StoreJob::Clocks { seen }) => Some(seen.clone()),
                _ => None,
            })
            .collect()
    };
    let report = |offset_ms| AgentMsg::ClockReport {
        offset_ms,
        rtt_ms: 4,
    };
    n.handle_agent_msg(at(100), a, report(-7));
    n.handle_agent_msg(at(200), b, report(3));
    n.handle_agent_msg(at(300), a, report(-5));
    let fx = effects(&mut n);
    assert!(clocks(&fx).is_empty(), "none stored at once: {fx:?}");
    assert!(
        !fx.iter()
            .any(|e| matches!(e, Effect::Store(StoreJob::Seen { .. }))),
        "no store job per report: {fx:?}"
    );
    assert_eq!(
        n.poll_timeout(),
        Some(at(100 + CLOCKS_STORE_EVERY_MS).mono_ms)
    );
    n.handle_timeout(at(100 + CLOCKS_STORE_EVERY_MS));
    let jobs = clocks(&effects(&mut n));
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let got: Vec<(u64, Option<(i64, i64)>)> =
        jobs[0].iter().map(|(id, s)| (id.0, s.clock)).collect();
    assert_eq!(got, vec![(1, Some((-5, 4))), (2, Some((3, 4)))]);
    // While that job runs, new reports wait for it, then for their second.
    n.handle_agent_msg(at(1_200), b, report(9));
    n.handle_timeout(at(2_500));
    assert!(clocks(&effects(&mut n)).is_empty());
    n.handle_store_done(at(2_600), StoreDone::Clocks { result: Ok(()) });
    assert_eq!(
        n.poll_timeout(),
        Some(at(2_600 + CLOCKS_STORE_EVERY_MS).mono_ms)
    );
    n.handle_timeout(at(2_600 + CLOCKS_STORE_EVERY_MS));
    let jobs = clocks(&effects(&mut n));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0][0].0, AgentId(2));
    assert_eq!(jobs[0][0].1.clock, Some((9, 4)));
}
