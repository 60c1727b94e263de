//! Cron expressions with the semantics of Debian (Vixie) cron, in any IANA
//! time zone.
//!
//! Fields: `[second] minute hour day-of-month month day-of-week`. Five fields
//! are a classic crontab line (seconds = 0); six add seconds in front. Each
//! field is a comma list of `*`, `N`, `N-M`, `*/S` or `N-M/S`; months and days
//! of week also take names (`JAN`, `MON`); 0 and 7 are Sunday. The macros
//! `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and
//! `@hourly` are accepted.
//!
//! Rules kept from Vixie cron, which operators' crontabs assume:
//! - Day-of-month and day-of-week combine with OR when both are restricted,
//!   and with AND when either field starts with `*` (so `*/2` makes it AND).
//! - A job is a *wildcard job* when its minute or hour field starts with `*`;
//!   every other job is a *fixed-time job* (Vixie's `MIN_STAR | HR_STAR`).
//! - Spring-forward gap: a fixed-time job whose local time does not exist fires
//!   once, at the end of the gap; wildcard jobs simply have no occurrences there.
//! - Fall-back overlap: a fixed-time job fires once, in the first pass; a
//!   wildcard job fires in both passes.
//!
//! Invariant: [`Cron::next_after`] returns instants strictly after its input,
//! in increasing order when iterated, and never more than one per instant.
//! The time-zone search assumes no zone changes its offset twice within
//! [`TRANSITION_PROBE_MS`] (true of every zone in the tz database).

use std::fmt;

use chrono::{Datelike, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike};
use chrono_tz::Tz;

use crate::time::Timestamp;

/// The step by which the search probes for an offset change. Offsets in the tz
/// database never change twice within a day.
pub const TRANSITION_PROBE_MS: i64 = 86_400_000;

/// A parsed cron expression (without its time zone).
#[derive(Clone, PartialEq, Eq)]
pub struct CronExpr {
    source: String,
    seconds: u64,
    minutes: u64,
    hours: u64,
    /// Bits 1..=31.
    days_of_month: u64,
    /// Bits 1..=12.
    months: u64,
    /// Bits 0..=6, Sunday = 0.
    days_of_week: u64,
    dom_star: bool,
    dow_star: bool,
    /// Vixie's `MIN_STAR | HR_STAR`: the job is a wildcard job.
    wildcard: bool,
}

/// Why a cron expression was refused. Shown to the operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("cron expression `{expr}` has {count} fields; expected 5 (minute hour day-of-month month day-of-week) or 6 (with seconds first)")]
    FieldCount { expr: String, count: usize },
    #[error("cron expression `{expr}`: {field} field `{text}`: {reason}")]
    Field {
        expr: String,
        field: &'static str,
        text: String,
        reason: String,
    },
    #[error("cron expression `{expr}`: unknown macro (use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)")]
    Macro { expr: String },
    #[error(
        "cron expression `{expr}` never fires: no month in it has the day of month it asks for"
    )]
    Never { expr: String },
    #[error(
        "unknown time zone `{0}` (expected an IANA name such as Europe/Berlin or America/New_York)"
    )]
    TimeZone(String),
}

struct FieldSpec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const SECOND: FieldSpec = FieldSpec {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
};
const MINUTE: FieldSpec = FieldSpec {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: FieldSpec = FieldSpec {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY_OF_MONTH: FieldSpec = FieldSpec {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: FieldSpec = FieldSpec {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
};
const DAY_OF_WEEK: FieldSpec = FieldSpec {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
};

fn bits_range(lo: u32, hi: u32) -> u64 {
    let mut b = 0u64;
    for v in lo..=hi {
        b |= 1 << v;
    }
    b
}

impl FieldSpec {
    fn parse_value(&self, text: &str) -> Result<u32, String> {
        if let Ok(v) = text.parse::<u32>() {
            if v < self.min || v > self.max {
                return Err(format!("value {v} out of range {}-{}", self.min, self.max));
            }
            return Ok(v);
        }
        let upper = text.to_ascii_uppercase();
        if let Some(i) = self.names.iter().position(|n| *n == upper) {
            // Names start at the field's minimum: JAN = 1, SUN = 0.
            return Ok(self.min + i as u32);
        }
        if self.names.is_empty() {
            Err(format!("`{text}` is not a number"))
        } else {
            Err(format!(
                "`{text}` is neither a number nor a name ({}..{})",
                self.names[0],
                self.names[self.names.len() - 1]
            ))
        }
    }

    /// Parses one field into a bitset; returns the set and whether the field
    /// starts with `*`.
    fn parse(&self, text: &str) -> Result<(u64, bool), String> {
        let mut bits = 0u64;
        for item in text.split(',') {
            if item.is_empty() {
                return Err("empty list item".to_owned());
            }
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step: u32 = s
                        .parse()
                        .map_err(|_| format!("step `{s}` is not a number"))?;
                    if step == 0 {
                        return Err("step 0 is not allowed".to_owned());
                    }
                    (r, step)
                }
                None => (item, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let lo = self.parse_value(a)?;
                let hi = self.parse_value(b)?;
                if lo > hi {
                    return Err(format!("range {a}-{b} runs backwards"));
                }
                (lo, hi)
            } else {
                let v = self.parse_value(range)?;
                if item.contains('/') {
                    // Vixie cron refuses `N/S`; say what to write instead.
                    return Err(format!(
                        "a step needs a range: write `{v}-{}/{step}` or `*/{step}`",
                        self.max
                    ));
                }
                (v, v)
            };
            let mut v = lo;
            while v <= hi {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok((bits, text.starts_with('*')))
    }
}

impl CronExpr {
    /// Parses a 5- or 6-field expression or a macro.
    pub fn parse(expr: &str) -> Result<CronExpr, CronError> {
        let trimmed = expr.trim();
        let expanded = if let Some(name) = trimmed.strip_prefix('@') {
            match name.to_ascii_lowercase().as_str() {
                "yearly" | "annually" => "0 0 1 1 *",
                "monthly" => "0 0 1 * *",
                "weekly" => "0 0 * * 0",
                "daily" | "midnight" => "0 0 * * *",
                "hourly" => "0 * * * *",
                _ => {
                    return Err(CronError::Macro {
                        expr: expr.to_owned(),
                    })
                }
            }
        } else {
            trimmed
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let specs: &[&FieldSpec] = match fields.len() {
            5 => &[&MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK],
            6 => &[&SECOND, &MINUTE, &HOUR, &DAY_OF_MONTH, &MONTH, &DAY_OF_WEEK],
            n => {
                return Err(CronError::FieldCount {
                    expr: expr.to_owned(),
                    count: n,
                })
            }
        };
        let mut parsed = Vec::with_capacity(6);
        for (spec, text) in specs.iter().zip(&fields) {
            let p = spec.parse(text).map_err(|reason| CronError::Field {
                expr: expr.to_owned(),
                field: spec.name,
                text: (*text).to_owned(),
                reason,
            })?;
            parsed.push(p);
        }
        let (seconds, rest) = if parsed.len() == 6 {
            (parsed[0].0, &parsed[1..])
        } else {
            (1, &parsed[..])
        };
        let mut dow = rest[4].0;
        if dow & (1 << 7) != 0 {
            dow = (dow | 1) & !(1 << 7);
        }
        let cron = CronExpr {
            source: trimmed.to_owned(),
            seconds,
            minutes: rest[0].0,
            hours: rest[1].0,
            days_of_month: rest[2].0,
            months: rest[3].0,
            days_of_week: dow,
            dom_star: rest[2].1,
            dow_star: rest[4].1,
            wildcard: rest[0].1 || rest[1].1,
        };
        if !cron.can_ever_match_a_day() {
            return Err(CronError::Never {
                expr: expr.to_owned(),
            });
        }
        Ok(cron)
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether this is a wildcard job in Vixie's sense (minute or hour starts
    /// with `*`), which decides its behaviour across DST changes.
    pub fn is_wildcard_job(&self) -> bool {
        self.wildcard
    }

    fn can_ever_match_a_day(&self) -> bool {
        if !(self.dom_star || self.dow_star) {
            return true; // OR with a restricted day-of-week always matches some day.
        }
        if self.days_of_week == 0 {
            return false;
        }
        const MONTH_DAYS: [u32; 13] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        (1..=12u32).any(|m| {
            self.months & (1 << m) != 0
                && self.days_of_month & bits_range(1, MONTH_DAYS[m as usize]) != 0
        })
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first local (naive) date-time at or after `from`, with whole
    /// seconds, that matches every field; `None` past year 9999.
    pub fn next_local_at_or_after(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        let mut dt = from.with_nanosecond(0)?;
        if dt < from {
            dt += chrono::Duration::seconds(1);
        }
        // Each pass either returns or moves `dt` forward to the next candidate
        // of a coarser field; the year bound ends the loop.
        loop {
            if dt.year() > 9999 {
                return None;
            }
            if self.months & (1 << dt.month()) == 0 {
                let next = next_bit(self.months, dt.month() + 1, 12);
                dt = match next {
                    Some(m) => NaiveDate::from_ymd_opt(dt.year(), m, 1)?,
                    None => NaiveDate::from_ymd_opt(dt.year() + 1, 1, 1)?,
                }
                .and_hms_opt(0, 0, 0)?;
                continue;
            }
            if !self.day_matches(dt.date()) {
                dt = dt.date().succ_opt()?.and_hms_opt(0, 0, 0)?;
                continue;
            }
            if self.hours & (1 << dt.hour()) == 0 {
                dt = match next_bit(self.hours, dt.hour() + 1, 23) {
                    Some(h) => dt.date().and_hms_opt(h, 0, 0)?,
                    None => dt.date().succ_opt()?.and_hms_opt(0, 0, 0)?,
                };
                continue;
            }
            if self.minutes & (1 << dt.minute()) == 0 {
                dt = match next_bit(self.minutes, dt.minute() + 1, 59) {
                    Some(m) => dt.date().and_hms_opt(dt.hour(), m, 0)?,
                    None => dt.date().and_hms_opt(dt.hour(), 0, 0)? + chrono::Duration::hours(1),
                };
                continue;
            }
            if self.seconds & (1 << dt.second()) == 0 {
                dt = match next_bit(self.seconds, dt.second() + 1, 59) {
                    Some(s) => dt.date().and_hms_opt(dt.hour(), dt.minute(), s)?,
                    None => {
                        dt.date().and_hms_opt(dt.hour(), dt.minute(), 0)?
                            + chrono::Duration::minutes(1)
                    }
                };
                continue;
            }
            return Some(dt);
        }
    }

    /// Whether any matching local time lies in `[from, to)`.
    fn any_local_in(&self, from: NaiveDateTime, to: NaiveDateTime) -> bool {
        self.next_local_at_or_after(from).is_some_and(|m| m < to)
    }

    /// The first occurrence strictly after `after` in zone `tz`, following the
    /// DST rules in the module doc; `None` past year 9999.
    pub fn next_after(&self, tz: Tz, after: Timestamp) -> Option<Timestamp> {
        let mut u = after.as_millis();
        // Each pass looks at one stretch of constant offset; zones change
        // offset at most a few times a year, so this ends quickly.
        loop {
            if u >= Timestamp::MAX.as_millis() {
                return None;
            }
            let offset = offset_ms(tz, u + 1);
            // Naive local time of instant `u`, under the offset in force just after it.
            let local_u = naive_from_ms(u + offset)?;
            let mut candidate =
                self.next_local_at_or_after(local_u + chrono::Duration::milliseconds(1))?;
            if !self.wildcard {
                // A fixed-time job fires in the first pass of a repeated hour only.
                while let LocalResult::Ambiguous(_, later) = tz.from_local_datetime(&candidate) {
                    if later.timestamp_millis() != naive_ms(candidate) - offset {
                        break;
                    }
                    candidate =
                        self.next_local_at_or_after(candidate + chrono::Duration::seconds(1))?;
                }
            }
            let c = naive_ms(candidate) - offset;
            match first_change_in(tz, u + 1, c, offset) {
                None => return Timestamp::from_millis(c).ok(),
                Some(change) => {
                    let new_offset_ms = offset_ms(tz, change);
                    if !self.wildcard && new_offset_ms > offset {
                        // Spring forward: local times in the gap do not exist;
                        // a fixed-time job due in it fires once at its end.
                        let gap_from = naive_from_ms(change + offset)?;
                        let gap_to = naive_from_ms(change + new_offset_ms)?;
                        if self.any_local_in(gap_from, gap_to) {
                            return Timestamp::from_millis(change).ok();
                        }
                    }
                    u = change - 1;
                }
            }
        }
    }
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronExpr({:?})", self.source)
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses an IANA zone name.
pub fn parse_tz(name: &str) -> Result<Tz, CronError> {
    name.trim()
        .parse::<Tz>()
        .map_err(|_| CronError::TimeZone(name.to_owned()))
}

fn next_bit(bits: u64, from: u32, max: u32) -> Option<u32> {
    if from > max {
        return None;
    }
    let shifted = bits >> from;
    if shifted == 0 {
        return None;
    }
    let v = from + shifted.trailing_zeros();
    (v <= max).then_some(v)
}

/// The zone's offset from UTC in force at instant `ms`.
fn offset_ms(tz: Tz, ms: i64) -> i64 {
    let naive = naive_from_ms(ms.clamp(Timestamp::MIN.as_millis(), Timestamp::MAX.as_millis()))
        .unwrap_or_default();
    i64::from(tz.offset_from_utc_datetime(&naive).fix().local_minus_utc()) * 1000
}

fn naive_from_ms(ms: i64) -> Option<NaiveDateTime> {
    chrono::DateTime::from_timestamp_millis(ms).map(|d| d.naive_utc())
}

fn naive_ms(n: NaiveDateTime) -> i64 {
    n.and_utc().timestamp_millis()
}

/// The first instant in `(from - 1, to]` whose offset differs from
/// `offset_ms`, if any. Probes in steps of [`TRANSITION_PROBE_MS`] and then
/// bisects to the second (tz transitions fall on whole seconds).
fn first_change_in(tz: Tz, from: i64, to: i64, offset: i64) -> Option<i64> {
    if to < from {
        return None;
    }
    let mut lo = from; // offset(lo) == offset is known
    loop {
        let probe = (lo + TRANSITION_PROBE_MS).min(to);
        if offset_ms(tz, probe) != offset {
            // Bisect in (lo, probe]: offset(lo) == offset, offset(hi) != offset.
            let mut hi = probe;
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if offset_ms(tz, mid) == offset {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            return Some(hi);
        }
        if probe >= to {
            return None;
        }
        lo = probe;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        Timestamp::parse(s).expect("valid test instant")
    }

    fn next_n(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        let cron = CronExpr::parse(expr).expect("valid expr");
        let tz = parse_tz(tz).expect("valid tz");
        let mut t = ts(from);
        let mut out = Vec::new();
        for _ in 0..n {
            t = cron.next_after(tz, t).expect("an occurrence");
            out.push(t.to_string());
        }
        out
    }

    #[test]
    fn refuses_bad_expressions_naming_the_field() {
        let cases = [
            ("* * * *", "4 fields"),
            (
                "61 * * * *",
                "minute field `61`: value 61 out of range 0-59",
            ),
            ("* 24 * * *", "hour field"),
            ("* * 0 * *", "day-of-month field"),
            ("* * * 13 *", "month field"),
            ("* * * * 8", "day-of-week field"),
            ("*/0 * * * *", "step 0"),
            ("5/10 * * * *", "a step needs a range"),
            ("* * * FOO *", "neither a number nor a name"),
            ("5-1 * * * *", "runs backwards"),
            ("0 0 30 2 *", "never fires"),
            ("@reboot", "unknown macro"),
            ("1,,2 * * * *", "empty list item"),
        ];
        for (expr, needle) in cases {
            let err = CronExpr::parse(expr).expect_err(expr).to_string();
            assert!(err.contains(needle), "{expr}: `{err}` lacks `{needle}`");
        }
        assert!(parse_tz("Mars/Olympus").is_err());
    }

    #[test]
    fn names_sunday_seven_and_macros() {
        let a = CronExpr::parse("0 9 * jan-mar Mon-FRI").expect("valid");
        let b = CronExpr::parse("0 9 * 1-3 1-5").expect("valid");
        assert_eq!(a.months, b.months);
        assert_eq!(a.days_of_week, b.days_of_week);
        assert_eq!(
            CronExpr::parse("0 0 * * 7").expect("valid").days_of_week,
            CronExpr::parse("0 0 * * 0").expect("valid").days_of_week
        );
        assert_eq!(
            next_n("@daily", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2026-01-02T00:00:00.000Z", "2026-01-03T00:00:00.000Z"]
        );
    }

    #[test]
    fn day_of_month_and_week_use_or_when_both_restricted() {
        // 2026-03-01 is a Sunday. `0 0 13 * 5`: the 13th OR any Friday.
        assert_eq!(
            next_n("0 0 13 * 5", "UTC", "2026-03-01T00:00:00Z", 4),
            [
                "2026-03-06T00:00:00.000Z",
                "2026-03-13T00:00:00.000Z",
                "2026-03-20T00:00:00.000Z",
                "2026-03-27T00:00:00.000Z"
            ]
        );
        // `*/2` in day-of-month starts with `*`, so the fields AND: odd days that are Fridays.
        assert_eq!(
            next_n("0 0 */2 * 5", "UTC", "2026-03-01T00:00:00Z", 2),
            ["2026-03-13T00:00:00.000Z", "2026-03-27T00:00:00.000Z"]
        );
        // `1-31` does not start with `*`: OR with Mondays gives every day.
        assert_eq!(
            next_n("0 0 1-31 * 1", "UTC", "2026-03-01T00:00:00Z", 2),
            ["2026-03-02T00:00:00.000Z", "2026-03-03T00:00:00.000Z"]
        );
    }

    #[test]
    fn six_fields_fire_on_seconds() {
        assert_eq!(
            next_n("*/20 * * * * *", "UTC", "2026-01-01T00:00:00.500Z", 3),
            [
                "2026-01-01T00:00:20.000Z",
                "2026-01-01T00:00:40.000Z",
                "2026-01-01T00:01:00.000Z"
            ]
        );
    }

    #[test]
    fn leap_day_is_found_years_ahead() {
        assert_eq!(
            next_n("0 12 29 2 *", "UTC", "2026-03-01T00:00:00Z", 2),
            ["2028-02-29T12:00:00.000Z", "2032-02-29T12:00:00.000Z"]
        );
    }
}
