//! Functions: a WebAssembly run's cold start and overhead next to `exec
//! /bin/true`, runs per second, memory per running instance, and whether
//! functions spinning on every core make a per-second program late.

use super::*;

use sundial_agent::exec::{self, ExecPolicy, FunctionPolicy};
use sundial_protocol::wasm::{ModuleHash, WasmSpec};

const NOOP: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;
const SPIN: &str = r#"(module (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))"#;

fn module(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap_or_default()
}

fn spec(bytes: &[u8], fuel: Option<u64>) -> WasmSpec {
    WasmSpec {
        module: ModuleHash::of(bytes),
        module_bytes: bytes.len() as u64,
        args: Vec::new(),
        env: Vec::new(),
        sealed_env: Vec::new(),
        fuel,
        memory_bytes: None,
    }
}

fn policy(runner: &Path) -> ExecPolicy {
    ExecPolicy {
        allow: vec!["/bin/true".into()],
        functions: FunctionPolicy {
            allowed: true,
            runner: runner.to_owned(),
            ..FunctionPolicy::default()
        },
        ..ExecPolicy::default()
    }
}

/// Wall time of one run each, ms: a trivial function and `/bin/true`, in turn.
async fn one_run_each(p: &ExecPolicy, noop: &[u8], n: usize) -> (Vec<f64>, Vec<f64>) {
    let w = spec(noop, None);
    let e = ExecSpec {
        program: "/bin/true".into(),
        ..ExecSpec::default()
    };
    let (mut f, mut x) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (_k, rx) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        let r = exec::run_function(&w, "bench", Some(noop.to_vec()), p, rx, |_| {}).await;
        if r.outcome == Outcome::Succeeded {
            f.push(t.elapsed().as_secs_f64() * 1_000.0);
        }
        let (_k, rx) = tokio::sync::oneshot::channel();
        let t = Instant::now();
        let r = exec::run_with(&e, p, rx, |_| {}).await;
        if r.outcome == Outcome::Succeeded {
            x.push(t.elapsed().as_secs_f64() * 1_000.0);
        }
    }
    (f, x)
}

/// Trivial functions run back to back by `parallel` loops for `secs`:
/// runs per second.
async fn runs_per_sec(p: &ExecPolicy, noop: &[u8], parallel: usize, secs: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let p = p.clone();
        let noop = noop.to_vec();
        set.spawn(async move {
            let w = spec(&noop, None);
            let mut n = 0u64;
            while Instant::now() < end {
                let (_k, rx) = tokio::sync::oneshot::channel();
                let r = exec::run_function(&w, "bench", Some(noop.clone()), &p, rx, |_| {}).await;
                if r.outcome == Outcome::Succeeded {
                    n += 1;
                }
            }
            n
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r.unwrap_or(0);
    }
    total as f64 / secs
}

/// The memory only this process uses (private pages, resident), KiB.
fn uss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// (USS, RSS) of `n` functions spinning at once, KiB each (read while they run).
async fn rss_per_instance(p: &ExecPolicy, spin: &[u8], n: usize) -> Vec<(f64, f64)> {
    let w = spec(spin, Some(50_000_000_000));
    let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut kills = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (k, rx) = tokio::sync::oneshot::channel();
        kills.push(k);
        let (p, w, spin, pids) = (p.clone(), w.clone(), spin.to_vec(), pids.clone());
        set.spawn(async move {
            exec::run_function(&w, "bench", Some(spin), &p, rx, move |pid| {
                if let Ok(mut v) = pids.lock() {
                    v.push(pid);
                }
            })
            .await
        });
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let rss: Vec<(f64, f64)> = pids
        .lock()
        .map(|v| {
            v.iter()
                .map(|pid| (uss_kib(*pid) as f64, rss_kib(*pid) as f64))
                .collect()
        })
        .unwrap_or_default();
    for k in kills {
        let _ = k.send(());
    }
    while set.join_next().await.is_some() {}
    rss
}

/// Lateness, µs, of `execs` `/bin/true` tasks firing every second for
/// `secs` on a real agent, beside `spinning` functions that spin to their
/// fuel limit over and over.
fn exec_beside_functions(runner: &Path, execs: usize, spinning: usize, secs: i64) -> Vec<f64> {
    let Ok(dir) = tempfile::tempdir() else {
        return Vec::new();
    };
    let store_path = dir.path().join("agent.redb");
    let now = SystemClock.read().wall_ms;
    let start = now + 2_000;
    let spin = module(SPIN);
    {
        let Ok(store) = AgentStore::open(&store_path) else {
            return Vec::new();
        };
        let mut tasks: Vec<TaskSpec> = (0..execs)
            .map(|i| {
                task(
                    i as u64,
                    Schedule::every(
                        DurationMs(1_000),
                        Timestamp::from_millis_saturating(
                            start + (i as i64 * 1_000 / execs as i64),
                        ),
                    )
                    .unwrap_or_else(|_| Schedule::at(Timestamp::from_millis_saturating(start)))
                    .with_window(
                        None,
                        Some(Timestamp::from_millis_saturating(start + secs * 1_000)),
                    )
                    .unwrap_or_else(|_| Schedule::at(Timestamp::from_millis_saturating(start))),
                    "/bin/true",
                )
            })
            .collect();
        for k in 0..spinning {
            let mut t = task(
                1_000 + k as u64,
                Schedule::every(DurationMs(1_000), Timestamp::from_millis_saturating(start))
                    .unwrap_or_else(|_| Schedule::at(Timestamp::from_millis_saturating(start))),
                "-",
            );
            // About a second of spinning each, over and over.
            t.action = Action::Wasm(spec(&spin, Some(300_000_000)));
            tasks.push(t);
        }
        if store.put_module(ModuleHash::of(&spin), &spin).is_err()
            || store.put_tasks(&tasks, Some(1)).is_err()
        {
            return Vec::new();
        }
    }
    let wait = Duration::from_millis((start + secs * 1_000 - now + 1_500) as u64);
    run_agent_for(dir.path(), policy(runner), Duration::from_millis(100), wait)
        .iter()
        .filter(|r| r.task_id.0 < 1_000)
        .filter_map(|r| r.lateness().map(|d| d.0 as f64 * 1_000.0))
        .collect()
}

pub fn functions(quick: bool, exe: &Path) -> Table {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return Table {
                suite: "functions",
                notes: vec![format!("no runtime: {e}")],
                rows: Vec::new(),
            }
        }
    };
    // The runner is this binary (`function-run`), as the agent's is its own.
    let p = policy(exe);
    let noop = module(NOOP);
    let spin = module(SPIN);
    let n = if quick { 40 } else { 200 };
    let (f, x) = rt.block_on(one_run_each(&p, &noop, n));
    let overhead = stats(&f).0 - stats(&x).0;
    let mut rows = vec![
        Row {
            metric: format!(
                "function cold start: spawn, load, run a trivial module, exit ({} runs)",
                f.len()
            ),
            value: fmt3(&f, "ms"),
            baselines: format!("exec /bin/true, same loop: {}", fmt3(&x, "ms")),
            target: "—".into(),
            verdict: "—".into(),
        },
        Row {
            metric: "per-run overhead of a function over exec /bin/true (medians)".into(),
            value: format!("{} ms", num(overhead.max(0.0))),
            baselines: "—".into(),
            target: "—".into(),
            verdict: "—".into(),
        },
    ];
    let cores = std::thread::available_parallelism().map_or(2, |c| c.get());
    let rate = rt.block_on(runs_per_sec(
        &p,
        &noop,
        cores * 2,
        if quick { 1.5 } else { 4.0 },
    ));
    rows.push(Row {
        metric: format!(
            "trivial functions run by one agent's executor, {} at a time",
            cores * 2
        ),
        value: format!("{} runs/s", num(rate)),
        baselines: "—".into(),
        target: "—".into(),
        verdict: "—".into(),
    });
    let rss = rt.block_on(rss_per_instance(&p, &spin, 8));
    drop(rt);
    let uss: Vec<f64> = rss.iter().map(|(u, _)| u / 1024.0).collect();
    let all: Vec<f64> = rss.iter().map(|(_, r)| r / 1024.0).collect();
    rows.push(Row {
        metric: format!(
            "memory per running instance: private memory (USS) of a function runner spinning, 64 KiB of linear memory ({} at once)",
            rss.len()
        ),
        value: fmt3(&uss, "MiB"),
        baselines: format!("RSS with the shared pages of the binary: {}", fmt3(&all, "MiB")),
        target: "16 at once within 64 MB of a 256 MB device".into(),
        verdict: met(!uss.is_empty() && stats(&uss).0 * 16.0 <= 64.0),
    });
    let secs = if quick { 4 } else { 10 };
    let alone = exec_beside_functions(exe, 20, 0, secs);
    let beside = exec_beside_functions(exe, 20, 4, secs);
    let alone_text = summary(alone.clone(), "alone");
    rows.push(lat_row(
        &format!("real agent, 20 per-second exec /bin/true tasks for {secs} s, beside 4 functions spinning to their fuel limit"),
        beside.clone(),
        alone_text,
        "p99 within 2× of the same tasks alone",
        |_, p99| {
            let mut a = alone.clone();
            a.sort_by(f64::total_cmp);
            p99 <= 2.0 * pct(&a, 0.99).max(1_000.0)
        },
    ));
    Table {
        suite: "functions",
        notes: vec![
            "A function runs in a child process of the agent's binary (`function-run`, wasmi, SCHED_IDLE): cold start \
             counts its spawn, reading the module from a pipe, the interpreter's validation and lazy translation, the run \
             and the exit; `exec /bin/true` is measured in the same loop. Memory per instance is the runner's RSS \
             while its function spins: USS counts what each instance costs (its private pages), RSS adds the binary's \
             pages, shared by every instance and the agent. The lateness row runs \
             the agent in process with a store of 20 per-second `/bin/true` tasks, then the same with four functions \
             spinning ~1 s each, every second, on two cores; lateness is the recorded `fired_at` (ms resolution)."
                .into(),
        ],
        rows,
    }
}
