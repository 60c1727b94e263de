//! `sundial-tests`: the whole fleet on one machine.
//!
//! - [`relay`]: a fault-injecting UDP relay per agent (cut, one-way loss,
//!   delay with jitter, loss, duplication, reordering);
//! - [`harness`]: a coordinator and agents as real processes of the
//!   simulator's own binary (or lightweight in-process agents), started,
//!   stopped and `kill -9`ed;
//! - [`checker`]: derives the expected occurrences from the schedules and
//!   checks the actions' own start records and the coordinator's records
//!   against them;
//! - [`scenario`]: seeded fault timelines; `sundial-sim` runs them;
//! - [`virt`]: the deterministic simulator (`sundial-sim virtual`): fleets of
//!   the core's agent nodes and coordinator sessions on virtual time.
//!
//! Invariant: everything listens on 127.0.0.1 and writes under one
//! temporary directory per run; every random choice comes from the seed.

pub mod bench;
pub mod checker;
pub mod crash_disk;
pub mod fuzz;
pub mod harness;
pub mod light;
pub mod oracle;
pub mod pg;
pub mod relay;
pub mod rng;
pub mod scenario;
pub mod virt;

/// An owner admin record for tests: certificate SHA-256 `cert_sha256`,
/// valid for a century from 2020.
pub fn test_owner(name: &str, cert_sha256: [u8; 32]) -> sundial_protocol::wire::AdminInfo {
    let t = sundial_protocol::Timestamp::from_millis_saturating;
    sundial_protocol::wire::AdminInfo {
        name: name.into(),
        role: sundial_protocol::wire::Role::Owner,
        cert_sha256,
        created_at: t(1_577_836_800_000),
        created_by: "test".into(),
        expires_at: t(4_733_510_400_000),
        revoked_at: None,
        last_used: None,
    }
}
