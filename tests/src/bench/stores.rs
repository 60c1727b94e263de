//! The coordinator's two stores beside each other, on the same work: run
//! records stored in result batches (what an agent's upload costs), tasks
//! created one per transaction (what an admin's `task create` costs), and
//! `run list` pages over many stored runs. PostgreSQL is a throw-away
//! cluster started for the run (`fsync=off`: the figures are PostgreSQL's
//! statements and round trips on loopback, not this machine's disk; redb
//! commits with fsync, so its rows are the stricter ones).

use super::*;
use sundial_coordinator::store::{CoordStore, Page, RunCursor, RunQuery};

/// Runs per result batch an agent uploads (its default).
const BATCH: usize = 1_000;

/// What one store did: runs/s per round, task creates/s, page times (ms).
#[derive(Default)]
struct Figures {
    runs_per_s: Vec<f64>,
    /// The same, from 4 writers at once (4 agents uploading together).
    parallel_per_s: Vec<f64>,
    creates_per_s: Vec<f64>,
    first_ms: Vec<f64>,
    deep_ms: Vec<f64>,
}

fn measure(store: &dyn CoordStore, total: i64, rounds: usize) -> Result<Figures, String> {
    let mut f = Figures::default();
    let now = Timestamp::from_millis_saturating(SystemClock.read().wall_ms);
    let base = Timestamp::from_millis_saturating(1_780_000_000_000);
    // Ingest: `total` runs in batches, timed by round (the store grows).
    let per_round = total / rounds as i64;
    for r in 0..rounds as i64 {
        let runs: Vec<RunRecord> = (r * per_round..(r + 1) * per_round)
            .map(|n| sample_run(n, base))
            .collect();
        let t = Instant::now();
        for chunk in runs.chunks(BATCH) {
            store.put_runs(chunk).map_err(|e| e.to_string())?;
        }
        f.runs_per_s
            .push(runs.len() as f64 / t.elapsed().as_secs_f64());
    }
    // Four writers at once, as a coordinator's blocking pool runs several
    // agents' batches together.
    let writers = 4i64;
    for r in 0..rounds as i64 {
        let from = total + r * per_round;
        let t = Instant::now();
        let failed = std::thread::scope(|s| {
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    s.spawn(move || {
                        let share = per_round / writers;
                        let runs: Vec<RunRecord> = (from + w * share..from + (w + 1) * share)
                            .map(|n| sample_run(n, base))
                            .collect();
                        runs.chunks(BATCH)
                            .try_for_each(|c| store.put_runs(c).map(|_| ()))
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| h.join().ok().and_then(Result::err))
                .next()
        });
        if let Some(e) = failed {
            return Err(e);
        }
        f.parallel_per_s
            .push(per_round as f64 / t.elapsed().as_secs_f64());
    }
    // Task creates, one per transaction (a revision each).
    for _ in 0..rounds {
        let n = 200;
        let t = Instant::now();
        for i in 0..n {
            let draft = sundial_protocol::wire::TaskDraft {
                name: None,
                target: sundial_protocol::task::Target::Agent(AgentId(1 + i % 20)),
                schedule: Schedule::every(DurationMs(3_600_000), now)
                    .unwrap_or_else(|_| Schedule::at(now)),
                action: task(0, Schedule::at(now), "/usr/bin/backup").action,
                policies: Default::default(),
                anchor_at_creation: false,
                placement: Default::default(),
            };
            store
                .create_task(draft, now, None)
                .map_err(|e| e.to_string())?;
        }
        f.creates_per_s
            .push(f64::from(n as u32) / t.elapsed().as_secs_f64());
    }
    let query = |page: Page| RunQuery {
        task: None,
        agent: None,
        since: None,
        limit: 100,
        page,
        forward_from_since: false,
    };
    let middle = RunCursor {
        scheduled_at_ms: base.as_millis() + (total / 2) * 1_000,
        task: 0,
        agent: 0,
        attempt: 0,
    };
    for _ in 0..rounds * 4 {
        let t = Instant::now();
        let got = store
            .runs(&query(Page::Latest))
            .map_err(|e| e.to_string())?;
        f.first_ms.push(t.elapsed().as_secs_f64() * 1_000.0);
        if got.runs.len() != 100 {
            return Err(format!("the first page held {} runs", got.runs.len()));
        }
        let t = Instant::now();
        store
            .runs(&query(Page::After(middle)))
            .map_err(|e| e.to_string())?;
        f.deep_ms.push(t.elapsed().as_secs_f64() * 1_000.0);
    }
    Ok(f)
}

pub fn stores(quick: bool) -> Table {
    let total: i64 = if quick { 20_000 } else { 1_000_000 };
    let rounds = if quick { 2 } else { 5 };
    let mut notes = vec![format!(
        "{total} runs stored in result batches of {BATCH} (one transaction each; timed per round of {}), 200 tasks created \
         one per transaction per round, then pages of 100 of `run list` (the latest, and one after run {}).",
        total / rounds as i64,
        total / 2
    )];
    let redb = (|| {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let store = sundial_coordinator::store::CoordinatorStore::open(
            &dir.path().join("coordinator.redb"),
        )
        .map_err(|e| e.to_string())?;
        measure(&store, total, rounds)
    })();
    let pg = (|| -> Result<Option<Figures>, String> {
        let Some(cluster) = crate::pg::PgCluster::start().map_err(|e| format!("{e:#}"))? else {
            return Ok(None);
        };
        let store = sundial_coordinator::pg::PgStore::open(&sundial_coordinator::pg::PgOptions {
            url: cluster.url(),
            password: None,
            pool_size: 4,
        })
        .map_err(|e| e.to_string())?;
        let f = measure(&store, total, rounds)?;
        drop(store);
        drop(cluster);
        Ok(Some(f))
    })();
    let redb = match redb {
        Ok(f) => f,
        Err(e) => {
            notes.push(format!("redb failed: {e}"));
            Figures::default()
        }
    };
    let pg = match pg {
        Ok(Some(f)) => Some(f),
        Ok(None) => {
            notes.push("PostgreSQL rows skipped: initdb is not installed".into());
            None
        }
        Err(e) => {
            notes.push(format!("PostgreSQL failed: {e}"));
            None
        }
    };
    let mut rows = Vec::new();
    let mut add =
        |metric: &str, r: &[f64], p: Option<&[f64]>, unit: &str, target: &str, ok: bool| {
            rows.push(Row {
                metric: metric.into(),
                value: format!("redb {}", fmt3(r, unit)),
                baselines: match p {
                    Some(p) => format!("PostgreSQL {}", fmt3(p, unit)),
                    None => "PostgreSQL —".into(),
                },
                target: target.into(),
                verdict: met(ok),
            });
        };
    let pg_runs = pg.as_ref().map(|p| stats(&p.runs_per_s).0).unwrap_or(0.0);
    add(
        "run records stored, batches of 1,000",
        &redb.runs_per_s,
        pg.as_ref().map(|p| p.runs_per_s.as_slice()),
        "/s",
        "PostgreSQL ≥ 100,000/s",
        pg_runs >= 100_000.0,
    );
    let pg_par = pg
        .as_ref()
        .map(|p| stats(&p.parallel_per_s).0)
        .unwrap_or(0.0);
    add(
        "run records stored, 4 writers at once",
        &redb.parallel_per_s,
        pg.as_ref().map(|p| p.parallel_per_s.as_slice()),
        "/s",
        "PostgreSQL ≥ 100,000/s",
        pg_par >= 100_000.0,
    );
    add(
        "tasks created, one per transaction",
        &redb.creates_per_s,
        pg.as_ref().map(|p| p.creates_per_s.as_slice()),
        "/s",
        "—",
        true,
    );
    let worst = |f: fn(&Figures) -> &Vec<f64>| {
        let mut m = stats(f(&redb)).0;
        if let Some(p) = &pg {
            m = m.max(stats(f(p)).0);
        }
        m
    };
    add(
        &format!("run list, first page of {total}"),
        &redb.first_ms,
        pg.as_ref().map(|p| p.first_ms.as_slice()),
        "ms",
        "≤ 10 ms",
        worst(|f| &f.first_ms) <= 10.0,
    );
    add(
        "run list, a page deep in the cursor",
        &redb.deep_ms,
        pg.as_ref().map(|p| p.deep_ms.as_slice()),
        "ms",
        "≤ 10 ms",
        worst(|f| &f.deep_ms) <= 10.0,
    );
    Table {
        suite: "stores",
        notes,
        rows,
    }
}
