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

#[test]
fn the_cron_dialects_people_bring_are_read_or_refused_with_what_to_write() {
    let next = |expr: &str, extra: &[&str]| {
        let mut args = vec![
            "schedule",
            "next",
            "--cron",
            expr,
            "--from",
            "2026-03-07T00:00:00Z",
            "--count",
            "2",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        ctl(&args)
    };
    // CRON_TZ= as crontabs and Kubernetes write it: the same as --tz.
    let (ok, with_prefix, err) = next("CRON_TZ=America/New_York 30 2 * * *", &[]);
    assert!(ok, "{err}");
    let (_, with_flag, _) = next("30 2 * * *", &["--tz", "America/New_York"]);
    assert_eq!(with_prefix, with_flag);
    // The same zone twice is fine; two zones are refused.
    let (ok, _, _) = next(
        "TZ=America/New_York 30 2 * * *",
        &["--tz", "America/New_York"],
    );
    assert!(ok);
    let (ok, _, err) = next("CRON_TZ=Europe/Berlin 30 2 * * *", &["--tz", "UTC"]);
    assert!(!ok && err.contains("give the zone once"), "{err}");
    // @every is a period.
    let (ok, every, err) = next("@every 90m", &[]);
    assert!(ok, "{err}");
    // Counted from now, as --every without --anchor: 90 minutes apart.
    let times: Vec<String> = serde_json::from_str(&every).expect("JSON");
    let ms = |t: &str| {
        sundial_protocol::Timestamp::parse(t)
            .expect("an instant")
            .as_millis()
    };
    assert_eq!(ms(&times[1]) - ms(&times[0]), 90 * 60_000, "{every}");
    // Quartz: read, with a note on stderr about its day numbers.
    let (ok, out, err) = next("0 0 12 ? * 2", &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("2026-03-09T12:00:00.000Z"),
        "Monday the 9th: {out}"
    );
    assert!(err.contains("note:") && err.contains("Quartz"), "{err}");
    // N/step: read as N-max/step.
    let (ok, out, err) = next("0/20 * * * *", &[]);
    assert!(ok, "{err}");
    assert!(out.contains("T00:20:00.000Z"), "{out}");
    // Refused, naming the dialect; every bad field at once.
    for (expr, needle) in [
        ("H 2 * * *", "Jenkins"),
        ("0 0 L * ?", "Quartz's `L`"),
        ("@reboot", "systemd unit"),
        ("61 25 * * *", "hour field `25`"),
    ] {
        let (ok, _, err) = next(expr, &[]);
        assert!(!ok, "{expr} accepted");
        assert!(err.contains(needle), "{expr}: {err}");
    }
    let (_, _, err) = next("61 25 * * *", &[]);
    assert!(err.contains("minute field `61`"), "{err}");
}

#[test]
fn a_zone_without_cron_and_a_task_without_a_target_are_refused_naming_both_choices() {
    let (ok, _, err) = ctl(&["schedule", "next", "--every", "1h", "--tz", "Europe/London"]);
    assert!(!ok && err.contains("--tz applies to --cron only"), "{err}");
    let (ok, _, err) = ctl(&["task", "create", "--every", "1s", "--", "/bin/true"]);
    assert!(!ok, "created without a target");
    assert!(
        err.contains("--agent") && err.contains("--selector"),
        "{err}"
    );
    // Completion scripts offer the policies' values.
    let (ok, bash, _) = ctl(&["completions", "bash"]);
    assert!(
        ok && bash.contains("skip once all"),
        "misfire values not offered"
    );
    // A manual page per subcommand, as the root page names them.
    let dir = tempfile::tempdir().expect("tempdir");
    let (ok, _, err) = ctl(&["manpage", "--dir", dir.path().to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    for page in [
        "sundialctl.1",
        "sundialctl-task.1",
        "sundialctl-task-create.1",
        "sundialctl-run-list.1",
    ] {
        assert!(dir.path().join(page).exists(), "{page} missing");
    }
    let root = std::fs::read_to_string(dir.path().join("sundialctl.1")).expect("root page");
    assert!(
        root.contains("sundialctl\\-task(1)") && root.contains("MISFIRE"),
        "the root page"
    );
}
