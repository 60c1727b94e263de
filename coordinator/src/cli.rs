//! Pieces of `sundialctl` shared by its commands: schedule flags, instants,
//! output formats.

use clap::{Args, ValueEnum};
pub use sundial_protocol::task::labels_text;
use sundial_protocol::{DurationMs, Schedule, Timestamp};

/// How a read command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// An aligned table for people.
    Table,
    /// The table with nothing shortened.
    Wide,
    /// JSON for scripts (snake_case fields, RFC 3339 UTC timestamps).
    Json,
}

/// `--at T | --every DUR [--anchor T] | --cron EXPR [--tz ZONE]`.
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// Once, at this instant (RFC 3339, e.g. 2026-11-26T08:00:00Z).
    #[arg(long, value_name = "T", value_parser = parse_instant, conflicts_with_all = ["every", "cron"])]
    pub at: Option<Timestamp>,
    /// Every period (250ms, 30s, 5m, 1h30m, 7d), counted from --anchor.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "cron")]
    pub every: Option<DurationMs>,
    /// The instant an --every schedule counts from (default: now).
    #[arg(long, value_name = "T", value_parser = parse_instant, requires = "every")]
    pub anchor: Option<Timestamp>,
    /// A cron expression: 5 fields (minute hour day-of-month month day-of-week)
    /// or 6 (seconds first), with Debian cron semantics.
    #[arg(long, value_name = "EXPR")]
    pub cron: Option<String>,
    /// The IANA time zone a --cron schedule runs in, e.g. Europe/Berlin [default: UTC].
    #[arg(long, value_name = "ZONE", requires = "cron")]
    pub tz: Option<String>,
}

impl ScheduleArgs {
    /// The schedule these flags describe; `now` is the default anchor.
    pub fn to_schedule(&self, now: Timestamp) -> Result<Schedule, String> {
        if self.tz.is_some() && self.cron.is_none() {
            return Err(
                "--tz applies to --cron only: an --at instant and an --every period are the same in every zone"
                    .into(),
            );
        }
        if let Some(at) = self.at {
            return Ok(Schedule::at(at));
        }
        if let Some(every) = self.every()? {
            return Schedule::every(every, self.anchor.unwrap_or(now))
                .map_err(|e| format!("--every: {e}"));
        }
        if let Some((expr, tz)) = self.cron_parts()? {
            return Schedule::cron(expr, tz).map_err(|e| e.to_string());
        }
        Err("one of --at, --every or --cron is required".into())
    }

    /// The period of an `--every` schedule, or of `--cron '@every DUR'`.
    pub fn every(&self) -> Result<Option<DurationMs>, String> {
        if self.every.is_some() {
            return Ok(self.every);
        }
        let Some(expr) = &self.cron else {
            return Ok(None);
        };
        let (prefix, rest) = sundial_protocol::cron::split_tz_prefix(expr);
        let Some(period) = rest.trim().strip_prefix("@every") else {
            return Ok(None);
        };
        if prefix.is_some() || self.tz.is_some() {
            return Err("`@every` is a period: a time zone has no meaning for it".into());
        }
        DurationMs::parse(period.trim())
            .map(Some)
            .map_err(|e| format!("--cron '@every {}': {e}", period.trim()))
    }

    /// A cron expression and its zone: `--tz`, or a `CRON_TZ=`/`TZ=` prefix
    /// (the two must agree), or UTC.
    fn cron_parts(&self) -> Result<Option<(&str, &str)>, String> {
        let Some(expr) = &self.cron else {
            return Ok(None);
        };
        let (prefix, rest) = sundial_protocol::cron::split_tz_prefix(expr);
        let tz = match (prefix, self.tz.as_deref()) {
            (Some(p), Some(t)) if p != t => {
                return Err(format!(
                    "the expression says CRON_TZ={p} but --tz says {t}: give the zone once"
                ))
            }
            (Some(p), _) => p,
            (None, Some(t)) => t,
            (None, None) => "UTC",
        };
        Ok(Some((rest, tz)))
    }

    /// How a cron expression of another dialect was read, for the operator
    /// (printed on stderr before the request goes).
    pub fn notes(&self) -> Vec<String> {
        match self.cron_parts() {
            Ok(Some((expr, _))) if self.every().ok().flatten().is_none() => {
                sundial_protocol::cron::CronExpr::parse_noted(expr)
                    .map(|(_, notes)| notes)
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    /// The time zone to show local times in, if the schedule has one.
    pub fn zone(&self) -> Option<chrono_tz::Tz> {
        let (_, tz) = self.cron_parts().ok().flatten()?;
        sundial_protocol::cron::parse_tz(tz).ok()
    }
}

/// Parses an instant as people write it: RFC 3339
/// (`2026-11-26T08:00:00Z`), a date (`2026-11-26`, midnight UTC), `now`, or
/// `now` plus a duration (`+20s`, `+1h30m`).
pub fn parse_instant(s: &str) -> Result<Timestamp, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now());
    }
    if let Some(d) = s.strip_prefix('+') {
        let d = DurationMs::parse(d).map_err(|e| format!("`{s}`: {e}"))?;
        return now()
            .checked_add_ms(d.as_millis_i64())
            .ok_or_else(|| format!("`{s}` lies past year 9999"));
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let dt = date.and_time(chrono::NaiveTime::MIN).and_utc();
        return Timestamp::from_datetime(dt).map_err(|e| e.to_string());
    }
    Timestamp::parse(s).map_err(|e| {
        format!("{e}; also accepted: a date like 2026-11-26, `now`, or `+DUR` like +20s")
    })
}

/// Parses `--since`: an instant as [`parse_instant`] takes it, or a duration
/// meaning that long ago (`1h`, `7d`).
pub fn parse_since(s: &str) -> Result<Timestamp, String> {
    if let Ok(d) = DurationMs::parse(s.trim()) {
        return Ok(now().saturating_add_ms(-d.as_millis_i64()));
    }
    parse_instant(s).map_err(|e| format!("{e}, or a duration such as 1h meaning that long ago"))
}

/// Parses a duration such as `1h30m`.
pub fn parse_duration(s: &str) -> Result<DurationMs, String> {
    DurationMs::parse(s).map_err(|e| e.to_string())
}

/// The system's wall clock.
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_millis_saturating(ms)
}

/// The most occurrences `schedule next` prints.
pub const SCHEDULE_COUNT_MAX: usize = 100_000;

/// The next `count` occurrences after `from`.
pub fn next_occurrences(schedule: &Schedule, from: Timestamp, count: usize) -> Vec<Timestamp> {
    schedule.occurrences_after(from).take(count).collect()
}

/// Parses `k=v`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not a label (expected key=value)")),
    }
}

/// A value parser by `FromStr` that offers `values` to shell completion and
/// `--help` while accepting every form the type parses (`all:5` beside
/// `skip`, `once`, `all`).
#[derive(Clone, Debug)]
pub struct Suggest<T> {
    values: &'static [&'static str],
    _type: std::marker::PhantomData<fn() -> T>,
}

impl<T> Suggest<T> {
    pub const fn new(values: &'static [&'static str]) -> Suggest<T> {
        Suggest {
            values,
            _type: std::marker::PhantomData,
        }
    }
}

impl<T> clap::builder::TypedValueParser for Suggest<T>
where
    T: std::str::FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let name = arg.map_or_else(|| "the value".to_owned(), |a| a.to_string());
        let text = value.to_str().ok_or_else(|| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!("{name}: not UTF-8\n"),
            )
            .with_cmd(cmd)
        })?;
        text.parse::<T>().map_err(|e| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{text}' for '{name}': {e}\n"),
            )
            .with_cmd(cmd)
        })
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            self.values
                .iter()
                .map(|v| clap::builder::PossibleValue::new(*v)),
        ))
    }
}

/// `--misfire` values offered to completion.
pub const MISFIRE_VALUES: &[&str] = &["skip", "once", "all", "all:10"];
/// `--overlap` values.
pub const OVERLAP_VALUES: &[&str] = &["allow", "forbid"];

/// Parses `NAME=VALUE` for a task's environment.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "`{s}` is not an environment setting (expected NAME=VALUE, e.g. --env LOG_LEVEL=debug)"
        )),
    }
}

/// Label pairs an agent must all have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(pub Vec<(String, String)>);

/// Parses `k=v[,k=v]...`.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    s.split(',')
        .map(parse_label)
        .collect::<Result<_, _>>()
        .map(Selector)
}

/// An aligned text table; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header);
    for r in rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}
