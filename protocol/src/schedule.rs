//! Schedules and their occurrence math, shared by agent and coordinator.
//!
//! One function, [`Schedule::next_after`], defines every occurrence of every
//! schedule; the agent fires exactly those and the coordinator expects
//! exactly those. An occurrence lies in the schedule's window
//! `[start, end)` when one is set.
//!
//! Invariant: a `Schedule` value is always valid (period >= 1 ms, window not
//! reversed, cron and zone parsed). Deserialization re-validates, so a
//! schedule from the wire is checked the same way as one typed by a user.

use std::fmt;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::cron::{parse_tz, CronError, CronExpr};
use crate::task::{Outcome, TaskId};
use crate::time::{DurationMs, Timestamp};

/// The most upstream tasks one triggered task waits for.
pub const TRIGGERS_MAX: usize = 16;

/// When a task fires.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ScheduleRepr", into = "ScheduleRepr")]
pub struct Schedule {
    kind: ScheduleKind,
    start: Option<Timestamp>,
    end: Option<Timestamp>,
}

/// The three kinds of schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Once, at an instant.
    At(Timestamp),
    /// Every `period`, at `anchor + k * period` for k >= 0.
    Every {
        period: DurationMs,
        anchor: Timestamp,
    },
    /// A cron expression in a time zone.
    Cron { expr: CronExpr, tz: Tz },
    /// Triggered, on the same agent, by the ends of other tasks' runs: an
    /// occurrence of each upstream (its `scheduled_at`) that ended, after
    /// its retries, as one of these asks is an occurrence of this task,
    /// with the same `scheduled_at`; with several upstreams (fan-in), when
    /// all of that occurrence have ended so. No occurrences by time.
    After(Vec<Trigger>),
}

/// One upstream of a triggered task: its run must end with one of `on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Trigger {
    pub upstream: TaskId,
    pub on: OutcomeSet,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.upstream, self.on)
    }
}

/// The outcomes a trigger accepts, as bits: `succeeded`; `failed` (also a
/// run that was rejected, or interrupted with no retry left: it ended
/// without success, not by a timeout); `timed_out`; `skipped`; `any`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct OutcomeSet(u8);

impl OutcomeSet {
    pub const SUCCEEDED: OutcomeSet = OutcomeSet(1);
    pub const FAILED: OutcomeSet = OutcomeSet(2);
    pub const TIMED_OUT: OutcomeSet = OutcomeSet(4);
    pub const SKIPPED: OutcomeSet = OutcomeSet(8);
    pub const ANY: OutcomeSet = OutcomeSet(15);
    const NAMES: [(&'static str, OutcomeSet); 4] = [
        ("succeeded", OutcomeSet::SUCCEEDED),
        ("failed", OutcomeSet::FAILED),
        ("timed_out", OutcomeSet::TIMED_OUT),
        ("skipped", OutcomeSet::SKIPPED),
    ];

    /// Whether a run that ended so fires the trigger.
    pub fn matches(self, outcome: Outcome) -> bool {
        let bit = match outcome {
            Outcome::Succeeded => OutcomeSet::SUCCEEDED,
            Outcome::Failed | Outcome::Rejected | Outcome::Interrupted => OutcomeSet::FAILED,
            Outcome::TimedOut => OutcomeSet::TIMED_OUT,
            Outcome::Skipped => OutcomeSet::SKIPPED,
        };
        self.0 & bit.0 != 0
    }

    /// `succeeded`, `failed,timed_out`, `any`, … (names joined by commas).
    pub fn parse(s: &str) -> Result<OutcomeSet, String> {
        let mut bits = 0u8;
        for word in s.split(',').map(str::trim) {
            if word == "any" {
                bits |= OutcomeSet::ANY.0;
                continue;
            }
            match OutcomeSet::NAMES.iter().find(|(n, _)| *n == word) {
                Some((_, set)) => bits |= set.0,
                None => {
                    return Err(format!(
                        "`{word}` is not an outcome to wait for (succeeded, failed, timed_out, skipped, any)"
                    ))
                }
            }
        }
        OutcomeSet::try_from(bits)
    }
}

impl TryFrom<u8> for OutcomeSet {
    type Error = String;
    fn try_from(bits: u8) -> Result<Self, Self::Error> {
        if bits == 0 || bits & !OutcomeSet::ANY.0 != 0 {
            return Err(format!("outcome set {bits:#x} is empty or unknown"));
        }
        Ok(OutcomeSet(bits))
    }
}

impl From<OutcomeSet> for u8 {
    fn from(s: OutcomeSet) -> u8 {
        s.0
    }
}

impl fmt::Display for OutcomeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == OutcomeSet::ANY {
            return f.write_str("any");
        }
        let names: Vec<&str> = OutcomeSet::NAMES
            .iter()
            .filter(|(_, b)| self.0 & b.0 != 0)
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

/// Why a schedule was refused; each names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("every: the period must be at least 1ms")]
    ZeroPeriod,
    #[error("window: end {end} is not after start {start}")]
    ReversedWindow { start: Timestamp, end: Timestamp },
    #[error(transparent)]
    Cron(#[from] CronError),
    #[error(
        "after: a triggered task waits for 1 to {TRIGGERS_MAX} upstream tasks, each once (got {0})"
    )]
    Triggers(String),
    #[error("after: a triggered task takes its occurrences from its upstreams; it has no window")]
    TriggerWindow,
}

impl Schedule {
    /// One occurrence at `at`.
    pub fn at(at: Timestamp) -> Schedule {
        Schedule {
            kind: ScheduleKind::At(at),
            start: None,
            end: None,
        }
    }

    /// Every `period` from `anchor`.
    pub fn every(period: DurationMs, anchor: Timestamp) -> Result<Schedule, ScheduleError> {
        if period.0 == 0 {
            return Err(ScheduleError::ZeroPeriod);
        }
        Ok(Schedule {
            kind: ScheduleKind::Every { period, anchor },
            start: None,
            end: None,
        })
    }

    /// A cron expression in the zone named `tz` (an IANA name, e.g. `UTC`).
    pub fn cron(expr: &str, tz: &str) -> Result<Schedule, ScheduleError> {
        let expr = CronExpr::parse(expr)?;
        let tz = parse_tz(tz)?;
        Ok(Schedule {
            kind: ScheduleKind::Cron { expr, tz },
            start: None,
            end: None,
        })
    }

    /// Triggered by the ends of upstream runs (see [`ScheduleKind::After`]).
    pub fn after(triggers: Vec<Trigger>) -> Result<Schedule, ScheduleError> {
        let mut ids: Vec<TaskId> = triggers.iter().map(|t| t.upstream).collect();
        ids.sort_unstable();
        ids.dedup();
        if triggers.is_empty() || triggers.len() > TRIGGERS_MAX || ids.len() != triggers.len() {
            let listed: Vec<String> = triggers.iter().map(Trigger::to_string).collect();
            return Err(ScheduleError::Triggers(format!("[{}]", listed.join(" "))));
        }
        Ok(Schedule {
            kind: ScheduleKind::After(triggers),
            start: None,
            end: None,
        })
    }

    /// The upstreams of a triggered task (empty for a schedule by time).
    pub fn triggers(&self) -> &[Trigger] {
        match &self.kind {
            ScheduleKind::After(t) => t,
            _ => &[],
        }
    }

    /// Restricts occurrences to `[start, end)`.
    pub fn with_window(
        mut self,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
    ) -> Result<Schedule, ScheduleError> {
        if matches!(self.kind, ScheduleKind::After(_)) && (start.is_some() || end.is_some()) {
            return Err(ScheduleError::TriggerWindow);
        }
        if let (Some(s), Some(e)) = (start, end) {
            if e <= s {
                return Err(ScheduleError::ReversedWindow { start: s, end: e });
            }
        }
        self.start = start;
        self.end = end;
        Ok(self)
    }

    pub fn kind(&self) -> &ScheduleKind {
        &self.kind
    }

    pub fn window(&self) -> (Option<Timestamp>, Option<Timestamp>) {
        (self.start, self.end)
    }

    /// The first occurrence strictly after `t`, or `None` when there is none
    /// (a past `at`, the window's end, or year 9999).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        // Occurrences start at `start`: search from just before it.
        let from = match self.start {
            Some(s) if s > t => s.saturating_add_ms(-1),
            _ => t,
        };
        let next = match &self.kind {
            ScheduleKind::At(at) => (*at > from).then_some(*at),
            ScheduleKind::Every { period, anchor } => {
                let p = period.as_millis_i64();
                if from < *anchor {
                    Some(*anchor)
                } else {
                    let k = from.millis_since(*anchor) / p + 1;
                    k.checked_mul(p).and_then(|d| anchor.checked_add_ms(d))
                }
            }
            ScheduleKind::Cron { expr, tz } => expr.next_after(*tz, from),
            ScheduleKind::After(_) => None,
        }?;
        match self.end {
            Some(end) if next >= end => None,
            _ => Some(next),
        }
    }

    /// The occurrences strictly after `t`, in order.
    pub fn occurrences_after(&self, t: Timestamp) -> Occurrences<'_> {
        Occurrences {
            schedule: self,
            cursor: Some(t),
        }
    }
}

/// Iterator over a schedule's occurrences; see [`Schedule::occurrences_after`].
#[derive(Debug, Clone)]
pub struct Occurrences<'a> {
    schedule: &'a Schedule,
    cursor: Option<Timestamp>,
}

impl Iterator for Occurrences<'_> {
    type Item = Timestamp;
    fn next(&mut self) -> Option<Timestamp> {
        let next = self.schedule.next_after(self.cursor?);
        self.cursor = next;
        next
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ScheduleKind::At(t) => write!(f, "at {t}")?,
            ScheduleKind::Every { period, anchor } => write!(f, "every {period} from {anchor}")?,
            ScheduleKind::Cron { expr, tz } => write!(f, "cron '{expr}' {tz}")?,
            ScheduleKind::After(t) => {
                let listed: Vec<String> = t.iter().map(Trigger::to_string).collect();
                write!(f, "after {}", listed.join(" "))?
            }
        }
        if let Some(s) = self.start {
            write!(f, " from {s}")?;
        }
        if let Some(e) = self.end {
            write!(f, " until {e}")?;
        }
        Ok(())
    }
}

/// The serialized form: plain data, validated on the way in.
#[derive(Serialize, Deserialize)]
enum ScheduleRepr {
    At {
        at: Timestamp,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
    },
    Every {
        period: DurationMs,
        anchor: Timestamp,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
    },
    Cron {
        expr: String,
        tz: String,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
    },
    /// New in 0.4: an older agent cannot decode it, so the coordinator
    /// sends triggered tasks only to agents that know them.
    After { after: Vec<Trigger> },
}

impl TryFrom<ScheduleRepr> for Schedule {
    type Error = ScheduleError;
    fn try_from(r: ScheduleRepr) -> Result<Self, Self::Error> {
        let (s, start, end) = match r {
            ScheduleRepr::At { at, start, end } => (Schedule::at(at), start, end),
            ScheduleRepr::Every {
                period,
                anchor,
                start,
                end,
            } => (Schedule::every(period, anchor)?, start, end),
            ScheduleRepr::Cron {
                expr,
                tz,
                start,
                end,
            } => (Schedule::cron(&expr, &tz)?, start, end),
            ScheduleRepr::After { after } => return Schedule::after(after),
        };
        s.with_window(start, end)
    }
}

impl From<Schedule> for ScheduleRepr {
    fn from(s: Schedule) -> Self {
        let (start, end) = (s.start, s.end);
        match s.kind {
            ScheduleKind::At(at) => ScheduleRepr::At { at, start, end },
            ScheduleKind::Every { period, anchor } => ScheduleRepr::Every {
                period,
                anchor,
                start,
                end,
            },
            ScheduleKind::Cron { expr, tz } => ScheduleRepr::Cron {
                expr: expr.as_str().to_owned(),
                tz: tz.name().to_owned(),
                start,
                end,
            },
            ScheduleKind::After(after) => ScheduleRepr::After { after },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_parse_match_and_travel() {
        let set = OutcomeSet::parse("failed,timed_out").expect("valid");
        assert!(set.matches(Outcome::Failed));
        assert!(set.matches(Outcome::Rejected));
        assert!(set.matches(Outcome::TimedOut));
        assert!(!set.matches(Outcome::Succeeded));
        assert!(!set.matches(Outcome::Skipped));
        assert_eq!(set.to_string(), "failed,timed_out");
        assert_eq!(OutcomeSet::parse("any").expect("valid"), OutcomeSet::ANY);
        assert!(OutcomeSet::parse("done").is_err());
        assert!(OutcomeSet::try_from(0u8).is_err());
        assert!(OutcomeSet::try_from(16u8).is_err());
        let s = Schedule::after(vec![
            Trigger {
                upstream: TaskId(1),
                on: OutcomeSet::SUCCEEDED,
            },
            Trigger {
                upstream: TaskId(2),
                on: OutcomeSet::ANY,
            },
        ])
        .expect("valid");
        assert_eq!(s.to_string(), "after t1:succeeded t2:any");
        assert_eq!(s.next_after(Timestamp::EPOCH), None);
        let bytes = postcard::to_allocvec(&s).expect("encodes");
        assert_eq!(
            postcard::from_bytes::<Schedule>(&bytes).expect("decodes"),
            s
        );
        let twice = Trigger {
            upstream: TaskId(1),
            on: OutcomeSet::ANY,
        };
        assert!(Schedule::after(vec![twice, twice]).is_err());
        assert!(Schedule::after(Vec::new()).is_err());
        assert_eq!(
            s.clone().with_window(Some(Timestamp::EPOCH), None),
            Err(ScheduleError::TriggerWindow)
        );
        // A duplicate from the wire is refused as one typed would be.
        let bad = ScheduleRepr::After {
            after: vec![twice, twice],
        };
        let bytes = postcard::to_allocvec(&bad).expect("encodes");
        assert!(postcard::from_bytes::<Schedule>(&bytes).is_err());
    }

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse(s).expect("valid test instant")
    }

    #[test]
    fn every_counts_from_its_anchor() {
        let s = Schedule::every(DurationMs(1500), ts("2026-01-01T00:00:00Z")).expect("valid");
        let got: Vec<String> = s
            .occurrences_after(ts("2025-12-31T00:00:00Z"))
            .take(3)
            .map(|t| t.to_string())
            .collect();
        assert_eq!(
            got,
            [
                "2026-01-01T00:00:00.000Z",
                "2026-01-01T00:00:01.500Z",
                "2026-01-01T00:00:03.000Z"
            ]
        );
        assert_eq!(
            s.next_after(ts("2026-01-01T00:00:01.500Z")),
            Some(ts("2026-01-01T00:00:03.000Z"))
        );
        assert_eq!(
            Schedule::every(DurationMs(0), ts("2026-01-01T00:00:00Z")),
            Err(ScheduleError::ZeroPeriod)
        );
    }

    #[test]
    fn window_is_half_open() {
        let s = Schedule::every(DurationMs(60_000), ts("2026-01-01T00:00:00Z"))
            .and_then(|s| {
                s.with_window(
                    Some(ts("2026-01-01T00:10:00Z")),
                    Some(ts("2026-01-01T00:12:00Z")),
                )
            })
            .expect("valid");
        let got: Vec<Timestamp> = s.occurrences_after(Timestamp::EPOCH).collect();
        assert_eq!(
            got,
            [ts("2026-01-01T00:10:00Z"), ts("2026-01-01T00:11:00Z")]
        );
        let reversed = Schedule::at(ts("2026-01-01T00:00:00Z")).with_window(
            Some(ts("2026-01-02T00:00:00Z")),
            Some(ts("2026-01-01T00:00:00Z")),
        );
        assert!(reversed
            .expect_err("reversed")
            .to_string()
            .contains("window"));
    }

    #[test]
    fn at_fires_once() {
        let s = Schedule::at(ts("2026-01-01T00:00:00Z"));
        let got: Vec<Timestamp> = s.occurrences_after(Timestamp::EPOCH).collect();
        assert_eq!(got, [ts("2026-01-01T00:00:00Z")]);
    }

    #[test]
    fn serialized_schedules_are_validated_again() {
        let s = Schedule::cron("30 2 * * *", "America/New_York").expect("valid");
        let bytes = postcard::to_allocvec(&s).expect("encodes");
        let back: Schedule = postcard::from_bytes(&bytes).expect("decodes");
        assert_eq!(back, s);
        let bad = ScheduleRepr::Cron {
            expr: "99 * * * *".into(),
            tz: "UTC".into(),
            start: None,
            end: None,
        };
        let bytes = postcard::to_allocvec(&bad).expect("encodes");
        assert!(postcard::from_bytes::<Schedule>(&bytes).is_err());
    }
}
