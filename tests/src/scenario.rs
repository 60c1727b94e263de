//! Scenarios: a fleet, a few tasks per agent, a seeded timeline of faults,
//! then heal everything, wait for the outboxes to drain, and check.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use sundial_protocol::policy::Policies;
use sundial_protocol::{AgentId, DurationMs, Schedule, TaskSpec, Timestamp};

use crate::checker::{self, Verdict};
use crate::harness::Fleet;
use crate::relay::{Direction, LinkConfig};
use crate::rng::Rng;

/// The scenarios `sundial-sim` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// One agent cut off for longer than the idle timeout, then healed (the default).
    Partition,
    /// One agent's link going down and up every few seconds.
    Flapping,
    /// An agent killed with SIGKILL while runs are going, and restarted, three times.
    AgentCrash,
    /// The coordinator killed with SIGKILL and restarted, twice.
    CoordinatorCrash,
    /// One agent cut off long enough to buffer at least 10,000 runs, then drained.
    LongPartition,
    /// Links cut one by one and restored in random order.
    Swizzle,
    /// 30% loss both ways, with duplication, delay and reordering.
    Lossy,
    /// Many lightweight in-process agents cut at once and healed at once.
    Storm,
    /// Three coordinators on one PostgreSQL (a throw-away cluster), each
    /// killed with SIGKILL and restarted in turn; agents move between them.
    CoordinatorFailover,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::Partition,
        Scenario::Flapping,
        Scenario::AgentCrash,
        Scenario::CoordinatorCrash,
        Scenario::LongPartition,
        Scenario::Swizzle,
        Scenario::Lossy,
        Scenario::Storm,
        Scenario::CoordinatorFailover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Partition => "partition",
            Scenario::Flapping => "flapping",
            Scenario::AgentCrash => "agent-crash",
            Scenario::CoordinatorCrash => "coordinator-crash",
            Scenario::LongPartition => "long-partition",
            Scenario::Swizzle => "swizzle",
            Scenario::Lossy => "lossy",
            Scenario::Storm => "storm",
            Scenario::CoordinatorFailover => "coordinator-failover",
        }
    }

    /// Default fleet size.
    pub fn agents_default(self) -> usize {
        match self {
            Scenario::Partition
            | Scenario::CoordinatorCrash
            | Scenario::Lossy
            | Scenario::CoordinatorFailover => 3,
            Scenario::Flapping | Scenario::AgentCrash => 2,
            Scenario::LongPartition => 1,
            Scenario::Swizzle => 4,
            Scenario::Storm => 200,
        }
    }

    /// Default length of the fault phase.
    pub fn duration_default(self) -> Duration {
        match self {
            Scenario::LongPartition => Duration::from_secs(125),
            _ => Duration::from_secs(40),
        }
    }
}

/// Pause between the end of the fault phase and the drain check.
const SETTLE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub scenario: Scenario,
    pub agents: usize,
    pub duration: Duration,
    pub seed: u64,
    /// The simulator binary (serves the hidden subcommands).
    pub exe: PathBuf,
}

/// What a run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub verdict: Verdict,
    /// Most records buffered in agents' outboxes at once (sampled).
    pub buffered_max: u64,
    /// From the last heal to every outbox empty.
    pub drain: Duration,
}

struct Clock {
    start: Instant,
}

impl Clock {
    fn stamp(&self) -> String {
        format!("t+{:6.1}s", self.start.elapsed().as_secs_f64())
    }
}

macro_rules! say {
    ($out:expr, $clock:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, "{}  {}", $clock.stamp(), format!($($arg)*));
        let _ = $out.flush();
    }};
}

fn now() -> Timestamp {
    sundial_coordinator::cli::now()
}

/// A step of a timeline: at `at` after the start, do `what`.
#[derive(Debug, Clone)]
enum Step {
    Link {
        agent: usize,
        cfg: LinkConfig,
        label: String,
    },
    KillAgent(usize),
    StartAgent(usize),
    KillCoordinator,
    StartCoordinator,
    /// Coordinator `k` of several (0: the first).
    KillNth(usize),
    StartNth(usize),
}

fn plan(opts: &Options, rng: &mut Rng) -> Vec<(Duration, Step)> {
    let n = opts.agents;
    let d = opts.duration.as_millis() as u64;
    let ms = Duration::from_millis;
    let mut steps = Vec::new();
    let pick = |rng: &mut Rng| rng.below(n as u64) as usize;
    match opts.scenario {
        Scenario::Partition => {
            let a = pick(rng);
            steps.push((
                ms(d / 5),
                Step::Link {
                    agent: a,
                    cfg: LinkConfig::partition(),
                    label: "partitioned".into(),
                },
            ));
            steps.push((
                ms(d * 3 / 5),
                Step::Link {
                    agent: a,
                    cfg: LinkConfig::pass(),
                    label: "healed".into(),
                },
            ));
        }
        Scenario::Flapping => {
            let a = pick(rng);
            let mut t = 3_000;
            let mut cut = true;
            while t < d.saturating_sub(2_000) {
                let cfg = if cut {
                    LinkConfig::partition()
                } else {
                    LinkConfig::pass()
                };
                let label = if cut { "down" } else { "up" };
                steps.push((
                    ms(t),
                    Step::Link {
                        agent: a,
                        cfg,
                        label: label.into(),
                    },
                ));
                cut = !cut;
                t += 2_000 + rng.below(3_000);
            }
            steps.push((
                ms(d.saturating_sub(1_000)),
                Step::Link {
                    agent: a,
                    cfg: LinkConfig::pass(),
                    label: "up".into(),
                },
            ));
        }
        Scenario::AgentCrash => {
            let a = pick(rng);
            let mut t = 4_000;
            for _ in 0..3 {
                t += rng.below(4_000);
                if t + 4_000 > d {
                    break;
                }
                steps.push((ms(t), Step::KillAgent(a)));
                t += 1_000 + rng.below(2_000);
                steps.push((ms(t), Step::StartAgent(a)));
                t += 3_000;
            }
        }
        Scenario::CoordinatorFailover => {
            // Each of the three killed in turn, down 3-6 s, at least two up
            // at any time; then two at once, the third serving alone.
            let mut t = d / 8;
            for k in 0..3 {
                steps.push((ms(t), Step::KillNth(k)));
                steps.push((ms(t + 3_000 + rng.below(3_000)), Step::StartNth(k)));
                t += d / 5;
            }
            let alone = rng.below(3) as usize;
            for k in (0..3).filter(|k| *k != alone) {
                steps.push((ms(t), Step::KillNth(k)));
                steps.push((ms(t + 4_000), Step::StartNth(k)));
            }
            steps.sort_by_key(|s| s.0);
        }
        Scenario::CoordinatorCrash => {
            steps.push((ms(d / 4), Step::KillCoordinator));
            steps.push((ms(d / 4 + 3_000 + rng.below(3_000)), Step::StartCoordinator));
            steps.push((ms(d * 5 / 8), Step::KillCoordinator));
            steps.push((
                ms(d * 5 / 8 + 2_000 + rng.below(2_000)),
                Step::StartCoordinator,
            ));
        }
        Scenario::LongPartition => {
            let a = pick(rng);
            steps.push((
                ms(5_000),
                Step::Link {
                    agent: a,
                    cfg: LinkConfig::partition(),
                    label: "partitioned".into(),
                },
            ));
            steps.push((
                ms(d.saturating_sub(5_000)),
                Step::Link {
                    agent: a,
                    cfg: LinkConfig::pass(),
                    label: "healed".into(),
                },
            ));
        }
        Scenario::Swizzle => {
            let mut order: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut order);
            let gap = (d / 2 / (n as u64 + 1)).max(500);
            let mut t = 3_000;
            for &a in &order {
                steps.push((
                    ms(t),
                    Step::Link {
                        agent: a,
                        cfg: LinkConfig::partition(),
                        label: "cut".into(),
                    },
                ));
                t += gap;
            }
            t += 12_000;
            rng.shuffle(&mut order);
            for &a in &order {
                steps.push((
                    ms(t.min(d - 1_000)),
                    Step::Link {
                        agent: a,
                        cfg: LinkConfig::pass(),
                        label: "restored".into(),
                    },
                ));
                t += gap;
            }
        }
        Scenario::Lossy => {
            let noisy = Direction {
                cut: false,
                loss: 0.30,
                duplicate: 0.10,
                delay_ms: 5,
                jitter_ms: 20,
            };
            for a in 0..n {
                steps.push((
                    ms(2_000),
                    Step::Link {
                        agent: a,
                        cfg: LinkConfig {
                            up: noisy,
                            down: noisy,
                        },
                        label: "lossy (30% loss, 10% dup, 5-25 ms)".into(),
                    },
                ));
            }
            for a in 0..n {
                steps.push((
                    ms(d.saturating_sub(2_000)),
                    Step::Link {
                        agent: a,
                        cfg: LinkConfig::pass(),
                        label: "clean".into(),
                    },
                ));
            }
        }
        Scenario::Storm => {
            for a in 0..n {
                steps.push((
                    ms(d / 5),
                    Step::Link {
                        agent: a,
                        cfg: LinkConfig::partition(),
                        label: "cut".into(),
                    },
                ));
            }
            for a in 0..n {
                steps.push((
                    ms(d * 3 / 5),
                    Step::Link {
                        agent: a,
                        cfg: LinkConfig::pass(),
                        label: "healed".into(),
                    },
                ));
            }
        }
    }
    steps.sort_by_key(|(t, _)| *t);
    steps
}

async fn add_tasks(fleet: &Fleet, opts: &Options, rng: &mut Rng) -> anyhow::Result<()> {
    let start = now();
    for a in 0..fleet.agents.len() {
        match opts.scenario {
            Scenario::LongPartition => {
                // 10 tasks every 100 ms: 100 runs a second to buffer.
                for k in 0..10 {
                    let anchor = start.saturating_add_ms(k * 10);
                    fleet
                        .add_task(
                            a,
                            &format!("burst{k}"),
                            Schedule::every(DurationMs(100), anchor)?,
                            0,
                            Policies::default(),
                        )
                        .await?;
                }
            }
            Scenario::Storm => {
                let anchor = start.saturating_add_ms(rng.below(5_000) as i64);
                fleet
                    .add_task(
                        a,
                        "beat",
                        Schedule::every(DurationMs(5_000), anchor)?,
                        0,
                        Policies::default(),
                    )
                    .await?;
            }
            _ => {
                fleet
                    .add_task(
                        a,
                        "tick",
                        Schedule::cron("* * * * * *", "Europe/Berlin")?,
                        0,
                        Policies::default(),
                    )
                    .await?;
                let anchor = start.saturating_add_ms(rng.below(700) as i64);
                fleet
                    .add_task(
                        a,
                        "fast",
                        Schedule::every(DurationMs(700), anchor)?,
                        0,
                        Policies::default(),
                    )
                    .await?;
                if opts.scenario == Scenario::AgentCrash {
                    // Long runs, so a kill lands while one is going.
                    fleet
                        .add_task(
                            a,
                            "slow",
                            Schedule::every(DurationMs(2_000), start)?,
                            1_500,
                            Policies::default(),
                        )
                        .await?;
                }
            }
        }
    }
    Ok(())
}

/// Runs a scenario, printing a live timeline to `out`.
pub async fn run(opts: &Options, out: &mut (dyn Write + Send)) -> anyhow::Result<Report> {
    let clock = Clock {
        start: Instant::now(),
    };
    let mut rng = Rng::new(opts.seed);
    let in_process = opts.scenario == Scenario::Storm;
    say!(
        out,
        clock,
        "scenario {} seed {} agents {} duration {}s{}",
        opts.scenario.name(),
        opts.seed,
        opts.agents,
        opts.duration.as_secs(),
        if in_process {
            " (in-process agents)"
        } else {
            ""
        }
    );
    let coordinators = if opts.scenario == Scenario::CoordinatorFailover {
        3
    } else {
        1
    };
    let mut fleet = Fleet::start_on(
        &opts.exe,
        opts.agents,
        in_process,
        &mut rng,
        &[],
        coordinators,
        false,
    )
    .await
    .context("starting the fleet")?;
    say!(
        out,
        clock,
        "{} on {}{}, {} agents enrolled and running",
        if coordinators > 1 {
            "coordinators"
        } else {
            "coordinator"
        },
        fleet.coord_addr,
        if coordinators > 1 {
            format!(" and {} more on one PostgreSQL", coordinators - 1)
        } else {
            String::new()
        },
        fleet.agents.len()
    );
    add_tasks(&fleet, opts, &mut rng)
        .await
        .context("creating tasks")?;
    say!(out, clock, "tasks created");

    let steps = plan(opts, &mut rng);
    let fault_start = Instant::now();
    let mut last_heal = Instant::now();
    // Set at a heal; cleared with the drain time when every outbox is empty.
    let mut awaiting_drain: Option<Instant> = None;
    let mut drain = Duration::ZERO;
    let mut buffered_max = 0u64;
    let mut next_report = Duration::from_secs(5);
    let sample_every = if fleet.agents.len() > 20 {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(250)
    };
    let mut next_sample = Duration::ZERO;
    let mut pending = steps.into_iter().peekable();
    while fault_start.elapsed() < opts.duration {
        while let Some((at, _)) = pending.peek() {
            if *at > fault_start.elapsed() {
                break;
            }
            let Some((_, step)) = pending.next() else {
                break;
            };
            match step {
                Step::Link { agent, cfg, label } => {
                    fleet.agents[agent].relay.set(cfg);
                    if cfg == LinkConfig::pass() {
                        last_heal = Instant::now();
                        awaiting_drain = Some(last_heal);
                    }
                    if fleet.agents.len() <= 20 {
                        say!(out, clock, "link {} {}", fleet.agents[agent].name, label);
                    } else if agent == 0 {
                        say!(
                            out,
                            clock,
                            "links of all {} agents {}",
                            fleet.agents.len(),
                            label
                        );
                    }
                }
                Step::KillAgent(a) => {
                    fleet.agents[a].kill9().await;
                    say!(out, clock, "kill -9 {}", fleet.agents[a].name);
                }
                Step::StartAgent(a) => {
                    let exe = fleet.exe().to_owned();
                    fleet.agents[a].start(&exe)?;
                    last_heal = Instant::now();
                    awaiting_drain = Some(last_heal);
                    say!(out, clock, "restarted {}", fleet.agents[a].name);
                }
                Step::KillCoordinator => {
                    fleet.kill_coordinator();
                    say!(out, clock, "kill -9 coordinator");
                }
                Step::StartCoordinator => {
                    fleet.start_coordinator().await?;
                    last_heal = Instant::now();
                    awaiting_drain = Some(last_heal);
                    say!(out, clock, "restarted coordinator");
                }
                Step::KillNth(k) => {
                    fleet.kill_nth(k);
                    say!(out, clock, "kill -9 coordinator {}", k + 1);
                }
                Step::StartNth(k) => {
                    if k == 0 {
                        fleet.start_coordinator().await?;
                    } else {
                        fleet.start_other(k)?;
                    }
                    say!(out, clock, "restarted coordinator {}", k + 1);
                }
            }
        }
        if fault_start.elapsed() >= next_sample {
            next_sample += sample_every;
            let (outbox, _) = fleet.backlog();
            buffered_max = buffered_max.max(outbox);
            if let (Some(healed), 0) = (awaiting_drain, outbox) {
                drain = healed.elapsed();
                awaiting_drain = None;
                say!(
                    out,
                    clock,
                    "outboxes empty {:.1} s after the heal",
                    drain.as_secs_f64()
                );
            }
        }
        if fault_start.elapsed() >= next_report {
            next_report += Duration::from_secs(5);
            let (outbox, running) = fleet.backlog();
            buffered_max = buffered_max.max(outbox);
            let synced = if fleet.coordinator_running() {
                fleet.synced_count().await
            } else {
                None
            };
            let synced = synced.map_or_else(
                || "-".into(),
                |s| {
                    if s >= 10_000 {
                        ">=10000".into()
                    } else {
                        s.to_string()
                    }
                },
            );
            // Many agents: the totals only; a few: which one is cut and buffering.
            let detail = if fleet.agents.len() <= 20 {
                fleet.activity()
            } else {
                format!("running {running}")
            };
            say!(
                out,
                clock,
                "synced {synced}, buffered in outboxes {outbox}; {detail}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = now();
    // Let occurrences due just before the end fire and be recorded before the
    // drain check looks at the outboxes (later ones are not counted).
    tokio::time::sleep(SETTLE).await;
    let (outbox, _) = fleet.backlog();
    buffered_max = buffered_max.max(outbox);
    say!(out, clock, "fault phase over; healing everything and waiting for outboxes to drain ({outbox} buffered)");
    let needs_heal = !fleet.coordinator_running()
        || fleet
            .agents
            .iter()
            .any(|a| !a.is_running() || a.relay.config() != LinkConfig::pass());
    if needs_heal {
        last_heal = Instant::now();
        awaiting_drain = Some(last_heal);
    }
    fleet.heal_all().await?;
    let drain_deadline = Instant::now() + Duration::from_secs(300);
    let drained_at = loop {
        let (outbox, running) = fleet.backlog();
        if outbox == 0 && running == 0 {
            break Instant::now();
        }
        anyhow::ensure!(
            Instant::now() < drain_deadline,
            "outboxes did not drain within 300 s ({outbox} left)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(healed) = awaiting_drain {
        drain = drained_at.saturating_duration_since(healed);
    }
    let _ = last_heal;
    say!(out, clock, "drained; stopping the fleet and checking");
    fleet.stop().await;

    // Both histories, read directly: the coordinators' store and the probe logs.
    let (store, records): (Box<dyn sundial_coordinator::store::CoordStore>, _) =
        match fleet.pg_url() {
            Some(url) => {
                let mut pg =
                    sundial_coordinator::pg::PgStore::open(&sundial_coordinator::pg::PgOptions {
                        url,
                        password: None,
                        pool_size: 2,
                    })?;
                // Read as the coordinators read it: with their key ring.
                if let Some(c) = sundial_net::at_rest::StoreCipher::from_file(
                    &fleet.coord_dir.join(sundial_net::at_rest::KEY_FILE),
                    false,
                )
                .map_err(anyhow::Error::msg)?
                {
                    pg.set_cipher(std::sync::Arc::new(c));
                }
                let records = pg.all_runs()?;
                (Box::new(pg), records)
            }
            None => {
                let redb = sundial_coordinator::store::CoordinatorStore::open(
                    &fleet
                        .coord_dir
                        .join(sundial_coordinator::server::STORE_FILE),
                )?;
                let records = redb.all_runs()?;
                (Box::new(redb), records)
            }
        };
    let mut all = Vec::new();
    loop {
        let page = store.tasks(all.last().map(|t: &TaskSpec| t.id), 1_000)?;
        if page.is_empty() {
            break;
        }
        all.extend(page.into_iter().map(|t| t.spec));
    }
    let tasks: Vec<(TaskSpec, AgentId)> = all
        .into_iter()
        .filter_map(|t| match t.target {
            sundial_protocol::task::Target::Agent(a) => Some((t, a)),
            _ => None,
        })
        .collect();
    let mut starts = Vec::new();
    let mut malformed = 0;
    for a in &fleet.agents {
        let (s, bad) = checker::read_probe_log(&a.probe_log);
        starts.extend(s);
        malformed += bad;
    }
    let mut verdict = checker::check(&tasks, end, &starts, &records);
    verdict.malformed_probe_lines = malformed;
    Ok(Report {
        verdict,
        buffered_max,
        drain,
    })
}
