//! The coordinator's side of placement: planning lease windows ahead.
//!
//! The node keeps the ids of placed tasks (those of the store at start,
//! [`placed_tasks`], then those created, changed or resumed) and when each
//! is next to be looked at; a [`StoreJob::Plan`](super::jobs::StoreJob::Plan) reads those
//! that are due, plans their next windows with the agents in session that
//! they reach ([`Placement::plan`]), writes each changed plan as a new
//! revision (compare-and-set: with several coordinators on one store, one
//! plan wins and the others read it again). The node then announces the
//! new revisions to the sessions, as for any change.

use sundial_protocol::placement::PlanStep;
use sundial_protocol::task::Target;
use sundial_protocol::{AgentId, TaskId, Timestamp};

use crate::coord_store::{targets, CoordStore, StoreError, StoreResult, PAGE_MAX};

/// How often, at most, the node looks for placed tasks due for planning, ms.
pub const PLAN_INTERVAL_MS: u64 = 500;
/// How long, at most, between two looks while tasks are placed, ms.
pub const PLAN_WAIT_MAX_MS: u64 = 60_000;
/// The most placed tasks one planning job looks at.
pub const PLAN_BATCH_MAX: usize = 1_000;
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
    /// Windows planned, and the members seated in the newest.
    pub windows: usize,
    pub members: usize,
}

/// The placed tasks of the store (read by the shell when the node starts).
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

/// Plans `tasks` at `now` with `members`, and on a `shared` store the
/// agents in session with other coordinators (see the module docs).
/// `replan_bug` seeds a fault for the simulator's checks: the last window,
/// not yet ended, is planned again with whoever is in session now.
pub fn plan(
    store: &dyn CoordStore,
    tasks: &[TaskId],
    members: &[Member],
    here: &[AgentId],
    shared: bool,
    now: Timestamp,
    replan_bug: bool,
) -> StoreResult<Vec<Planned>> {
    let mut out = Vec::new();
    // On a store other coordinators share, the agents in session with them
    // are members too (as their fresh session marks say); read only when
    // a window is to be planned.
    let mut elsewhere: Option<Vec<Member>> = None;
    for &id in tasks {
        let gone = Planned {
            task: id,
            next_at: None,
            announce: None,
            windows: 0,
            members: 0,
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
        if shared
            && elsewhere.is_none()
            && placement.needs_plan(&spec.schedule, spec.created_at, now)
        {
            elsewhere = Some(
                crate::coord::admin::all_agents(store)?
                    .into_iter()
                    .filter(|a| {
                        // Those in session here are members only if they
                        // follow lease windows (`members`).
                        !a.revoked
                            && !here.contains(&a.id)
                            && a.in_session
                            && a.last_seen.is_some_and(|t| {
                                t.millis_since(now) > -crate::coord::admin::SESSION_MARK_FRESH_MS
                            })
                    })
                    .map(|a| (a.id, a.labels))
                    .collect(),
            );
        }
        let mut reached: Vec<AgentId> = members
            .iter()
            .chain(elsewhere.iter().flatten())
            .filter(|(a, labels)| targets(&spec.target, *a, labels))
            .map(|(a, _)| *a)
            .collect();
        reached.sort_unstable();
        reached.dedup();
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
        let members = reached.len();
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
        out.push(Planned {
            task: id,
            next_at: step.next_at,
            announce: Some((spec.target.clone(), revision)),
            windows,
            members,
        });
    }
    Ok(out)
}

/// A wall clock that moved by more than this against the monotonic clock
/// since the last believed reading has stepped.
pub const PLAN_STEP_MAX_MS: i64 = 1_000;
/// A step is believed once it has held this long.
pub const PLAN_STEP_CONFIRM_MS: u64 = 10 * 60_000;

/// The time planning uses: the wall clock while it runs with the monotonic
/// clock; a step (either way) is followed only once it has held for
/// [`PLAN_STEP_CONFIRM_MS`], and until then time follows the monotonic
/// clock from the last believed reading. A coordinator whose clock jumps
/// an hour ahead for a minute would otherwise plan an hour of windows that
/// nobody holds, and one whose clock jumps back would stall placement.
#[derive(Clone, Debug, Default)]
pub struct PlanClock {
    /// The last believed reading: (wall ms, monotonic ms).
    base: Option<(i64, u64)>,
    /// A step not yet believed: its size and since when.
    step: Option<(i64, u64)>,
}

impl PlanClock {
    pub fn time(&mut self, wall: Timestamp, mono_ms: u64) -> Timestamp {
        let w = wall.as_millis();
        let Some((base_wall, base_mono)) = self.base else {
            self.base = Some((w, mono_ms));
            return wall;
        };
        let line = base_wall + mono_ms.saturating_sub(base_mono) as i64;
        let off = w - line;
        if off.abs() <= PLAN_STEP_MAX_MS {
            self.base = Some((w, mono_ms));
            self.step = None;
            return wall;
        }
        match self.step {
            Some((size, since)) if (size - off).abs() <= PLAN_STEP_MAX_MS => {
                if mono_ms.saturating_sub(since) >= PLAN_STEP_CONFIRM_MS {
                    self.base = Some((w, mono_ms));
                    self.step = None;
                    return wall;
                }
            }
            _ => self.step = Some((off, mono_ms)),
        }
        Timestamp::from_millis_saturating(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_followed_only_once_it_held() {
        let mut c = PlanClock::default();
        let t = |ms| Timestamp::from_millis_saturating(ms);
        assert_eq!(c.time(t(1_000_000), 0), t(1_000_000));
        // An hour ahead for 30 s: planning follows the monotonic clock.
        assert_eq!(c.time(t(4_600_000), 1_000), t(1_001_000));
        assert_eq!(c.time(t(4_630_000), 31_000), t(1_031_000));
        // Back in line: followed.
        assert_eq!(c.time(t(1_032_000), 32_000), t(1_032_000));
        // An hour back for a while: the same.
        assert_eq!(c.time(t(-2_567_000), 33_000), t(1_033_000));
        assert_eq!(c.time(t(1_034_000), 34_000), t(1_034_000));
        // A step that holds is believed after ten minutes.
        let m = PLAN_STEP_CONFIRM_MS;
        assert_eq!(c.time(t(3_000_000), 35_000), t(1_035_000));
        assert_eq!(
            c.time(t(3_000_000 + m as i64), 35_000 + m),
            t(3_000_000 + m as i64)
        );
    }
}
