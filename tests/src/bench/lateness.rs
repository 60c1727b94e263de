//! How late runs fire: the core's loop, tokio `sleep_until`, tokio-cron-scheduler, and real executions.

use super::*;

/// Drives the real scheduler on the real clock, with a no-op action, and
/// returns start lateness in µs of every occurrence.
/// With `lead`, the driver wakes that much before a deadline, decides
/// (`advance` to the deadline: nothing else reaches the scheduler between),
/// spins until the deadline and hands the starts out then.
pub(super) fn core_lateness(
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
                placement: None,
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
                placement: None,
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
            let mut follow = Vec::new();
            for key in started {
                sched.run_finished(key, Outcome::Succeeded, key.scheduled_at, &mut follow);
            }
        }
    });
    late_us
}

pub(super) fn wall_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

pub(super) fn tokio_lateness(instants_ms: &[i64]) -> Vec<f64> {
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

pub(super) fn cron_crate_lateness(jobs: usize, run_for: Duration) -> Vec<f64> {
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

/// tokio-cron-scheduler with `jobs` per-second jobs, each spawning this
/// binary's `__stamp` (and reaping it): lateness as the process read it, µs.
pub(super) fn cron_crate_exec_lateness(stamp: &Path, jobs: usize, secs: u64) -> Vec<f64> {
    let Ok(dir) = tempfile::tempdir() else {
        return Vec::new();
    };
    let stamps = dir.path().join("stamps");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    rt.block_on(async {
        let Ok(sched) = tokio_cron_scheduler::JobScheduler::new().await else {
            return;
        };
        for _ in 0..jobs {
            let exe = stamp.to_owned();
            let stamps = stamps.clone();
            let job = tokio_cron_scheduler::Job::new_async("* * * * * *", move |_, _| {
                let exe = exe.clone();
                let stamps = stamps.clone();
                Box::pin(async move {
                    // The occurrence is the second the job runs in.
                    let at_ms = wall_ns() / 1_000_000_000 * 1_000;
                    let child = tokio::process::Command::new(&exe)
                        .arg(&stamps)
                        .env("SUNDIAL_SCHEDULED_AT_MS", at_ms.to_string())
                        .spawn();
                    if let Ok(mut c) = child {
                        let _ = c.wait().await;
                    }
                })
            });
            if let Ok(job) = job {
                let _ = sched.add(job).await;
            }
        }
        let _ = sched.start().await;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let mut sched = sched;
        let _ = sched.shutdown().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    read_stamps(&stamps)
}

/// The lateness in `sundial-stamp`'s log, µs.
fn read_stamps(stamps: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(stamps).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (at, ns) = l.split_once(' ')?;
            let at: i128 = at.parse().ok()?;
            let ns: i128 = ns.parse().ok()?;
            Some(((ns - at * 1_000_000) as f64 / 1_000.0).max(0.0))
        })
        .collect()
}

/// The floor: `jobs` spawns of `sundial-stamp` in a loop from one thread,
/// from each second's instant on, for `secs` seconds (reaped by a second
/// thread); lateness as each process read it, µs.
pub(super) fn spawn_loop_lateness(stamp: &Path, jobs: usize, secs: u64) -> Vec<f64> {
    let Ok(dir) = tempfile::tempdir() else {
        return Vec::new();
    };
    let stamps = dir.path().join("stamps");
    tight_timer_slack();
    let (tx, rx) = std::sync::mpsc::channel::<std::process::Child>();
    let reaper = std::thread::spawn(move || {
        for mut c in rx {
            let _ = c.wait();
        }
    });
    for _ in 0..secs {
        let next_s = wall_ns() / 1_000_000_000 + 1;
        let at_ns = next_s * 1_000_000_000;
        let wait = (at_ns - wall_ns()).max(0) as u64;
        std::thread::sleep(Duration::from_nanos(wait));
        while wall_ns() < at_ns {
            std::hint::spin_loop();
        }
        for _ in 0..jobs {
            let child = Command::new(stamp)
                .arg(&stamps)
                .env("SUNDIAL_SCHEDULED_AT_MS", (next_s * 1_000).to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn();
            if let Ok(c) = child {
                let _ = tx.send(c);
            }
        }
    }
    drop(tx);
    let _ = reaper.join();
    read_stamps(&stamps)
}

pub(super) fn lat_row(
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

pub(super) fn summary(mut v: Vec<f64>, name: &str) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{name}: p50 {} µs, p99 {} µs, max {} µs",
        num(pct(&v, 0.5)),
        num(pct(&v, 0.99)),
        num(v.last().copied().unwrap_or(0.0))
    )
}

/// How far ahead of a deadline the driver of the "decided ahead" row wakes.
pub(super) const CRON_LEAD: Duration = Duration::from_millis(1);

pub fn lateness(quick: bool, exe: &Path) -> Table {
    let now_ms = SystemClock.read().wall_ms;
    let start = now_ms + 1_500;
    let (n1, n2, wide_ms) = if quick {
        (1_000, 5_000, 3_000)
    } else {
        (10_000, 100_000, 10_000)
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
        .map(|i| start + (spread(i as u64, wide_ms) as i64))
        .collect();
    let ours = core_lateness(
        &wide,
        0,
        Duration::from_millis(wide_ms + 1_700),
        Duration::ZERO,
    );
    let now_ms = SystemClock.read().wall_ms;
    let wide_t: Vec<i64> = wide.iter().map(|t| t - start + now_ms + 1_500).collect();
    let theirs = tokio_lateness(&wide_t);
    rows.push(lat_row(
        &format!(
            "scheduler core, no-op action, {n2} tasks over {} s",
            wide_ms / 1_000
        ),
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
    let stamp = exe.with_file_name("sundial-stamp");
    let mut notes = Vec::new();
    if stamp.exists() {
        exec_cron_rows(&stamp, quick, &mut rows);
    } else {
        notes.push(format!(
            "{} is not built: run `cargo build --release -p sundial-tests --bins` for the rows of cron jobs that exec.",
            stamp.display()
        ));
    }
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
    notes.insert(0,
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
                .into());
    notes.push(
        "The cron rows that exec: per-second cron tasks in the real agent (in process, its store on disk), whose \
         action is `sundial-stamp`, a binary of the standard library alone that reads the wall clock first thing \
         and logs it: lateness is the action's own start, process spawn and exec included. \"decided ahead\" (the \
         agent's default): the agent decides an instant's starts and commits their `started` marks ahead of it (by \
         twice what the last batch took, at least 20 ms) and hands the batch out at the instant; \"deciding when \
         due\": it decides and commits at the instant. The floor is one thread spawning the same processes in a \
         loop from the instant on (a second one reaping them), with no scheduler, store or output capture: the \
         i-th spawn cannot start before i spawns' time."
            .into(),
    );
    Table {
        suite: "lateness",
        notes,
        rows,
    }
}

/// The real agent (in process, unenrolled, its store on disk) with `jobs`
/// per-second cron tasks whose action is `sundial-stamp` (`stamp`): each
/// run's lateness as the started process itself read it, µs.
pub(super) fn cron_exec_lateness(
    stamp: &Path,
    jobs: usize,
    secs: u64,
    start_lead: sundial_agent::runtime::StartLead,
) -> Vec<f64> {
    let Ok(dir) = tempfile::tempdir() else {
        return Vec::new();
    };
    let stamps = dir.path().join("stamps");
    {
        let Ok(store) = AgentStore::open(&dir.path().join("agent.redb")) else {
            return Vec::new();
        };
        let tasks: Vec<TaskSpec> = (0..jobs)
            .map(|i| {
                let mut t = task(
                    i as u64,
                    Schedule::cron("* * * * * *", "UTC")
                        .unwrap_or_else(|_| Schedule::at(Timestamp::from_millis_saturating(0))),
                    &stamp.display().to_string(),
                );
                if let Action::Exec(spec) = &mut t.action {
                    spec.args = vec![stamps.display().to_string()];
                }
                t
            })
            .collect();
        if store.put_tasks(&tasks, Some(1)).is_err() {
            return Vec::new();
        }
    }
    let exec = sundial_agent::exec::ExecPolicy {
        allow: vec![stamp.display().to_string()],
        ..Default::default()
    };
    let cfg = sundial_agent::runtime::AgentConfig {
        runs_concurrent_max: jobs * 4,
        start_lead,
        ..sundial_agent::runtime::AgentConfig::new(dir.path().to_owned())
    };
    let cfg = sundial_agent::runtime::AgentConfig { exec, ..cfg };
    // A second for the agent to start, then `secs` whole seconds.
    let _ = run_agent_with(cfg, Duration::from_millis(1_500 + secs * 1_000));
    read_stamps(&stamps)
}

/// The rows of per-second cron jobs that exec `sundial-stamp`, in the real
/// agent, beside the agent deciding when due, tokio-cron-scheduler and the
/// floor (a loop of spawns).
fn exec_cron_rows(stamp: &Path, quick: bool, rows: &mut Vec<Row>) {
    use sundial_agent::runtime::StartLead;
    let secs = if quick { 2 } else { 5 };
    let sizes: &[usize] = if quick { &[100] } else { &[20, 100, 1_000] };
    for &jobs in sizes {
        let ahead = cron_exec_lateness(stamp, jobs, secs, StartLead::Ahead);
        let when_due = cron_exec_lateness(stamp, jobs, secs, StartLead::WhenDue);
        let floor = spawn_loop_lateness(stamp, jobs, secs);
        let mut baselines = vec![
            summary(when_due, "the agent deciding when due"),
            summary(floor, "the floor, a loop of spawns at the instant"),
        ];
        if jobs == 1_000 || quick {
            baselines.push(summary(
                cron_crate_exec_lateness(stamp, jobs, secs),
                "tokio-cron-scheduler 0.15 spawning the same",
            ));
        }
        rows.push(lat_row(
            &format!("real agent, {jobs} per-second cron jobs, exec, each action's own start, decided ahead"),
            ahead,
            baselines.join("; "),
            if jobs == 1_000 { "p99 ≤ 2 ms" } else { "—" },
            |_, p99| p99 <= 2_000.0,
        ));
        if jobs != 1_000 {
            if let Some(r) = rows.last_mut() {
                r.verdict = "—".into();
            }
        }
    }
}

pub(super) fn exec_lateness(_exe: &Path, n: usize, window_ms: i64) -> Vec<f64> {
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
    let exec = sundial_agent::exec::ExecPolicy {
        allow: vec!["/bin/true".into()],
        ..Default::default()
    };
    let wait = Duration::from_millis((start + window_ms - now + 2_000) as u64);
    run_agent_for(
        dir.path(),
        exec,
        sundial_agent::runtime::STOP_GRACE_DEFAULT,
        wait,
    )
    .iter()
    .filter_map(|r| r.lateness().map(|d| d.0 as f64 * 1_000.0))
    .collect()
}

/// Runs an unenrolled agent in process on the store in `dir` for `wait`,
/// then returns its outbox (every run it recorded).
pub(super) fn run_agent_for(
    dir: &Path,
    exec: sundial_agent::exec::ExecPolicy,
    stop_grace: Duration,
    wait: Duration,
) -> Vec<RunRecord> {
    let cfg = sundial_agent::runtime::AgentConfig {
        exec,
        stop_grace,
        ..sundial_agent::runtime::AgentConfig::new(dir.to_owned())
    };
    run_agent_with(cfg, wait)
}

/// Runs an unenrolled agent in process as `cfg` says for `wait`, then
/// returns its outbox (every run it recorded).
pub(super) fn run_agent_with(
    cfg: sundial_agent::runtime::AgentConfig,
    wait: Duration,
) -> Vec<RunRecord> {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return Vec::new(),
    };
    let dir = cfg.data_dir.clone();
    let _ = rt
        .block_on(async move { sundial_agent::runtime::run(cfg, tokio::time::sleep(wait)).await });
    let Ok(store) = AgentStore::open(&dir.join("agent.redb")) else {
        return Vec::new();
    };
    store
        .outbox_batch(usize::MAX, usize::MAX)
        .unwrap_or_default()
}

pub(super) fn task(id: u64, schedule: Schedule, program: &str) -> TaskSpec {
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
        placement: None,
    }
}
