//! `sundial-bench`: the figures behind Sundial's claims, each measured beside
//! its baselines in the same run. Benchmarks print numbers (median and
//! spread over repeated runs) and never fail on timing; a missed target is
//! shown as missed.

use std::collections::{BinaryHeap, HashSet};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sundial_agent::clock::{boot_ns, BootTimer, SystemClock};
use sundial_agent::scheduler::{Command as SchedCommand, SchedTask, Scheduler};
use sundial_agent::store::{AgentStore, StepWrite};
use sundial_agent::wheel::TimerWheel;
use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::{
    AgentId, DurationMs, Outcome, RunRecord, Schedule, TaskId, TaskSpec, Timestamp,
};

use crate::harness::Fleet;
use crate::relay::LinkConfig;
use crate::rng::Rng;

/// One line of a result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub value: String,
    pub baselines: String,
    pub target: String,
    pub verdict: String,
}

/// A suite's results.
#[derive(Debug, Clone)]
pub struct Table {
    pub suite: &'static str,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.suite);
        s.push_str("| metric | Sundial (median, min–max) | baselines, same run | target | met |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.metric, r.value, r.baselines, r.target, r.verdict
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }
}

/// Median, min and max.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt3(v: &[f64], unit: &str) -> String {
    let (m, lo, hi) = stats(v);
    format!("{} {unit} ({}–{})", num(m), num(lo), num(hi))
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn met(ok: bool) -> String {
    if ok {
        "met".into()
    } else {
        "**missed**".into()
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn spread(i: u64, span: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x % span
}

/// Sets the thread's timer slack to 1 ns, so sleeps end when asked.
pub fn tight_timer_slack() {
    // Best effort: without it wake-ups are up to 50 µs later.
    let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
}

// ---- wheel -------------------------------------------------------------------

pub fn wheel(quick: bool) -> Table {
    let sizes: &[usize] = if quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 1_000_000, 10_000_000]
    };
    let rounds = if quick { 3 } else { 5 };
    let ops = 100_000u64;
    let span = 12 * 86_400_000u64;
    let mut rows = Vec::new();
    let mut notes = vec![format!(
        "{ops} operations per round, {rounds} rounds, timers spread over 12 days, with N already pending, after one \
         untimed churn of {ops} inserts and cancels (so the slab does not grow while timed). \
         BinaryHeap cancels lazily (a tombstone set); DelayQueue is tokio-util's (insert and remove only: its expiry runs on tokio's own timer), measured up to N = 1M."
    )];
    let mut inserts_all = Vec::new();
    for &n in sizes {
        let (mut ins, mut can, mut exp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut h_ins, mut h_can, mut h_exp) = (Vec::new(), Vec::new(), Vec::new());
        let (mut d_ins, mut d_can) = (Vec::new(), Vec::new());
        let mut bytes_per = 0.0f64;
        for round in 0..rounds {
            // Sundial's wheel.
            let mut w: TimerWheel<u64> = TimerWheel::new(0);
            for i in 0..n as u64 {
                w.insert(1 + spread(i, span), i);
            }
            if round == 0 {
                bytes_per = w.memory_bytes() as f64 / n as f64;
            }
            let base = (round as u64 + 1) * 1_000_000_000;
            // Steady state, as in a running agent: the slab has room (a first
            // churn grows it), so the timed part measures the wheel, not Vec growth.
            let warm: Vec<_> = (0..ops)
                .map(|i| w.insert(1 + spread(base / 2 + i, span), i))
                .collect();
            for h in warm {
                w.cancel(h);
            }
            let t = Instant::now();
            let hs: Vec<_> = (0..ops)
                .map(|i| w.insert(1 + spread(base + i, span), i))
                .collect();
            ins.push(t.elapsed().as_nanos() as f64 / ops as f64);
            let t = Instant::now();
            for h in hs {
                black_box(w.cancel(h));
            }
            can.push(t.elapsed().as_nanos() as f64 / ops as f64);
            // Expire: advance through the first `ops` deadlines' worth of time.
            let horizon = span * ops / n as u64;
            let t = Instant::now();
            let mut expired = 0u64;
            // As a driver does: sleep to the next wake, then take what is due.
            while let Some(wake) = w.next_wake() {
                if wake > horizon {
                    break;
                }
                while let Some(x) = w.poll(wake) {
                    black_box(x);
                    expired += 1;
                }
            }
            exp.push(t.elapsed().as_nanos() as f64 / expired.max(1) as f64);
            drop(w);

            // BinaryHeap with lazy cancel.
            let mut heap: BinaryHeap<std::cmp::Reverse<(u64, u64)>> = BinaryHeap::with_capacity(n);
            for i in 0..n as u64 {
                heap.push(std::cmp::Reverse((1 + spread(i, span), i)));
            }
            let mut dead: HashSet<u64> = HashSet::new();
            let t = Instant::now();
            for i in 0..ops {
                heap.push(std::cmp::Reverse((
                    1 + spread(base + i, span),
                    n as u64 + i,
                )));
            }
            h_ins.push(t.elapsed().as_nanos() as f64 / ops as f64);
            let t = Instant::now();
            for i in 0..ops {
                dead.insert(n as u64 + i);
            }
            h_can.push(t.elapsed().as_nanos() as f64 / ops as f64);
            let t = Instant::now();
            let mut expired = 0u64;
            while let Some(std::cmp::Reverse((d, id))) = heap.peek().copied() {
                if d > horizon {
                    break;
                }
                heap.pop();
                if !dead.remove(&id) {
                    expired += 1;
                }
            }
            h_exp.push(t.elapsed().as_nanos() as f64 / expired.max(1) as f64);
            drop(heap);

            // tokio-util DelayQueue (capped at 1M pending: it is slow to fill beyond).
            if n <= 1_000_000 {
                let (di, dc) = delay_queue(n, ops as usize, span);
                d_ins.push(di);
                d_can.push(dc);
            }
        }
        let (im, _, _) = stats(&ins);
        let (cm, _, _) = stats(&can);
        inserts_all.push(im);
        let dq = |v: &Vec<f64>| {
            if v.is_empty() {
                "—".to_string()
            } else {
                fmt3(v, "ns")
            }
        };
        let ratio = |ours: f64, v: &Vec<f64>| {
            if v.is_empty() {
                String::new()
            } else {
                format!(" ({:.1}× ours)", stats(v).0 / ours)
            }
        };
        rows.push(Row {
            metric: format!("insert, N = {n}"),
            value: fmt3(&ins, "ns"),
            baselines: format!(
                "BinaryHeap {}; DelayQueue {}{}",
                fmt3(&h_ins, "ns"),
                dq(&d_ins),
                ratio(im, &d_ins)
            ),
            target: "≤ 40 ns; ≥ 5× DelayQueue".into(),
            verdict: met(im <= 40.0 && (d_ins.is_empty() || stats(&d_ins).0 >= 5.0 * im)),
        });
        rows.push(Row {
            metric: format!("cancel, N = {n}"),
            value: fmt3(&can, "ns"),
            baselines: format!(
                "BinaryHeap (lazy) {}; DelayQueue {}{}",
                fmt3(&h_can, "ns"),
                dq(&d_can),
                ratio(cm, &d_can)
            ),
            target: "≤ 25 ns; ≥ 5× DelayQueue".into(),
            verdict: met(cm <= 25.0 && (d_can.is_empty() || stats(&d_can).0 >= 5.0 * cm)),
        });
        rows.push(Row {
            metric: format!("expire, N = {n}"),
            value: fmt3(&exp, "ns"),
            baselines: format!("BinaryHeap {}", fmt3(&h_exp, "ns")),
            target: "—".into(),
            verdict: "—".into(),
        });
        rows.push(Row {
            metric: format!("bytes per pending timer, N = {n}"),
            value: format!(
                "{bytes_per:.1} B (slab entry {} B, as allocated)",
                TimerWheel::<u64>::ENTRY_BYTES
            ),
            baselines: "—".into(),
            target: "—".into(),
            verdict: "—".into(),
        });
    }
    let (lo, hi) = (
        inserts_all.iter().copied().fold(f64::INFINITY, f64::min),
        inserts_all.iter().copied().fold(0.0, f64::max),
    );
    notes.push(format!("Insert cost from the smallest to the largest N: {lo:.1}–{hi:.1} ns (flat means the ratio stays near 1: {:.2}).", hi / lo.max(0.001)));
    Table {
        suite: "wheel",
        notes,
        rows,
    }
}

fn delay_queue(n: usize, ops: usize, span: u64) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build();
    let Ok(rt) = rt else { return (0.0, 0.0) };
    rt.block_on(async move {
        let mut q: tokio_util::time::DelayQueue<u64> =
            tokio_util::time::DelayQueue::with_capacity(n + ops);
        let start = tokio::time::Instant::now();
        for i in 0..n as u64 {
            q.insert_at(i, start + Duration::from_millis(1 + spread(i, span)));
        }
        let t = Instant::now();
        let keys: Vec<_> = (0..ops as u64)
            .map(|i| {
                q.insert_at(
                    i,
                    start + Duration::from_millis(1 + spread(7_000_000_000 + i, span)),
                )
            })
            .collect();
        let ins = t.elapsed().as_nanos() as f64 / ops as f64;
        let t = Instant::now();
        for k in keys {
            black_box(q.remove(&k));
        }
        let can = t.elapsed().as_nanos() as f64 / ops as f64;
        (ins, can)
    })
}

// ---- lateness ----------------------------------------------------------------

/// Drives the real scheduler on the real clock, with a no-op action, and
/// returns start lateness in µs of every occurrence.
/// With `lead`, the driver wakes that much before a deadline, decides
/// (`advance` to the deadline: nothing else reaches the scheduler between),
/// spins until the deadline and hands the starts out then.
fn core_lateness(
    instants_ms: &[i64],
    cron_tasks: usize,
    run_for: Duration,
    lead: Duration,
) -> Vec<f64> {
    tight_timer_slack();
    let clock = SystemClock;
    let now_ms = clock.read().wall_ms;
    let mut sched = Scheduler::new(Timestamp::from_millis_saturating(now_ms));
    let mut out = Vec::new();
    let created = Timestamp::from_millis_saturating(now_ms);
    for (i, at) in instants_ms.iter().enumerate() {
        sched.upsert(
            SchedTask {
                id: TaskId(i as u64),
                schedule: Schedule::at(Timestamp::from_millis_saturating(*at)),
                policies: Policies::default(),
                created_at: created,
            },
            &mut out,
        );
    }
    for k in 0..cron_tasks {
        sched.upsert(
            SchedTask {
                id: TaskId(1_000_000 + k as u64),
                schedule: Schedule::cron("* * * * * *", "UTC")
                    .unwrap_or_else(|_| Schedule::at(created)),
                policies: Policies::default(),
                created_at: created,
            },
            &mut out,
        );
    }
    out.clear();
    sched.precompute();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    let end = Instant::now() + run_for;
    let mut late_us = Vec::new();
    rt.block_on(async {
        let mut timer = BootTimer::new();
        while Instant::now() < end {
            let Some(wake) = sched.next_wake() else { break };
            // Map the wall-clock deadline to boot time, as the agent does.
            let r_wall_ns = wall_ns();
            let boot = boot_ns();
            let target_ns = wake.as_millis() as i128 * 1_000_000;
            let deadline = boot + (target_ns - r_wall_ns - lead.as_nanos() as i128).max(0) as i64;
            timer.sleep_until(deadline).await;
            let now_ns = wall_ns();
            let decide_at = if lead.is_zero() {
                (now_ns / 1_000_000) as i64
            } else {
                wake.as_millis().max((now_ns / 1_000_000) as i64)
            };
            let mut cmds = Vec::new();
            sched.advance(Timestamp::from_millis_saturating(decide_at), &mut cmds);
            while wall_ns() < decide_at as i128 * 1_000_000 {
                std::hint::spin_loop();
            }
            // Each start is handed out in turn: its lateness is read as the
            // driver takes it (after the whole `advance`).
            let mut started = Vec::new();
            for c in &cmds {
                if let SchedCommand::Start { key, .. } = c {
                    let late = (wall_ns() - key.scheduled_at.as_millis() as i128 * 1_000_000)
                        as f64
                        / 1_000.0;
                    late_us.push(late.max(0.0));
                    started.push(*key);
                }
            }
            // Then the bookkeeping: the next occurrences, the runs' ends.
            sched.precompute();
            for key in started {
                sched.run_finished(key, Outcome::Succeeded, key.scheduled_at);
            }
        }
    });
    late_us
}

fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn tokio_lateness(instants_ms: &[i64]) -> Vec<f64> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    rt.block_on(async {
        let base_wall = wall_ns();
        let base = tokio::time::Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for &at in instants_ms {
            let target_ns = at as i128 * 1_000_000;
            let wait = Duration::from_nanos((target_ns - base_wall).max(0) as u64);
            set.spawn(async move {
                tokio::time::sleep_until(base + wait).await;
                ((wall_ns() - target_ns) as f64 / 1_000.0).max(0.0)
            });
        }
        let mut v = Vec::new();
        while let Some(r) = set.join_next().await {
            if let Ok(x) = r {
                v.push(x);
            }
        }
        v
    })
}

fn cron_crate_lateness(jobs: usize, run_for: Duration) -> Vec<f64> {
    use std::sync::{Arc, Mutex};
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    rt.block_on(async move {
        let samples: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
        let Ok(sched) = tokio_cron_scheduler::JobScheduler::new().await else {
            return Vec::new();
        };
        for _ in 0..jobs {
            let s = samples.clone();
            let job = tokio_cron_scheduler::Job::new_async("* * * * * *", move |_, _| {
                let s = s.clone();
                Box::pin(async move {
                    let now = wall_ns();
                    let late = (now % 1_000_000_000) as f64 / 1_000.0;
                    if let Ok(mut v) = s.lock() {
                        v.push(late);
                    }
                })
            });
            if let Ok(job) = job {
                let _ = sched.add(job).await;
            }
        }
        let _ = sched.start().await;
        tokio::time::sleep(run_for).await;
        let mut sched = sched;
        let _ = sched.shutdown().await;
        samples.lock().map(|v| v.clone()).unwrap_or_default()
    })
}

fn lat_row(
    metric: &str,
    mut ours: Vec<f64>,
    baselines: String,
    target: &str,
    ok: impl Fn(f64, f64) -> bool,
) -> Row {
    ours.sort_by(f64::total_cmp);
    let (p50, p99, p999, max) = (
        pct(&ours, 0.5),
        pct(&ours, 0.99),
        pct(&ours, 0.999),
        ours.last().copied().unwrap_or(0.0),
    );
    Row {
        metric: format!("{metric} ({} starts)", ours.len()),
        value: format!(
            "p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            num(p50),
            num(p99),
            num(p999),
            num(max)
        ),
        baselines,
        target: target.into(),
        verdict: met(ok(p50, p99)),
    }
}

fn summary(mut v: Vec<f64>, name: &str) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name}: p50 {} µs, p99 {} µs, max {} µs",
        num(pct(&v, 0.5)),
        num(pct(&v, 0.99)),
        num(v.last().copied().unwrap_or(0.0))
    )
}

/// How far ahead of a deadline the driver of the "decided ahead" row wakes.
const CRON_LEAD: Duration = Duration::from_millis(1);

pub fn lateness(quick: bool, exe: &Path) -> Table {
    let now_ms = SystemClock.read().wall_ms;
    let start = now_ms + 1_500;
    let (n1, n2) = if quick {
        (1_000, 5_000)
    } else {
        (10_000, 100_000)
    };
    let burst: Vec<i64> = (0..n1)
        .map(|i| start + (spread(i as u64, 1_000) as i64))
        .collect();
    let ours = core_lateness(&burst, 0, Duration::from_millis(2_700), Duration::ZERO);
    let now_ms = SystemClock.read().wall_ms;
    let burst_t: Vec<i64> = burst.iter().map(|t| t - start + now_ms + 1_500).collect();
    let theirs = tokio_lateness(&burst_t);
    let mut rows = vec![lat_row(
        &format!("scheduler core, no-op action, {n1} tasks due within 1 s"),
        ours,
        summary(theirs, "tokio sleep_until"),
        "p50 ≤ 100 µs, p99 ≤ 500 µs",
        |p50, p99| p50 <= 100.0 && p99 <= 500.0,
    )];
    let now_ms = SystemClock.read().wall_ms;
    let start = now_ms + 1_500;
    let wide: Vec<i64> = (0..n2)
        .map(|i| start + (spread(i as u64, 10_000) as i64))
        .collect();
    let ours = core_lateness(&wide, 0, Duration::from_millis(11_700), Duration::ZERO);
    let now_ms = SystemClock.read().wall_ms;
    let wide_t: Vec<i64> = wide.iter().map(|t| t - start + now_ms + 1_500).collect();
    let theirs = tokio_lateness(&wide_t);
    rows.push(lat_row(
        &format!("scheduler core, no-op action, {n2} tasks over 10 s"),
        ours,
        summary(theirs, "tokio sleep_until"),
        "p50 ≤ 100 µs, p99 ≤ 500 µs",
        |p50, p99| p50 <= 100.0 && p99 <= 500.0,
    ));
    let secs = if quick { 3 } else { 6 };
    let theirs = cron_crate_lateness(1_000, Duration::from_secs(secs));
    let at_instant = core_lateness(&[], 1_000, Duration::from_secs(secs), Duration::ZERO);
    rows.push(lat_row(
        "1,000 per-second cron jobs, decided when due",
        at_instant,
        summary(theirs.clone(), "tokio-cron-scheduler 0.15, same jobs"),
        "p50 ≤ 50 µs, p99 ≤ 150 µs",
        |p50, p99| p50 <= 50.0 && p99 <= 150.0,
    ));
    let ahead = core_lateness(&[], 1_000, Duration::from_secs(secs), CRON_LEAD);
    rows.push(lat_row(
        "1,000 per-second cron jobs, decided 1 ms ahead",
        ahead,
        summary(theirs, "tokio-cron-scheduler 0.15, same jobs"),
        "p50 ≤ 50 µs, p99 ≤ 150 µs",
        |p50, p99| p50 <= 50.0 && p99 <= 150.0,
    ));
    let (execs, window_ms) = if quick { (50, 1_000) } else { (300, 3_000) };
    let exec = exec_lateness(exe, execs, window_ms);
    rows.push(lat_row(
        &format!(
            "real agent, exec /bin/true, {execs} tasks over {} s",
            window_ms / 1000
        ),
        exec,
        "—".into(),
        "p99 ≤ 5 ms",
        |_, p99| p99 <= 5_000.0,
    ));
    Table {
        suite: "lateness",
        notes: vec![
            "Lateness is wall-clock time from the scheduled instant to the start of the action: for the scheduler core, \
             when the driver (timerfd on CLOCK_BOOTTIME, timer slack 1 ns, the agent's Scheduler) hands the run out — \
             each start's time is read as the driver takes it from the batch `advance` returned, so a start waits for \
             every decision of its batch (on-time occurrences are handed out without computing the next one; the next \
             ones are computed by `precompute` after the batch). \"decided when due\": the driver wakes at the instant \
             and decides then; \"decided 1 ms ahead\": it wakes 1 ms early, decides for the instant (nothing else \
             reaches the scheduler in between), spins until the instant and hands the batch out. \
             for the real agent, the `fired_at` it records after committing the `started` marker (ms resolution, so \
             values are multiples of 1000 µs). Thousands of process spawns a second do not fit on two cores, so \
             the exec row uses fewer tasks than the in-process rows."
                .into(),
        ],
        rows,
    }
}

fn exec_lateness(_exe: &Path, n: usize, window_ms: i64) -> Vec<f64> {
    let Ok(dir) = tempfile::tempdir() else {
        return Vec::new();
    };
    let store_path = dir.path().join("agent.redb");
    let now = SystemClock.read().wall_ms;
    let start = now + 2_000;
    {
        let Ok(store) = AgentStore::open(&store_path) else {
            return Vec::new();
        };
        let tasks: Vec<TaskSpec> = (0..n)
            .map(|i| {
                task(
                    i as u64,
                    Schedule::at(Timestamp::from_millis_saturating(
                        start + spread(i as u64, window_ms as u64) as i64,
                    )),
                    "/bin/true",
                )
            })
            .collect();
        if store.put_tasks(&tasks, Some(1)).is_err() {
            return Vec::new();
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    let cfg = sundial_agent::runtime::AgentConfig {
        data_dir: dir.path().to_owned(),
        exec: sundial_agent::exec::ExecPolicy {
            allow: vec!["/bin/true".into()],
            ..Default::default()
        },
        runs_concurrent_max: sundial_agent::runtime::RUNS_CONCURRENT_MAX_DEFAULT,
        stop_grace: sundial_agent::runtime::STOP_GRACE_DEFAULT,
    };
    let wait = Duration::from_millis((start + window_ms - now + 2_000) as u64);
    let _ = rt
        .block_on(async move { sundial_agent::runtime::run(cfg, tokio::time::sleep(wait)).await });
    let Ok(store) = AgentStore::open(&store_path) else {
        return Vec::new();
    };
    store
        .outbox_batch(usize::MAX, usize::MAX)
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r.lateness().map(|d| d.0 as f64 * 1_000.0))
        .collect()
}

fn task(id: u64, schedule: Schedule, program: &str) -> TaskSpec {
    TaskSpec {
        id: TaskId(id),
        name: None,
        target: Target::Agent(AgentId(1)),
        schedule,
        action: Action::Exec(ExecSpec {
            program: program.into(),
            ..ExecSpec::default()
        }),
        policies: Policies::default(),
        revision: id + 1,
        created_at: Timestamp::from_millis_saturating(SystemClock.read().wall_ms),
    }
}

// ---- ingest ------------------------------------------------------------------

pub fn ingest(quick: bool) -> Table {
    let total = if quick { 20_000 } else { 200_000 };
    let batch = 1_000;
    let rounds = if quick { 3 } else { 5 };
    let mut batched = Vec::new();
    let mut single = Vec::new();
    let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
    for _ in 0..rounds {
        let Ok(dir) = tempfile::tempdir() else {
            continue;
        };
        let Ok(store) = AgentStore::open(&dir.path().join("agent.redb")) else {
            continue;
        };
        let tasks: Vec<TaskSpec> = (0..total as u64)
            .map(|i| {
                task(
                    i,
                    Schedule::every(DurationMs(3_600_000), now)
                        .unwrap_or_else(|_| Schedule::at(now)),
                    "/usr/bin/backup",
                )
            })
            .collect();
        let t = Instant::now();
        for chunk in tasks.chunks(batch) {
            let _ = store.put_tasks(chunk, None);
        }
        batched.push(total as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for tk in tasks.iter().take(200) {
            let _ = store.put_task(tk, None);
        }
        single.push(200.0 / t.elapsed().as_secs_f64());
    }
    let (m, _, _) = stats(&batched);
    Table {
        suite: "ingest",
        notes: vec![format!("{total} tasks stored durably (each transaction committed with fsync) in batches of {batch}; \
            the unbatched row commits every task on its own, as a naive client would.")],
        rows: vec![
            Row { metric: format!("tasks/s, batches of {batch}"), value: fmt3(&batched, "/s"), baselines: format!("one task per transaction: {}", fmt3(&single, "/s")), target: "≥ 50,000/s".into(), verdict: met(m >= 50_000.0) },
        ],
    }
}

// ---- drain -------------------------------------------------------------------

/// Time for an agent with `n` buffered runs to empty its outbox over
/// loopback QUIC once it connects; returns (seconds, stored at coordinator).
pub async fn drain_once(exe: &Path, n: usize) -> anyhow::Result<(f64, u64)> {
    let mut rng = Rng::new(n as u64);
    // The pipe's own speed: the per-agent upload limit (a defence against
    // a flooding agent, 2,000 runs/s by default) is lifted for this measure.
    let mut fleet = Fleet::start_with(
        exe,
        1,
        true,
        &mut rng,
        &["--upload-runs-per-sec", "100000000"],
    )
    .await?;
    // The runs must be of a task assigned to the agent: others are refused.
    let task = fleet
        .add_task(
            0,
            "drain",
            sundial_protocol::Schedule::at(Timestamp::parse("2099-01-01T00:00:00Z")?),
            0,
            Policies::default(),
        )
        .await?;
    fleet.agents[0].stop().await;
    {
        let store = AgentStore::open(&fleet.agents[0].dir.join("agent.redb"))?;
        let base = Timestamp::parse("2026-11-26T00:00:00Z")?;
        let id = fleet.agents[0].id;
        let records: Vec<RunRecord> = (0..n)
            .map(|i| RunRecord {
                task_id: task,
                agent_id: id,
                scheduled_at: base.saturating_add_ms(i as i64 * 1000),
                attempt: 1,
                fired_at: Some(base.saturating_add_ms(i as i64 * 1000 + 1)),
                finished_at: Some(base.saturating_add_ms(i as i64 * 1000 + 20)),
                outcome: Outcome::Succeeded,
                exit_code: Some(0),
                offline: true,
                detail: None,
                stdout_tail: b"ok\n".to_vec(),
                stderr_tail: Vec::new(),
            })
            .collect();
        for chunk in records.chunks(10_000) {
            store.apply_step(&StepWrite {
                records: chunk.to_vec(),
                ..StepWrite::default()
            })?;
        }
    }
    let t = Instant::now();
    let exe2 = exe.to_owned();
    fleet.agents[0].start(&exe2)?;
    loop {
        let s = sundial_agent::status::read(&fleet.agents[0].dir);
        if matches!(s, Ok(ref s) if s.outbox_len == 0) {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "drain did not finish"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    fleet.stop().await;
    let store = sundial_coordinator::store::CoordinatorStore::open(
        &fleet
            .coord_dir
            .join(sundial_coordinator::server::STORE_FILE),
    )?;
    use sundial_coordinator::store::CoordStore as _;
    Ok((secs, store.run_count()?))
}

pub async fn drain(quick: bool, exe: &Path) -> Table {
    let n = if quick { 10_000 } else { 100_000 };
    let rounds = if quick { 2 } else { 3 };
    let (mut rates, mut times) = (Vec::new(), Vec::new());
    let mut notes = Vec::new();
    for _ in 0..rounds {
        match drain_once(exe, n).await {
            Ok((secs, stored)) if stored == n as u64 => {
                rates.push(n as f64 / secs);
                times.push(secs);
            }
            Ok((_, stored)) => notes.push(format!("a round stored {stored} of {n} runs")),
            Err(e) => notes.push(format!("a round failed: {e:#}")),
        }
    }
    let (m, _, _) = stats(&rates);
    notes.push(format!("{n} run records buffered in one agent's outbox; the agent connects (link restored) and the clock \
        stops when its outbox is empty, every record committed by the coordinator before its acknowledgement. \
        The per-agent upload limit (`--upload-runs-per-sec`, default 2,000/s) is lifted to measure the pipe; with the \
        default, one agent drains at 2,000 runs/s."));
    Table {
        suite: "drain",
        notes,
        rows: vec![
            Row {
                metric: format!("runs/s, {n}-run backlog"),
                value: fmt3(&rates, "/s"),
                baselines: "—".into(),
                target: "≥ 50,000 runs/s".into(),
                verdict: met(m >= 50_000.0),
            },
            Row {
                metric: "link restored → outbox empty".into(),
                value: fmt3(&times, "s"),
                baselines: "—".into(),
                target: "—".into(),
                verdict: "—".into(),
            },
        ],
    }
}

// ---- fleet -------------------------------------------------------------------

pub async fn fleet(quick: bool, exe: &Path) -> Table {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    // SUNDIAL_BENCH_FLEET_ROWS=idle,heal,storm picks rows (all by default);
    // SUNDIAL_BENCH_IDLE_SIZES=N,M the idle fleets.
    let rows_env = std::env::var("SUNDIAL_BENCH_FLEET_ROWS").unwrap_or_default();
    let want = |r: &str| rows_env.is_empty() || rows_env.split(',').any(|x| x.trim() == r);
    let idle_sizes: Vec<usize> = match std::env::var("SUNDIAL_BENCH_IDLE_SIZES") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if quick => vec![300],
        Err(_) => vec![10_000, 100_000],
    };
    for &n in idle_sizes.iter().filter(|_| want("idle")) {
        let deadline = Duration::from_secs(if quick {
            60
        } else if n >= 100_000 {
            240
        } else {
            120
        });
        match crate::light::idle(
            exe,
            n,
            n.min(IDLE_IDENTITIES_MAX),
            IDLE_AGENTS_PER_SOCKET,
            deadline,
        )
        .await
        {
            Ok(r) => {
                rows.push(Row {
                    metric: format!("idle agents held by one coordinator (of {n} connecting)"),
                    value: format!(
                        "{} held, {:.1} KiB coordinator RSS per agent, {:.0}% of a core while idle",
                        r.held, r.rss_kib_per_agent, r.idle_cpu_pct
                    ),
                    baselines: "—".into(),
                    target: if n >= 100_000 {
                        "100,000 held, ≤ 30 KiB each".into()
                    } else {
                        "10,000 idle agents".into()
                    },
                    verdict: met(if n >= 100_000 {
                        r.held >= 100_000 && r.rss_kib_per_agent <= 30.0
                    } else {
                        r.held >= 10_000
                    }),
                });
                notes.push(format!("{n} idle agents: light agents (see the storm row) over {} client sockets, {} enrolled \
                    identities shared round-robin (a coordinator serves several sessions of one agent as it would many \
                    agents); every one in session took {:.1} s at a handshake budget of {}/s; RSS (from /proc, less the \
                    coordinator's before any agent) and CPU (utime + stime over 10 s) of the coordinator process.",
                    r.sockets, r.identities, r.connect.as_secs_f64(), handshakes_for_bench()));
            }
            Err(e) => notes.push(format!("idle agents ({n}): failed: {e:#}")),
        }
    }
    let heal_n = if quick { 50 } else { 1_000 };
    match if want("heal") {
        heal(exe, heal_n).await
    } else {
        Ok(Vec::new())
    } {
        Ok(v) if v.is_empty() => {}
        Ok(v) => {
            let (m, _, _) = stats(&v);
            rows.push(Row {
                metric: format!("{heal_n} agents cut at once: heal → all synced"),
                value: fmt3(&v, "s"),
                baselines: "—".into(),
                target: "≤ 5 s".into(),
                verdict: met(m <= 5.0 && heal_n >= 1_000),
            });
            notes.push(format!("{heal_n} in-process agents, each behind its own relay and firing every 15 s, cut for 16 s \
                (longer than the idle timeout), then healed at once; the clock stops when every outbox is empty."));
        }
        Err(e) => notes.push(format!("heal: failed: {e:#}")),
    }
    let (storm_n, budget) = if quick {
        (300, 100)
    } else {
        (
            10_000,
            sundial_coordinator::server::handshakes_per_sec_default(),
        )
    };
    let deadline = Duration::from_secs(if quick { 60 } else { 120 });
    let storm = if want("storm") {
        Some(crate::light::storm(exe, storm_n, Duration::from_secs(16), budget, deadline).await)
    } else {
        None
    };
    match storm {
        None => {}
        Some(Ok(r)) => {
            let secs = r.healed.as_secs_f64();
            let all = r.synced_again == r.agents;
            let under = r.handshakes_max_per_sec as f64 <= f64::from(r.budget) * 1.1;
            rows.push(Row {
                metric: format!("{} agents healed at once: all synced", r.agents),
                value: if all {
                    format!("{secs:.1} s")
                } else {
                    format!("{} of {} in {secs:.0} s", r.synced_again, r.agents)
                },
                baselines: "—".into(),
                target: "≤ 30 s".into(),
                verdict: met(all && secs <= 30.0 && !quick),
            });
            rows.push(Row {
                metric: format!("{} agents healed at once: coordinator handshakes", r.agents),
                value: format!(
                    "at most {} in any second (budget {}/s); {} attempts refused at once",
                    r.handshakes_max_per_sec, r.budget, r.refused
                ),
                baselines: "—".into(),
                target: "never above the budget".into(),
                verdict: met(under),
            });
            notes.push(format!("{n} light agents (the core's session machine each — reconnect policy, backoff, Hello — \
                over connections of one client socket, no store) synced in {first:.1} s; then the coordinator process was \
                killed, stayed away 16 s, and came back on the same address and store with a handshake budget of {b}/s \
                (the default: 250 per core; the burst is a tenth of it, so the most in a second may reach 1.1 × the budget). \
                Synced = assignments received in a new session. Handshakes are counted by the agents as they complete.",
                n = r.agents, first = r.first_sync.as_secs_f64(), b = r.budget));
        }
        Some(Err(e)) => notes.push(format!("storm: failed: {e:#}")),
    }
    Table {
        suite: "fleet",
        notes,
        rows,
    }
}

/// Enrolled identities of the idle fleet (more agents share them).
const IDLE_IDENTITIES_MAX: usize = 2_000;
/// Light agents per client UDP socket.
const IDLE_AGENTS_PER_SOCKET: usize = 10_000;

/// The handshake budget the idle rows give the coordinator: this machine
/// connects ~1,000 a second with both ends on it; the budget is not what
/// those rows measure.
pub(crate) fn handshakes_for_bench() -> u32 {
    2_000
}

async fn heal(exe: &Path, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut rng = Rng::new(42);
    let fleet = Fleet::start(exe, n, true, &mut rng).await?;
    let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
    for a in 0..n {
        let anchor = now.saturating_add_ms(rng.below(15_000) as i64);
        fleet
            .add_task(
                a,
                "beat",
                Schedule::every(DurationMs(15_000), anchor)?,
                0,
                Policies::default(),
            )
            .await?;
    }
    let mut out = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        for a in &fleet.agents {
            a.relay.set(LinkConfig::partition());
        }
        tokio::time::sleep(Duration::from_secs(16)).await;
        let t = Instant::now();
        for a in &fleet.agents {
            a.relay.set(LinkConfig::pass());
        }
        loop {
            let (outbox, _) = fleet.backlog();
            if outbox == 0 {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "heal did not finish"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out.push(t.elapsed().as_secs_f64());
    }
    let mut fleet = fleet;
    fleet.stop().await;
    Ok(out)
}

// ---- footprint ---------------------------------------------------------------

pub fn footprint(quick: bool, exe: &Path) -> Table {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let agent_bin = exe.with_file_name("sundial-agent");
    if agent_bin.exists() {
        let stripped =
            std::env::temp_dir().join(format!("sundial-agent-stripped-{}", std::process::id()));
        let _ = std::fs::copy(&agent_bin, &stripped);
        let ok = Command::new("strip")
            .arg(&stripped)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let size = std::fs::metadata(&stripped).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&stripped);
        let mb = size as f64 / 1_048_576.0;
        rows.push(Row {
            metric: "stripped release binary (sundial-agent, x86_64)".into(),
            value: if ok {
                format!("{mb:.1} MiB")
            } else {
                "strip failed".into()
            },
            baselines: "—".into(),
            target: "≤ 10 MB".into(),
            verdict: met(ok && size <= 10_000_000),
        });
    } else {
        notes.push(format!("{} is not built: run `cargo build --release -p sundial-agent` first for the binary size.", agent_bin.display()));
    }
    let counts: &[usize] = if quick {
        &[0, 10_000]
    } else {
        &[0, 100_000, 1_000_000, 10_000_000]
    };
    let counts: Vec<usize> = match std::env::var("SUNDIAL_BENCH_FOOTPRINT_COUNTS") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => counts.to_vec(),
    };
    for &n in &counts {
        let t = Instant::now();
        match agent_with_tasks(exe, n) {
            Ok(f) => {
                let mb = f.rss_kib as f64 / 1024.0;
                let (target, ok) = match n {
                    0 => ("≤ 10 MB idle", mb <= 10.0),
                    1_000_000 => ("≤ 64 MB", mb <= 64.0),
                    _ => ("—", true),
                };
                let fired = format!(
                    "; probes fired {} of {}, p99 {} ms late",
                    f.probes_fired, PROBES, f.probe_late_p99_ms
                );
                rows.push(Row {
                    metric: format!("agent RSS, idle, {n} tasks stored"),
                    value: format!("{mb:.1} MiB{}", if n > 0 { fired.as_str() } else { "" }),
                    baselines: "—".into(),
                    target: target.into(),
                    verdict: if target == "—" {
                        if n > 0 {
                            met(f.probes_fired == PROBES)
                        } else {
                            "—".into()
                        }
                    } else {
                        met(ok && (n == 0 || f.probes_fired == PROBES))
                    },
                });
                if n >= 100_000 {
                    let limit = (n == 1_000_000).then_some(Duration::from_secs(1));
                    rows.push(Row {
                        metric: format!("agent start-up with {n} tasks stored"),
                        value: format!("{:.3} s", f.startup.as_secs_f64()),
                        baselines: "—".into(),
                        target: limit.map_or("—".into(), |_| "≤ 1 s".into()),
                        verdict: limit.map_or("—".into(), |l| met(f.startup <= l)),
                    });
                }
                if n >= 1_000_000 {
                    notes.push(format!(
                        "{n} tasks: the store ({:.0} MiB) took {:.0} s to build; the row took {:.0} s.",
                        f.store_bytes as f64 / 1_048_576.0,
                        f.build.as_secs_f64(),
                        t.elapsed().as_secs_f64()
                    ));
                }
            }
            Err(e) => notes.push(format!("{n} tasks: failed: {e:#}")),
        }
    }
    notes.push(format!("The agent runs as a process of this benchmark's binary (same entry point as `sundial-agent run`), \
        unenrolled, its tasks every hour, the first occurrences spread over the hour after next, so that only the \
        probes fire: {PROBES} one-shot tasks stored last, due 2 s after the store is built (`/bin/true`); they are \
        counted from the agent's outbox after it is stopped (p99 lateness from its `fired_at`). RSS is read from \
        /proc 3 s after the agent reports it is running; start-up is from spawn to that report, which comes after \
        the tasks due within the horizon are loaded. The agent holds only tasks due within 60 s (at most 16,384) in \
        memory and reads the rest from its store's due index as time moves on."));
    Table {
        suite: "footprint",
        notes,
        rows,
    }
}

/// One-shot tasks due soon after an agent with many tasks starts: it fires
/// them (fewer than the default of runs at once, so none is skipped).
const PROBES: usize = 50;

struct Footprint {
    rss_kib: u64,
    startup: Duration,
    build: Duration,
    store_bytes: u64,
    probes_fired: usize,
    probe_late_p99_ms: i64,
}

fn agent_with_tasks(exe: &Path, n: usize) -> anyhow::Result<Footprint> {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("agent.redb");
    let built = Instant::now();
    let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
    let probe_base = n as u64 + 1;
    {
        let store = AgentStore::open(&store_path)?;
        let mut failed = None;
        let hourly = (0..n as u64).map_while(|i| {
            match Schedule::every(
                DurationMs(3_600_000),
                // Spread evenly over the hour after next, in id order.
                now.saturating_add_ms(3_600_000 + (i as u128 * 3_600_000 / n as u128) as i64),
            ) {
                Ok(s) => Some(task(i, s, "/bin/true")),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        store.import_tasks(hourly, 200_000)?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        let probe_at =
            Timestamp::from_millis_saturating(SystemClock.read().wall_ms).saturating_add_ms(2_000);
        let probes: Vec<TaskSpec> = (0..PROBES as u64)
            .map(|p| task(probe_base + p, Schedule::at(probe_at), "/bin/true"))
            .collect();
        store.put_tasks(&probes, None)?;
    }
    let build = built.elapsed();
    let store_bytes = std::fs::metadata(&store_path).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    let mut child = Command::new(exe)
        .arg(crate::harness::SUB_AGENT)
        .args(["run", "--allow-exec", "/bin/true", "--data-dir"])
        .arg(dir.path())
        .env("SUNDIAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stderr"))?;
    let mut lines = BufReader::new(stderr).lines();
    let mut startup = None;
    while let Some(Ok(l)) = lines.next() {
        if l.contains("agent running") {
            startup = Some(t.elapsed());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let startup = startup.ok_or_else(|| anyhow::anyhow!("the agent did not report running"))?;
    std::thread::sleep(Duration::from_secs(3));
    let rss_kib = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let store = AgentStore::open(&store_path)?;
    let mut late: Vec<i64> = store
        .outbox_batch(usize::MAX, usize::MAX)?
        .into_iter()
        .filter(|r| r.task_id.0 >= probe_base && r.outcome == sundial_protocol::Outcome::Succeeded)
        .filter_map(|r| r.fired_at.map(|f| f.millis_since(r.scheduled_at)))
        .collect();
    late.sort_unstable();
    let probe_late_p99_ms = late
        .get((late.len() * 99 / 100).min(late.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0);
    Ok(Footprint {
        rss_kib,
        startup,
        build,
        store_bytes,
        probes_fired: late.len(),
        probe_late_p99_ms,
    })
}

/// The machine, for the report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|k| format!("{:.0} GiB", k as f64 / 1_048_576.0))
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, {mem} RAM, Linux {kernel}")
}

/// Where a report goes.
pub fn report_path() -> PathBuf {
    PathBuf::from("BENCHMARKS.md")
}

// ---- runlist -------------------------------------------------------------------

/// `run list` against a store of many runs: the first page (the latest 100)
/// and a page deep in the cursor, read from the time index, beside the way
/// it was done before the index (read, decode and sort every run, then cut).
pub fn runlist(quick: bool) -> Table {
    use sundial_coordinator::store::{
        CoordStore as _, CoordinatorStore, Page, RunCursor, RunQuery,
    };
    let total: i64 = if quick { 100_000 } else { 1_000_000 };
    let rounds = if quick { 5 } else { 20 };
    let empty = |why: String| Table {
        suite: "runlist",
        notes: vec![why],
        rows: Vec::new(),
    };
    let Ok(dir) = tempfile::tempdir() else {
        return empty("no temporary directory".into());
    };
    let store = match CoordinatorStore::open(&dir.path().join("coordinator.redb")) {
        Ok(s) => s,
        Err(e) => return empty(format!("store: {e}")),
    };
    let base = Timestamp::from_millis_saturating(1_780_000_000_000);
    let fill = Instant::now();
    for chunk in 0..(total / 10_000) {
        let runs: Vec<RunRecord> = (0..10_000)
            .map(|i| {
                let n = chunk * 10_000 + i;
                RunRecord {
                    task_id: TaskId(1 + (n % 50) as u64),
                    agent_id: AgentId(1 + (n % 20) as u64),
                    scheduled_at: base.saturating_add_ms(n * 1_000),
                    attempt: 1,
                    fired_at: Some(base.saturating_add_ms(n * 1_000 + 3)),
                    finished_at: Some(base.saturating_add_ms(n * 1_000 + 40)),
                    outcome: Outcome::Succeeded,
                    exit_code: Some(0),
                    offline: false,
                    detail: None,
                    stdout_tail: b"ok\n".to_vec(),
                    stderr_tail: Vec::new(),
                }
            })
            .collect();
        if let Err(e) = store.put_runs(&runs) {
            return empty(format!("storing runs: {e}"));
        }
    }
    let fill_s = fill.elapsed().as_secs_f64();
    let query = |page: Page| RunQuery {
        task: None,
        agent: None,
        since: None,
        limit: 100,
        page,
        forward_from_since: false,
    };
    let mut first = Vec::new();
    let mut deep = Vec::new();
    let mut by_task = Vec::new();
    let middle = RunCursor {
        scheduled_at_ms: base.as_millis() + (total / 2) * 1_000,
        task: 0,
        agent: 0,
        attempt: 0,
    };
    for _ in 0..rounds {
        let t = Instant::now();
        let ok = store.runs(&query(Page::Latest)).map(|p| p.runs.len());
        first.push(t.elapsed().as_secs_f64() * 1_000.0);
        if ok.ok() != Some(100) {
            return empty("the first page was not 100 runs".into());
        }
        let t = Instant::now();
        let _ = store.runs(&query(Page::After(middle)));
        deep.push(t.elapsed().as_secs_f64() * 1_000.0);
        let t = Instant::now();
        let _ = store.runs(&RunQuery {
            task: Some(TaskId(7)),
            ..query(Page::Latest)
        });
        by_task.push(t.elapsed().as_secs_f64() * 1_000.0);
    }
    // Before the index: every run read, decoded and sorted, then cut.
    let mut scan = Vec::new();
    for _ in 0..if quick { 2 } else { 3 } {
        let t = Instant::now();
        if let Ok(mut all) = store.all_runs() {
            all.sort_by_key(|r| (r.scheduled_at, r.task_id, r.agent_id, r.attempt));
            let keep = all.len().saturating_sub(100);
            all.drain(..keep);
        }
        scan.push(t.elapsed().as_secs_f64() * 1_000.0);
    }
    let (f, _, _) = stats(&first);
    let (d, _, _) = stats(&deep);
    Table {
        suite: "runlist",
        notes: vec![format!(
            "{total} runs stored (50 tasks, 20 agents; {fill_s:.1} s to store them in batches of 10,000); pages of 100 read from the \
             time index (and the per-task index), decoded; the baseline is how `run list` worked before the index."
        )],
        rows: vec![
            Row {
                metric: format!("first page (latest 100) of {total}"),
                value: fmt3(&first, "ms"),
                baselines: format!("read, decode, sort all: {}", fmt3(&scan, "ms")),
                target: "≤ 10 ms".into(),
                verdict: met(f <= 10.0),
            },
            Row {
                metric: format!("a page deep in the cursor (after run {})", total / 2),
                value: fmt3(&deep, "ms"),
                baselines: "—".into(),
                target: "≤ 10 ms".into(),
                verdict: met(d <= 10.0),
            },
            Row {
                metric: "latest 100 of one task".into(),
                value: fmt3(&by_task, "ms"),
                baselines: "—".into(),
                target: "≤ 10 ms".into(),
                verdict: met(stats(&by_task).0 <= 10.0),
            },
        ],
    }
}
