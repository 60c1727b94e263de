//! The agent's binary size, idle RSS and start-up with tasks stored.

use super::*;

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
            target: "≤ 12 MB (with the function runtime)".into(),
            verdict: met(ok && size <= 12_000_000),
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
        unenrolled (`--standalone`), its store encrypted at rest as agents keep it, its tasks every hour, the first occurrences spread over the hour after next, so that only the \
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
pub(super) const PROBES: usize = 50;

pub(super) struct Footprint {
    pub(super) rss_kib: u64,
    pub(super) startup: Duration,
    pub(super) build: Duration,
    pub(super) store_bytes: u64,
    pub(super) probes_fired: usize,
    pub(super) probe_late_p99_ms: i64,
}

pub(super) fn agent_with_tasks(exe: &Path, n: usize) -> anyhow::Result<Footprint> {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir()?;
    let store_path = dir.path().join("agent.redb");
    let built = Instant::now();
    let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
    let probe_base = n as u64 + 1;
    {
        // Built as the agent keeps it: encrypted at rest with its ring.
        let key_file = dir.path().join(sundial_net::at_rest::KEY_FILE);
        let cipher = sundial_net::at_rest::StoreCipher::from_file(&key_file, true)
            .map_err(anyhow::Error::msg)?
            .ok_or_else(|| anyhow::anyhow!("no key ring made"))?;
        let mut store = AgentStore::open(&store_path)?;
        store.encrypt_with(std::sync::Arc::new(cipher), &key_file)?;
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
        .args([
            "run",
            "--standalone",
            "--allow-exec",
            "/bin/true",
            "--data-dir",
        ])
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
