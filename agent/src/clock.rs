//! Time as the agent sees it: the wall clock, corrected by the estimated
//! offset to the coordinator's clock, checked against a clock that counts
//! suspend (CLOCK_BOOTTIME), and held when it cannot be trusted.
//!
//! [`ClockGuard`] is pure logic fed with readings, so bad clocks (steps,
//! suspend, a device that boots at 1970) are tested with made-up numbers.
//! [`SystemClock`] reads the real clocks and [`BootTimer`] sleeps on
//! CLOCK_BOOTTIME, so a suspended device wakes on time.
//!
//! Invariants: a corrected time earlier than the last known-good instant
//! (less [`UNTRUSTED_SLACK_MS`]) is never handed out for firing; the
//! known-good instant only moves forward.

use std::os::fd::OwnedFd;

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

/// What an observation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockNote {
    /// The wall clock moved by `by_ms` more than boot time did.
    Jumped { by_ms: i64 },
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
    last: Option<Reading>,
    trusted: bool,
}

impl ClockGuard {
    /// A guard with a persisted offset and known-good instant.
    pub fn new(offset_ms: i64, last_known_good: Option<Timestamp>) -> ClockGuard {
        ClockGuard {
            offset_ms,
            last_known_good,
            last: None,
            trusted: true,
        }
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms
    }

    pub fn last_known_good(&self) -> Option<Timestamp> {
        self.last_known_good
    }

    pub fn is_trusted(&self) -> bool {
        self.trusted
    }

    /// Takes a reading. Returns the corrected time when firing may use it
    /// (`None`: held), and anything worth logging.
    pub fn observe(&mut self, r: Reading, notes: &mut Vec<ClockNote>) -> Option<Timestamp> {
        if let Some(prev) = self.last {
            let expected = prev.wall_ms + (r.boot_ms - prev.boot_ms);
            let by_ms = r.wall_ms - expected;
            if by_ms.abs() > JUMP_THRESHOLD_MS {
                notes.push(ClockNote::Jumped { by_ms });
            }
        }
        self.last = Some(r);
        let now = Timestamp::from_millis_saturating(r.wall_ms.saturating_add(self.offset_ms));
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
        let now = Timestamp::from_millis_saturating(r.wall_ms.saturating_add(offset_ms));
        // The coordinator vouches for this instant, even if it is earlier.
        self.last_known_good = Some(now);
        self.trusted = true;
        self.last = Some(r);
        now
    }
}

/// The real clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    pub fn read(&self) -> Reading {
        let wall_ms = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
        };
        Reading {
            wall_ms,
            boot_ms: boot_ns() / 1_000_000,
        }
    }
}

/// CLOCK_BOOTTIME in nanoseconds.
pub fn boot_ns() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    t.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec)
}

/// Sleeps until a CLOCK_BOOTTIME deadline with a timerfd, so time spent in
/// suspend counts; falls back to tokio's timer where timerfd is missing.
#[derive(Debug)]
pub struct BootTimer {
    fd: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
}

impl BootTimer {
    pub fn new() -> BootTimer {
        use rustix::time::{timerfd_create, TimerfdClockId, TimerfdFlags};
        let fd = timerfd_create(
            TimerfdClockId::Boottime,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .ok()
        .and_then(register);
        if fd.is_none() {
            tracing::warn!("timerfd on CLOCK_BOOTTIME unavailable; sleeping on the monotonic clock (suspend not counted)");
        }
        BootTimer { fd }
    }

    /// Sleeps until CLOCK_BOOTTIME reaches `deadline_ns`.
    pub async fn sleep_until(&mut self, deadline_ns: i64) {
        use rustix::time::{timerfd_settime, Itimerspec, TimerfdTimerFlags, Timespec};
        let Some(fd) = self.fd.as_mut() else {
            let wait = (deadline_ns - boot_ns()).max(0) as u64;
            tokio::time::sleep(std::time::Duration::from_nanos(wait)).await;
            return;
        };
        if deadline_ns <= boot_ns() {
            return;
        }
        let spec = Itimerspec {
            it_interval: Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: Timespec {
                tv_sec: deadline_ns / 1_000_000_000,
                tv_nsec: deadline_ns % 1_000_000_000,
            },
        };
        if timerfd_settime(fd.get_ref(), TimerfdTimerFlags::ABSTIME, &spec).is_err() {
            let wait = (deadline_ns - boot_ns()).max(0) as u64;
            tokio::time::sleep(std::time::Duration::from_nanos(wait)).await;
            return;
        }
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            let mut buf = [0u8; 8];
            match guard.try_io(|inner| {
                rustix::io::read(inner.get_ref(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(_) => return,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Registers the timerfd with tokio's reactor.
#[allow(unsafe_code)]
fn register(fd: OwnedFd) -> Option<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open for
    // exactly as long as it is registered, and nothing else can close it.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.ok()
}

impl Default for BootTimer {
    fn default() -> Self {
        BootTimer::new()
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
    fn steps_are_detected_against_boot_time() {
        let mut g = ClockGuard::new(0, None);
        let mut notes = Vec::new();
        g.observe(r(GOOD, 10_000), &mut notes);
        g.observe(r(GOOD + 5_000, 15_000), &mut notes);
        assert!(notes.is_empty(), "steady clock flagged: {notes:?}");
        g.observe(r(GOOD + 3_605_000, 16_000), &mut notes);
        assert_eq!(notes, [ClockNote::Jumped { by_ms: 3_599_000 }]);
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

    #[tokio::test]
    async fn boot_timer_wakes_at_its_deadline() {
        let mut t = BootTimer::new();
        let start = boot_ns();
        t.sleep_until(start + 50_000_000).await;
        let woke = boot_ns();
        assert!(
            woke >= start + 50_000_000,
            "woke {} ns early",
            start + 50_000_000 - woke
        );
    }
}
