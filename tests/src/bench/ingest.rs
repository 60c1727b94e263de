//! Storing run records at the coordinator.

use super::*;

pub fn ingest(quick: bool) -> Table {
    let total = if quick { 20_000 } else { 200_000 };
    let batch = 1_000;
    let rounds = if quick { 3 } else { 5 };
    let mut batched = Vec::new();
    let mut single = Vec::new();
    let mut encrypted = Vec::new();
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
        // The same tasks into a store encrypted at rest, as agents keep it.
        let Ok(mut sealed) = AgentStore::open(&dir.path().join("sealed.redb")) else {
            continue;
        };
        let Ok(ring) = sundial_net::at_rest::Keyring::generate() else {
            continue;
        };
        let cipher = std::sync::Arc::new(sundial_net::at_rest::StoreCipher::new(ring));
        if sealed
            .encrypt_with(cipher, &dir.path().join("store.key"))
            .is_err()
        {
            continue;
        }
        let t = Instant::now();
        for chunk in tasks.chunks(batch) {
            let _ = sealed.put_tasks(chunk, None);
        }
        encrypted.push(total as f64 / t.elapsed().as_secs_f64());
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
            Row { metric: format!("tasks/s, batches of {batch}, encrypted at rest"), value: fmt3(&encrypted, "/s"), baselines: format!("plain, same run: {}", fmt3(&batched, "/s")), target: "≥ 50,000/s".into(), verdict: met(stats(&encrypted).0 >= 50_000.0) },
        ],
    }
}
