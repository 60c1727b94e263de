//! Every scenario, in a short form with a fixed seed, must keep the
//! invariants: nothing lost, nothing duplicated, nothing unexpected. And the
//! checker must be able to fail: with a fault switched on in the agent
//! (compiled into test builds only), the simulator reports it and exits
//! non-zero.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sundial_tests::scenario::{self, Options, Scenario};

const SIM: &str = env!("CARGO_BIN_EXE_sundial-sim");
/// The seed of every CI run; change it only on purpose.
const SEED: u64 = 20_261_126;

fn run(scenario: Scenario, agents: usize, secs: u64) -> scenario::Report {
    run_with_timeline(scenario, agents, secs).0
}

fn run_with_timeline(scenario: Scenario, agents: usize, secs: u64) -> (scenario::Report, String) {
    let opts = Options {
        scenario,
        agents,
        duration: Duration::from_secs(secs),
        seed: SEED,
        exe: PathBuf::from(SIM),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut out: Vec<u8> = Vec::new();
    let report = rt.block_on(scenario::run(&opts, &mut out));
    let timeline = String::from_utf8_lossy(&out);
    let report =
        report.unwrap_or_else(|e| panic!("{} failed to run: {e:#}\n{timeline}", scenario.name()));
    let v = &report.verdict;
    assert!(
        v.passed(),
        "{} (seed {SEED}) broke an invariant:\n{v}\n{timeline}",
        scenario.name()
    );
    assert!(
        v.expected > 0 && v.fired == v.expected,
        "{}: {v}",
        scenario.name()
    );
    let timeline = timeline.into_owned();
    (report, timeline)
}

#[test]
fn partition() {
    let (r, timeline) = run_with_timeline(Scenario::Partition, 3, 30);
    // Cut for longer than the idle timeout: runs were made offline and synced later.
    assert!(r.verdict.fired_offline > 0, "{}", r.verdict);
    // The live timeline names the agent that is cut and what it buffers,
    // and counts the runs fired as they go.
    assert!(
        timeline
            .lines()
            .any(|l| l.contains(" cut, ") && l.contains("buffered")),
        "{timeline}"
    );
    let fired: Vec<u64> = timeline
        .lines()
        .filter_map(|l| l.split("fired ").nth(1))
        .filter_map(|rest| rest.split([';', ' ']).next()?.parse().ok())
        .collect();
    assert!(
        fired.windows(2).any(|w| w[1] > w[0]),
        "the fired count never moved: {timeline}"
    );
}

#[test]
fn flapping() {
    run(Scenario::Flapping, 2, 16);
}

#[test]
fn agent_crash() {
    let r = run(Scenario::AgentCrash, 2, 24);
    assert!(
        r.verdict.interrupted > 0,
        "no run was cut short by a kill:\n{}",
        r.verdict
    );
}

#[test]
fn coordinator_crash() {
    run(Scenario::CoordinatorCrash, 2, 20);
}

#[test]
fn coordinator_failover() {
    // Three coordinators on a throw-away PostgreSQL, killed in turn: the
    // agents move between them and every run is stored once.
    if sundial_tests::pg::PgCluster::start()
        .expect("PostgreSQL starts")
        .is_none()
    {
        return;
    }
    let r = run(Scenario::CoordinatorFailover, 3, 30);
    assert!(
        r.verdict.fired_offline > 0,
        "runs fired while their coordinator was down: {}",
        r.verdict
    );
}

#[test]
fn long_partition() {
    // Short form: 10 s cut at 100 runs/s buffers about 1,000 runs.
    let r = run(Scenario::LongPartition, 1, 20);
    assert!(r.buffered_max >= 500, "buffered only {}", r.buffered_max);
}

#[test]
fn swizzle() {
    run(Scenario::Swizzle, 3, 24);
}

#[test]
fn lossy() {
    run(Scenario::Lossy, 2, 16);
}

#[test]
fn storm() {
    // Short form: 50 in-process agents (the full scenario uses 200).
    run(Scenario::Storm, 50, 20);
}

fn sim_with_fault(fault: &str) -> (bool, String) {
    let out = Command::new(SIM)
        .args([
            "--scenario",
            "partition",
            "--agents",
            "2",
            "--duration",
            "30s",
            "--seed",
            &SEED.to_string(),
        ])
        .env("SUNDIAL_FAULT", fault)
        .output()
        .expect("sundial-sim runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The value under `column` in the verdict table.
fn column(stdout: &str, column: &str) -> u64 {
    let lines: Vec<&str> = stdout.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.contains("duplicated") && l.contains("expected"))
        .expect("verdict table");
    let header: Vec<&str> = lines[i]
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let values: Vec<&str> = lines[i + 1].split_whitespace().collect();
    let k = header.iter().position(|h| *h == column).expect("column");
    values[k].parse().expect("number")
}

#[test]
fn the_checker_catches_a_double_fire() {
    let (ok, stdout) = sim_with_fault("double-fire");
    assert!(!ok, "a double-firing agent passed:\n{stdout}");
    assert!(column(&stdout, "duplicated") > 0, "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn the_checker_catches_records_dropped_before_their_ack() {
    let (ok, stdout) = sim_with_fault("ack-early");
    assert!(
        !ok,
        "an agent that drops unacknowledged records passed:\n{stdout}"
    );
    assert!(column(&stdout, "lost") > 0, "{stdout}");
}
