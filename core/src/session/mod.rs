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
    /// Events a session machine dropped, its queue full ([`EVENTS_MAX`]):
    /// nobody drained them.
    EventsDropped {
        count: u64,
    },
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
    /// Nothing heard for the session's idle timeout: the agent ends the
    /// connection and dials again.
    LinkIdle {
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
    /// A function's module arrived whole (to be stored).
    ModuleReceived {
        hash: sundial_protocol::wasm::ModuleHash,
        size: u64,
    },
    /// A module's pieces did not make the module they said.
    ModuleRefused {
        why: String,
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

/// Events a session machine keeps for its node; beyond, the oldest go and
/// are counted ([`Event::EventsDropped`]). The nodes drain them after
/// every call, so only a node that stops reading fills it.
pub const EVENTS_MAX: usize = 1_024;

/// Effects or messages a session machine may hold between two of its
/// node's drains. One call makes at most a page of assignments, a window of
/// result batches and a few acknowledgements, probes and notices; the nodes
/// drain after every call (the coordinator's writer may lag: its backlog is
/// bounded by the node's `TRANSMIT_BACKLOG_MAX`, over which the session is
/// closed). Checked in debug builds (tests and simulators).
pub const DRAINED_QUEUE_MAX: usize = 4_096;

// A session's messages before they are pulled: the coordinator closes a
// session at TRANSMIT_BACKLOG_MAX, well below the debug check.
const _: () = assert!(crate::coord::TRANSMIT_BACKLOG_MAX < DRAINED_QUEUE_MAX);

/// A session machine's events, bounded by [`EVENTS_MAX`].
#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    queue: std::collections::VecDeque<Event>,
    dropped: u64,
}

impl EventQueue {
    pub(crate) fn push_back(&mut self, e: Event) {
        if self.queue.len() >= EVENTS_MAX {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(e);
    }

    pub(crate) fn pop_front(&mut self) -> Option<Event> {
        if self.dropped > 0 {
            let count = std::mem::take(&mut self.dropped);
            return Some(Event::EventsDropped { count });
        }
        self.queue.pop_front()
    }
}

#[cfg(test)]
mod queue_tests {
    use super::*;

    #[test]
    fn a_full_event_queue_drops_the_oldest_and_says_how_many() {
        let mut q = EventQueue::default();
        for _ in 0..EVENTS_MAX + 5 {
            q.push_back(Event::LinkHeard);
        }
        assert_eq!(q.pop_front(), Some(Event::EventsDropped { count: 5 }));
        let rest = std::iter::from_fn(|| q.pop_front()).count();
        assert_eq!(rest, EVENTS_MAX);
    }
}
