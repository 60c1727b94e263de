//! Quick figures for the scheduler core (the benchmark suite proper is
//! `sundial-bench`): timer wheel ns per insert / cancel with 1M timers
//! pending, and resident memory per scheduled task.
//!
//! Run: `cargo run --release -p sundial-agent --example quick_measure`

use std::hint::black_box;
use std::time::Instant;

use sundial_agent::scheduler::{SchedTask, Scheduler};
use sundial_agent::wheel::TimerWheel;
use sundial_protocol::policy::Policies;
use sundial_protocol::{DurationMs, Schedule, TaskId, Timestamp};

const PENDING: usize = 1_000_000;
const OPS: usize = 1_000_000;
const ROUNDS: usize = 7;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// xorshift: deterministic spread of deadlines over ~12 days.
fn spread(i: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x % (12 * 86_400_000)
}

fn median_and_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let mut insert_ns = Vec::new();
    let mut cancel_ns = Vec::new();
    for round in 0..ROUNDS {
        let mut w: TimerWheel<u64> = TimerWheel::new(1_000);
        for i in 0..PENDING as u64 {
            w.insert(1_000 + spread(i), i);
        }
        let base = PENDING as u64 * (round as u64 + 1);
        let t = Instant::now();
        let handles: Vec<_> = (0..OPS as u64)
            .map(|i| w.insert(1_000 + spread(base + i), i))
            .collect();
        insert_ns.push(t.elapsed().as_nanos() as f64 / OPS as f64);
        let t = Instant::now();
        for h in handles {
            black_box(w.cancel(h));
        }
        cancel_ns.push(t.elapsed().as_nanos() as f64 / OPS as f64);
        black_box(&w);
    }
    let (im, ilo, ihi) = median_and_spread(insert_ns);
    let (cm, clo, chi) = median_and_spread(cancel_ns);
    println!("timer wheel, {PENDING} pending, {OPS} ops x {ROUNDS} rounds:");
    println!("  insert: median {im:.1} ns (min {ilo:.1}, max {ihi:.1})");
    println!("  cancel: median {cm:.1} ns (min {clo:.1}, max {chi:.1})");
    println!(
        "  slab bytes per pending timer: {}",
        TimerWheel::<u64>::ENTRY_BYTES
    );

    let now = Timestamp::parse("2026-11-26T00:00:00Z").expect("valid");
    for (label, make) in [("cron '*/5 * * * *' Europe/Berlin", 0), ("every 1m", 1)] {
        let before = rss_bytes();
        let mut s = Scheduler::new(now);
        for i in 0..PENDING as u64 {
            let schedule = if make == 0 {
                Schedule::cron("*/5 * * * *", "Europe/Berlin").expect("valid")
            } else {
                Schedule::every(
                    DurationMs(60_000),
                    now.saturating_add_ms(spread(i) as i64 % 60_000),
                )
                .expect("valid")
            };
            s.restore(
                SchedTask {
                    id: TaskId(i),
                    schedule,
                    policies: Policies::default(),
                    created_at: now,
                },
                None,
            );
        }
        let after = rss_bytes();
        println!(
            "scheduler memory, {label}: {:.0} bytes per scheduled task ({} tasks, RSS +{} MiB)",
            (after - before) as f64 / PENDING as f64,
            s.task_count(),
            (after - before) >> 20
        );
        drop(s);
    }
}
