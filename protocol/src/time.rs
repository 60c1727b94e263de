//! Instants and durations as Sundial speaks them.
//!
//! Every trigger time is an absolute UTC instant with millisecond resolution
//! ([`Timestamp`], Unix milliseconds). Its text form is RFC 3339 in UTC with
//! milliseconds (`2026-11-26T08:00:00.000Z`). Durations ([`DurationMs`]) are
//! written the way operators type them: `250ms`, `30s`, `5m`, `1h30m`, `7d`.
//!
//! Invariant: a `Timestamp` built by any constructor here lies within
//! [`Timestamp::MIN`]..=[`Timestamp::MAX`] (years 1 to 9999), so formatting it
//! never fails and calendar math on it never overflows.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// An absolute UTC instant, in milliseconds since the Unix epoch.
///
/// Deserialization checks the range, so an instant that arrives from the
/// network or a file is refused there, not stored and choked on later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Timestamp(i64);

impl TryFrom<i64> for Timestamp {
    type Error = TimestampError;
    fn try_from(ms: i64) -> Result<Self, Self::Error> {
        Timestamp::from_millis(ms)
    }
}

impl From<Timestamp> for i64 {
    fn from(t: Timestamp) -> i64 {
        t.0
    }
}

/// Why a text or number is not a valid instant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// The text is not RFC 3339; the caller should show the expected form.
    #[error(
        "`{text}` is not an RFC 3339 instant (expected e.g. 2026-11-26T08:00:00.000Z): {reason}"
    )]
    Syntax { text: String, reason: String },
    /// The instant lies outside years 1..=9999.
    #[error("instant {0} ms is outside the supported range (years 0001 to 9999)")]
    OutOfRange(i64),
}

impl Timestamp {
    /// 0001-01-01T00:00:00.000Z.
    pub const MIN: Timestamp = Timestamp(-62_135_596_800_000);
    /// 9999-12-31T23:59:59.999Z.
    pub const MAX: Timestamp = Timestamp(253_402_300_799_999);
    /// The Unix epoch.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// An instant from Unix milliseconds, refused outside years 1..=9999.
    pub fn from_millis(ms: i64) -> Result<Timestamp, TimestampError> {
        if (Self::MIN.0..=Self::MAX.0).contains(&ms) {
            Ok(Timestamp(ms))
        } else {
            Err(TimestampError::OutOfRange(ms))
        }
    }

    /// An instant from Unix milliseconds, clamped into the supported range.
    pub fn from_millis_saturating(ms: i64) -> Timestamp {
        Timestamp(ms.clamp(Self::MIN.0, Self::MAX.0))
    }

    /// Unix milliseconds.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// This instant plus `ms` milliseconds, or `None` past the supported range.
    pub fn checked_add_ms(self, ms: i64) -> Option<Timestamp> {
        self.0
            .checked_add(ms)
            .and_then(|v| Timestamp::from_millis(v).ok())
    }

    /// This instant plus `ms`, clamped into the supported range.
    pub fn saturating_add_ms(self, ms: i64) -> Timestamp {
        Timestamp::from_millis_saturating(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self` (negative when `self` is earlier).
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0 - earlier.0
    }

    /// The chrono form of this instant.
    pub fn to_datetime(self) -> DateTime<Utc> {
        // Invariant: the range check in every constructor keeps this in chrono's range.
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// The instant of a chrono date-time, truncated to whole milliseconds.
    pub fn from_datetime(dt: DateTime<Utc>) -> Result<Timestamp, TimestampError> {
        Timestamp::from_millis(dt.timestamp_millis())
    }

    /// The naive UTC date-time of this instant.
    pub fn to_naive_utc(self) -> NaiveDateTime {
        self.to_datetime().naive_utc()
    }

    /// Parses RFC 3339 (any offset; converted to UTC). Digits below the
    /// millisecond are truncated.
    pub fn parse(text: &str) -> Result<Timestamp, TimestampError> {
        let year_digits = text.trim().bytes().take_while(u8::is_ascii_digit).count();
        if year_digits > 4 {
            return Err(TimestampError::Syntax {
                text: text.to_owned(),
                reason: "years past 9999 are not supported".into(),
            });
        }
        let dt = DateTime::parse_from_rfc3339(text.trim()).map_err(|e| TimestampError::Syntax {
            text: text.to_owned(),
            reason: e.to_string(),
        })?;
        Timestamp::from_datetime(dt.with_timezone(&Utc))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            &self
                .to_datetime()
                .to_rfc3339_opts(SecondsFormat::Millis, true),
        )
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Timestamp::parse(s)
    }
}

/// A non-negative length of time in milliseconds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct DurationMs(pub u64);

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a duration (expected e.g. 250ms, 30s, 5m, 1h30m, 7d): {reason}")]
pub struct DurationError {
    text: String,
    reason: &'static str,
}

impl DurationMs {
    pub const ZERO: DurationMs = DurationMs(0);
    /// The longest duration accepted: 100 years, far beyond any schedule.
    pub const MAX: DurationMs = DurationMs(100 * 366 * 86_400_000);

    pub fn from_secs(s: u64) -> DurationMs {
        DurationMs(s.saturating_mul(1000))
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// As signed milliseconds; exact because of [`DurationMs::MAX`].
    pub fn as_millis_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// Parses `250ms`, `30s`, `5m`, `1h30m`, `7d`, `2w` and sums of them.
    pub fn parse(text: &str) -> Result<DurationMs, DurationError> {
        let err = |reason| DurationError {
            text: text.to_owned(),
            reason,
        };
        let s = text.trim();
        if s.is_empty() {
            return Err(err("it is empty"));
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut total: u64 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(err("expected a number before each unit"));
            }
            let n: u64 = s[start..i].parse().map_err(|_| err("number too large"))?;
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit_ms: u64 = match &s[unit_start..i] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "w" => 7 * 86_400_000,
                "" => return Err(err("a unit is missing (ms, s, m, h, d or w)")),
                _ => return Err(err("unknown unit (use ms, s, m, h, d or w)")),
            };
            let part = n.checked_mul(unit_ms).ok_or_else(|| err("too large"))?;
            total = total.checked_add(part).ok_or_else(|| err("too large"))?;
        }
        if total > Self::MAX.0 {
            return Err(err("longer than 100 years"));
        }
        Ok(DurationMs(total))
    }
}

impl fmt::Display for DurationMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, ms) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ] {
            if rest >= ms {
                write!(f, "{}{unit}", rest / ms)?;
                rest %= ms;
            }
        }
        Ok(())
    }
}

impl FromStr for DurationMs {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DurationMs::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_text_round_trips_with_milliseconds() {
        let t = Timestamp::parse("2026-11-26T08:00:00.123Z").expect("valid");
        assert_eq!(t.to_string(), "2026-11-26T08:00:00.123Z");
        let offset = Timestamp::parse("2026-11-26T09:00:00+01:00").expect("valid");
        assert_eq!(offset.to_string(), "2026-11-26T08:00:00.000Z");
    }

    #[test]
    fn out_of_range_instants_do_not_deserialize() {
        let bytes = postcard::to_allocvec(&i64::MAX).expect("encode");
        assert!(postcard::from_bytes::<Timestamp>(&bytes).is_err());
        let ok = postcard::to_allocvec(&Timestamp::MAX).expect("encode");
        assert_eq!(
            postcard::from_bytes::<Timestamp>(&ok).expect("decode"),
            Timestamp::MAX
        );
    }

    #[test]
    fn timestamps_past_year_9999_are_refused() {
        assert!(Timestamp::parse("9999-12-31T23:59:59.999Z").is_ok());
        assert!(Timestamp::from_millis(Timestamp::MAX.as_millis() + 1).is_err());
        assert!(Timestamp::parse("10000-01-01T00:00:00Z").is_err());
        let err = Timestamp::parse("tomorrow").expect_err("not RFC 3339");
        assert!(err.to_string().contains("RFC 3339"), "{err}");
    }

    #[test]
    fn durations_parse_in_operator_units() {
        let cases = [
            ("250ms", 250),
            ("30s", 30_000),
            ("5m", 300_000),
            ("1h30m", 5_400_000),
            ("7d", 604_800_000),
            ("1m500ms", 60_500),
        ];
        for (text, ms) in cases {
            assert_eq!(DurationMs::parse(text).expect(text).0, ms, "{text}");
        }
        assert_eq!(DurationMs(5_400_000).to_string(), "1h30m");
        assert_eq!(DurationMs(250).to_string(), "250ms");
        for bad in ["", "5", "-5s", "5x", "h", "1.5h", "999999999999999999d"] {
            assert!(DurationMs::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
