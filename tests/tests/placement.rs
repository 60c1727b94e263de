//! Placement end to end, with real agent processes: three agents under
//! `--placement one --every 1s`; one is `kill -9`ed and one cut off by its
//! relay for longer than a lease window. No occurrence runs twice (the
//! probe's own log, written by every run that started, is the witness);
//! every occurrence is run once or recorded skipped; and once the cut and
//! the killed agents' last windows ended, the remaining agent runs them all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sundial_protocol::placement::{PlacementAsk, PlacementMode};
use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::wire::{AdminRequest, AdminResponse, TaskDraft};
use sundial_protocol::{DurationMs, Outcome, RunRecord, Schedule, Timestamp};
use sundial_tests::harness::{Fleet, SUB_PROBE};
use sundial_tests::relay::LinkConfig;
use sundial_tests::rng::Rng;

const SIM: &str = env!("CARGO_BIN_EXE_sundial-sim");
const LEASE_MS: i64 = 4_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// (agent id, scheduled at) of every run that started, from the probe's log.
fn probed(log: &PathBuf) -> Vec<(String, i64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 5 || f[3] != "1" {
                return None;
            }
            Some((f[0].to_owned(), f[2].parse().ok()?))
        })
        .collect()
}

async fn wait_until(what: &str, max: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < max {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn one_member_runs_each_occurrence_through_a_kill_and_a_partition() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(scenario());
}

async fn scenario() {
    let mut rng = Rng::new(20_261_206);
    let mut fleet = Fleet::start(std::path::Path::new(SIM), 3, false, &mut rng)
        .await
        .expect("fleet");
    let log = fleet.root.path().join("placed.log");
    let draft = TaskDraft {
        name: Some("till".into()),
        target: Target::Selector(vec![("fleet".into(), "sim".into())]),
        schedule: Schedule::every(DurationMs(1_000), Timestamp::from_millis_saturating(0))
            .expect("schedule"),
        action: Action::Exec(ExecSpec {
            program: SIM.into(),
            args: vec![SUB_PROBE.into(), log.display().to_string()],
            ..Default::default()
        }),
        // As sundialctl sets it for `--every 1s`: a grace of one period.
        policies: Policies {
            misfire: sundial_protocol::policy::MisfirePolicy {
                grace: DurationMs(1_000),
                ..Default::default()
            },
            ..Policies::default()
        },
        anchor_at_creation: false,
        placement: Some(PlacementAsk::new(
            PlacementMode::One,
            DurationMs(LEASE_MS as u64),
        ))
        .into(),
    };
    let task = match fleet
        .admin(&AdminRequest::TaskCreate(Box::new(draft)))
        .await
        .expect("create")
    {
        AdminResponse::TaskCreated(id) | AdminResponse::TaskCreatedWarn { id, .. } => id,
        r => panic!("create: {r:?}"),
    };
    let ids: Vec<String> = fleet.agents.iter().map(|a| a.id.to_string()).collect();
    // All three share the work.
    wait_until(
        "every member to run some",
        Duration::from_secs(40),
        async || {
            let by: BTreeSet<String> = probed(&log).into_iter().map(|(a, _)| a).collect();
            ids.iter().all(|i| by.contains(i))
        },
    )
    .await;

    // The first is killed, the second cut off for four windows and more.
    let cut_at = now_ms();
    fleet.agents[0].kill9().await;
    fleet.agents[1].relay.set(LinkConfig::partition());
    let cut_for = Duration::from_millis((LEASE_MS * 8) as u64);
    tokio::time::sleep(cut_for).await;
    let healed_at = now_ms();
    fleet.agents[1].relay.set(LinkConfig::pass());
    tokio::time::sleep(Duration::from_secs(5)).await;
    // The killed one comes back and accounts for what it held.
    let exe = fleet.exe().to_owned();
    fleet.agents[0].start(&exe).expect("restart");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let cancelled_at = now_ms();
    match fleet.admin(&AdminRequest::TaskCancel(task)).await {
        Ok(AdminResponse::Done) => {}
        r => panic!("cancel: {r:?}"),
    }
    // Everything synced: the occurrences up to a little before the cancel
    // are all accounted for.
    let end = cancelled_at - 3_000;
    let mut stored = Vec::new();
    wait_until(
        "every occurrence accounted for",
        Duration::from_secs(40),
        async || {
            stored = fleet.task_runs(task).await.unwrap_or_default();
            let first = stored.iter().map(|r| r.scheduled_at.as_millis()).min();
            let Some(first) = first else {
                return false;
            };
            let have: BTreeSet<i64> = stored.iter().map(|r| r.scheduled_at.as_millis()).collect();
            (first..end).step_by(1_000).all(|t| have.contains(&t))
        },
    )
    .await;

    // Never twice: not in the probe's log (every start), not in the records.
    let mut started: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for (a, at) in probed(&log) {
        started.entry(at).or_default().push(a);
    }
    let twice: Vec<_> = started.iter().filter(|(_, a)| a.len() > 1).collect();
    assert!(twice.is_empty(), "occurrences that ran twice: {twice:?}");
    let mut recorded: BTreeMap<i64, Vec<&RunRecord>> = BTreeMap::new();
    for r in stored.iter().filter(|r| r.attempt == 1) {
        recorded
            .entry(r.scheduled_at.as_millis())
            .or_default()
            .push(r);
    }
    for (at, rs) in &recorded {
        let ran = rs.iter().filter(|r| r.fired_at.is_some()).count();
        assert!(
            ran <= 1 && (ran == 1 || rs.iter().all(|r| r.outcome == Outcome::Skipped)),
            "occurrence {at}: {rs:?}"
        );
        assert!(
            rs.len() == 1,
            "occurrence {at} has {} records: {rs:?}",
            rs.len()
        );
    }

    // The share moved: from when the killed and the cut agents' last
    // windows had ended (the session's 5 s idle timeout to notice, half a
    // window planned ahead, one window, and slack for a busy machine),
    // until the heal, the third agent ran every occurrence.
    let moved_by = cut_at + 5_000 + LEASE_MS / 2 + LEASE_MS + 8_000;
    let third = fleet.agents[2].id;
    let alone: Vec<&RunRecord> = stored
        .iter()
        .filter(|r| {
            let t = r.scheduled_at.as_millis();
            t >= moved_by && t < healed_at - 1_000
        })
        .collect();
    assert!(
        alone.len() >= 4,
        "a stretch with the third agent alone: {alone:?}"
    );
    for r in &alone {
        assert_eq!(r.agent_id, third, "after the failover: {r:?}");
        assert!(r.fired_at.is_some(), "ran: {r:?}");
    }
    // How long the failover took: the first occurrence after the cut from
    // which the third agent ran everything up to the heal.
    let mut from = None;
    for (at, rs) in recorded.range(cut_at..healed_at - 1_000).rev() {
        if rs
            .iter()
            .all(|r| r.agent_id == third && r.fired_at.is_some())
        {
            from = Some(*at);
        } else {
            break;
        }
    }
    let from = from.expect("the third agent took over");
    eprintln!(
        "placement failover: lease window {LEASE_MS} ms, planned {} ms ahead; the third agent ran every occurrence from {} ms after the cut",
        LEASE_MS / 2,
        from - cut_at
    );
    // What the killed agent held while it was down is recorded, not lost.
    let killed = fleet.agents[0].id;
    let held: Vec<&RunRecord> = stored
        .iter()
        .filter(|r| r.agent_id == killed && r.scheduled_at.as_millis() > cut_at + 1_000)
        .filter(|r| r.scheduled_at.as_millis() < cut_at + 5_000)
        .collect();
    for r in held {
        assert!(
            r.outcome == Outcome::Skipped || r.fired_at.is_some(),
            "a held occurrence of the killed agent: {r:?}"
        );
    }
    fleet.stop().await;
}
