//! `sundial-sim`: runs a whole fleet on this machine through a fault
//! scenario and checks that every occurrence fired on time and was recorded
//! exactly once. Exits non-zero when an invariant fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sundial_protocol::DurationMs;
use sundial_tests::harness;
use sundial_tests::scenario::{self, Options, Scenario};

/// Run a Sundial fleet (a coordinator and agents as real processes, each
/// agent behind its own fault-injecting UDP relay) through a scenario, then
/// check: nothing lost, nothing duplicated, lateness measured by the actions.
#[derive(Debug, Parser)]
#[command(name = "sundial-sim", version, about)]
struct Cli {
    /// The scenario.
    #[arg(long, value_enum, default_value = "partition")]
    scenario: Scenario,
    /// Number of agents [default: depends on the scenario].
    #[arg(long)]
    agents: Option<usize>,
    /// Length of the fault phase, e.g. 40s or 2m [default: depends on the scenario].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<DurationMs>,
    /// Seed of every random choice [default: from the clock]; printed, so a run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
}

fn parse_duration(s: &str) -> Result<DurationMs, String> {
    DurationMs::parse(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // Re-executions of this binary as the fleet's parts.
    if let Some(code) = harness::run_as_part(&args) {
        return code;
    }
    let cli = Cli::parse();
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000)
            .unwrap_or(1)
    });
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sundial-sim: cannot find its own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = Options {
        scenario: cli.scenario,
        agents: cli
            .agents
            .unwrap_or_else(|| cli.scenario.agents_default())
            .max(1),
        duration: cli
            .duration
            .map(|d| Duration::from_millis(d.0))
            .unwrap_or_else(|| cli.scenario.duration_default()),
        seed,
        exe,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sundial-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    let report = rt.block_on(scenario::run(&opts, &mut out));
    match report {
        Ok(r) => {
            println!();
            println!(
                "verdict: scenario {}  seed {}  agents {}  fault phase {} s  most buffered {}  drained {:.1} s after the last heal",
                opts.scenario.name(),
                opts.seed,
                opts.agents,
                opts.duration.as_secs(),
                r.buffered_max,
                r.drain.as_secs_f64()
            );
            print!("{}", r.verdict);
            if r.verdict.passed() {
                println!("PASS: nothing lost, nothing duplicated, nothing unexpected");
                ExitCode::SUCCESS
            } else {
                println!(
                    "FAIL: an invariant does not hold (replay with --scenario {} --seed {})",
                    opts.scenario.name(),
                    opts.seed
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sundial-sim: {e:#} (seed {})", opts.seed);
            ExitCode::FAILURE
        }
    }
}
