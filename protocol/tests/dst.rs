//! Cron across DST matches Debian (Vixie) cron: gaps, overlaps, half-hour
//! shifts.

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

// The property test against a minute-by-minute model of Vixie's loop is
// `tests/tests/cron_oracle.rs`: the model is the simulator's oracle too.
