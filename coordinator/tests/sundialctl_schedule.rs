//! `sundialctl schedule next` prints what the agents will fire, with no
//! coordinator, and refuses bad schedules naming what is wrong.

use std::process::Command;

const CTL: &str = env!("CARGO_BIN_EXE_sundialctl");

fn ctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(CTL)
        .args(args)
        .output()
        .expect("sundialctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cron_across_spring_forward_as_json() {
    let (ok, out, err) = ctl(&[
        "schedule",
        "next",
        "--cron",
        "30 2 * * *",
        "--tz",
        "America/New_York",
        "--from",
        "2026-03-07T00:00:00Z",
        "--count",
        "3",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        r#"["2026-03-07T07:30:00.000Z","2026-03-08T07:00:00.000Z","2026-03-09T06:30:00.000Z"]"#
    );
}

#[test]
fn table_shows_local_times() {
    let (ok, out, _) = ctl(&[
        "schedule",
        "next",
        "--cron",
        "0 9 * * MON",
        "--tz",
        "Europe/Berlin",
        "--from",
        "2026-11-26T00:00:00Z",
        "--count",
        "1",
    ]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "2026-11-30T08:00:00.000Z  2026-11-30 09:00:00 CET"
    );
}

#[test]
fn every_counts_from_its_anchor() {
    let (ok, out, _) = ctl(&[
        "schedule",
        "next",
        "--every",
        "1h30m",
        "--anchor",
        "2026-01-01T00:00:00Z",
        "--from",
        "2026-01-01T00:00:00Z",
        "--count",
        "2",
        "-o",
        "json",
    ]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        r#"["2026-01-01T01:30:00.000Z","2026-01-01T03:00:00.000Z"]"#
    );
}

#[test]
fn bad_input_is_refused_naming_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["--cron", "61 * * * *"], "minute field `61`"),
        (&["--cron", "* * * *"], "4 fields"),
        (
            &["--cron", "* * * * *", "--tz", "Mars/Olympus"],
            "unknown time zone `Mars/Olympus`",
        ),
        (&["--every", "0s"], "period must be at least 1ms"),
        (&["--every=-5m"], "not a duration"),
        (&["--at", "10000-01-01T00:00:00Z"], "years past 9999"),
        (&["--at", "yesterday"], "not an RFC 3339 instant"),
        (&[], "one of --at, --every or --cron is required"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["schedule", "next"];
        args.extend_from_slice(extra);
        let (ok, _, err) = ctl(&args);
        assert!(!ok, "{extra:?} was accepted");
        assert!(err.contains(needle), "{extra:?}: `{err}` lacks `{needle}`");
    }
}
