//! The agent's clocks: the wall clock and CLOCK_BOOTTIME read for real
//! ([`SystemClock`]), the boot id, and [`BootTimer`], which sleeps on
//! CLOCK_BOOTTIME so a suspended device wakes on time. The rules that judge
//! the readings are the core's [`ClockGuard`].

use std::os::fd::OwnedFd;

pub use sundial_core::clock::*;

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

/// This boot's id (`/proc/sys/kernel/random/boot_id`), if the kernel says.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
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
