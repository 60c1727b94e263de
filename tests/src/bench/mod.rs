//! `sundial-bench`: the figures behind Sundial's claims, each measured beside
//! its baselines in the same run. Benchmarks print numbers (median and
//! spread over repeated runs) and never fail on timing; a missed target is
//! shown as missed.

use std::collections::{BinaryHeap, HashSet};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sundial_agent::clock::{boot_ns, BootTimer, SystemClock};
use sundial_agent::scheduler::{Command as SchedCommand, SchedTask, Scheduler};
use sundial_agent::store::{AgentStore, StepWrite};
use sundial_agent::wheel::TimerWheel;
use sundial_protocol::policy::Policies;
use sundial_protocol::task::{Action, ExecSpec, Target};
use sundial_protocol::{
    AgentId, DurationMs, Outcome, RunRecord, Schedule, TaskId, TaskSpec, Timestamp,
};

use crate::harness::Fleet;
use crate::relay::LinkConfig;
use crate::rng::Rng;

mod drain;
mod failover;
mod fleet;
mod footprint;
mod functions;
mod ingest;
mod lateness;
mod runlist;
mod stores;
mod wheel;

pub use drain::*;
pub use failover::*;
pub use fleet::*;
pub use footprint::*;
pub use functions::*;
pub use ingest::*;
pub use lateness::*;
pub use runlist::*;
pub use stores::*;
pub use wheel::*;

/// One line of a result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub value: String,
    pub baselines: String,
    pub target: String,
    pub verdict: String,
}

/// A suite's results.
#[derive(Debug, Clone)]
pub struct Table {
    pub suite: &'static str,
    pub notes: Vec<String>,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.suite);
        s.push_str("| metric | Sundial (median, min–max) | baselines, same run | target | met |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.metric, r.value, r.baselines, r.target, r.verdict
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("\n{n}\n"));
        }
        s
    }
}

/// Median, min and max.
pub fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt3(v: &[f64], unit: &str) -> String {
    let (m, lo, hi) = stats(v);
    format!("{} {unit} ({}–{})", num(m), num(lo), num(hi))
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn met(ok: bool) -> String {
    if ok {
        "met".into()
    } else {
        "**missed**".into()
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn spread(i: u64, span: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x % span
}

/// Sets the thread's timer slack to 1 ns, so sleeps end when asked.
pub fn tight_timer_slack() {
    // Best effort: without it wake-ups are up to 50 µs later.
    let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
}

/// The machine, for the report.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|k| format!("{:.0} GiB", k as f64 / 1_048_576.0))
        .unwrap_or_default();
    format!("{cores} cores, {cpu}, {mem} RAM, Linux {kernel}")
}

/// Where a report goes.
pub fn report_path() -> PathBuf {
    PathBuf::from("BENCHMARKS.md")
}

/// Run `n` of a store's sample load: 50 tasks, 20 agents, a second apart
/// from `base`, succeeded with a short tail.
pub(super) fn sample_run(n: i64, base: Timestamp) -> RunRecord {
    RunRecord {
        task_id: TaskId(1 + (n % 50) as u64),
        agent_id: AgentId(1 + (n % 20) as u64),
        scheduled_at: base.saturating_add_ms(n * 1_000),
        attempt: 1,
        fired_at: Some(base.saturating_add_ms(n * 1_000 + 3)),
        finished_at: Some(base.saturating_add_ms(n * 1_000 + 40)),
        outcome: Outcome::Succeeded,
        exit_code: Some(0),
        offline: false,
        detail: None,
        stdout_tail: b"ok\n".to_vec(),
        stderr_tail: Vec::new(),
    }
}
