//! `run list` pages read from the time indexes.

use super::*;

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
            .map(|i| sample_run(chunk * 10_000 + i, base))
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
