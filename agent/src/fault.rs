//! Fault switches for proving the fleet checker can fail. Compiled in only
//! with the `fault-injection` feature (test builds of `sundial-tests`); in
//! every other build [`active`] is a constant `false`.
//!
//! `SUNDIAL_FAULT` is a comma list of:
//! - `double-fire`: every run is started twice (a duplicate);
//! - `ack-early`: records leave the outbox when sent, before the
//!   acknowledgement (a loss when the link drops).

/// Whether the named fault is switched on.
#[cfg(feature = "fault-injection")]
pub fn active(name: &str) -> bool {
    std::env::var("SUNDIAL_FAULT")
        .map(|v| v.split(',').any(|f| f.trim() == name))
        .unwrap_or(false)
}

/// Whether the named fault is switched on: never, in this build.
#[cfg(not(feature = "fault-injection"))]
pub fn active(_name: &str) -> bool {
    false
}
