//! The node's events as log lines.

use super::*;

pub(super) fn log_event(event: &Event) {
    match event {
        Event::Clock(n) => log_clock_note(n),
        Event::ClockVouched {
            offset_ms,
            rtt_ms,
            was_ahead_ms,
            moved_ms,
            confirmed,
            rewound_from,
            at,
        } => {
            if let Some(by_ms) = was_ahead_ms {
                tracing::info!(by_ms, offset_ms, %at, "the coordinator vouched for the time: the wall clock's lead is now corrected by the offset");
            }
            if *confirmed {
                tracing::warn!(moved_ms, offset_ms, %at, "a lasting disagreement with the coordinator's clock was confirmed by several samples: trusted time moved to the coordinator's");
            }
            if let Some(from) = rewound_from {
                tracing::warn!(moved_ms, %at, decided_until = %from, "trusted time went back: the clock had been ahead; what was decided up to the old time stays decided, the rest fires at its time");
            } else if moved_ms.abs() > 1_000 {
                tracing::info!(moved_ms, offset_ms, %at, "the coordinator's first clock sample of this boot corrected trusted time");
            }
            tracing::debug!(
                offset_ms,
                rtt_ms,
                "clock offset to the coordinator measured"
            );
        }
        Event::ClockUnvouched {
            waited_ms,
            unreachable,
        } => {
            if *unreachable {
                tracing::warn!(waited_ms, "the coordinator is unreachable at boot: firing goes on by this device's wall clock, unvouched (were it wrong, runs would be early or late)");
            } else {
                tracing::warn!(waited_ms, "no clock sample from the coordinator in time: firing goes on by this device's wall clock, unvouched");
            }
        }
        Event::TaskAssigned { task_id, revision } => {
            tracing::info!(task = %task_id, revision, "task assigned")
        }
        Event::TaskRemoved { task_id } => tracing::info!(task = %task_id, "task cancelled"),
        Event::ConcurrencyCap { max, task_id } => {
            tracing::warn!(max, task = %task_id, "at the cap of concurrent runs; occurrences due now are recorded as skipped")
        }
        // A run that did not succeed is worth a look: WARN, so that
        // `grep -E 'WARN|ERROR'` finds every failed task.
        Event::RunRecorded { key, outcome } => match outcome {
            sundial_protocol::Outcome::Failed
            | sundial_protocol::Outcome::TimedOut
            | sundial_protocol::Outcome::Rejected
            | sundial_protocol::Outcome::Interrupted => {
                tracing::warn!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, %outcome, "run recorded: it did not succeed")
            }
            _ => {
                tracing::info!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, %outcome, "run recorded")
            }
        },
        other => session::log_event(other),
    }
}

pub(super) fn log_clock_note(n: &ClockNote) {
    match n {
        ClockNote::Jumped { by_ms } => tracing::warn!(
            by_ms,
            "wall clock stepped back against the boot clock; firing follows the earlier time (occurrences already fired do not fire again)"
        ),
        ClockNote::Ahead { by_ms } => tracing::warn!(
            by_ms,
            "wall clock is ahead of trusted time (stepped forward, or found so at start): firing follows the boot clock until the coordinator vouches for the time or the wall clock is back in line; nothing fires early"
        ),
        ClockNote::BackInLine => tracing::info!("wall clock agrees with trusted time again"),
        ClockNote::Untrusted {
            now,
            last_known_good,
        } => tracing::error!(
            %now, %last_known_good,
            "clock is behind the last known-good time: firing is held until the clock is trusted again"
        ),
        ClockNote::TrustRestored => tracing::info!("clock trusted again; firing resumes"),
        ClockNote::Disputed { by_ms, samples } => tracing::error!(
            by_ms,
            samples,
            "the coordinator's clock disagrees with this agent's trusted time by more than a second: not followed until several samples over a span confirm it (is the coordinator's clock wrong?)"
        ),
    }
}
