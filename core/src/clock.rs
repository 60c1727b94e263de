//! Time as the agent sees it: the wall clock, corrected by the estimated
//! offset to the coordinator's clock, checked against a clock that counts
//! suspend (CLOCK_BOOTTIME), and held when it cannot be trusted.
//!
//! [`ClockGuard`] is pure logic fed with readings, so bad clocks (steps,
//! suspend, a device that boots at 1970, a coordinator whose clock is wrong
//! for a while) are tested with made-up numbers. The agent's shell reads the
//! real clocks and sleeps on CLOCK_BOOTTIME (`sundial_agent::clock`).
//!
//! The guard keeps a *base*: a trusted instant at a boot-clock reading, set
//! when the coordinator vouches for the time (a clock sample) or, until it
//! has in this boot, at the first trusted reading of the boot. Trusted time
//! follows the boot clock from the base, and the wall clock is believed only
//! while it stays within a bound of that line: [`JUMP_THRESHOLD_MS`] plus
//! [`DRIFT_ALLOWANCE_PPM`] of the boot time since the base. So a wall clock
//! may run *ahead* of the boot clock between vouchings by at most that
//! bound, whatever the sum of its steps (many small forward steps add up
//! against the base, not each against the last). When the wall clock is
//! earlier than the line, the earlier time is taken, because firing late can
//! be made good and firing early cannot:
//! - the wall clock steps *back*: the new, earlier wall time is taken (the
//!   scheduler never goes back, so nothing fires again);
//! - the wall clock steps *forward* past the bound (or an agent restarted in
//!   the same boot finds it so, from the persisted base): firing goes on by
//!   the boot clock from the base, and the wall clock is believed again only
//!   when the coordinator vouches for it or it comes back in line.
//!
//! One clock sample cannot move trusted time by much: a sample that
//! disagrees with vouched time by more than [`VOUCH_STEP_MAX_MS`] is
//! *disputed* and applied only once [`VOUCH_CONFIRM_SAMPLES`] samples that
//! agree with each other span [`VOUCH_CONFIRM_SPAN_MS`] of boot time, so a
//! coordinator whose clock is wrong for a while does not move the fleet.
//! The first sample of a boot is the reference and is applied as it is: a
//! fresh boot's wall clock is unvouched (an RTC keeping local time, a
//! device without one) and nothing else can tell.
//!
//! Invariants: a corrected time earlier than the last known-good instant
//! (less [`UNTRUSTED_SLACK_MS`]) is never handed out for firing; the
//! known-good instant only moves forward and is only taken from the time
//! handed out (never from a wall clock found ahead), except that a vouched
//! sample sets it (the coordinator's clock is the reference); the time
//! handed out never exceeds the base line by more than the bound.

use sundial_protocol::Timestamp;

/// A wall-clock change larger than this, against boot time, is a jump; a
/// wall clock may run ahead of the boot clock since the base by at most
/// this (plus the drift allowance).
pub const JUMP_THRESHOLD_MS: i64 = 1_000;
/// How fast the wall clock may gain on the boot clock between vouchings, in
/// parts per million of boot time since the base (both clocks are driven by
/// one oscillator and disciplined together by NTP; this covers what is left).
pub const DRIFT_ALLOWANCE_PPM: i64 = 100;
/// How far behind the last known-good instant the clock may be before it is
/// distrusted (covers small NTP slews and persisted-value staleness).
pub const UNTRUSTED_SLACK_MS: i64 = 5 * 60_000;
/// A clock sample that moves vouched time by at most this is applied at once.
pub const VOUCH_STEP_MAX_MS: i64 = 1_000;
/// A larger move needs this many samples that agree with each other ...
pub const VOUCH_CONFIRM_SAMPLES: u32 = 4;
/// ... spanning at least this much boot time, ms (samples come every 30 s).
pub const VOUCH_CONFIRM_SPAN_MS: i64 = 90_000;
/// Samples agree with each other when they differ by at most this, ms.
pub const VOUCH_AGREE_MS: i64 = 1_000;

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

impl Anchor {
    /// The instant this anchor's line reaches at boot-clock reading `boot_ms`.
    fn line(&self, boot_ms: i64) -> i64 {
        self.time_ms.saturating_add(boot_ms - self.boot_ms)
    }

    /// How far ahead of the line the wall clock may be at `boot_ms`.
    fn slack(&self, boot_ms: i64) -> i64 {
        JUMP_THRESHOLD_MS + (boot_ms - self.boot_ms).max(0) / (1_000_000 / DRIFT_ALLOWANCE_PPM)
    }
}

/// What an observation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockNote {
    /// The wall clock moved back by `by_ms` (negative) against boot time;
    /// the earlier time is taken.
    Jumped { by_ms: i64 },
    /// The wall clock is `by_ms` ahead of trusted time (a forward step, the
    /// sum of small ones, or found so at start in the same boot): firing
    /// follows the boot clock.
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
    /// A clock sample disagrees with vouched time by `by_ms` (positive: the
    /// coordinator is ahead); not applied until confirmed.
    Disputed { by_ms: i64, samples: u32 },
}

/// What a clock sample did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouch {
    /// Applied: trusted time is now `at`, moved by `moved_ms` from what it
    /// was (negative: back).
    Applied {
        at: Timestamp,
        moved_ms: i64,
        /// A disputed disagreement that enough samples confirmed.
        confirmed: bool,
    },
    /// Disputed: kept as a candidate, time not moved.
    Disputed { by_ms: i64, samples: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Dispute {
    first_boot_ms: i64,
    /// The coordinator's time less the boot clock, at the first sample.
    coord_less_boot: i64,
    samples: u32,
}

/// The agent's view of time; see the module doc.
#[derive(Debug, Clone)]
pub struct ClockGuard {
    offset_ms: i64,
    last_known_good: Option<Timestamp>,
    /// The line trusted time follows (see the module doc).
    base: Option<Anchor>,
    /// The base came from a coordinator's sample in this boot.
    vouched: bool,
    /// The time of the previous reading, for noticing steps back.
    prev: Option<Anchor>,
    /// The wall clock is ahead of the base line by this much.
    ahead_ms: Option<i64>,
    trusted: bool,
    dispute: Option<Dispute>,
    /// A seeded bug for the simulator: every sample is applied.
    trust_every_sample: bool,
}

impl ClockGuard {
    /// A guard with a persisted offset and known-good instant.
    pub fn new(offset_ms: i64, last_known_good: Option<Timestamp>) -> ClockGuard {
        ClockGuard {
            offset_ms,
            last_known_good,
            base: None,
            vouched: false,
            prev: None,
            ahead_ms: None,
            trusted: true,
            dispute: None,
            trust_every_sample: false,
        }
    }

    /// A seeded bug, for showing that the simulator catches it: every
    /// clock sample is applied, however far it moves time.
    #[doc(hidden)]
    pub fn trusting_every_sample(mut self) -> ClockGuard {
        self.trust_every_sample = true;
        self
    }

    /// Resumes from a base persisted earlier *in the same boot* (`vouched`:
    /// a coordinator's sample set it), so a wall clock stepped while the
    /// agent was stopped is noticed.
    pub fn with_base(mut self, base: Anchor, vouched: bool) -> ClockGuard {
        self.base = Some(base);
        self.vouched = vouched;
        self
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms
    }

    pub fn last_known_good(&self) -> Option<Timestamp> {
        self.last_known_good
    }

    /// The base: the trusted instant time follows from, and its boot-clock
    /// reading.
    pub fn base(&self) -> Option<Anchor> {
        self.base
    }

    /// Whether a coordinator's sample set the base in this boot.
    pub fn is_vouched(&self) -> bool {
        self.vouched
    }

    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// How far the wall clock is ahead of trusted time, while it is.
    pub fn ahead_ms(&self) -> Option<i64> {
        self.ahead_ms
    }

    /// A disputed disagreement with the coordinator, while there is one:
    /// (by how much, samples so far).
    pub fn disputed(&self) -> Option<(i64, u32)> {
        self.dispute.map(|d| {
            let ours = self.base.map_or(0, |b| b.line(d.first_boot_ms));
            (d.coord_less_boot + d.first_boot_ms - ours, d.samples)
        })
    }

    /// The trusted time for a reading, and by how much the wall clock is
    /// past the bound (if it is).
    fn bounded(&self, r: Reading) -> (i64, Option<i64>) {
        let candidate = r.wall_ms.saturating_add(self.offset_ms);
        match self.base {
            None => (candidate, None),
            Some(b) => {
                let line = b.line(r.boot_ms);
                let diff = candidate.saturating_sub(line);
                if diff > b.slack(r.boot_ms) {
                    (line, Some(diff))
                } else {
                    (candidate, None)
                }
            }
        }
    }

    /// The best time for a reading, without changing anything: for
    /// stamping records between observations.
    pub fn time_of(&self, r: Reading) -> Timestamp {
        Timestamp::from_millis_saturating(self.bounded(r).0)
    }

    /// Takes a reading. Returns the time firing may use (`None`: held), and
    /// anything worth logging.
    pub fn observe(&mut self, r: Reading, notes: &mut Vec<ClockNote>) -> Option<Timestamp> {
        let (now_ms, ahead) = self.bounded(r);
        match ahead {
            // Ahead of trusted time: follow the boot clock. Also while
            // held: the base is trusted, so a clock corrected past it (an
            // overshoot) is not followed either.
            Some(diff) => {
                if self.ahead_ms.is_none() {
                    notes.push(ClockNote::Ahead { by_ms: diff });
                }
                self.ahead_ms = Some(diff);
            }
            None => {
                if self.ahead_ms.take().is_some() {
                    notes.push(ClockNote::BackInLine);
                }
            }
        }
        if let Some(p) = self.prev {
            let by = now_ms.saturating_sub(p.line(r.boot_ms));
            if by < -JUMP_THRESHOLD_MS {
                notes.push(ClockNote::Jumped { by_ms: by });
            }
        }
        self.prev = Some(Anchor {
            boot_ms: r.boot_ms,
            time_ms: now_ms,
        });
        let now = Timestamp::from_millis_saturating(now_ms);
        let behind = self
            .last_known_good
            .is_some_and(|g| now.millis_since(g) < -UNTRUSTED_SLACK_MS);
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
        // The first trusted reading of a boot is its base until the
        // coordinator vouches (a held clock is no reference).
        if self.base.is_none() {
            self.base = Some(Anchor {
                boot_ms: r.boot_ms,
                time_ms: now_ms,
            });
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

    /// The coordinator measured our offset (at the low end of its error).
    /// Applied at once when it is the first sample of the boot or moves
    /// vouched time by at most [`VOUCH_STEP_MAX_MS`]; otherwise disputed
    /// until confirmed (see the module doc).
    pub fn vouch(&mut self, offset_ms: i64, r: Reading) -> Vouch {
        let coord_ms = r.wall_ms.saturating_add(offset_ms);
        let before = self.bounded(r).0;
        let mut confirmed = false;
        if let (true, false, Some(b)) = (self.vouched, self.trust_every_sample, self.base) {
            let by = coord_ms.saturating_sub(b.line(r.boot_ms));
            if by.abs() > VOUCH_STEP_MAX_MS {
                let coord_less_boot = coord_ms.saturating_sub(r.boot_ms);
                let d = match self.dispute {
                    Some(d) if (d.coord_less_boot - coord_less_boot).abs() <= VOUCH_AGREE_MS => {
                        Dispute {
                            samples: d.samples.saturating_add(1),
                            ..d
                        }
                    }
                    _ => Dispute {
                        first_boot_ms: r.boot_ms,
                        coord_less_boot,
                        samples: 1,
                    },
                };
                if d.samples < VOUCH_CONFIRM_SAMPLES
                    || r.boot_ms - d.first_boot_ms < VOUCH_CONFIRM_SPAN_MS
                {
                    self.dispute = Some(d);
                    return Vouch::Disputed {
                        by_ms: by,
                        samples: d.samples,
                    };
                }
                confirmed = true;
            }
        }
        self.dispute = None;
        self.offset_ms = offset_ms;
        let now = Timestamp::from_millis_saturating(coord_ms);
        // The coordinator vouches for this instant, even if it is earlier.
        self.last_known_good = Some(now);
        self.trusted = true;
        self.ahead_ms = None;
        self.vouched = true;
        let base = Anchor {
            boot_ms: r.boot_ms,
            time_ms: coord_ms,
        };
        self.base = Some(base);
        self.prev = Some(base);
        Vouch::Applied {
            at: now,
            moved_ms: coord_ms.saturating_sub(before),
            confirmed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(wall_ms: i64, boot_ms: i64) -> Reading {
        Reading { wall_ms, boot_ms }
    }

    const GOOD: i64 = 1_780_000_000_000;

    fn applied(v: Vouch) -> i64 {
        match v {
            Vouch::Applied { at, .. } => at.as_millis(),
            other => panic!("not applied: {other:?}"),
        }
    }

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
        let now = applied(g.vouch(-3_600_000, r(GOOD + 3_612_000, 22_000)));
        assert_eq!(now, GOOD + 12_000);
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
            .with_base(anchor, true);
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
                let prev = g.base().filter(|_| g.is_trusted());
                if let Some(now) = g.observe(r(wall, boot), &mut notes) {
                    let now = now.as_millis();
                    assert!(now <= wall, "ahead of the wall clock");
                    // While trusted, time is also bounded by the boot clock
                    // (a held guard accepts the step that ends the hold).
                    if let Some(a) = prev {
                        assert!(
                            now <= a.time_ms
                                + (boot - a.boot_ms)
                                + JUMP_THRESHOLD_MS
                                + (boot - a.boot_ms) / 10_000,
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
        let now = applied(g.vouch(GOOD - 4_980, r(5_000, 5_000)));
        assert_eq!(now, GOOD + 20);
        assert!(g.observe(r(6_000, 6_000), &mut notes).is_some());
    }

    #[test]
    fn offset_corrects_the_wall_clock() {
        let mut g = ClockGuard::new(-250, None);
        let now = g.observe(r(GOOD, 0), &mut Vec::new());
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD - 250));
    }

    #[test]
    fn small_forward_steps_add_up_against_the_base() {
        // 0.9 s forward every 2 s: each step is under the jump threshold,
        // but time never runs ahead of the boot clock since the base by
        // more than the bound, whatever the sum.
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        let (mut wall, mut boot) = (GOOD, 0i64);
        g.observe(r(wall, boot), &mut notes);
        let mut worst = 0;
        for _ in 0..100 {
            boot += 2_000;
            wall += 2_000 + 900;
            let now = g.observe(r(wall, boot), &mut notes).expect("trusted");
            let truth = GOOD + boot;
            worst = worst.max(now.as_millis() - truth);
        }
        assert!(
            worst <= JUMP_THRESHOLD_MS + 200_000 / 10_000,
            "ran {worst} ms ahead of the boot clock"
        );
        assert!(
            notes.contains(&ClockNote::Ahead { by_ms: 1_800 }),
            "{notes:?}"
        );
        // The coordinator vouches (its sample agrees with the boot clock):
        // the wall clock's offset is measured, and time is right at once.
        let off = GOOD + boot - wall;
        assert_eq!(applied(g.vouch(off, r(wall, boot))), GOOD + boot);
    }

    #[test]
    fn one_bad_sample_does_not_move_vouched_time() {
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        g.observe(r(GOOD, 0), &mut notes);
        assert_eq!(applied(g.vouch(0, r(GOOD, 0))), GOOD);
        // The coordinator's clock is an hour ahead for 45 s: two samples
        // disagree, neither moves time.
        for s in [30_000, 60_000] {
            let v = g.vouch(3_600_000, r(GOOD + s, s));
            assert!(
                matches!(
                    v,
                    Vouch::Disputed {
                        by_ms: 3_600_000,
                        ..
                    }
                ),
                "{v:?}"
            );
            let now = g.observe(r(GOOD + s, s), &mut notes);
            assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + s));
        }
        assert!(g.disputed().is_some());
        // Its clock is right again: the dispute ends, time never moved.
        assert_eq!(applied(g.vouch(0, r(GOOD + 90_000, 90_000))), GOOD + 90_000);
        assert!(g.disputed().is_none());
        // A lasting disagreement, confirmed by samples over the span, is
        // applied (the coordinator's clock is the reference).
        let mut applied_at = None;
        for k in 1..=6 {
            let s = 90_000 + k * 30_000;
            match g.vouch(-5_000, r(GOOD + s, s)) {
                Vouch::Applied {
                    at,
                    confirmed: true,
                    ..
                } => {
                    applied_at = Some((k, at.as_millis() - (GOOD + s)));
                    break;
                }
                Vouch::Disputed { by_ms, .. } => assert_eq!(by_ms, -5_000),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(applied_at, Some((4, -5_000)));
    }

    #[test]
    fn the_first_sample_of_a_boot_is_the_reference() {
        // A device whose wall clock is an hour ahead at its first start:
        // nothing can tell until the coordinator does, and then at once.
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        g.observe(r(GOOD + 3_600_000, 5_000), &mut notes);
        assert!(!g.is_vouched());
        match g.vouch(-3_600_000, r(GOOD + 3_601_000, 6_000)) {
            Vouch::Applied { at, moved_ms, .. } => {
                assert_eq!(at.as_millis(), GOOD + 1_000);
                assert_eq!(moved_ms, -3_600_000);
            }
            other => panic!("{other:?}"),
        }
        assert!(g.is_vouched());
        let now = g.observe(r(GOOD + 3_602_000, 7_000), &mut notes);
        assert_eq!(now.map(Timestamp::as_millis), Some(GOOD + 2_000));
    }
}
