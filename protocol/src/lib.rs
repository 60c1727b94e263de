//! `sundial-protocol`: what agent and coordinator agree on.
//!
//! Timestamps and durations ([`time`]), cron ([`cron`]) and schedules with
//! their occurrence math ([`schedule`]), policies ([`policy`]), tasks and run
//! records ([`task`]), session messages ([`wire`]) and their framing
//! ([`codec`]).
//!
//! Join tokens ([`token`]) live here too; the TLS trust rules are in
//! `sundial-net`, beside the QUIC plumbing.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and depends
//! on no async runtime; every function that depends on time takes it as input.

pub mod codec;
pub mod cron;
pub mod placement;
pub mod policy;
pub mod records;
pub mod schedule;
pub mod seal;
pub mod task;
pub mod time;
pub mod token;
pub mod wasm;
pub mod wire;

pub use schedule::{OutcomeSet, Schedule, ScheduleKind, Trigger};

/// An error and its causes as one line for people: each cause is added only
/// when the text so far does not already say it (error types that print
/// their source, and also return it as their source, would repeat it).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}
pub use task::{AgentId, Outcome, RunKey, RunRecord, TaskId, TaskSpec};
pub use time::{DurationMs, Timestamp};
