//! Cron across DST agrees with a minute-by-minute model of Vixie cron's loop
//! (`sundial_tests::oracle`, the simulator's oracle too) around real
//! transitions in several zones.

use proptest::prelude::*;
use sundial_protocol::cron::{parse_tz, CronExpr};
use sundial_protocol::Timestamp;
use sundial_tests::oracle::{cron_minutes, next_transition};

fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).expect("valid test instant")
}

#[test]
fn transitions_are_found_to_the_minute() {
    let berlin = parse_tz("Europe/Berlin").expect("zone");
    // 2027-03-28 01:00 UTC: 02:00 CET becomes 03:00 CEST.
    assert_eq!(
        next_transition(berlin, ts("2027-03-01T00:00:00Z").as_millis()),
        Some(ts("2027-03-28T01:00:00Z").as_millis())
    );
    let lord_howe = parse_tz("Australia/Lord_Howe").expect("zone");
    // 2027-04-04 02:00 LHDT (+11) becomes 01:30 LHST (+10:30): 15:00 UTC the day before.
    assert_eq!(
        next_transition(lord_howe, ts("2027-03-01T00:00:00Z").as_millis()),
        Some(ts("2027-04-03T15:00:00Z").as_millis())
    );
    let utc = parse_tz("UTC").expect("zone");
    assert_eq!(
        next_transition(utc, ts("2027-03-01T00:00:00Z").as_millis()),
        None
    );
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
        let want = cron_minutes(&expr, tz, start_min, end_min);
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
