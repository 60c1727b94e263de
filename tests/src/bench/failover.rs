//! Two coordinators on one PostgreSQL: one killed with SIGKILL, and the
//! time until every agent it served has its runs stored through the other.

use super::*;

/// One round: seconds from the kill until every agent has a run fired
/// after the kill stored through the survivor.
async fn failover_once(exe: &Path, agents: usize, seed: u64) -> anyhow::Result<f64> {
    let mut rng = Rng::new(seed);
    let mut fleet = Fleet::start_on(exe, agents, true, &mut rng, &[], 2, true).await?;
    for i in 0..agents {
        fleet
            .add_task(
                i,
                "tick",
                Schedule::every(DurationMs(500), Timestamp::from_millis_saturating(0))
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
                0,
                Policies::default(),
            )
            .await?;
    }
    // Every agent in session and syncing before the kill.
    let t = Instant::now();
    while fleet.backlog().0 > 0 || t.elapsed() < Duration::from_secs(3) {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the fleet did not settle"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let killed_ms = SystemClock.read().wall_ms;
    let killed = Instant::now();
    fleet.kill_nth(0);
    let ids: Vec<AgentId> = fleet.agents.iter().map(|a| a.id).collect();
    loop {
        let mut all = true;
        for id in &ids {
            let r = fleet
                .admin(&sundial_protocol::wire::AdminRequest::RunList {
                    task: None,
                    agent: Some(*id),
                    since: Some(Timestamp::from_millis_saturating(killed_ms + 1)),
                    limit: 1,
                    after: None,
                    before: None,
                })
                .await;
            if !matches!(r, Ok(sundial_protocol::wire::AdminResponse::Runs(ref v)) if !v.is_empty())
            {
                all = false;
                break;
            }
        }
        if all {
            break;
        }
        anyhow::ensure!(
            killed.elapsed() < Duration::from_secs(60),
            "no failover within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = killed.elapsed().as_secs_f64();
    fleet.stop().await;
    Ok(secs)
}

pub async fn failover(quick: bool, exe: &Path) -> Table {
    let agents = if quick { 5 } else { 20 };
    let rounds = if quick { 1 } else { 3 };
    let mut times = Vec::new();
    let mut notes = vec![format!(
        "{agents} in-process agents over two coordinators on one throw-away PostgreSQL (fsync=off), \
         each agent with a task every 500 ms; the first coordinator is killed with SIGKILL and the clock \
         stops when every agent has a run fired after the kill stored through the second. About 5 s of it \
         is the agents noticing the silence (QUIC's idle timeout)."
    )];
    if crate::pg::PgCluster::start().ok().flatten().is_none() {
        notes.push("skipped: PostgreSQL's initdb is not installed".into());
        return Table {
            suite: "failover",
            notes,
            rows: Vec::new(),
        };
    }
    for r in 0..rounds {
        match failover_once(exe, agents, 7 + r as u64).await {
            Ok(s) => times.push(s),
            Err(e) => notes.push(format!("a round failed: {e:#}")),
        }
    }
    let (m, _, _) = stats(&times);
    Table {
        suite: "failover",
        notes,
        rows: vec![Row {
            metric: "coordinator killed → its agents' runs stored through another".into(),
            value: fmt3(&times, "s"),
            baselines: "—".into(),
            target: "within a few seconds (≤ 10 s)".into(),
            verdict: met(!times.is_empty() && m <= 10.0),
        }],
    }
}
