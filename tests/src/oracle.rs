//! Expected occurrences by brute force, independent of the scheduler's
//! `next_after`: an `at` is its instant; an `every` steps from its anchor
//! one period at a time; cron walks UTC minutes through Vixie cron's loop
//! (Debian's semantics across DST). The simulator's checks and the cron
//! property test take their expectations from here.

use chrono::{LocalResult, Offset, TimeZone};
use sundial_protocol::cron::CronExpr;
use sundial_protocol::{Schedule, ScheduleKind, Timestamp};

/// The occurrences of `schedule` in `[from, to]`, within its window.
pub fn occurrences(schedule: &Schedule, from: Timestamp, to: Timestamp) -> Vec<Timestamp> {
    let (start, end) = schedule.window();
    let in_window = |t: Timestamp| start.is_none_or(|s| t >= s) && end.is_none_or(|e| t < e);
    let all = match schedule.kind() {
        ScheduleKind::At(at) => vec![*at]
            .into_iter()
            .filter(|t| *t >= from && *t <= to)
            .collect(),
        ScheduleKind::Every { period, anchor } => {
            let p = period.as_millis_i64().max(1);
            let mut out = Vec::new();
            let mut t = anchor.as_millis();
            while t <= to.as_millis() {
                if t >= from.as_millis() {
                    out.push(Timestamp::from_millis_saturating(t));
                }
                t += p;
            }
            out
        }
        ScheduleKind::Cron { expr, tz } => {
            let from_min = from.as_millis().div_euclid(60_000)
                + i64::from(from.as_millis().rem_euclid(60_000) != 0);
            cron_minutes(expr, *tz, from_min, to.as_millis().div_euclid(60_000) + 1)
        }
        // A triggered task has no occurrences of its own by time: they are
        // its upstreams' (the checks derive them from the records).
        ScheduleKind::After(_) => Vec::new(),
    };
    all.into_iter().filter(|t| in_window(*t)).collect()
}

/// Vixie cron's loop, minute by minute: at each UTC minute in
/// `[from_min, to_min)`, a wildcard job fires if local time matches; a
/// fixed-time job fires if local time matches and this is not the second
/// pass of a repeated time; after a forward jump, fixed-time jobs due in
/// the skipped local minutes fire once at the jump.
pub fn cron_minutes(
    expr: &CronExpr,
    tz: chrono_tz::Tz,
    from_min: i64,
    to_min: i64,
) -> Vec<Timestamp> {
    let naive = |m: i64| chrono::DateTime::from_timestamp(m * 60, 0).map(|d| d.naive_utc());
    let off = |m: i64| -> i64 {
        naive(m).map_or(0, |utc| {
            i64::from(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc()) / 60
        })
    };
    let matches = |local_min: i64| -> bool {
        naive(local_min).is_some_and(|n| expr.next_local_at_or_after(n) == Some(n))
    };
    let mut out = Vec::new();
    for m in from_min..to_min {
        let (prev, cur) = (off(m - 1), off(m));
        let local = m + cur;
        let mut fire = false;
        if cur > prev && !expr.is_wildcard_job() {
            // The skipped local minutes [m + prev, m + cur).
            fire |= (m + prev..m + cur).any(matches);
        }
        if matches(local) {
            if expr.is_wildcard_job() {
                fire = true;
            } else if let Some(n) = naive(local) {
                let second_pass = matches!(
                    tz.from_local_datetime(&n),
                    LocalResult::Ambiguous(_, later) if later.timestamp() == m * 60
                );
                fire |= !second_pass;
            }
        }
        if fire {
            out.push(Timestamp::from_millis_saturating(m * 60_000));
        }
    }
    out
}

/// The first instant after `after_ms` at which `tz` changes its offset
/// (searched hour by hour for up to a year, then to the minute).
pub fn next_transition(tz: chrono_tz::Tz, after_ms: i64) -> Option<i64> {
    let off = |ms: i64| -> Option<i32> {
        let utc = chrono::DateTime::from_timestamp_millis(ms)?.naive_utc();
        Some(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc())
    };
    let first = off(after_ms)?;
    let hour = 3_600_000;
    let mut t = after_ms;
    for _ in 0..(366 * 24) {
        let next = t + hour;
        if off(next)? != first {
            // Between t and next: to the minute.
            let (mut lo, mut hi) = (t, next);
            while hi - lo > 60_000 {
                let mid = lo + (hi - lo) / 2;
                if off(mid)? == first {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            return Some(hi - hi.rem_euclid(60_000));
        }
        t = next;
    }
    None
}
