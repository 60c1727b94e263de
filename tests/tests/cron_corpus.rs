//! Cron expressions as people write them (tests/data/cron_corpus.tsv,
//! collected from public code): how many Sundial accepts, how it refuses
//! the rest, and that every one it accepts fires at the same instants as
//! croner (an independent parser and iterator) in UTC and as Vixie cron's
//! minute loop (`sundial_tests::oracle`) across New York's DST changes.
//! Prints the figures; run with `--nocapture` to read them.

use std::collections::BTreeMap;

use chrono::TimeZone;
use sundial_protocol::cron::{parse_tz, split_tz_prefix, CronExpr};
use sundial_protocol::{DurationMs, Timestamp};
use sundial_tests::oracle::cron_minutes;

fn corpus() -> Vec<(String, String)> {
    let text = include_str!("../data/cron_corpus.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (from, expr) = l.split_once('\t').expect("WHERE<TAB>EXPRESSION");
            (from.to_owned(), expr.to_owned())
        })
        .collect()
}

fn ts(s: &str) -> Timestamp {
    Timestamp::parse(s).expect("instant")
}

/// Our next `n` instants after `from` in `tz`.
fn ours(expr: &CronExpr, tz: chrono_tz::Tz, from: Timestamp, n: usize) -> Vec<i64> {
    let mut out = Vec::new();
    let mut t = from;
    while out.len() < n {
        let Some(next) = expr.next_after(tz, t) else {
            break;
        };
        out.push(next.as_millis());
        t = next;
    }
    out
}

/// croner's next `n` instants after `from` in UTC, of the expression as
/// written (croner reads seconds and years itself).
fn croner_utc(text: &str, from: Timestamp, n: usize) -> Result<Vec<i64>, String> {
    let cron: croner::Cron = text.parse().map_err(|e| format!("{e:?}"))?;
    let mut t = chrono::Utc
        .timestamp_millis_opt(from.as_millis())
        .single()
        .ok_or("instant")?;
    let mut out = Vec::new();
    while out.len() < n {
        let next = cron
            .find_next_occurrence(&t, false)
            .map_err(|e| format!("{e:?}"))?;
        out.push(next.timestamp_millis());
        t = next;
    }
    Ok(out)
}

#[test]
fn the_corpus_is_read_as_its_authors_meant_or_refused_with_a_reason() {
    let corpus = corpus();
    let mut accepted = 0;
    let mut rewritten = 0;
    let mut intervals = 0;
    let mut refused: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut disagree = Vec::new();
    let mut checked_utc = 0;
    let mut checked_dst = 0;
    let mut sub_minute = 0;
    let start = ts("2026-01-01T00:00:00Z");
    let ny = parse_tz("America/New_York").expect("zone");
    for (from, text) in &corpus {
        let (prefix, rest) = split_tz_prefix(text);
        if let Some(period) = rest.trim().strip_prefix("@every") {
            // `--cron '@every DUR'` is `--every DUR`.
            DurationMs::parse(period.trim()).expect("a period Sundial reads");
            intervals += 1;
            continue;
        }
        let (expr, notes) = match CronExpr::parse_noted(rest) {
            Ok(v) => v,
            Err(e) => {
                let why = e.to_string();
                assert!(why.len() > text.len() + 10, "a refusal says why: {why}");
                refused
                    .entry(from.clone())
                    .or_default()
                    .push(format!("{text}: {why}"));
                continue;
            }
        };
        accepted += 1;
        if !notes.is_empty() {
            rewritten += 1;
        }
        let tz = parse_tz(prefix.unwrap_or("UTC")).expect("zone");
        // In UTC, against croner reading the expression as written (AWS
        // EventBridge's form, which croner does not know, as we rewrote it).
        if prefix.is_none() {
            let theirs = if from == "aws" { expr.as_str() } else { rest };
            let want = croner_utc(theirs, start, 300);
            let got = ours(&expr, tz, start, 300);
            match want {
                Ok(want) if want == got => checked_utc += 1,
                Ok(want) => disagree.push(format!(
                    "{from} `{text}` (read as `{}`): croner {:?}… ours {:?}…",
                    expr.as_str(),
                    &want[..want.len().min(3)],
                    &got[..got.len().min(3)]
                )),
                Err(e) => disagree.push(format!("{from} `{text}`: croner refuses it: {e}")),
            }
        }
        // Across New York's DST changes, against Vixie cron's loop (which
        // has minutes only: not for a seconds field other than 0).
        let fields: Vec<&str> = expr.as_str().split_whitespace().collect();
        if fields.len() == 6 && fields[0] != "0" {
            sub_minute += 1;
            continue;
        }
        for around in ["2026-03-01T00:00:00Z", "2026-10-25T00:00:00Z"] {
            let from_t = ts(around);
            let from_min = from_t.as_millis() / 60_000;
            let to_min = from_min + 14 * 1_440;
            let want: Vec<i64> = cron_minutes(&expr, ny, from_min, to_min)
                .into_iter()
                .map(Timestamp::as_millis)
                .collect();
            let mut got = Vec::new();
            let mut t = from_t.saturating_add_ms(-1);
            while let Some(next) = expr.next_after(ny, t) {
                if next.as_millis() >= to_min * 60_000 {
                    break;
                }
                got.push(next.as_millis());
                t = next;
            }
            if want == got {
                checked_dst += 1;
            } else {
                disagree.push(format!(
                    "{from} `{text}` in New York from {around}: {} vs {} instants",
                    want.len(),
                    got.len()
                ));
            }
        }
    }
    let refused_n: usize = refused.values().map(Vec::len).sum();
    println!(
        "{} expressions: {} accepted as cron ({} of them rewritten from another dialect, with a note), {} as intervals (@every), {} refused",
        corpus.len(),
        accepted,
        rewritten,
        intervals,
        refused_n
    );
    println!(
        "agreement: {checked_utc} with croner in UTC (300 instants each), {checked_dst} windows of two weeks with Vixie cron's loop across New York's DST changes ({sub_minute} firing at seconds, which that loop cannot model)"
    );
    for (from, list) in &refused {
        for r in list {
            println!("refused ({from}): {r}");
        }
    }
    assert!(
        disagree.is_empty(),
        "disagreements:\n{}",
        disagree.join("\n")
    );
    assert_eq!(accepted + intervals + refused_n, corpus.len());
    // Jenkins' hashed H and @reboot are refused, naming what to write.
    for list in refused.values() {
        for r in list {
            if r.starts_with('H') {
                assert!(r.contains("Jenkins"), "{r}");
            }
        }
    }
}
