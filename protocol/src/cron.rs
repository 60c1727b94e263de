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
    #[error("cron expression `{expr}`: {}", fields_text(.errors))]
    Fields {
        expr: String,
        /// Every field that was refused: (field, text, reason).
        errors: Vec<(&'static str, String, String)>,
    },
    #[error("cron expression `{expr}`: unknown macro (use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)")]
    Macro { expr: String },
    /// A form of another cron dialect that has no meaning here.
    #[error("cron expression `{expr}`: {reason}")]
    Dialect { expr: String, reason: String },
    #[error(
        "cron expression `{expr}` never fires: no month in it has the day of month it asks for"
    )]
    Never { expr: String },
    #[error(
        "unknown time zone `{0}` (expected an IANA name such as Europe/Berlin or America/New_York)"
    )]
    TimeZone(String),
}

fn fields_text(errors: &[(&'static str, String, String)]) -> String {
    errors
        .iter()
        .map(|(field, text, reason)| format!("{field} field `{text}`: {reason}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// What another dialect means by `text` in `field`, and what to write
/// here instead; `None` when it is no dialect's form.
fn dialect_hint(field: &str, text: &str) -> Option<String> {
    let upper = text.to_ascii_uppercase();
    if upper == "H" || upper.starts_with("H(") || upper.starts_with("H/") {
        return Some(
            "Jenkins' `H` (a value hashed from the job's name) is not supported: write a fixed value, e.g. `17`"
                .into(),
        );
    }
    if upper.contains('#') {
        return Some(
            "Quartz's `#` (the Nth weekday of the month) is not supported: list the days of month it can fall on with the weekday, e.g. `8-14` and `MON` for the second Monday, in two tasks or with a check in the program"
                .into(),
        );
    }
    let digits_then = |suffix: &str| {
        upper
            .strip_suffix(suffix)
            .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
    };
    if upper == "L" || upper == "LW" || upper.starts_with("L-") || digits_then("L") {
        return Some(format!(
            "Quartz's `L` (the last day) is not supported in the {field} field: for the last day of the month, run on days `28-31` and let the program check that tomorrow is the 1st"
        ));
    }
    if digits_then("W") {
        return Some(
            "Quartz's `W` (the nearest weekday) is not supported: name the days, e.g. `1-3` with `MON-FRI`"
                .into(),
        );
    }
    None
}

/// `CRON_TZ=Zone` or `TZ=Zone` in front of an expression, as crontabs and
/// Kubernetes write it: the zone, and the expression after it.
pub fn split_tz_prefix(expr: &str) -> (Option<&str>, &str) {
    let trimmed = expr.trim_start();
    for prefix in ["CRON_TZ=", "TZ="] {
        if let Some(rest) = trimmed.strip_prefix(prefix) {
            let (zone, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            return (Some(zone), tail.trim_start());
        }
    }
    (None, expr)
}

/// `N/S` (a step without a range), read as `N-max/S` as Vixie's successors
/// and Quartz do; other items unchanged.
fn widen_step(item: &str, max: u32) -> String {
    match item.split_once('/') {
        Some((start, step)) if !start.is_empty() && start != "*" && !start.contains('-') => {
            format!("{start}-{max}/{step}")
        }
        _ => item.to_owned(),
    }
}

/// A Quartz day-of-week field (1 = Sunday … 7 = Saturday) in our numbers
/// (0 = Sunday … 6 = Saturday); names and steps are unchanged.
fn quartz_days(text: &str) -> Result<String, String> {
    let shift = |v: &str| -> Result<String, String> {
        match v.parse::<u32>() {
            Ok(n @ 1..=7) => Ok((n - 1).to_string()),
            Ok(n) => Err(format!(
                "value {n} out of range 1-7 (Quartz numbers days 1 = Sunday to 7 = Saturday)"
            )),
            Err(_) => Ok(v.to_owned()),
        }
    };
    let items: Result<Vec<String>, String> = text
        .split(',')
        .map(|item| {
            let (range, step) = match item.split_once('/') {
                Some((r, st)) => (r, Some(st)),
                None => (item, None),
            };
            let range = match range.split_once('-') {
                Some((a, b)) => format!("{}-{}", shift(a)?, shift(b)?),
                None if range == "*" => range.to_owned(),
                None => shift(range)?,
            };
            Ok(match step {
                Some(st) => format!("{range}/{st}"),
                None => range,
            })
        })
        .collect();
    Ok(items?.join(","))
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
        if let Some(hint) = dialect_hint(self.name, text) {
            return Err(hint);
        }
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
        CronExpr::parse_noted(expr).map(|(c, _)| c)
    }

    /// Parses as [`parse`](Self::parse) does, with what the operator should
    /// know of how a form of another dialect was read (Quartz's `?`, its
    /// seven fields and day numbers; `N/S` steps). Such forms are rewritten
    /// into this dialect, and [`as_str`](Self::as_str) gives the rewrite, so
    /// an agent of any version reads the expression the same way. Every
    /// refused field is reported, not only the first.
    pub fn parse_noted(expr: &str) -> Result<(CronExpr, Vec<String>), CronError> {
        let trimmed = expr.trim();
        let dialect = |reason: String| CronError::Dialect {
            expr: expr.to_owned(),
            reason,
        };
        let expanded = if let Some(name) = trimmed.strip_prefix('@') {
            let lower = name.to_ascii_lowercase();
            match lower.split_whitespace().next().unwrap_or("") {
                "yearly" | "annually" => "0 0 1 1 *",
                "monthly" => "0 0 1 * *",
                "weekly" => "0 0 * * 0",
                "daily" | "midnight" => "0 0 * * *",
                "hourly" => "0 * * * *",
                "every" => {
                    return Err(dialect(
                        "`@every DUR` is a period, not a cron expression: use --every DUR".into(),
                    ))
                }
                "reboot" => {
                    return Err(dialect(
                        "`@reboot` has no meaning here: Sundial fires on time, not at boot; run the program from a systemd unit instead"
                            .into(),
                    ))
                }
                _ => {
                    return Err(CronError::Macro {
                        expr: expr.to_owned(),
                    })
                }
            }
        } else {
            trimmed
        };
        let mut notes = Vec::new();
        let mut rewritten = false;
        // AWS EventBridge writes `cron(…)` around its expressions.
        let expanded = match expanded
            .strip_prefix("cron(")
            .and_then(|e| e.strip_suffix(')'))
        {
            Some(inner) => {
                rewritten = true;
                inner
            }
            None => expanded,
        };
        let mut fields: Vec<String> = expanded.split_whitespace().map(str::to_owned).collect();
        // Quartz: seconds first, an optional year last, `?` for "no value".
        let mut quartz = fields.iter().any(|f| f.contains('?'));
        // AWS EventBridge: six fields, minutes first and a year last, `?`
        // in day-of-month or day-of-week (the third or fifth field, where
        // Quartz's six fields never have one).
        if fields.len() == 6 && (fields[2] == "?" || fields[4] == "?") {
            let year = fields.pop().unwrap_or_default();
            if year != "*" {
                return Err(dialect(format!(
                    "a year field (`{year}`, AWS EventBridge's sixth) is not supported: use --start and --end for the years it should run in"
                )));
            }
            rewritten = true;
            notes.push(
                "read as AWS EventBridge: minutes first, a year last (`*`, dropped); day-of-week numbers as Quartz's (1 = Sunday)"
                    .into(),
            );
        } else if fields.len() == 7 {
            let year = fields.pop().unwrap_or_default();
            if year != "*" && year != "?" {
                return Err(dialect(format!(
                    "a year field (`{year}`, Quartz's seventh) is not supported: use --start and --end for the years it should run in"
                )));
            }
            quartz = true;
            rewritten = true;
            notes.push("read as Quartz: seconds first; the year field `*` dropped".into());
        }
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
        let mut errors: Vec<(&'static str, String, String)> = Vec::new();
        let mut parsed = Vec::with_capacity(6);
        for (spec, text) in specs.iter().zip(fields.iter_mut()) {
            let original = text.clone();
            let is_day = spec.name == DAY_OF_MONTH.name || spec.name == DAY_OF_WEEK.name;
            if text.contains('?') {
                if text == "?" && is_day {
                    *text = "*".into();
                    rewritten = true;
                } else {
                    errors.push((
                        spec.name,
                        original,
                        "`?` (Quartz's \"no specific value\") stands alone, in day-of-month or day-of-week only".into(),
                    ));
                    parsed.push((0, false));
                    continue;
                }
            }
            if quartz && spec.name == DAY_OF_WEEK.name && text.chars().any(|c| c.is_ascii_digit()) {
                match quartz_days(text) {
                    Ok(ours) => {
                        if ours != *text {
                            notes.push(format!(
                                "day-of-week `{original}` read with Quartz's numbers (1 = Sunday … 7 = Saturday): `{ours}` here (0 = Sunday); names such as MON-FRI mean the same in both"
                            ));
                            *text = ours;
                            rewritten = true;
                        }
                    }
                    Err(reason) => {
                        errors.push((spec.name, original, reason));
                        parsed.push((0, false));
                        continue;
                    }
                }
            }
            let widened: Vec<String> = text
                .split(',')
                .map(|i| {
                    widen_step(
                        i,
                        spec.max.min(if spec.name == DAY_OF_WEEK.name {
                            6
                        } else {
                            spec.max
                        }),
                    )
                })
                .collect();
            let widened = widened.join(",");
            if widened != *text {
                notes.push(format!(
                    "{} `{original}` read as `{widened}` (a step from a value runs to the field's end)",
                    spec.name
                ));
                *text = widened;
                rewritten = true;
            }
            match spec.parse(text) {
                Ok(p) => parsed.push(p),
                Err(reason) => {
                    errors.push((spec.name, original, reason));
                    parsed.push((0, false));
                }
            }
        }
        match errors.len() {
            0 => {}
            1 => {
                let (field, text, reason) = errors.remove(0);
                return Err(CronError::Field {
                    expr: expr.to_owned(),
                    field,
                    text,
                    reason,
                });
            }
            _ => {
                return Err(CronError::Fields {
                    expr: expr.to_owned(),
                    errors,
                })
            }
        }
        let source = if rewritten {
            fields.join(" ")
        } else {
            trimmed.to_owned()
        };
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
            source,
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
        Ok((cron, notes))
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
            ("5/10 * * * ?x", "stands alone"),
            ("* * * FOO *", "neither a number nor a name"),
            ("5-1 * * * *", "runs backwards"),
            ("0 0 30 2 *", "never fires"),
            ("@reboot", "not at boot"),
            ("@fortnightly", "unknown macro"),
            ("@every 5m", "use --every"),
            ("H * * * *", "Jenkins"),
            ("0 0 L * ?", "Quartz's `L`"),
            ("0 0 15W * ?", "Quartz's `W`"),
            ("0 0 ? * 6#3", "Quartz's `#`"),
            ("0 0 0 ? * MON 2027", "year field"),
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

    #[test]
    fn a_step_from_a_value_runs_to_the_end_of_its_field() {
        let (c, notes) = CronExpr::parse_noted("0/5 1/6 * * *").expect("valid");
        let plain = CronExpr::parse("0-59/5 1-23/6 * * *").expect("valid");
        assert_eq!((c.minutes, c.hours), (plain.minutes, plain.hours));
        assert_eq!(
            c.as_str(),
            "0-59/5 1-23/6 * * *",
            "agents get the plain form"
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
        // Days of week stop at Saturday: `1/2` is Monday, Wednesday, Friday.
        let d = CronExpr::parse("0 0 * * 1/2").expect("valid");
        assert_eq!(
            d.days_of_week,
            CronExpr::parse("0 0 * * 1,3,5").expect("v").days_of_week
        );
    }

    #[test]
    fn quartz_forms_read_as_quartz_documents_them() {
        // The examples of Quartz's CronTrigger tutorial, from a Sunday.
        let from = "2026-03-01T00:00:00Z";
        assert_eq!(
            next_n("0 0 12 * * ?", "UTC", from, 2),
            ["2026-03-01T12:00:00.000Z", "2026-03-02T12:00:00.000Z"]
        );
        assert_eq!(
            next_n("0 15 10 ? * *", "UTC", from, 1),
            ["2026-03-01T10:15:00.000Z"]
        );
        // Every 5 minutes from 14:00 to 14:55.
        let fives = next_n("0 0/5 14 * * ?", "UTC", from, 13);
        assert_eq!(fives[0], "2026-03-01T14:00:00.000Z");
        assert_eq!(fives[11], "2026-03-01T14:55:00.000Z");
        assert_eq!(fives[12], "2026-03-02T14:00:00.000Z");
        // Weekdays at 10:15: Monday the 2nd first.
        assert_eq!(
            next_n("0 15 10 ? * MON-FRI", "UTC", from, 1),
            ["2026-03-02T10:15:00.000Z"]
        );
        // 8:00, 8:30, 9:00, 9:30 on the 5th and the 20th.
        assert_eq!(
            next_n("0 0/30 8-9 5,20 * ?", "UTC", from, 5),
            [
                "2026-03-05T08:00:00.000Z",
                "2026-03-05T08:30:00.000Z",
                "2026-03-05T09:00:00.000Z",
                "2026-03-05T09:30:00.000Z",
                "2026-03-20T08:00:00.000Z"
            ]
        );
        // Seven fields with a year of `*`.
        assert_eq!(
            next_n("0 11 11 11 11 ? *", "UTC", from, 1),
            ["2026-11-11T11:11:00.000Z"]
        );
        // Quartz numbers days from 1 = Sunday: 2 is Monday, and it says so.
        let (c, notes) = CronExpr::parse_noted("0 0 12 ? * 2").expect("valid");
        assert_eq!(c.days_of_week, 1 << 1);
        assert!(notes.iter().any(|n| n.contains("Quartz")), "{notes:?}");
        assert_eq!(c.as_str(), "0 0 12 * * 1");
        // `?` in a field other than the days is refused.
        assert!(CronExpr::parse("? * * * *").is_err());
    }

    #[test]
    fn aws_eventbridge_forms_read_as_its_documentation_says() {
        // Examples of EventBridge's cron expressions (minutes first, a year
        // last), from Sunday 2026-03-01.
        let from = "2026-03-01T00:00:00Z";
        assert_eq!(
            next_n("0 10 * * ? *", "UTC", from, 2),
            ["2026-03-01T10:00:00.000Z", "2026-03-02T10:00:00.000Z"]
        );
        assert_eq!(
            next_n("cron(15 12 * * ? *)", "UTC", from, 1),
            ["2026-03-01T12:15:00.000Z"]
        );
        assert_eq!(
            next_n("0 18 ? * MON-FRI *", "UTC", from, 1),
            ["2026-03-02T18:00:00.000Z"]
        );
        assert_eq!(
            next_n("0 8 1 * ? *", "UTC", from, 2),
            ["2026-03-01T08:00:00.000Z", "2026-04-01T08:00:00.000Z"]
        );
        assert_eq!(
            next_n("0/15 * * * ? *", "UTC", from, 2),
            ["2026-03-01T00:15:00.000Z", "2026-03-01T00:30:00.000Z"]
        );
        let fives = next_n("0/5 8-17 ? * MON-FRI *", "UTC", from, 121);
        assert_eq!(fives[0], "2026-03-02T08:00:00.000Z");
        assert_eq!(fives[119], "2026-03-02T17:55:00.000Z");
        assert_eq!(fives[120], "2026-03-03T08:00:00.000Z");
        // Day numbers as Quartz's: 1 is Sunday.
        let (c, notes) = CronExpr::parse_noted("0 2 ? * 1 *").expect("valid");
        assert_eq!(c.as_str(), "0 2 * * 0");
        assert!(notes.iter().any(|n| n.contains("AWS")), "{notes:?}");
        // A year is refused, saying what to use instead.
        let err = CronExpr::parse("0 2 ? * SUN 2027").expect_err("a year");
        assert!(err.to_string().contains("--start"), "{err}");
    }

    #[test]
    fn every_refused_field_is_reported_and_a_zone_prefix_is_split_off() {
        let err = CronExpr::parse("61 25 * * 9")
            .expect_err("three bad fields")
            .to_string();
        for needle in [
            "minute field `61`",
            "hour field `25`",
            "day-of-week field `9`",
        ] {
            assert!(err.contains(needle), "`{err}` lacks `{needle}`");
        }
        assert_eq!(
            split_tz_prefix("CRON_TZ=Europe/Berlin 0 5 * * *"),
            (Some("Europe/Berlin"), "0 5 * * *")
        );
        assert_eq!(split_tz_prefix("TZ=UTC @daily"), (Some("UTC"), "@daily"));
        assert_eq!(split_tz_prefix("0 5 * * *"), (None, "0 5 * * *"));
    }
}
