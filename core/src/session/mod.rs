//! The session protocols of both ends as state machines, in quinn-proto's
//! shape: `handle_*(now, …)` in; `poll_transmit` (messages),
//! `poll_effect` (what the shell must do), `poll_event` (what happened, for
//! logs, metrics and dashboards) and `poll_timeout` out. No I/O, no clock:
//! the same machines run under QUIC in the binaries and on virtual time in
//! the simulator.

pub mod agent;
pub mod coordinator;

/// Fixtures of both machines' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::Now;
    use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, Timestamp};

    /// The time `ms` after an origin, on both clocks.
    pub fn at(ms: u64) -> Now {
        Now {
            mono_ms: ms,
            wall: Timestamp::from_millis_saturating(1_800_000_000_000 + ms as i64),
        }
    }

    /// A skipped run's record.
    pub fn record(task: u64, agent: u64, scheduled_ms: i64) -> RunRecord {
        RunRecord {
            task_id: TaskId(task),
            agent_id: AgentId(agent),
            scheduled_at: Timestamp::from_millis_saturating(scheduled_ms),
            attempt: 1,
            fired_at: None,
            finished_at: None,
            outcome: Outcome::Skipped,
            exit_code: None,
            offline: false,
            detail: None,
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
        }
    }
}

use sundial_protocol::{AgentId, RunKey, Timestamp};

/// The time, as the machines take it: a monotonic reading in ms (for
/// timers) and the wall clock (for clock samples and records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub wall: Timestamp,
}

/// A small deterministic random source (SplitMix64) for jitter; never for
/// secrets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `p` (0.0–1.0).
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// What the core decided, for observers (logs, metrics, a dashboard).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    // ---- the agent's session
    /// The coordinator stated how to reconnect (as clamped by the agent).
    ReconnectPolicy(sundial_protocol::wire::ReconnectPolicy),
    SessionUp {
        last_revision: u64,
        outbox_len: u64,
    },
    SessionDown {
        closed: agent::Closed,
    },
    /// Nothing heard for a while: runs fired now are marked offline.
    LinkSilent {
        silent_ms: u64,
    },
    LinkHeard,
    HandshakeRefused {
        why: String,
    },
    Revoked,
    AssignmentsApplied {
        changes: usize,
        upto_revision: u64,
    },
    ResultsSent {
        batch_id: u64,
        runs: usize,
    },
    ResultsAcked {
        batch_id: u64,
        runs: usize,
    },
    // ---- the coordinator's session
    AgentSessionUp {
        agent: AgentId,
        last_revision: u64,
        outbox_len: u64,
    },
    AssignmentsSent {
        agent: AgentId,
        changes: usize,
        messages: usize,
        upto_revision: u64,
    },
    ResultsStored {
        agent: AgentId,
        batch_id: u64,
        runs: usize,
    },
    ResultsRefused {
        agent: AgentId,
        batch_id: u64,
        why: String,
    },
    /// An agent uploads faster than its limit: its next batch waits.
    UploadThrottled {
        agent: AgentId,
        wait_ms: u64,
    },
    // ---- an agent node
    /// What the clock guard noticed.
    Clock(crate::clock::ClockNote),
    /// The coordinator measured the clock: time is trusted from here.
    ClockVouched {
        offset_ms: i64,
        rtt_ms: i64,
        /// The wall clock had been ahead of trusted time by this much.
        was_ahead_ms: Option<i64>,
        /// Trusted time moved by this much (negative: back).
        moved_ms: i64,
        /// A large move, confirmed by samples over a span.
        confirmed: bool,
        /// Time went back from here, where occurrences had been decided up
        /// to: the scheduler went back with it.
        rewound_from: Option<Timestamp>,
        at: Timestamp,
    },
    /// A new boot's first vouching did not come in time (or the coordinator
    /// is unreachable): firing goes on by the unvouched wall clock.
    ClockUnvouched {
        waited_ms: i64,
        unreachable: bool,
    },
    TaskAssigned {
        task_id: sundial_protocol::TaskId,
        revision: u64,
    },
    /// At the cap of concurrent runs: occurrences due now are skipped.
    ConcurrencyCap {
        max: usize,
        task_id: sundial_protocol::TaskId,
    },
    /// A cancel reached the agent: the task is gone from its store.
    TaskRemoved {
        task_id: sundial_protocol::TaskId,
    },
    RunFired {
        key: RunKey,
        offline: bool,
    },
    RunRecorded {
        key: RunKey,
        outcome: sundial_protocol::Outcome,
    },
}
