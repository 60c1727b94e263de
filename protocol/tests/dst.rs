//! Cron across DST matches Debian (Vixie) cron: gaps, overlaps, half-hour
//! shifts, and a minute-by-minute model of Vixie's loop as the oracle.

use chrono::{LocalResult, Offset, TimeZone};
use proptest::prelude::*;
use sundial_protocol::cron::{parse_tz, CronExpr};
use sundial_protocol::Timestamp;

fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).expect("valid test instant")
}

fn next_n(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
    let cron = CronExpr::parse(expr).expect("valid expr");
    let tz = parse_tz(tz).expect("valid tz");
    let mut t = ts(from);
    (0..n)
        .map(|_| {
            t = cron.next_after(tz, t).expect("an occurrence");
            t.to_string()
        })
        .collect()
}

#[test]
fn new_york_spring_forward() {
    // 2026-03-08 02:00 EST (07:00Z) jumps to 03:00 EDT.
    assert_eq!(
        next_n("30 2 * * *", "America/New_York", "2026-03-07T00:00:00Z", 3),
        [
            "2026-03-07T07:30:00.000Z",
            "2026-03-08T07:00:00.000Z",
            "2026-03-09T06:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n("30 1 * * *", "America/New_York", "2026-03-07T00:00:00Z", 3),
        [
            "2026-03-07T06:30:00.000Z",
            "2026-03-08T06:30:00.000Z",
            "2026-03-09T05:30:00.000Z"
        ]
    );
    // Wildcard job: no occurrences in the gap, none doubled after it.
    assert_eq!(
        next_n(
            "*/15 * * * *",
            "America/New_York",
            "2026-03-08T06:40:00Z",
            3
        ),
        [
            "2026-03-08T06:45:00.000Z",
            "2026-03-08T07:00:00.000Z",
            "2026-03-08T07:15:00.000Z"
        ]
    );
    // Two fixed times in the gap still fire once, at its end.
    assert_eq!(
        next_n(
            "0,30 2 * * *",
            "America/New_York",
            "2026-03-08T06:00:00Z",
            2
        ),
        ["2026-03-08T07:00:00.000Z", "2026-03-09T06:00:00.000Z"]
    );
}

#[test]
fn new_york_fall_back() {
    // 2026-11-01 02:00 EDT (06:00Z) falls back to 01:00 EST.
    assert_eq!(
        next_n("30 2 * * *", "America/New_York", "2026-10-31T00:00:00Z", 3),
        [
            "2026-10-31T06:30:00.000Z",
            "2026-11-01T07:30:00.000Z",
            "2026-11-02T07:30:00.000Z"
        ]
    );
    // Fixed time in the repeated hour: first pass only.
    assert_eq!(
        next_n("30 1 * * *", "America/New_York", "2026-10-31T00:00:00Z", 3),
        [
            "2026-10-31T05:30:00.000Z",
            "2026-11-01T05:30:00.000Z",
            "2026-11-02T06:30:00.000Z"
        ]
    );
    // Wildcard hour: both passes.
    assert_eq!(
        next_n(
            "*/15 * * * *",
            "America/New_York",
            "2026-11-01T05:40:00Z",
            6
        ),
        [
            "2026-11-01T05:45:00.000Z",
            "2026-11-01T06:00:00.000Z",
            "2026-11-01T06:15:00.000Z",
            "2026-11-01T06:30:00.000Z",
            "2026-11-01T06:45:00.000Z",
            "2026-11-01T07:00:00.000Z"
        ]
    );
    // Vixie counts a `*` minute as wildcard too (MIN_STAR): both passes of 01:xx.
    assert_eq!(
        next_n(
            "*/30 1 * * *",
            "America/New_York",
            "2026-11-01T04:59:00Z",
            5
        ),
        [
            "2026-11-01T05:00:00.000Z",
            "2026-11-01T05:30:00.000Z",
            "2026-11-01T06:00:00.000Z",
            "2026-11-01T06:30:00.000Z",
            "2026-11-02T06:00:00.000Z"
        ]
    );
}

#[test]
fn berlin_spring_forward_and_fall_back() {
    // 2026-03-29 02:00 CET (01:00Z) -> 03:00 CEST; 2026-10-25 03:00 CEST (01:00Z) -> 02:00 CET.
    assert_eq!(
        next_n("30 2 * * *", "Europe/Berlin", "2026-03-28T00:00:00Z", 3),
        [
            "2026-03-28T01:30:00.000Z",
            "2026-03-29T01:00:00.000Z",
            "2026-03-30T00:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n("30 1 * * *", "Europe/Berlin", "2026-03-28T00:00:00Z", 3),
        [
            "2026-03-28T00:30:00.000Z",
            "2026-03-29T00:30:00.000Z",
            "2026-03-29T23:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n("30 2 * * *", "Europe/Berlin", "2026-10-24T00:00:00Z", 3),
        [
            "2026-10-24T00:30:00.000Z",
            "2026-10-25T00:30:00.000Z",
            "2026-10-26T01:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n("30 1 * * *", "Europe/Berlin", "2026-10-24T00:00:00Z", 3),
        [
            "2026-10-24T23:30:00.000Z",
            "2026-10-26T00:30:00.000Z",
            "2026-10-27T00:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n("*/15 * * * *", "Europe/Berlin", "2026-10-25T00:40:00Z", 3),
        [
            "2026-10-25T00:45:00.000Z",
            "2026-10-25T01:00:00.000Z",
            "2026-10-25T01:15:00.000Z"
        ]
    );
    assert_eq!(
        next_n("*/15 * * * *", "Europe/Berlin", "2026-03-29T00:40:00Z", 3),
        [
            "2026-03-29T00:45:00.000Z",
            "2026-03-29T01:00:00.000Z",
            "2026-03-29T01:15:00.000Z"
        ]
    );
}

#[test]
fn lord_howe_half_hour_shifts() {
    // 2026-04-05 02:00 +11 (04-04T15:00Z) -> 01:30 +10:30;
    // 2026-10-04 02:00 +10:30 (10-03T15:30Z) -> 02:30 +11.
    assert_eq!(
        next_n(
            "30 1 * * *",
            "Australia/Lord_Howe",
            "2026-04-03T00:00:00Z",
            3
        ),
        [
            "2026-04-03T14:30:00.000Z",
            "2026-04-04T14:30:00.000Z",
            "2026-04-05T15:00:00.000Z"
        ]
    );
    assert_eq!(
        next_n(
            "30 2 * * *",
            "Australia/Lord_Howe",
            "2026-04-03T00:00:00Z",
            3
        ),
        [
            "2026-04-03T15:30:00.000Z",
            "2026-04-04T16:00:00.000Z",
            "2026-04-05T16:00:00.000Z"
        ]
    );
    assert_eq!(
        next_n(
            "*/15 * * * *",
            "Australia/Lord_Howe",
            "2026-04-04T14:20:00Z",
            5
        ),
        [
            "2026-04-04T14:30:00.000Z",
            "2026-04-04T14:45:00.000Z",
            "2026-04-04T15:00:00.000Z",
            "2026-04-04T15:15:00.000Z",
            "2026-04-04T15:30:00.000Z"
        ]
    );
    // Spring: 02:00..02:30 does not exist; 02:30 itself does.
    assert_eq!(
        next_n(
            "30 2 * * *",
            "Australia/Lord_Howe",
            "2026-10-02T00:00:00Z",
            3
        ),
        [
            "2026-10-02T16:00:00.000Z",
            "2026-10-03T15:30:00.000Z",
            "2026-10-04T15:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n(
            "30 1 * * *",
            "Australia/Lord_Howe",
            "2026-10-02T00:00:00Z",
            3
        ),
        [
            "2026-10-02T15:00:00.000Z",
            "2026-10-03T15:00:00.000Z",
            "2026-10-04T14:30:00.000Z"
        ]
    );
    assert_eq!(
        next_n(
            "15 2 * * *",
            "Australia/Lord_Howe",
            "2026-10-03T00:00:00Z",
            2
        ),
        ["2026-10-03T15:30:00.000Z", "2026-10-04T15:15:00.000Z"]
    );
    assert_eq!(
        next_n(
            "*/15 * * * *",
            "Australia/Lord_Howe",
            "2026-10-03T15:10:00Z",
            3
        ),
        [
            "2026-10-03T15:15:00.000Z",
            "2026-10-03T15:30:00.000Z",
            "2026-10-03T15:45:00.000Z"
        ]
    );
}

/// Vixie cron's loop, minute by minute, as an independent oracle: at each UTC
/// minute, a wildcard job fires if local time matches; a fixed-time job fires
/// if local time matches and this is not the second pass of a repeated time;
/// after a forward jump, fixed-time jobs due in the skipped local minutes fire
/// once at the jump.
fn oracle(expr: &CronExpr, tz: chrono_tz::Tz, from_min: i64, to_min: i64) -> Vec<Timestamp> {
    let mut out = Vec::new();
    let off = |m: i64| -> i64 {
        let utc = chrono::DateTime::from_timestamp(m * 60, 0)
            .expect("in range")
            .naive_utc();
        i64::from(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc()) / 60
    };
    let matches = |local_min: i64| -> bool {
        let n = chrono::DateTime::from_timestamp(local_min * 60, 0)
            .expect("in range")
            .naive_utc();
        expr.next_local_at_or_after(n) == Some(n)
    };
    for m in from_min..to_min {
        let (prev, cur) = (off(m - 1), off(m));
        let local = m + cur;
        let mut fire = false;
        if cur > prev && !expr.is_wildcard_job() {
            // Skipped local minutes [m + prev, m + cur).
            fire |= (m + prev..m + cur).any(matches);
        }
        if matches(local) {
            if expr.is_wildcard_job() {
                fire = true;
            } else {
                let n = chrono::DateTime::from_timestamp(local * 60, 0)
                    .expect("in range")
                    .naive_utc();
                let second_pass = matches!(tz.from_local_datetime(&n), LocalResult::Ambiguous(_, later) if later.timestamp() == m * 60);
                fire |= !second_pass;
            }
        }
        if fire {
            out.push(Timestamp::from_millis(m * 60_000).expect("in range"));
        }
    }
    out
}

fn field(max: u32, min: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        Just("*".to_string()),
        (min..=max).prop_map(|v| v.to_string()),
        (min..=max, min..=max).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
        (2u32..=7).prop_map(|s| format!("*/{s}")),
        (min..=max, min..=max).prop_map(|(a, b)| format!("{a},{b}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// next_after agrees with the minute-by-minute Vixie model around real
    /// DST transitions in several zones.
    #[test]
    fn next_after_matches_vixie_model(
        minute in field(59, 0),
        hour in prop_oneof![field(23, 0), prop::sample::select(vec!["0", "1", "2", "3", "1-3", "0,2", "2-4/2", "*/2"]).prop_map(String::from)],
        dom in prop_oneof![Just("*".to_string()), field(31, 1)],
        dow in prop_oneof![Just("*".to_string()), field(6, 0)],
        zone in prop::sample::select(vec!["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata", "America/Santiago"]),
        around in prop::sample::select(vec!["2026-03-08T00:00:00Z", "2026-11-01T00:00:00Z", "2026-03-29T00:00:00Z", "2026-10-25T00:00:00Z", "2026-04-04T00:00:00Z", "2026-10-03T00:00:00Z", "2026-04-05T00:00:00Z", "2026-09-06T00:00:00Z"]),
    ) {
        let expr_text = format!("{minute} {hour} {dom} * {dow}");
        let expr = CronExpr::parse(&expr_text).expect("generated valid");
        let tz = parse_tz(zone).expect("valid");
        let start_min = ts(around).as_millis() / 60_000 - 24 * 60;
        let end_min = start_min + 3 * 24 * 60;
        let want = oracle(&expr, tz, start_min, end_min);
        let mut got = Vec::new();
        let mut t = Timestamp::from_millis(start_min * 60_000 - 1).expect("in range");
        while let Some(n) = expr.next_after(tz, t) {
            if n.as_millis() >= end_min * 60_000 { break; }
            got.push(n);
            t = n;
        }
        prop_assert_eq!(got, want, "{} in {}", expr_text, zone);
    }
}
