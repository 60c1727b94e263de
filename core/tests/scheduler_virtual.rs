//! The scheduler in virtual time: days of schedules, downtime, overlap,
//! retries and timeouts, decided in milliseconds of test time.

// A test is a shell: it reads the wall clock to bound how long virtual days take.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::Instant;

use sundial_core::scheduler::{Command, SchedTask, Scheduler, SkipReason};
use sundial_protocol::policy::{MisfireMode, MisfirePolicy, OverlapPolicy, Policies, RetryPolicy};
use sundial_protocol::{
    DurationMs, Outcome, OutcomeSet, RunKey, Schedule, TaskId, Timestamp, Trigger,
};

fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).expect("valid test instant")
}

/// What happened to one run, as the harness saw it.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Started { key: RunKey, at: Timestamp },
    Skipped { key: RunKey, reason: SkipReason },
    Killed { key: RunKey, at: Timestamp },
    Triggered { key: RunKey, at: Timestamp },
}

type ActionFn = Box<dyn Fn(RunKey) -> (i64, Outcome)>;

/// A virtual agent: drives a scheduler through time, runs actions for a
/// given duration with a given outcome, and logs everything.
struct Harness {
    sched: Scheduler,
    now: Timestamp,
    /// end time -> runs ending then
    ending: BTreeMap<Timestamp, Vec<(RunKey, Outcome)>>,
    action: ActionFn,
    events: Vec<Event>,
}

impl Harness {
    fn new(now: Timestamp, action: impl Fn(RunKey) -> (i64, Outcome) + 'static) -> Harness {
        Harness {
            sched: Scheduler::new(now),
            now,
            ending: BTreeMap::new(),
            action: Box::new(action),
            events: Vec::new(),
        }
    }

    fn add(&mut self, task: SchedTask) {
        let mut out = Vec::new();
        self.sched.upsert(task, &mut out);
        self.apply(out);
    }

    fn apply(&mut self, cmds: Vec<Command>) {
        let mut more = Vec::new();
        for c in cmds {
            match c {
                Command::Start { key, .. } => {
                    self.events.push(Event::Started { key, at: self.now });
                    let (dur, outcome) = (self.action)(key);
                    self.ending
                        .entry(self.now.saturating_add_ms(dur))
                        .or_default()
                        .push((key, outcome));
                }
                Command::Skip { key, reason } => self.events.push(Event::Skipped { key, reason }),
                Command::Kill { key } => {
                    self.events.push(Event::Killed { key, at: self.now });
                    for runs in self.ending.values_mut() {
                        runs.retain(|(k, _)| *k != key);
                    }
                    self.sched
                        .run_finished(key, Outcome::TimedOut, self.now, &mut more);
                }
                Command::SaveState { .. } => {}
                Command::Trigger { key, at } => self.events.push(Event::Triggered { key, at }),
                Command::FanIn { .. } => {}
            }
        }
        if !more.is_empty() {
            self.apply(more);
        }
    }

    /// Runs until `end`, waking exactly when the scheduler or a run needs it.
    fn run_until(&mut self, end: Timestamp) {
        loop {
            let wake = self.sched.next_wake();
            let finish = self.ending.keys().next().copied();
            let next = match (wake, finish) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > end {
                break;
            }
            self.now = next.max(self.now);
            if let Some(runs) = self.ending.remove(&next) {
                let mut out = Vec::new();
                for (key, outcome) in runs {
                    self.sched.run_finished(key, outcome, self.now, &mut out);
                }
                self.apply(out);
            }
            let mut out = Vec::new();
            self.sched.advance(self.now, &mut out);
            self.apply(out);
        }
        self.now = end.max(self.now);
        let mut out = Vec::new();
        self.sched.advance(self.now, &mut out);
        self.apply(out);
    }

    fn starts(&self) -> Vec<(RunKey, Timestamp)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Started { key, at } => Some((*key, *at)),
                _ => None,
            })
            .collect()
    }

    fn skips(&self) -> Vec<(RunKey, SkipReason)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Skipped { key, reason } => Some((*key, *reason)),
                _ => None,
            })
            .collect()
    }
}

fn task(id: u64, schedule: Schedule, policies: Policies, created_at: Timestamp) -> SchedTask {
    SchedTask {
        id: TaskId(id),
        schedule,
        policies,
        created_at,
        placement: None,
    }
}

#[test]
fn a_day_of_per_second_cron_fires_86400_times_in_order_on_time() {
    let start = ts("2026-06-01T00:00:00Z");
    let mut h = Harness::new(start, |_| (10, Outcome::Succeeded));
    h.add(task(
        1,
        Schedule::cron("* * * * * *", "Europe/Berlin").expect("valid"),
        Policies::default(),
        start,
    ));
    let wall = Instant::now();
    h.run_until(ts("2026-06-01T23:59:59.999Z"));
    let elapsed = wall.elapsed();
    let starts = h.starts();
    assert_eq!(starts.len(), 86_400);
    for (i, (key, at)) in starts.iter().enumerate() {
        let want = start.saturating_add_ms(1000 * i as i64);
        assert_eq!(key.scheduled_at, want, "occurrence {i}");
        assert_eq!(*at, key.scheduled_at, "occurrence {i} started late");
    }
    assert!(h.skips().is_empty());
    // Generous: the point is "virtual time is fast", not a benchmark.
    assert!(
        elapsed.as_secs_f64() < 5.0,
        "a virtual day took {elapsed:?}"
    );
}

/// Down from 10:00 to 13:00 with a per-minute task: which policy does what.
fn three_hours_down(mode: MisfireMode) -> Harness {
    let created = ts("2026-06-01T09:00:00Z");
    let policies = Policies {
        misfire: MisfirePolicy {
            mode,
            grace: DurationMs(30_000),
        },
        ..Policies::default()
    };
    let every_minute = Schedule::every(DurationMs(60_000), created).expect("valid");
    let mut h = Harness::new(created, |_| (1_000, Outcome::Succeeded));
    h.add(task(1, every_minute.clone(), policies, created));
    h.run_until(ts("2026-06-01T10:00:30Z"));
    assert_eq!(h.starts().len(), 61); // 09:00 .. 10:00 inclusive
    let next_due = h.sched.next_due(TaskId(1));
    assert_eq!(next_due, Some(ts("2026-06-01T10:01:00Z")));

    // Down; a new process restores the persisted state at 13:00:10.
    let back = ts("2026-06-01T13:00:10Z");
    let mut h2 = Harness::new(back, |_| (1_000, Outcome::Succeeded));
    h2.sched
        .restore(task(1, every_minute, policies, created), Some(next_due));
    h2.run_until(back);
    h2
}

#[test]
fn misfire_skip_records_every_missed_occurrence_and_runs_none() {
    let h = three_hours_down(MisfireMode::Skip);
    // 10:01 .. 12:59 are missed (179); 13:00 is 10 s late, inside grace, so it runs.
    let skips = h.skips();
    assert_eq!(skips.len(), 179);
    assert!(skips.iter().all(|(_, r)| *r == SkipReason::Misfire));
    assert_eq!(skips[0].0.scheduled_at, ts("2026-06-01T10:01:00Z"));
    assert_eq!(skips[178].0.scheduled_at, ts("2026-06-01T12:59:00Z"));
    let starts: Vec<Timestamp> = h.starts().iter().map(|(k, _)| k.scheduled_at).collect();
    assert_eq!(starts, [ts("2026-06-01T13:00:00Z")]);
    assert_eq!(
        h.sched.next_due(TaskId(1)),
        Some(ts("2026-06-01T13:01:00Z"))
    );
}

#[test]
fn misfire_once_runs_one_catch_up_unless_an_on_time_run_covers_it() {
    let h = three_hours_down(MisfireMode::Once);
    // 13:00 runs on time, so it is the one run; all 179 missed are skipped.
    assert_eq!(h.skips().len(), 179);
    assert_eq!(h.starts().len(), 1);

    // Back at 13:00:45 (13:00 is missed too, nothing on time): one catch-up, the latest.
    let created = ts("2026-06-01T09:00:00Z");
    let policies = Policies {
        misfire: MisfirePolicy {
            mode: MisfireMode::Once,
            grace: DurationMs(30_000),
        },
        ..Policies::default()
    };
    let back = ts("2026-06-01T13:00:45Z");
    let mut h = Harness::new(back, |_| (1_000, Outcome::Succeeded));
    h.sched.restore(
        task(
            1,
            Schedule::every(DurationMs(60_000), created).expect("valid"),
            policies,
            created,
        ),
        Some(Some(ts("2026-06-01T10:01:00Z"))),
    );
    h.run_until(back);
    let starts = h.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].0.scheduled_at, ts("2026-06-01T13:00:00Z"));
    assert_eq!(starts[0].1, back);
    assert_eq!(h.skips().len(), 179);
}

#[test]
fn misfire_all_runs_the_most_recent_up_to_its_cap() {
    let h = three_hours_down(MisfireMode::All { cap: 50 });
    let starts: Vec<Timestamp> = h.starts().iter().map(|(k, _)| k.scheduled_at).collect();
    // 50 most recent missed (12:10 .. 12:59) plus 13:00 on time.
    assert_eq!(starts.len(), 51);
    assert_eq!(starts[0], ts("2026-06-01T12:10:00Z"));
    assert_eq!(starts[50], ts("2026-06-01T13:00:00Z"));
    let skips = h.skips();
    assert_eq!(skips.len(), 129);
    assert_eq!(
        skips.last().map(|s| s.0.scheduled_at),
        Some(ts("2026-06-01T12:09:00Z"))
    );
}

#[test]
fn years_of_downtime_do_not_stall_a_per_second_schedule() {
    let created = ts("2020-01-01T00:00:00Z");
    let sched = Schedule::cron("* * * * * *", "UTC").expect("valid");
    let back = ts("2026-01-01T00:00:00.500Z");
    let mut h = Harness::new(back, |_| (1, Outcome::Succeeded));
    let wall = Instant::now();
    h.sched
        .restore(task(1, sched, Policies::default(), created), None);
    h.run_until(back);
    assert!(
        wall.elapsed().as_secs() < 10,
        "catch-up took {:?}",
        wall.elapsed()
    );
    // Bounded records, the catch-up and on-time runs, and the schedule is current again.
    assert!(h.skips().len() <= sundial_core::scheduler::MISFIRE_RECORDS_MAX);
    assert!(!h.starts().is_empty());
    assert_eq!(
        h.sched.next_due(TaskId(1)),
        Some(ts("2026-01-01T00:00:01Z"))
    );
}

#[test]
fn overlap_forbid_skips_occurrences_while_a_run_goes() {
    // every 1 s, action takes 2.5 s: 0 runs until 2.5, so 1 and 2 are skipped;
    // 3 runs until 5.5, so 4 and 5 are skipped; and so on.
    let t0 = ts("2026-06-01T00:00:00Z");
    let policies = Policies {
        overlap: OverlapPolicy::Forbid,
        ..Policies::default()
    };
    let mut h = Harness::new(t0, |_| (2_500, Outcome::Succeeded));
    h.add(task(
        1,
        Schedule::every(DurationMs(1_000), t0).expect("valid"),
        policies,
        t0,
    ));
    h.run_until(t0.saturating_add_ms(8_999));
    let secs = |v: Vec<Timestamp>| {
        v.iter()
            .map(|t| t.millis_since(t0) / 1000)
            .collect::<Vec<_>>()
    };
    let started = secs(h.starts().iter().map(|(k, _)| k.scheduled_at).collect());
    let skipped = secs(
        h.skips()
            .iter()
            .map(|(k, r)| {
                assert_eq!(*r, SkipReason::Overlap);
                k.scheduled_at
            })
            .collect(),
    );
    assert_eq!(started, [0, 3, 6]);
    assert_eq!(skipped, [1, 2, 4, 5, 7, 8]);

    // With `allow`, every occurrence starts.
    let mut h = Harness::new(t0, |_| (2_500, Outcome::Succeeded));
    h.add(task(
        1,
        Schedule::every(DurationMs(1_000), t0).expect("valid"),
        Policies::default(),
        t0,
    ));
    h.run_until(t0.saturating_add_ms(8_999));
    assert_eq!(h.starts().len(), 9);
}

#[test]
fn retries_back_off_exponentially_up_to_the_cap() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let policies = Policies {
        retry: RetryPolicy {
            retries: 4,
            backoff_initial: DurationMs(1_000),
            backoff_max: DurationMs(3_000),
        },
        ..Policies::default()
    };
    // Every attempt fails after 100 ms.
    let mut h = Harness::new(t0, |_| (100, Outcome::Failed));
    h.add(task(1, Schedule::at(t0), policies, t0));
    h.run_until(t0.saturating_add_ms(60_000));
    let starts = h.starts();
    let attempts: Vec<(u32, i64)> = starts
        .iter()
        .map(|(k, at)| (k.attempt, at.millis_since(t0)))
        .collect();
    // start, fail at +100, retry after 1 s, 2 s, 3 s (capped), 3 s.
    assert_eq!(
        attempts,
        [(1, 0), (2, 1_100), (3, 3_200), (4, 6_300), (5, 9_400)]
    );
    assert!(starts.iter().all(|(k, _)| k.scheduled_at == t0));

    // A success ends the retries; a rejected run is never retried.
    let mut h = Harness::new(t0, |k| {
        (
            100,
            if k.attempt < 2 {
                Outcome::Failed
            } else {
                Outcome::Succeeded
            },
        )
    });
    h.add(task(1, Schedule::at(t0), policies, t0));
    h.run_until(t0.saturating_add_ms(60_000));
    assert_eq!(h.starts().len(), 2);
    let mut h = Harness::new(t0, |_| (0, Outcome::Rejected));
    h.add(task(1, Schedule::at(t0), policies, t0));
    h.run_until(t0.saturating_add_ms(60_000));
    assert_eq!(h.starts().len(), 1);
}

#[test]
fn timeouts_kill_the_run_and_count_as_failures_for_retry() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let policies = Policies {
        timeout: Some(DurationMs(2_000)),
        retry: RetryPolicy {
            retries: 1,
            backoff_initial: DurationMs(500),
            backoff_max: DurationMs(500),
        },
        ..Policies::default()
    };
    let mut h = Harness::new(t0, |_| (10_000, Outcome::Succeeded));
    h.add(task(1, Schedule::at(t0), policies, t0));
    h.run_until(t0.saturating_add_ms(60_000));
    let kills: Vec<(u32, i64)> = h
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Killed { key, at } => Some((key.attempt, at.millis_since(t0))),
            _ => None,
        })
        .collect();
    assert_eq!(kills, [(1, 2_000), (2, 4_500)]);
}

#[test]
fn a_task_created_while_away_catches_up_by_its_misfire_policy() {
    // Created at 08:00 for 08:05, reaches the agent at 09:00: `once` runs it late.
    let created = ts("2026-06-01T08:00:00Z");
    let now = ts("2026-06-01T09:00:00Z");
    let mut h = Harness::new(now, |_| (10, Outcome::Succeeded));
    h.add(task(
        1,
        Schedule::at(ts("2026-06-01T08:05:00Z")),
        Policies::default(),
        created,
    ));
    h.run_until(now);
    assert_eq!(h.starts().len(), 1);
    // Under `skip` the same is recorded as skipped.
    let mut h = Harness::new(now, |_| (10, Outcome::Succeeded));
    let skip = Policies {
        misfire: MisfirePolicy {
            mode: MisfireMode::Skip,
            grace: DurationMs(1_000),
        },
        ..Policies::default()
    };
    h.add(task(
        1,
        Schedule::at(ts("2026-06-01T08:05:00Z")),
        skip,
        created,
    ));
    h.run_until(now);
    assert_eq!(h.starts().len(), 0);
    assert_eq!(h.skips().len(), 1);
}

#[test]
fn a_clock_stepped_back_fires_nothing_again() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let mut h = Harness::new(t0, |_| (10, Outcome::Succeeded));
    h.add(task(
        1,
        Schedule::every(DurationMs(1_000), t0).expect("valid"),
        Policies::default(),
        t0,
    ));
    h.run_until(t0.saturating_add_ms(5_000));
    assert_eq!(h.starts().len(), 6);
    let mut out = Vec::new();
    h.sched.advance(t0.saturating_add_ms(1_000), &mut out);
    assert!(out.is_empty(), "a step back decided {out:?}");
}

/// Down 40 s with a per-second task: a catch-up is one run, never a burst.
fn forty_seconds_down(grace_ms: u64, overlap: OverlapPolicy) -> Harness {
    let created = ts("2026-06-01T09:00:00Z");
    let policies = Policies {
        misfire: MisfirePolicy {
            mode: MisfireMode::Once,
            grace: DurationMs(grace_ms),
        },
        overlap,
        ..Policies::default()
    };
    let every_second = Schedule::every(DurationMs(1_000), created).expect("valid");
    let back = ts("2026-06-01T09:00:40.500Z");
    let mut h = Harness::new(back, |_| (300, Outcome::Succeeded));
    h.sched.restore(
        task(1, every_second, policies, created),
        Some(Some(ts("2026-06-01T09:00:00Z"))),
    );
    h.run_until(back);
    h
}

#[test]
fn a_short_outage_within_the_grace_replays_no_burst_under_overlap_forbid() {
    // Grace of a minute (explicit), overlap forbid: the 41 occurrences are
    // all "within the grace", but one run at a time means the latest runs
    // and the others are recorded missed, not as overlapping it.
    let h = forty_seconds_down(60_000, OverlapPolicy::Forbid);
    let starts = h.starts();
    assert_eq!(starts.len(), 1, "{starts:?}");
    assert_eq!(starts[0].0.scheduled_at, ts("2026-06-01T09:00:40Z"));
    let skips = h.skips();
    assert_eq!(skips.len(), 40);
    assert!(skips.iter().all(|(_, r)| *r == SkipReason::Misfire));
}

#[test]
fn the_default_grace_of_a_frequent_task_turns_an_outage_into_one_catch_up() {
    // sundialctl's default grace for a per-second task is its period: 1 s.
    let h = forty_seconds_down(1_000, OverlapPolicy::Allow);
    assert_eq!(h.starts().len(), 1);
    assert_eq!(h.skips().len(), 40);
}

fn after(ups: &[(u64, OutcomeSet)]) -> Schedule {
    Schedule::after(
        ups.iter()
            .map(|(u, on)| Trigger {
                upstream: TaskId(*u),
                on: *on,
            })
            .collect(),
    )
    .expect("valid triggers")
}

/// The (task, occurrence, attempt) of every start, in order.
fn started(h: &Harness) -> Vec<(u64, i64, u32)> {
    h.starts()
        .iter()
        .map(|(k, _)| (k.task_id.0, k.scheduled_at.as_millis(), k.attempt))
        .collect()
}

#[test]
fn a_chain_with_a_failure_branch_fires_on_the_upstream_occurrence() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let ms = t0.as_millis();
    // backup (t1) every minute: fails at 00:01, succeeds otherwise.
    // upload (t2) after backup succeeded; alert (t3) after backup failed;
    // notify (t4) after upload, whatever its end (skipped included).
    let mut h = Harness::new(t0, move |k| {
        let failing = k.task_id.0 == 1 && k.scheduled_at.as_millis() == ms + 60_000;
        (
            500,
            if failing {
                Outcome::Failed
            } else {
                Outcome::Succeeded
            },
        )
    });
    let every = Schedule::every(DurationMs(60_000), t0).expect("valid");
    h.add(task(1, every, Policies::default(), t0));
    h.add(task(
        2,
        after(&[(1, OutcomeSet::SUCCEEDED)]),
        Policies::default(),
        t0,
    ));
    h.add(task(
        3,
        after(&[(1, OutcomeSet::FAILED)]),
        Policies::default(),
        t0,
    ));
    h.add(task(
        4,
        after(&[(2, OutcomeSet::ANY)]),
        Policies::default(),
        t0,
    ));
    h.run_until(t0.saturating_add_ms(90_000));
    // (Runs due at the same instant start in no promised order.)
    let mut all = started(&h);
    all.sort_unstable_by_key(|(t, s, _)| (*s, *t));
    assert_eq!(
        all,
        [
            (1, ms, 1),
            (2, ms, 1),
            (4, ms, 1),
            (1, ms + 60_000, 1),
            (3, ms + 60_000, 1),
            (4, ms + 60_000, 1),
        ]
    );
    // Each start of a triggered task began when its upstream ended.
    let starts = h.starts();
    assert_eq!(starts[1].1.millis_since(t0), 500);
    assert_eq!(starts[2].1.millis_since(t0), 1_000);
    // What did not fire is recorded, naming why: alert at 00:00, upload at
    // 00:01 (and notify fired after upload's skip, as `any` asks).
    let skips: Vec<(u64, i64, String)> = h
        .skips()
        .iter()
        .map(|(k, r)| (k.task_id.0, k.scheduled_at.as_millis() - ms, r.detail()))
        .collect();
    assert_eq!(
        skips,
        [
            (
                3,
                0,
                "not triggered: upstream t1 ended succeeded".to_owned()
            ),
            (
                2,
                60_000,
                "not triggered: upstream t1 ended failed".to_owned()
            ),
        ]
    );
}

#[test]
fn retries_come_before_the_trigger_and_the_downstream_has_its_own() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let ms = t0.as_millis();
    let retry = |n| Policies {
        retry: RetryPolicy {
            retries: n,
            backoff_initial: DurationMs(1_000),
            backoff_max: DurationMs(1_000),
        },
        ..Policies::default()
    };
    // t1 fails twice then succeeds; t2 (after t1) fails once then succeeds.
    let mut h = Harness::new(t0, |k| {
        let ok = match k.task_id.0 {
            1 => k.attempt >= 3,
            _ => k.attempt >= 2,
        };
        (
            100,
            if ok {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            },
        )
    });
    h.add(task(1, Schedule::at(t0), retry(3), t0));
    h.add(task(2, after(&[(1, OutcomeSet::SUCCEEDED)]), retry(1), t0));
    h.run_until(t0.saturating_add_ms(60_000));
    assert_eq!(
        started(&h),
        [(1, ms, 1), (1, ms, 2), (1, ms, 3), (2, ms, 1), (2, ms, 2)]
    );
}

#[test]
fn fan_out_and_fan_in_fire_once_per_occurrence_when_all_have_ended() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let ms = t0.as_millis();
    // t1 and t2 on the same schedule; t2 takes longer. t3 after both; t4
    // and t5 after t3 (fan-out).
    let mut h = Harness::new(t0, |k| {
        let dur = if k.task_id.0 == 2 { 3_000 } else { 100 };
        (dur, Outcome::Succeeded)
    });
    let every = Schedule::every(DurationMs(10_000), t0).expect("valid");
    h.add(task(1, every.clone(), Policies::default(), t0));
    h.add(task(2, every, Policies::default(), t0));
    let both = after(&[(1, OutcomeSet::SUCCEEDED), (2, OutcomeSet::ANY)]);
    h.add(task(3, both, Policies::default(), t0));
    h.add(task(
        4,
        after(&[(3, OutcomeSet::SUCCEEDED)]),
        Policies::default(),
        t0,
    ));
    h.add(task(
        5,
        after(&[(3, OutcomeSet::SUCCEEDED)]),
        Policies::default(),
        t0,
    ));
    h.run_until(t0.saturating_add_ms(15_000));
    let starts = h.starts();
    let of = |id: u64| -> Vec<(i64, i64)> {
        starts
            .iter()
            .filter(|(k, _)| k.task_id.0 == id)
            .map(|(k, at)| (k.scheduled_at.as_millis() - ms, at.millis_since(t0)))
            .collect()
    };
    // Fired when the slower upstream ended, once per occurrence.
    assert_eq!(of(3), [(0, 3_000), (10_000, 13_000)]);
    assert_eq!(of(4), [(0, 3_100), (10_000, 13_100)]);
    assert_eq!(of(5), of(4));
    assert!(h.skips().is_empty());
}

#[test]
fn a_fan_in_whose_upstream_failed_is_skipped_and_the_skip_flows_on() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let mut h = Harness::new(t0, |k| {
        (
            100,
            if k.task_id.0 == 2 {
                Outcome::Failed
            } else {
                Outcome::Succeeded
            },
        )
    });
    h.add(task(1, Schedule::at(t0), Policies::default(), t0));
    h.add(task(2, Schedule::at(t0), Policies::default(), t0));
    let both = after(&[(1, OutcomeSet::SUCCEEDED), (2, OutcomeSet::SUCCEEDED)]);
    h.add(task(3, both, Policies::default(), t0));
    h.add(task(
        4,
        after(&[(3, OutcomeSet::SKIPPED)]),
        Policies::default(),
        t0,
    ));
    h.run_until(t0.saturating_add_ms(10_000));
    assert_eq!(
        started(&h).iter().map(|s| s.0).collect::<Vec<_>>(),
        [1, 2, 4]
    );
    let skips = h.skips();
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0].0.task_id, TaskId(3));
    assert_eq!(
        skips[0].1.detail(),
        "not triggered: upstream t2 ended failed"
    );
}

#[test]
fn a_fan_in_that_never_completes_is_given_up_within_its_bound() {
    use sundial_core::scheduler::FANIN_OPEN_MAX;
    let t0 = ts("2026-06-01T00:00:00Z");
    // t2 is never assigned here: t3 after t1 and t2 hears only t1.
    let mut h = Harness::new(t0, |_| (10, Outcome::Succeeded));
    let every = Schedule::every(DurationMs(1_000), t0).expect("valid");
    h.add(task(1, every, Policies::default(), t0));
    let both = after(&[(1, OutcomeSet::SUCCEEDED), (2, OutcomeSet::SUCCEEDED)]);
    h.add(task(3, both, Policies::default(), t0));
    let n = FANIN_OPEN_MAX + 10;
    h.run_until(t0.saturating_add_ms(n as i64 * 1_000 - 1));
    assert_eq!(h.starts().len(), n, "t1 only");
    let skips = h.skips();
    assert_eq!(skips.len(), 10, "the oldest beyond the bound are given up");
    assert!(skips.iter().all(|(k, _)| k.task_id == TaskId(3)));
    assert_eq!(skips[0].0.scheduled_at, t0);
    assert!(skips[0].1.detail().contains("upstream t2 never ended"));
}

#[test]
fn a_cycle_from_a_faulty_coordinator_does_not_loop() {
    let t0 = ts("2026-06-01T00:00:00Z");
    let mut h = Harness::new(t0, |_| (10, Outcome::Succeeded));
    h.add(task(1, Schedule::at(t0), Policies::default(), t0));
    // t2 after t1 or t3; t3 after t2: a loop through t2 and t3.
    h.add(task(
        2,
        after(&[(1, OutcomeSet::ANY)]),
        Policies::default(),
        t0,
    ));
    h.add(task(
        3,
        after(&[(2, OutcomeSet::ANY)]),
        Policies::default(),
        t0,
    ));
    h.add(task(
        4,
        after(&[(3, OutcomeSet::ANY)]),
        Policies::default(),
        t0,
    ));
    // Re-point t2 to t3: t2 → t3 → t2.
    h.add(task(
        2,
        after(&[(3, OutcomeSet::ANY)]),
        Policies::default(),
        t0,
    ));
    h.add(task(
        5,
        after(&[(1, OutcomeSet::ANY)]),
        Policies::default(),
        t0,
    ));
    h.run_until(t0.saturating_add_ms(10_000));
    // t1 fires t5; nothing reaches the loop, and nothing spins.
    assert_eq!(started(&h).iter().map(|s| s.0).collect::<Vec<_>>(), [1, 5]);
}
