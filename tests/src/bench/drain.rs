//! An agent's outbox drained through a real coordinator after the link comes back.

use super::*;

/// Time for an agent with `n` buffered runs to empty its outbox over
/// loopback QUIC once it connects; returns (seconds, stored at coordinator).
pub async fn drain_once(
    exe: &Path,
    n: usize,
    postgres: bool,
    encrypted: bool,
) -> anyhow::Result<(f64, u64)> {
    let mut rng = Rng::new(n as u64);
    // The pipe's own speed: the per-agent upload limit (a defence against
    // a flooding agent, 2,000 runs/s by default) is lifted for this measure.
    let mut args = vec!["--upload-runs-per-sec", "100000000"];
    if !encrypted {
        args.extend(["--store-key", "off"]);
    }
    let mut fleet = Fleet::start_on(exe, 1, true, &mut rng, &args, 1, postgres).await?;
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
        let mut store = AgentStore::open(&fleet.agents[0].dir.join("agent.redb"))?;
        if encrypted {
            // Written as the agent writes them: encrypted with its ring.
            let key = fleet.agents[0].dir.join(sundial_net::at_rest::KEY_FILE);
            let ring = sundial_net::at_rest::StoreCipher::from_file(&key, false)
                .map_err(anyhow::Error::msg)?
                .ok_or_else(|| anyhow::anyhow!("the agent made no key ring"))?;
            store.encrypt_with(std::sync::Arc::new(ring), &key)?;
        }
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
        // The count alone (no record read, no key derived): the bench's own
        // polling takes little from the agent it shares two cores with.
        if matches!(
            sundial_agent::status::outbox_len(&fleet.agents[0].dir),
            Ok(0)
        ) {
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
    use sundial_coordinator::store::CoordStore as _;
    if let Some(url) = fleet.pg_url() {
        let pg = sundial_coordinator::pg::PgStore::open(&sundial_coordinator::pg::PgOptions {
            url,
            password: None,
            pool_size: 1,
        })?;
        return Ok((secs, pg.run_count()?));
    }
    let store = sundial_coordinator::store::CoordinatorStore::open(
        &fleet
            .coord_dir
            .join(sundial_coordinator::server::STORE_FILE),
    )?;
    Ok((secs, store.run_count()?))
}

pub async fn drain(quick: bool, exe: &Path) -> Table {
    let n = if quick { 10_000 } else { 100_000 };
    let rounds = if quick { 2 } else { 3 };
    let (mut rates, mut times) = (Vec::new(), Vec::new());
    let mut pg_rates = Vec::new();
    let mut plain_rates = Vec::new();
    let mut plain_pg_rates = Vec::new();
    let mut notes = Vec::new();
    let have_pg = crate::pg::PgCluster::start().ok().flatten().is_some();
    for _ in 0..rounds {
        match drain_once(exe, n, false, false).await {
            Ok((secs, stored)) if stored == n as u64 => plain_rates.push(n as f64 / secs),
            Ok((_, stored)) => notes.push(format!("a plain round stored {stored} of {n} runs")),
            Err(e) => notes.push(format!("a plain round failed: {e:#}")),
        }
        match drain_once(exe, n, false, true).await {
            Ok((secs, stored)) if stored == n as u64 => {
                rates.push(n as f64 / secs);
                times.push(secs);
            }
            Ok((_, stored)) => notes.push(format!("a round stored {stored} of {n} runs")),
            Err(e) => notes.push(format!("a round failed: {e:#}")),
        }
        if have_pg {
            match drain_once(exe, n, true, false).await {
                Ok((secs, stored)) if stored == n as u64 => plain_pg_rates.push(n as f64 / secs),
                Ok((_, stored)) => notes.push(format!(
                    "a plain PostgreSQL round stored {stored} of {n} runs"
                )),
                Err(e) => notes.push(format!("a plain PostgreSQL round failed: {e:#}")),
            }
            match drain_once(exe, n, true, true).await {
                Ok((secs, stored)) if stored == n as u64 => pg_rates.push(n as f64 / secs),
                Ok((_, stored)) => {
                    notes.push(format!("a PostgreSQL round stored {stored} of {n} runs"))
                }
                Err(e) => notes.push(format!("a PostgreSQL round failed: {e:#}")),
            }
        }
    }
    if !have_pg {
        notes.push("PostgreSQL rows skipped: initdb is not installed".into());
    }
    let (m, _, _) = stats(&rates);
    notes.push(format!("{n} run records buffered in one agent's outbox; the agent connects (link restored) and the clock \
        stops when its outbox is empty, every record committed by the coordinator before its acknowledgement. \
        The per-agent upload limit (`--upload-runs-per-sec`, default 2,000/s) is lifted to measure the pipe; with the \
        default, one agent drains at 2,000 runs/s. Both stores encrypt task definitions and run records at rest \
        (the default); the plain rounds, in the same run, keep both stores plain (`--store-key off`)."));
    Table {
        suite: "drain",
        notes,
        rows: vec![
            Row {
                metric: format!("runs/s, {n}-run backlog"),
                value: fmt3(&rates, "/s"),
                baselines: if pg_rates.is_empty() {
                    format!(
                        "both stores plain (--store-key off): {}",
                        fmt3(&plain_rates, "/s")
                    )
                } else {
                    format!(
                        "both stores plain (--store-key off): {}; the coordinator on PostgreSQL: {}, plain: {}",
                        fmt3(&plain_rates, "/s"),
                        fmt3(&pg_rates, "/s"),
                        fmt3(&plain_pg_rates, "/s")
                    )
                },
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
