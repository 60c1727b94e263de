//! Messages of the agent–coordinator session (ALPN `sundial/1`).
//!
//! Session: the agent sends [`AgentMsg::Hello`]; the coordinator answers with
//! [`CoordMsg::Assignments`] (changes since the agent's revision, or a
//! snapshot), then streams further changes as they happen. Results travel up
//! in [`AgentMsg::Results`] batches and are acknowledged by
//! [`CoordMsg::ResultsAck`] only after the coordinator's commit. Clock samples
//! are exchanged NTP-style with [`AgentMsg::ClockProbe`] / [`CoordMsg::ClockReply`].

use serde::{Deserialize, Serialize};

use crate::task::{RunKey, RunRecord, TaskId, TaskSpec};
use crate::time::Timestamp;

/// The version of this message set; a peer with another is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// The QUIC ALPN of the session.
pub const ALPN: &[u8] = b"sundial/1";

/// The most run records in one result batch.
pub const RESULT_BATCH_RUNS_MAX: usize = 512;

/// Agent → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello {
        /// The last assignment revision this agent applied.
        last_revision: u64,
        /// Run records waiting in its outbox.
        outbox_len: u64,
        agent_version: String,
    },
    Results {
        batch_id: u64,
        runs: Vec<RunRecord>,
    },
    ClockProbe {
        /// Agent's clock when sent (NTP t1).
        t1: Timestamp,
    },
}

/// Coordinator → agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CoordMsg {
    Assignments {
        /// When set, `changes` is the whole set: tasks not in it are gone.
        snapshot: bool,
        changes: Vec<AssignmentChange>,
        /// The revision the agent has after applying these.
        upto_revision: u64,
    },
    ResultsAck {
        batch_id: u64,
        /// Every run of the batch, now durably stored.
        keys: Vec<RunKey>,
    },
    ClockReply {
        t1: Timestamp,
        /// Coordinator's clock at receipt (t2) and at reply (t3).
        t2: Timestamp,
        t3: Timestamp,
    },
    /// The session is closed for the reason given.
    Refused { reason: String },
}

/// One change to an agent's assignments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AssignmentChange {
    Upsert(Box<TaskSpec>),
    Cancel { task_id: TaskId, revision: u64 },
}
