//! Time as the agent sees it: the wall clock, corrected by the estimated
//! offset to the coordinator's clock, checked against a clock that counts
//! suspend (CLOCK_BOOTTIME), and held when it cannot be trusted.
//!
//! [`ClockGuard`] is pure logic fed with readings, so bad clocks (steps,
//! suspend, a device that boots at 1970) are tested with made-up numbers.
//! The agent's shell reads the real clocks and sleeps on CLOCK_BOOTTIME
//! (`sundial_agent::clock`).
//!
//! The guard keeps an *anchor*: a trusted instant at a boot-clock reading.
//! Between readings, trusted time advances with the boot clock. When the
//! wall clock disagrees with it, the earlier of the two is taken, because
//! firing late can be made good and firing early cannot:
//! - the wall clock steps *back*: the new, earlier wall time is taken (the
//!   scheduler never goes back, so nothing fires again);
//! - the wall clock steps *forward* (or an agent restarted in the same boot
//!   finds it ahead of where its boot clock says it should be): firing goes
//!   on by the boot clock from the anchor, and the wall clock is believed
//!   again only when the coordinator vouches for it (a clock exchange) or
//!   it comes back in line. A device whose clock was *behind* and was
//!   stepped forward by NTP thus fires late until its coordinator is
//!   reached; never early.
//!
//! Invariants: a corrected time earlier than the last known-good instant
//! (less [`UNTRUSTED_SLACK_MS`]) is never handed out for firing; the
//! known-good instant only moves forward and is only taken from the time
//! handed out (never from a wall clock found ahead).

use sundial_protocol::Timestamp;

/// A wall-clock change larger than this, against boot time, is a jump.
pub const JUMP_THRESHOLD_MS: i64 = 1_000;
/// How far behind the last known-good instant the clock may be before it is
/// distrusted (covers small NTP slews and persisted-value staleness).
pub const UNTRUSTED_SLACK_MS: i64 = 5 * 60_000;

/// One reading of both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Wall clock, Unix ms.
    pub wall_ms: i64,
    /// CLOCK_BOOTTIME, ms.
    pub boot_ms: i64,
}

/// A trusted instant at a boot-clock reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub boot_ms: i64,
    pub time_ms: i64,
}

/// What an observation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockNote {
    /// The wall clock moved back by `by_ms` (negative) against boot time;
    /// the earlier time is taken.
    Jumped { by_ms: i64 },
    /// The wall clock is `by_ms` ahead of trusted time (a forward step, or
    /// found so at start in the same boot): firing follows the boot clock.
    Ahead { by_ms: i64 },
    /// The wall clock agrees with trusted time again.
    BackInLine,
    /// The clock is behind the last known-good instant: firing is held.
    Untrusted {
        now: Timestamp,
        last_known_good: Timestamp,
    },
    /// The clock is trusted again.
    TrustRestored,
}

/// The agent's view of time; see the module doc.
#[derive(Debug, Clone)]
pub struct ClockGuard {
    offset_ms: i64,
    last_known_good: Option<Timestamp>,
    anchor: Option<Anchor>,
    /// The wall clock is ahead of the anchor's time by this much.
    ahead_ms: Option<i64>,
    trusted: bool,
}

impl ClockGuard {
    /// A guard with a persisted offset and known-good instant.
    pub fn new(offset_ms: i64, last_known_good: Option<Timestamp>) -> ClockGuard {
        ClockGuard {
            offset_ms,
            last_known_good,
            anchor: None,
            ahead_ms: None,
            trusted: true,
        }
    }

    /// Resumes from an anchor persisted earlier *in the same boot*, so a
    /// wall clock stepped while the agent was stopped is noticed.
    pub fn with_anchor(mut self, anchor: Anchor) -> ClockGuard {
        self.anchor = Some(anchor);
        self
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms
    }

    pub fn last_known_good(&self) -> Option<Timestamp> {
        self.last_known_good
    }

    /// The latest trusted instant and its boot-clock reading.
    pub fn anchor(&self) -> Option<Anchor> {
        self.anchor
    }

    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// How far the wall clock is ahead of trusted time, while it is.
    pub fn ahead_ms(&self) -> Option<i64> {
        self.ahead_ms
    }

    /// The best time for a reading, without changing anything: for
    /// stamping records between observations.
    pub fn time_of(&self, r: Reading) -> Timestamp {
        let candidate = r.wall_ms.saturating_add(self.offset_ms);
        let ms = match self.anchor {
            Some(a) => candidate.min(a.time_ms.saturating_add(r.boot_ms - a.boot_ms)),
            None => candidate,
        };
        Timestamp::from_millis_saturating(ms)
    }

    /// Takes a reading. Returns the time firing may use (`None`: held), and
    /// anything worth logging.
    pub fn observe(&mut self, r: Reading, notes: &mut Vec<ClockNote>) -> Option<Timestamp> {
        let candidate = r.wall_ms.saturating_add(self.offset_ms);
        let now_ms = match self.anchor {
            None => candidate,
            Some(a) => {
                let expected = a.time_ms.saturating_add(r.boot_ms - a.boot_ms);
                let diff = candidate.saturating_sub(expected);
                if diff > JUMP_THRESHOLD_MS {
                    // Ahead of trusted time: follow the boot clock. Also
                    // while held: the anchor is the last trusted instant,
                    // so a clock corrected past it (an overshoot) is not
                    // followed either.
                    if self.ahead_ms.is_none() {
                        notes.push(ClockNote::Ahead { by_ms: diff });
                    }
                    self.ahead_ms = Some(diff);
                    expected
                } else {
                    if diff < -JUMP_THRESHOLD_MS {
                        notes.push(ClockNote::Jumped { by_ms: diff });
                    }
                    if self.ahead_ms.take().is_some() {
                        notes.push(ClockNote::BackInLine);
                    }
                    candidate
                }
            }
        };
        let now = Timestamp::from_millis_saturating(now_ms);
        let behind = self
            .last_known_good
            .is_some_and(|g| now.millis_since(g) < -UNTRUSTED_SLACK_MS);
        // The anchor moves only with trusted time: a held clock is no
        // reference for the next reading.
        if self.ahead_ms.is_none() && !behind {
            self.anchor = Some(Anchor {
                boot_ms: r.boot_ms,
                time_ms: now_ms,
            });
        }
        if behind {
            if self.trusted {
                self.trusted = false;
                if let Some(g) = self.last_known_good {
                    notes.push(ClockNote::Untrusted {
                        now,
                        last_known_good: g,
                    });
                }
            }
            return None;
        }
        if !self.trusted {
            self.trusted = true;
            notes.push(ClockNote::TrustRestored);
        }
        if self.last_known_good.is_none_or(|g| now > g) {
            self.last_known_good = Some(now);
        }
        Some(now)
    }

    /// The coordinator measured our offset: its clock is the reference, so
    /// time is trusted from here on.
    pub fn set_offset(&mut self, offset_ms: i64, r: Reading) -> Timestamp {
        self.offset_ms = offset_ms;
        let now_ms = r.wall_ms.saturating_add(offset_ms);
        let now = Timestamp::from_millis_saturating(now_ms);
        // The coordinator vouches for this instant, even if it is earlier.
        self.last_known_good = Some(now);
        self.trusted = true;
        self.ahead_ms = None;
        self.anchor = Some(Anchor {
            boot_ms: r.boot_ms,
            time_ms: now_ms,
        });
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(wall_ms: i64, boot_ms: i64) -> Reading {
        Reading { wall_ms, boot_ms }
    }

    const GOOD: i64 = 1_780_000_000_000;

    #[test]
    fn a_step_back_takes_the_earlier_time_and_fires_nothing_again() {
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        g.observe(r(GOOD, 10_000), &mut notes);
        assert_eq!(
            g.observe(r(GOOD + 5_000, 15_000), &mut notes)
                .map(Timestamp::as_millis),
            Some(GOOD + 5_000)
        );
        assert!(notes.is_empty(), "steady clock flagged: {notes:?}");
        // Stepped back 2 s: the earlier time is taken (late, never early).
        let now = g.observe(r(GOOD + 4_000, 16_000), &mut notes);
        assert_eq!(notes, [ClockNote::Jumped { by_ms: -2_000 }]);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 4_000));
        // Stepped back an hour: far behind the known-good instant, so firing
        // is held until the clock is past it again.
        notes.clear();
        assert_eq!(g.observe(r(GOOD - 3_594_000, 17_000), &mut notes), None);
        assert!(matches!(
            notes[..],
            [ClockNote::Jumped { .. }, ClockNote::Untrusted { .. }]
        ));
    }

    #[test]
    fn a_held_clock_corrected_past_the_truth_is_not_followed() {
        // Found by the virtual simulator: stepped back an hour (held), then
        // "corrected" 20 s past the true time. The anchor is the last
        // trusted instant, so the overshoot is followed on the boot clock.
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        g.observe(r(GOOD, 10_000), &mut notes);
        assert_eq!(g.observe(r(GOOD - 3_590_000, 20_000), &mut notes), None);
        let now = g.observe(r(GOOD + 50_000, 30_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 20_000));
        // Corrected exactly: followed again, nothing held.
        let now = g.observe(r(GOOD + 21_000, 31_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 21_000));
    }

    #[test]
    fn a_step_forward_while_running_never_fires_the_future() {
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        g.observe(r(GOOD, 10_000), &mut notes);
        // +1 h: time goes on by the boot clock, not the wall.
        let now = g.observe(r(GOOD + 3_601_000, 11_000), &mut notes);
        assert_eq!(notes, [ClockNote::Ahead { by_ms: 3_600_000 }]);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 1_000));
        let now = g.observe(r(GOOD + 3_611_000, 21_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 11_000));
        assert_eq!(notes.len(), 1, "said once: {notes:?}");
        // The known-good instant never took the wall's future.
        assert_eq!(
            g.last_known_good().map(Timestamp::as_millis),
            Some(GOOD + 11_000)
        );
        // The coordinator measures the offset: its time is the truth.
        let now = g.set_offset(-3_600_000, r(GOOD + 3_612_000, 22_000));
        assert_eq!(now.as_millis(), GOOD + 12_000);
        let now = g.observe(r(GOOD + 3_613_000, 23_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 13_000));
        assert!(g.ahead_ms().is_none());
    }

    #[test]
    fn a_wall_clock_ahead_at_restart_in_the_same_boot_is_caught() {
        // The anchor an earlier run persisted, 60 s of boot time ago.
        let anchor = Anchor {
            boot_ms: 100_000,
            time_ms: GOOD,
        };
        let mut g = ClockGuard::new(0, Some(Timestamp::from_millis(GOOD).expect("in range")))
            .with_anchor(anchor);
        let mut notes = Vec::new();
        let now = g.observe(r(GOOD + 60_000 + 3_600_000, 160_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 60_000));
        assert_eq!(notes, [ClockNote::Ahead { by_ms: 3_600_000 }]);
        // The wall clock is set right again: in line, no jump back noted.
        notes.clear();
        let now = g.observe(r(GOOD + 61_000, 161_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 61_000));
        assert_eq!(notes, [ClockNote::BackInLine]);
    }

    #[test]
    fn every_time_handed_out_is_the_earliest_of_the_clocks() {
        // Random steps both ways, at any moment: time never runs ahead of
        // either the wall clock or the boot clock since the last trusted
        // instant, and the known-good instant never exceeds what was handed out.
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let mut g = ClockGuard::new(0, None);
            let mut notes = Vec::new();
            let (mut wall, mut boot) = (GOOD, 0i64);
            let mut handed_max = i64::MIN;
            for _ in 0..200 {
                let step = (next() % 2_000) as i64;
                boot += step;
                wall += step;
                match next() % 10 {
                    0 => wall += (next() % 7_200_000) as i64,
                    1 => wall -= (next() % 7_200_000) as i64,
                    _ => {}
                }
                let prev = g.anchor().filter(|_| g.is_trusted());
                if let Some(now) = g.observe(r(wall, boot), &mut notes) {
                    let now = now.as_millis();
                    assert!(now <= wall, "ahead of the wall clock");
                    // While trusted, time is also bounded by the boot clock
                    // (a held guard accepts the step that ends the hold).
                    if let Some(a) = prev {
                        assert!(
                            now <= a.time_ms + (boot - a.boot_ms),
                            "ahead of the boot clock"
                        );
                    }
                    handed_max = handed_max.max(now);
                }
                assert!(g
                    .last_known_good()
                    .is_none_or(|k| k.as_millis() <= handed_max));
            }
        }
    }

    #[test]
    fn a_device_booting_at_1970_holds_until_trusted_again() {
        let lkg = Timestamp::from_millis(GOOD).expect("in range");
        let mut g = ClockGuard::new(0, Some(lkg));
        let mut notes = Vec::new();
        assert_eq!(g.observe(r(5_000, 5_000), &mut notes), None);
        assert!(!g.is_trusted());
        assert!(matches!(notes[0], ClockNote::Untrusted { .. }));
        // Still held a while later; the known-good instant did not move back.
        assert_eq!(g.observe(r(65_000, 65_000), &mut notes), None);
        assert_eq!(g.last_known_good(), Some(lkg));
        // NTP steps the clock to the present: trusted again.
        assert!(g.observe(r(GOOD + 70_000, 70_000), &mut notes).is_some());
        assert!(notes.contains(&ClockNote::TrustRestored));
    }

    #[test]
    fn the_coordinator_vouches_for_time() {
        let mut g = ClockGuard::new(0, Some(Timestamp::from_millis(GOOD).expect("in range")));
        let mut notes = Vec::new();
        assert_eq!(g.observe(r(5_000, 5_000), &mut notes), None);
        // The coordinator says we are GOOD - 5000 + 20 behind.
        let now = g.set_offset(GOOD - 4_980, r(5_000, 5_000));
        assert_eq!(now.as_millis(), GOOD + 20);
        assert!(g.observe(r(6_000, 6_000), &mut notes).is_some());
    }

    #[test]
    fn offset_corrects_the_wall_clock() {
        let mut g = ClockGuard::new(-250, None);
        let now = g.observe(r(GOOD, 0), &mut Vec::new());
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD - 250));
    }
}
