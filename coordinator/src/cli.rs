//! Pieces of `sundialctl` shared by its commands: schedule flags, instants,
//! output formats.

use clap::{Args, ValueEnum};
use sundial_protocol::{DurationMs, Schedule, Timestamp};

/// How a read command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// An aligned table for people.
    Table,
    /// JSON for scripts (snake_case fields, RFC 3339 UTC timestamps).
    Json,
}

/// `--at T | --every DUR [--anchor T] | --cron EXPR [--tz ZONE]`.
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// Once, at this instant (RFC 3339, e.g. 2026-11-26T08:00:00Z).
    #[arg(long, value_name = "T", value_parser = parse_instant, conflicts_with_all = ["every", "cron"])]
    pub at: Option<Timestamp>,
    /// Every period (250ms, 30s, 5m, 1h30m, 7d), counted from --anchor.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "cron")]
    pub every: Option<DurationMs>,
    /// The instant an --every schedule counts from (default: now).
    #[arg(long, value_name = "T", value_parser = parse_instant, requires = "every")]
    pub anchor: Option<Timestamp>,
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week)
    /// or 6 (seconds first), with Debian cron semantics.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// The IANA time zone a --cron schedule runs in.
    /// The IANA time zone a --cron schedule runs in [default: UTC].
    #[arg(long, value_name = "ZONE", requires = "cron")]
    pub tz: Option<String>,
}

impl ScheduleArgs {
    /// The schedule these flags describe; `now` is the default anchor.
    pub fn to_schedule(&self, now: Timestamp) -> Result<Schedule, String> {
        if let Some(at) = self.at {
            return Ok(Schedule::at(at));
        }
        if let Some(every) = self.every {
            return Schedule::every(every, self.anchor.unwrap_or(now))
                .map_err(|e| format!("--every: {e}"));
        }
        if let Some(expr) = &self.cron {
            return Schedule::cron(expr, self.tz_name()).map_err(|e| e.to_string());
        }
        Err("one of --at, --every or --cron is required".into())
    }

    /// The time zone to show local times in, if the schedule has one.
    pub fn zone(&self) -> Option<chrono_tz::Tz> {
        self.cron.as_ref()?;
        sundial_protocol::cron::parse_tz(self.tz_name()).ok()
    }

    fn tz_name(&self) -> &str {
        self.tz.as_deref().unwrap_or("UTC")
    }
}

/// Parses an RFC 3339 instant, or `now`.
pub fn parse_instant(s: &str) -> Result<Timestamp, String> {
    if s == "now" {
        return Ok(now());
    }
    Timestamp::parse(s).map_err(|e| e.to_string())
}

/// Parses a duration such as `1h30m`.
pub fn parse_duration(s: &str) -> Result<DurationMs, String> {
    DurationMs::parse(s).map_err(|e| e.to_string())
}

/// The system's wall clock.
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_millis_saturating(ms)
}

/// The next `count` occurrences after `from`.
pub fn next_occurrences(schedule: &Schedule, from: Timestamp, count: usize) -> Vec<Timestamp> {
    schedule.occurrences_after(from).take(count).collect()
}
