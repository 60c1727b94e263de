//! How fast a backlog drains once the link is back: an agent with N run
//! records buffered (as after a long partition) connects, and we time until
//! its outbox is empty and the coordinator holds all N.
//!
//! Run: `cargo run --release -p sundial-coordinator --example drain -- [N] [ROUNDS]`

use std::time::{Duration, Instant};

use sundial_agent::store::{AgentStore, StepWrite};
use sundial_coordinator::server::Server;
use sundial_coordinator::store::CoordinatorStore;
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, Timestamp};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let mut rates = Vec::new();
    let mut times = Vec::new();
    for round in 0..rounds {
        let (secs, stored) = one_round(n)?;
        anyhow::ensure!(
            stored == n as u64,
            "round {round}: coordinator stored {stored} of {n}"
        );
        rates.push(n as f64 / secs);
        times.push(secs * 1000.0);
    }
    rates.sort_by(f64::total_cmp);
    times.sort_by(f64::total_cmp);
    println!("drain of {n} buffered runs over loopback QUIC, {rounds} rounds:");
    println!(
        "  runs/s:            median {:.0} (min {:.0}, max {:.0})",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1]
    );
    println!(
        "  link up -> empty:  median {:.0} ms (min {:.0}, max {:.0})",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    Ok(())
}

fn one_round(n: usize) -> anyhow::Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let coord_dir = dir.path().join("coord");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let creds =
        sundial_coordinator::server::init(&coord_dir, "127.0.0.1:0", "sundial-coordinator")?;
    let listen: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let server = rt.block_on(async { Server::bind(&coord_dir, listen) })?;
    let addr = server
        .local_addr()
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    // A token, through the admin API as an operator would.
    let token = rt.block_on(async {
        let mut c =
            sundial_coordinator::pki::AdminCreds::load(&creds).map_err(anyhow::Error::msg)?;
        c.coordinator = addr.to_string();
        let client = sundial_coordinator::client::AdminClient::connect(&c)
            .await
            .map_err(anyhow::Error::msg)?;
        match client
            .request(&sundial_protocol::wire::AdminRequest::TokenCreate {
                ttl_ms: 60_000,
                uses: 1,
                labels: vec![],
            })
            .await
            .map_err(anyhow::Error::msg)?
        {
            sundial_protocol::wire::AdminResponse::Token(t) => Ok::<_, anyhow::Error>(t),
            r => anyhow::bail!("unexpected {r:?}"),
        }
    })?;
    let agent_dir = dir.path().join("agent");
    rt.block_on(sundial_agent::enroll::join(
        &agent_dir,
        sundial_agent::enroll::JoinRequest {
            coordinator: addr.to_string(),
            token,
            name: None,
            labels: vec![],
            allow_exec: vec![],
        },
    ))
    .map_err(anyhow::Error::msg)?;
    {
        let store = AgentStore::open(&agent_dir.join("agent.redb"))?;
        let base = Timestamp::parse("2026-11-26T00:00:00Z")?;
        let records: Vec<RunRecord> = (0..n)
            .map(|i| RunRecord {
                task_id: TaskId(1),
                agent_id: AgentId(1),
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
        store.apply_step(&StepWrite {
            records,
            ..StepWrite::default()
        })?;
    }
    // Link restored: the agent starts and connects.
    let started = Instant::now();
    let (agent_stop_tx, agent_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_dir2 = agent_dir.clone();
    let agent = std::thread::spawn(move || {
        let art = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let cfg = sundial_agent::runtime::AgentConfig {
            data_dir: agent_dir2,
            exec: Default::default(),
        };
        let _ = art.block_on(sundial_agent::runtime::run(cfg, async {
            let _ = agent_stop_rx.await;
        }));
    });
    loop {
        let left = sundial_agent::status::read(&agent_dir)
            .map(|s| s.outbox_len)
            .unwrap_or(u64::MAX);
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "drain did not finish"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = agent_stop_tx.send(());
    let _ = agent.join();
    let _ = stop_tx.send(());
    let _ = rt.block_on(serving);
    drop(rt);
    let stored = CoordinatorStore::open(&coord_dir.join("coordinator.redb"))?.run_count()?;
    Ok((secs, stored))
}
