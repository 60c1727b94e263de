//! The coordinator's side of placement: planning lease windows ahead.
//!
//! The node keeps the ids of placed tasks and when each is next to be
//! looked at; a [`StoreJob::Plan`](super::jobs::StoreJob::Plan) reads those
//! that are due, plans their next windows with the agents in session that
//! they reach ([`Placement::plan`]), writes each changed plan as a new
//! revision (compare-and-set: with several coordinators on one store, one
//! plan wins and the others read it again), and records the occurrences of
//! windows no member held as `skipped`. The node then announces the new
//! revisions to the sessions, as for any change.

use sundial_protocol::placement::PlanStep;
use sundial_protocol::task::Target;
use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, TaskSpec, Timestamp};

use crate::coord_store::{targets, CoordStore, StoreError, StoreResult, PAGE_MAX};

/// How often the node looks for placed tasks due for planning, ms.
pub const PLAN_INTERVAL_MS: u64 = 500;
/// The most placed tasks one planning job looks at.
pub const PLAN_BATCH_MAX: usize = 1_000;
/// The most `skipped` records written for one window no member held.
pub const UNMANNED_RECORDS_MAX: usize = 1_000;
/// The agent id of records the coordinator writes itself (no agent ran or
/// skipped them): no agent has it.
pub const NO_AGENT: AgentId = AgentId(0);
/// The detail of an occurrence no member held.
pub const NO_MEMBER_DETAIL: &str = "no member held its lease (no agent the task reaches was in session when its window was planned)";

/// An agent in session here: its id and labels.
pub type Member = (AgentId, Vec<(String, String)>);

/// What planning did to one task.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub task: TaskId,
    /// When to look at it again (`None`: it has no more occurrences, or is
    /// gone, paused or no longer placed: forget it until it changes).
    pub next_at: Option<Timestamp>,
    /// A new plan was stored: announce this revision to its target.
    pub announce: Option<(Target, u64)>,
    /// Windows planned, and those of them with no member.
    pub windows: usize,
    pub unmanned: usize,
    /// `skipped` records written for occurrences no member held.
    pub skipped: usize,
}

/// The placed tasks of the store (read once when the node starts).
pub fn placed_tasks(store: &dyn CoordStore) -> StoreResult<Vec<TaskId>> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store.tasks(after, PAGE_MAX)?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.spec.id);
        out.extend(
            page.iter()
                .filter(|t| !t.removed() && t.spec.placement.is_some())
                .map(|t| t.spec.id),
        );
        if page.len() < PAGE_MAX {
            break;
        }
    }
    Ok(out)
}

/// Plans `tasks` at `now` with `members` (see the module docs).
/// `replan_bug` seeds a fault for the simulator's checks: the last window,
/// not yet ended, is planned again with whoever is in session now.
pub fn plan(
    store: &dyn CoordStore,
    tasks: &[TaskId],
    members: &[Member],
    now: Timestamp,
    replan_bug: bool,
) -> StoreResult<Vec<Planned>> {
    let mut out = Vec::new();
    for &id in tasks {
        let gone = Planned {
            task: id,
            next_at: None,
            announce: None,
            windows: 0,
            unmanned: 0,
            skipped: 0,
        };
        let Some(stored) = store.task(id)? else {
            out.push(gone);
            continue;
        };
        if stored.removed() {
            out.push(gone);
            continue;
        }
        let mut spec = stored.spec;
        let Some(mut placement) = spec.placement.take() else {
            out.push(gone);
            continue;
        };
        let reached: Vec<AgentId> = members
            .iter()
            .filter(|(a, labels)| targets(&spec.target, *a, labels))
            .map(|(a, _)| *a)
            .collect();
        if replan_bug {
            if let Some(last) = placement.windows.last() {
                let seated: Vec<AgentId> = last.seats.iter().map(|(_, a)| *a).collect();
                if last.until > now && last.from <= now && seated != reached {
                    placement.windows.pop();
                }
            }
        }
        let step: PlanStep = placement.plan(&spec.schedule, spec.created_at, now, &reached);
        if !step.changed {
            out.push(Planned {
                next_at: step.next_at,
                ..gone
            });
            continue;
        }
        let windows = step.added;
        let expected = spec.revision;
        spec.placement = Some(placement);
        let revision = match store.update_task(&spec, expected, None) {
            Ok(r) => r,
            // Another coordinator planned it first: read it again soon.
            Err(StoreError::Conflict(_)) => {
                out.push(Planned {
                    next_at: Some(now),
                    ..gone
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        let records = unmanned_records(&spec, &step);
        let skipped = records.len();
        if !records.is_empty() {
            store.store_runs(&records)?;
        }
        out.push(Planned {
            task: id,
            next_at: step.next_at,
            announce: Some((spec.target.clone(), revision)),
            windows,
            unmanned: step.unmanned.len(),
            skipped,
        });
    }
    Ok(out)
}

/// `skipped` records for the occurrences of the windows no member held
/// (the most recent [`UNMANNED_RECORDS_MAX`] of each).
fn unmanned_records(spec: &TaskSpec, step: &PlanStep) -> Vec<RunRecord> {
    let mut out = Vec::new();
    for &(from, until) in &step.unmanned {
        let from = from.max(spec.created_at);
        let mut at: Vec<Timestamp> = Vec::new();
        let mut cursor = spec.schedule.next_after(from.saturating_add_ms(-1));
        let mut scanned = 0usize;
        while let Some(t) = cursor {
            if t >= until || scanned >= 100 * UNMANNED_RECORDS_MAX {
                break;
            }
            if at.len() == UNMANNED_RECORDS_MAX {
                at.remove(0);
            }
            at.push(t);
            scanned += 1;
            cursor = spec.schedule.next_after(t);
        }
        out.extend(at.into_iter().map(|t| RunRecord {
            task_id: spec.id,
            agent_id: NO_AGENT,
            scheduled_at: t,
            attempt: 1,
            fired_at: None,
            finished_at: None,
            outcome: Outcome::Skipped,
            exit_code: None,
            offline: false,
            detail: Some(NO_MEMBER_DETAIL.into()),
            stdout_tail: Vec::new(),
            stderr_tail: Vec::new(),
        }));
    }
    out
}
