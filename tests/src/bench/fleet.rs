//! Fleets held by one coordinator: idle agents, heals after a cut, the reconnect storm.

use super::*;
use anyhow::Context as _;

pub async fn fleet(quick: bool, exe: &Path) -> Table {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    // SUNDIAL_BENCH_FLEET_ROWS=idle,heal,storm,contention picks rows (all by
    // default; a quick run leaves contention out unless it is named);
    // SUNDIAL_BENCH_IDLE_SIZES=N,M the idle fleets.
    let rows_env = std::env::var("SUNDIAL_BENCH_FLEET_ROWS").unwrap_or_default();
    let want = |r: &str| rows_env.is_empty() || rows_env.split(',').any(|x| x.trim() == r);
    let idle_sizes: Vec<usize> = match std::env::var("SUNDIAL_BENCH_IDLE_SIZES") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if quick => vec![300],
        Err(_) => vec![10_000, 100_000],
    };
    // The contention rows: the idle fleet and the heal again, with one core
    // kept busy by another process beside them (not in a quick run unless
    // asked for by name).
    let contention = if quick {
        rows_env.split(',').any(|x| x.trim() == "contention")
    } else {
        want("contention")
    };
    let mut idle_runs: Vec<(usize, bool)> = Vec::new();
    if want("idle") {
        idle_runs.extend(idle_sizes.iter().map(|&n| (n, false)));
    }
    if contention {
        if let Some(&n) = idle_sizes.iter().min() {
            idle_runs.push((n, true));
        }
    }
    for (n, busy) in idle_runs {
        let hog = if busy { Some(CpuHog::start()) } else { None };
        if let Some(Err(e)) = &hog {
            notes.push(format!("contention: no CPU hog: {e:#}"));
            continue;
        }
        let beside = if busy { ", one core busy beside" } else { "" };
        // Arriving at the budget takes n / budget; half as long again for
        // the refused to come back.
        let deadline = Duration::from_secs(if quick {
            60
        } else {
            (n as u64 / u64::from(handshakes_for_bench())) * 3 / 2 + 60
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
                    metric: format!("idle agents held by one coordinator (of {n} connecting){beside}"),
                    value: format!(
                        "{} held, {:.1} KiB coordinator RSS per agent, {:.0}% of a core while idle, {} sessions ended in 10 s idle",
                        r.held, r.rss_kib_per_agent, r.idle_cpu_pct, r.churned
                    ),
                    baselines: "—".into(),
                    target: if busy {
                        "every agent held, no churn".into()
                    } else if n >= 100_000 {
                        "100,000 held, ≤ 30 KiB each".into()
                    } else {
                        "10,000 idle agents".into()
                    },
                    verdict: met(if busy {
                        r.held == n && r.churned == 0
                    } else if n >= 100_000 {
                        r.held >= 100_000 && r.rss_kib_per_agent <= 30.0
                    } else {
                        r.held >= 10_000
                    }),
                });
                notes.push(format!("{n} idle agents{beside}: light agents (see the storm row) over {} client sockets, {} enrolled \
                    identities (one per agent); every one in session took {:.1} s at a handshake budget of {}/s ({} dials refused for load on the way); RSS (from /proc, less the \
                    coordinator's before any agent) and CPU (utime + stime over 10 s) of the coordinator process.",
                    r.sockets, r.identities, r.connect.as_secs_f64(), handshakes_for_bench(), r.refused));
            }
            Err(e) => notes.push(format!("idle agents ({n}{beside}): failed: {e:#}")),
        }
        drop(hog);
    }
    let heal_n = if quick { 50 } else { 1_000 };
    let mut heal_runs = Vec::new();
    if want("heal") {
        heal_runs.push(false);
    }
    if contention {
        heal_runs.push(true);
    }
    // Both heal rows on one fleet (its start and enrollment are not what
    // they measure): the cuts alone first, then with the CPU hog.
    match heal(exe, heal_n, &heal_runs).await {
        Ok(done) => {
            for (busy, got) in done {
                let beside = if busy { ", one core busy beside" } else { "" };
                let v = match got {
                    Ok(v) if v.is_empty() => continue,
                    Ok(v) => v,
                    Err(e) => {
                        notes.push(format!("heal{beside}: failed: {e:#}"));
                        continue;
                    }
                };
                let (m, _, _) = stats(&v);
                let target = if busy { 10.0 } else { 5.0 };
                rows.push(Row {
                    metric: format!("{heal_n} agents cut at once: heal → all synced{beside}"),
                    value: fmt3(&v, "s"),
                    baselines: "—".into(),
                    target: if busy {
                        "≤ 10 s (twice the target alone)".into()
                    } else {
                        "≤ 5 s".into()
                    },
                    verdict: met(m <= target && heal_n >= 1_000),
                });
                notes.push(format!("{heal_n} in-process agents{beside}, each behind its own relay and firing `/bin/true` every 15 s, cut for 16 s \
                    (longer than the idle timeout), then healed at once; the clock stops when every agent's outbox has been seen empty since the heal (the runs made while cut are stored).{}",
                    if busy { " The same fleet as the row without the hog, after it." } else { "" }));
            }
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
                over connections of one client socket, no store), started at the budget's pace, synced in {first:.1} s; then the coordinator process was \
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

/// Enrolled identities of the idle fleet: one per agent, as the
/// coordinator holds one session per agent (a second session of an agent
/// replaces its first, so agents sharing identities would only churn:
/// 3,000 agents on 2,000 identities held 2,000).
pub(super) const IDLE_IDENTITIES_MAX: usize = 1_000_000;
/// Light agents per client UDP socket.
pub(super) const IDLE_AGENTS_PER_SOCKET: usize = 10_000;

/// The handshake budget the idle rows give the coordinator: this machine
/// connects ~1,000 a second with both ends on it; the budget is not what
/// those rows measure.
/// The idle fleets' handshake budget: the coordinator's default on this
/// machine (250 a second per core), at which the fleet also arrives.
pub(crate) fn handshakes_for_bench() -> u32 {
    sundial_coordinator::server::handshakes_per_sec_default()
}

/// Heals of a fleet of `n`, one set of cuts per entry of `phases` (`true`:
/// with a CPU hog beside), on the same fleet: the seconds from each heal
/// until every agent is synced, per phase.
pub(super) async fn heal(
    exe: &Path,
    n: usize,
    phases: &[bool],
) -> anyhow::Result<Vec<(bool, anyhow::Result<Vec<f64>>)>> {
    if phases.is_empty() {
        return Ok(Vec::new());
    }
    let mut rng = Rng::new(42);
    let fleet = Fleet::start(exe, n, true, &mut rng).await?;
    let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
    for a in 0..n {
        let anchor = now.saturating_add_ms(rng.below(15_000) as i64);
        // `/bin/true`, not the probe (this 90 MB binary, started anew for
        // each run): 67 starts a second of it took a core from the agents
        // and the coordinator the row measures.
        fleet
            .add_exec_task(
                a,
                "beat",
                Schedule::every(DurationMs(15_000), anchor)?,
                crate::harness::LIGHT_ACTION,
            )
            .await?;
    }
    let mut done = Vec::new();
    for &busy in phases {
        let hog = if busy {
            match CpuHog::start() {
                Ok(h) => Some(h),
                Err(e) => {
                    done.push((busy, Err(e.context("contention: no CPU hog"))));
                    continue;
                }
            }
        } else {
            None
        };
        let got = heal_cuts(&fleet, n).await;
        drop(hog);
        let failed = got.is_err();
        done.push((busy, got));
        if failed {
            break;
        }
    }
    let mut fleet = fleet;
    fleet.stop().await;
    // The coordinator's log, for reading a slow heal (as the idle rows'
    // SUNDIAL_BENCH_COORD_LOG).
    if let Some(to) = std::env::var_os("SUNDIAL_BENCH_COORD_LOG") {
        std::fs::copy(fleet.coord_dir.join("coordinator.log"), &to).with_context(|| {
            format!("copying the coordinator's log to {}", to.to_string_lossy())
        })?;
    }
    Ok(done)
}

/// Cuts every agent of `fleet` off for 16 s and heals it at once, twice
/// (once in a smoke run's small fleet): the seconds until all are synced.
async fn heal_cuts(fleet: &Fleet, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    let cuts = if n >= 1_000 { 2 } else { 1 };
    for _ in 0..cuts {
        tokio::time::sleep(Duration::from_secs(3)).await;
        for a in &fleet.agents {
            a.relay.set(LinkConfig::partition());
        }
        tokio::time::sleep(Duration::from_secs(16)).await;
        let t = Instant::now();
        for a in &fleet.agents {
            a.relay.set(LinkConfig::pass());
        }
        // Synced: every agent's outbox seen empty once since the heal (the
        // runs it made while cut are then stored by the coordinator). Not
        // all empty at one instant: the fleet fires 67 runs a second, each
        // in an outbox until its acknowledgement. Each look opens an
        // agent's store, so only outboxes not yet seen empty are looked at
        // again.
        let mut waiting: Vec<usize> = (0..n).collect();
        let mut shown = Instant::now();
        loop {
            waiting.retain(|a| fleet.outbox_of(*a) > 0);
            if waiting.is_empty() {
                break;
            }
            if shown.elapsed() >= Duration::from_secs(1) {
                shown = Instant::now();
                eprintln!(
                    "  heal: {} of {n} agents not yet synced after {:.1} s",
                    waiting.len(),
                    t.elapsed().as_secs_f64()
                );
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(120),
                "heal did not finish: {} agents not synced",
                waiting.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Another process keeping one core busy while a row runs (the contention
/// rows); stopped when dropped.
pub(super) struct CpuHog(std::process::Child);

impl CpuHog {
    pub(super) fn start() -> anyhow::Result<CpuHog> {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start `sh` as a CPU hog: {e}"))?;
        Ok(CpuHog(child))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
