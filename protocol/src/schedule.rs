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
use crate::time::{DurationMs, Timestamp};

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

    /// Restricts occurrences to `[start, end)`.
    pub fn with_window(
        mut self,
        start: Option<Timestamp>,
        end: Option<Timestamp>,
    ) -> Result<Schedule, ScheduleError> {
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
