//! The node's events as log lines. Floods (handshakes shed, connections
//! refused) are summed and said at most every [`WARN_INTERVAL`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use sundial_core::admission::Admit;
use sundial_core::coord::{CloseWhy, CoordEvent, Refusal};
use sundial_core::session::Event;
use sundial_protocol::{Outcome, TaskId, Timestamp};

use super::Shared;

/// Floods are logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Sums of what is logged in bulk.
#[derive(Debug, Default)]
pub(super) struct LogState {
    shed: u64,
    over_share: u64,
    pending_capped: u64,
    shed_said: Option<Instant>,
    pending_said: Option<Instant>,
    behind: u64,
    behind_said: Option<Instant>,
    store_failed: u64,
    store_said: Option<Instant>,
    /// Failed runs per task: when last said, and how many since.
    failed_runs: std::collections::HashMap<TaskId, (Option<Instant>, u64)>,
}

/// Tasks whose failed runs are remembered for rate limiting; beyond, the
/// memory starts over (a warning more, never unbounded).
const FAILED_TASKS_MAX: usize = 10_000;

fn due(said: &mut Option<Instant>) -> bool {
    if said.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
        *said = Some(Instant::now());
        true
    } else {
        false
    }
}

pub(super) fn event(shared: &Arc<Shared>, e: CoordEvent) {
    match e {
        CoordEvent::Shed { ip, why } => {
            let Ok(mut s) = shared.log.lock() else {
                return;
            };
            match why {
                Refusal::PendingPerAddress => {
                    s.pending_capped += 1;
                    if due(&mut s.pending_said) {
                        let refused = std::mem::take(&mut s.pending_capped);
                        tracing::warn!(%ip, refused, "refusing connections from an address with too many unauthenticated ones (handshaking or enrolling)");
                    }
                }
                Refusal::Budget(admit) => {
                    s.shed += 1;
                    if admit == Admit::OverShare {
                        s.over_share += 1;
                    }
                    if due(&mut s.shed_said) {
                        let refused = std::mem::take(&mut s.shed);
                        let over_address_share = std::mem::take(&mut s.over_share);
                        tracing::warn!(
                            refused,
                            over_address_share,
                            last_address = %ip,
                            "reconnect storm: refusing handshakes over the budget; agents come back spread out"
                        );
                    }
                }
                Refusal::Behind => {
                    s.behind += 1;
                    if due(&mut s.behind_said) {
                        let refused = std::mem::take(&mut s.behind);
                        tracing::warn!(
                            refused,
                            last_address = %ip,
                            "behind: as many connections are still starting as went into session in the last second (a busy CPU); refusing more until they are served; agents come back spread out"
                        );
                    }
                }
            }
        }
        CoordEvent::LeasesPlanned {
            task,
            revision,
            windows,
            members,
        } => tracing::debug!(%task, revision, windows, members, "lease windows planned"),
        CoordEvent::ConnRefused { ip, why } => {
            tracing::warn!(remote = %ip, ?why, "refused a connection")
        }
        CoordEvent::Closing { conn, agent, why } => match why {
            CloseWhy::NoHelloInTime => {
                tracing::warn!(conn, ?agent, "no Hello within the deadline; closing")
            }
            CloseWhy::NotReading => tracing::warn!(
                conn,
                ?agent,
                "the agent does not read what it is sent; closing its session"
            ),
            other => tracing::debug!(conn, ?agent, why = ?other, "closing a connection"),
        },
        CoordEvent::SessionBusy {
            agent,
            retry_after_ms,
        } => {
            tracing::warn!(%agent, retry_after_ms, "session refused: the coordinator serves its maximum of sessions")
        }
        CoordEvent::SessionReplaced { agent } => {
            tracing::info!(%agent, "a newer session of this agent replaces an older one")
        }
        CoordEvent::AgentSessionDown { agent } => tracing::info!(%agent, "agent session down"),
        CoordEvent::StoreBehind {
            agent,
            agent_revision,
            lost,
            revision,
        } => {
            tracing::warn!(%agent, agent_revision, lost_ids = ?lost, revision, "this agent is ahead of the store, which was restored from an older backup: counters moved past it, and the agent is sent its whole assignment again")
        }
        CoordEvent::RunsOfUnknownTask { agent, task } => {
            tracing::warn!(%agent, %task, "records of a task this store does not know (restored from an older backup?) were acknowledged and dropped: they cannot be stored")
        }
        CoordEvent::RunConflict {
            agent,
            key: (task, _, sched, attempt),
        } => {
            tracing::warn!(%agent, task = %TaskId(task), scheduled_at = %Timestamp::from_millis_saturating(sched), attempt, "a different record for a run already stored was refused; the first record stands")
        }
        CoordEvent::ChangeAnnounced { revision, sessions } => {
            tracing::debug!(revision, sessions, "change announced")
        }
        CoordEvent::AssignmentApplied {
            agent,
            revision,
            lag_ms,
        } => tracing::debug!(%agent, revision, lag_ms, "assignments applied"),
        CoordEvent::AdminChanged { by, change } => tracing::info!(%by, ?change, "admin change"),
        CoordEvent::AdminRefused { by, why } => {
            tracing::info!(%by, reason = %why, "admin request refused")
        }
        CoordEvent::AgentRevoked {
            agent,
            by,
            sessions_closed,
        } => tracing::warn!(%agent, %by, sessions_closed, "agent revoked"),
        CoordEvent::Enrolled { agent, name } => tracing::info!(%agent, ?name, "agent enrolled"),
        CoordEvent::EnrollRefused { why } => tracing::warn!(reason = ?why, "enrollment refused"),
        CoordEvent::RunsRecorded { runs } => {
            // Failed runs at WARN, at most one line per task per interval
            // (with how many more there were).
            let Ok(mut s) = shared.log.lock() else {
                return;
            };
            for r in runs.iter().filter(|r| {
                matches!(
                    r.outcome,
                    Outcome::Failed | Outcome::TimedOut | Outcome::Rejected | Outcome::Interrupted
                )
            }) {
                if s.failed_runs.len() >= FAILED_TASKS_MAX && !s.failed_runs.contains_key(&r.task) {
                    s.failed_runs.clear();
                }
                let entry = s.failed_runs.entry(r.task).or_insert((None, 0));
                if due(&mut entry.0) {
                    let more = std::mem::take(&mut entry.1);
                    tracing::warn!(
                        task = %r.task,
                        agent = %r.agent,
                        scheduled_at = %r.scheduled_at,
                        attempt = r.attempt,
                        outcome = r.outcome.as_str(),
                        why = r.why.as_deref().unwrap_or("-"),
                        more_since_last = more,
                        "a run did not succeed"
                    );
                } else {
                    entry.1 += 1;
                }
            }
        }
        CoordEvent::Audited(e) => match &e.refused {
            None => tracing::info!(
                admin = %e.admin,
                action = %e.action,
                subject = e.subject.as_deref().unwrap_or("-"),
                from = e.from.as_deref().unwrap_or("-"),
                "audit"
            ),
            Some(why) => tracing::warn!(
                admin = %e.admin,
                action = %e.action,
                subject = e.subject.as_deref().unwrap_or("-"),
                from = e.from.as_deref().unwrap_or("-"),
                reason = %why,
                "audit: refused"
            ),
        },
        CoordEvent::AuditPurged { before } => {
            tracing::info!(%before, "audit retention: deleted entries written before the retention")
        }
        CoordEvent::RunsPurged { deleted, before } => {
            tracing::info!(deleted, %before, "run retention: deleted runs scheduled before the retention")
        }
        CoordEvent::StoreFailed { error } if shared.shared_store && error.is_unavailable() => {
            // Every session and admin request meets an outage: said once
            // every WARN_INTERVAL, with how many failed.
            let Ok(mut s) = shared.log.lock() else {
                return;
            };
            s.store_failed += 1;
            if due(&mut s.store_said) {
                let failed = std::mem::take(&mut s.store_failed);
                tracing::error!(error = %error, failed, "the shared store is unreachable: sessions are closed (agents keep firing and keep their records), admin requests refused; reconnecting by itself");
            }
        }
        CoordEvent::AgentRevokedElsewhere {
            agent,
            sessions_closed,
        } => tracing::warn!(%agent, sessions_closed, "agent revoked through another coordinator"),
        CoordEvent::FeedApplied {
            tasks,
            certs_added,
            certs_revoked,
            run_nows,
        } => tracing::debug!(
            tasks,
            certs_added,
            certs_revoked,
            run_nows,
            "changes from the shared store"
        ),
        CoordEvent::RunNowQueued { agents } => tracing::info!(
            agents,
            "run-now for agents not in session here left for the coordinator that holds them"
        ),
        CoordEvent::StoreFailed { error } => {
            if error.is_unavailable() {
                tracing::error!(error = %error, "the store failed to write (disk full or failing?); stopping so the supervisor restarts the coordinator with the store reopened. Nothing committed is lost; agents keep their records until then");
            } else {
                tracing::error!(error = %error, "a store operation failed");
            }
        }
        CoordEvent::EventsDropped { count } => {
            tracing::warn!(
                count,
                "coordinator events were dropped before they were logged"
            )
        }
        CoordEvent::Session(e) => session_event(e),
    }
}

fn session_event(event: Event) {
    match event {
        Event::AgentSessionUp {
            agent,
            last_revision,
            outbox_len,
        } => tracing::info!(%agent, last_revision, outbox_len, "agent session up"),
        Event::ResultsRefused {
            agent,
            batch_id,
            why,
        } => {
            tracing::warn!(%agent, batch_id, reason = %why, "refused a result batch; closing the session")
        }
        Event::UploadThrottled { agent, wait_ms } => {
            tracing::warn!(%agent, wait_ms, "agent uploads faster than its limit; slowing it down")
        }
        Event::AssignmentsSent {
            agent,
            changes,
            messages,
            upto_revision,
        } => tracing::debug!(%agent, changes, messages, upto_revision, "assignments sent"),
        other => tracing::trace!(event = ?other, "session"),
    }
}
