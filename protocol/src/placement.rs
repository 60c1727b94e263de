//! Placement: which of the agents a selector matches runs an occurrence.
//!
//! A task placed `one` runs each occurrence on exactly one member; a task
//! placed `shard` runs each occurrence on every member, each told its seat
//! (`SUNDIAL_SHARD_INDEX` of `SUNDIAL_SHARD_COUNT`). Either way the
//! coordinator decides ahead, in *lease windows*: a window `[from, until)`
//! of the timeline and the members that were in session when it was
//! planned, each with a seat. A window is planned once and never changed,
//! so every occurrence has one owner fixed before it is due, and an agent
//! fires its share from its own store, with or without a session — no
//! clock, however wrong, can make two members run the same occurrence.
//!
//! An agent fires an occurrence only if a window it was sent covers it and
//! gives it to its seat; it waits at an occurrence no window covers yet
//! (the plan is renewed ahead while agents are in session), and never runs
//! an occurrence it owns more than the misfire grace after its window ended.
//! Which member owns an occurrence of a `one` task is a hash of the task
//! and the occurrence, taken modulo the window's member count: every side
//! computes it without state, and the work spreads evenly whatever the
//! schedule's period.

use serde::{Deserialize, Serialize};

use crate::schedule::Schedule;
use crate::task::{AgentId, TaskId};
use crate::time::{DurationMs, Timestamp};

/// The shortest lease window.
pub const LEASE_MIN: DurationMs = DurationMs(1_000);
/// The longest lease window.
pub const LEASE_MAX: DurationMs = DurationMs(24 * 60 * 60 * 1_000);
/// The lease window when a task does not say.
pub const LEASE_DEFAULT: DurationMs = DurationMs(60_000);
/// The most members one window seats (the first by id, if more match).
pub const MEMBERS_MAX: usize = 256;
/// The most windows a plan may hold (what an agent accepts).
pub const LEASES_MAX: usize = 64;
/// The windows a coordinator keeps in a plan: the newest, whatever its
/// clock says (a window dropped while an agent still needs it would make
/// it pass over occurrences it owns), for agents that come back and for
/// `task get`.
pub const LEASES_KEPT: usize = 32;
/// The most occurrences [`Placement::shares`] counts.
pub const SHARE_SCAN_MAX: usize = 100_000;
/// How long before an occurrence the coordinator plans its window: half a
/// window, within these bounds.
pub const LEAD_MIN_MS: i64 = 1_000;
pub const LEAD_MAX_MS: i64 = 5 * 60 * 1_000;

/// How occurrences are placed on the members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PlacementMode {
    /// Each occurrence on one member.
    One,
    /// Each occurrence on every member, with its seat in the environment.
    Shard,
}

impl PlacementMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementMode::One => "one",
            PlacementMode::Shard => "shard",
        }
    }
}

impl std::fmt::Display for PlacementMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PlacementMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "one" => Ok(PlacementMode::One),
            "shard" => Ok(PlacementMode::Shard),
            _ => Err(format!(
                "placement `{s}`: expected `one` (each occurrence on one matching agent) or `shard` (on every matching agent, each told its shard)"
            )),
        }
    }
}

/// A placement as a new task asks for it (`TaskDraft::placement`): plain
/// numbers, so that a draft whose placement is wrong decodes and is refused
/// with a reason rather than read as an older client's draft without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementAsk {
    /// 0 one, 1 shard.
    pub mode: u8,
    pub lease_ms: u64,
}

impl PlacementAsk {
    pub fn new(mode: PlacementMode, lease: DurationMs) -> PlacementAsk {
        PlacementAsk {
            mode: match mode {
                PlacementMode::One => 0,
                PlacementMode::Shard => 1,
            },
            lease_ms: lease.0,
        }
    }

    /// The placement asked for, with no plan yet; why not, if it cannot be.
    pub fn placement(self) -> Result<Placement, String> {
        let mode = match self.mode {
            0 => PlacementMode::One,
            1 => PlacementMode::Shard,
            m => return Err(format!("unknown placement mode {m} (0 one, 1 shard)")),
        };
        let p = Placement::new(mode, DurationMs(self.lease_ms));
        match p.refusal() {
            Some(why) => Err(why),
            None => Ok(p),
        }
    }
}

/// One planned window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseWindow {
    pub from: Timestamp,
    pub until: Timestamp,
    /// How many members share it.
    pub count: u32,
    /// `(seat, agent)`; an agent is sent only its own seat.
    pub seats: Vec<(u32, AgentId)>,
}

/// A task's placement: its mode, its window length and its plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub mode: PlacementMode,
    pub lease: DurationMs,
    /// Windows, oldest first, not overlapping (a gap: the task was paused).
    pub windows: Vec<LeaseWindow>,
}

#[derive(Deserialize)]
struct PlacementRepr {
    mode: PlacementMode,
    lease: DurationMs,
    windows: Vec<LeaseWindow>,
}

impl<'de> Deserialize<'de> for Placement {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let r = PlacementRepr::deserialize(d)?;
        let p = Placement {
            mode: r.mode,
            lease: r.lease,
            windows: r.windows,
        };
        match p.refusal() {
            Some(why) => Err(serde::de::Error::custom(why)),
            None => Ok(p),
        }
    }
}

/// What an agent does with one occurrence of a placed task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No window it knows covers it yet: wait for the plan.
    Unplanned,
    /// Another member's.
    NotMine,
    /// Its own, in a window that ends at `until`; `shard` is (index, count).
    Mine {
        until: Timestamp,
        shard: Option<(u32, u32)>,
    },
}

/// The seat that owns occurrence `at` of `task` among `count` (> 0).
pub fn owner_seat(task: TaskId, at: Timestamp, count: u32) -> u32 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let h = mix(task.0 ^ mix(at.as_millis() as u64));
    (h % u64::from(count.max(1))) as u32
}

/// What one planning step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStep {
    /// Windows were added or dropped: the task has a new plan.
    pub changed: bool,
    /// Windows added.
    pub added: usize,
    /// When the plan should be looked at next (`None`: no more occurrences).
    pub next_at: Option<Timestamp>,
}

impl Placement {
    /// A new placement with no plan yet.
    pub fn new(mode: PlacementMode, lease: DurationMs) -> Placement {
        Placement {
            mode,
            lease,
            windows: Vec::new(),
        }
    }

    /// How long before an occurrence its window is planned.
    pub fn lead_ms(&self) -> i64 {
        (self.lease.as_millis_i64() / 2).clamp(LEAD_MIN_MS, LEAD_MAX_MS)
    }

    /// Why this placement cannot be true; `None` if it can.
    pub fn refusal(&self) -> Option<String> {
        if self.lease < LEASE_MIN || self.lease > LEASE_MAX {
            return Some(format!(
                "the lease window {} is outside {LEASE_MIN}..={LEASE_MAX}",
                self.lease
            ));
        }
        if self.windows.len() > LEASES_MAX {
            return Some(format!(
                "{} lease windows; at most {LEASES_MAX}",
                self.windows.len()
            ));
        }
        for (i, w) in self.windows.iter().enumerate() {
            if w.from >= w.until {
                return Some(format!("lease window {i} ends before it begins"));
            }
            if i > 0 && self.windows[i - 1].until > w.from {
                return Some(format!(
                    "lease window {i} begins before the one before it ends"
                ));
            }
            if w.count == 0 || w.count as usize > MEMBERS_MAX || w.seats.len() > w.count as usize {
                return Some(format!(
                    "lease window {i} seats {} of {} members; at most {MEMBERS_MAX}",
                    w.seats.len(),
                    w.count
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for (seat, _) in &w.seats {
                if *seat >= w.count || !seen.insert(*seat) {
                    return Some(format!("lease window {i} has a bad seat {seat}"));
                }
            }
            let mut agents: Vec<AgentId> = w.seats.iter().map(|(_, a)| *a).collect();
            agents.sort_unstable();
            agents.dedup();
            if agents.len() != w.seats.len() {
                return Some(format!("lease window {i} seats an agent twice"));
            }
        }
        None
    }

    /// This placement as `agent` is sent it: every window, with only its own seat.
    pub fn for_agent(&self, agent: AgentId) -> Placement {
        Placement {
            mode: self.mode,
            lease: self.lease,
            windows: self
                .windows
                .iter()
                .map(|w| LeaseWindow {
                    from: w.from,
                    until: w.until,
                    count: w.count,
                    seats: w
                        .seats
                        .iter()
                        .filter(|(_, a)| *a == agent)
                        .copied()
                        .collect(),
                })
                .collect(),
        }
    }

    /// The window covering `at`.
    pub fn window_of(&self, at: Timestamp) -> Option<&LeaseWindow> {
        let i = self.windows.partition_point(|w| w.until <= at);
        self.windows.get(i).filter(|w| w.from <= at)
    }

    /// What `agent` does with occurrence `at` of `task`.
    pub fn decide(&self, task: TaskId, agent: AgentId, at: Timestamp) -> Decision {
        let Some(last) = self.windows.last() else {
            return Decision::Unplanned;
        };
        if at >= last.until {
            return Decision::Unplanned;
        }
        let Some(w) = self.window_of(at) else {
            // Before the oldest window kept: long decided.
            return Decision::NotMine;
        };
        let Some(&(seat, _)) = w.seats.iter().find(|(_, a)| *a == agent) else {
            return Decision::NotMine;
        };
        match self.mode {
            PlacementMode::One if owner_seat(task, at, w.count) == seat => Decision::Mine {
                until: w.until,
                shard: None,
            },
            PlacementMode::One => Decision::NotMine,
            PlacementMode::Shard => Decision::Mine {
                until: w.until,
                shard: Some((seat, w.count)),
            },
        }
    }

    /// [`Placement::decide`] on an agent's own view (which lists only its
    /// own seat, if any).
    pub fn decide_seated(&self, task: TaskId, at: Timestamp) -> Decision {
        let me = self
            .windows
            .iter()
            .find_map(|w| w.seats.first())
            .map_or(AgentId(0), |(_, a)| *a);
        self.decide(task, me, at)
    }

    /// The agent owning occurrence `at` of `task` (a `one` task), if any.
    pub fn owner(&self, task: TaskId, at: Timestamp) -> Option<AgentId> {
        let w = self.window_of(at)?;
        if w.count == 0 {
            return None;
        }
        let seat = owner_seat(task, at, w.count);
        w.seats.iter().find(|(s, _)| *s == seat).map(|(_, a)| *a)
    }

    /// Who runs occurrence `at` of `task`: its owner (`one`) or every
    /// member (`shard`); `None`: no window covers it.
    pub fn owners(&self, task: TaskId, at: Timestamp) -> Option<Vec<AgentId>> {
        let w = self.window_of(at)?;
        Some(match self.mode {
            PlacementMode::One => self.owner(task, at).into_iter().collect(),
            PlacementMode::Shard => w.seats.iter().map(|(_, a)| *a).collect(),
        })
    }

    /// Each member's count of the occurrences in the plan (from its oldest
    /// window kept to its end; at most [`SHARE_SCAN_MAX`] counted) — what
    /// `task get` shows.
    pub fn shares(&self, task: TaskId, schedule: &Schedule) -> Vec<(AgentId, u64)> {
        let mut per: std::collections::BTreeMap<AgentId, u64> = Default::default();
        let (Some(first), Some(end)) = (self.windows.first(), self.planned_until()) else {
            return Vec::new();
        };
        for w in &self.windows {
            for (_, a) in &w.seats {
                per.entry(*a).or_default();
            }
        }
        let occurrences = schedule
            .occurrences_after(first.from.saturating_add_ms(-1))
            .take_while(|t| *t < end)
            .take(SHARE_SCAN_MAX);
        for t in occurrences {
            for a in self.owners(task, t).into_iter().flatten() {
                *per.entry(a).or_default() += 1;
            }
        }
        per.into_iter().collect()
    }

    /// The end of the plan: where the next window begins.
    pub fn planned_until(&self) -> Option<Timestamp> {
        self.windows.last().map(|w| w.until)
    }

    /// Whether [`Placement::plan`] at `now` would plan a window (given members).
    pub fn needs_plan(&self, schedule: &Schedule, created_at: Timestamp, now: Timestamp) -> bool {
        let plan_end = self
            .planned_until()
            .map_or(created_at, |end| end.max(created_at));
        schedule
            .next_after(plan_end.saturating_add_ms(-1))
            .is_some_and(|next| next.millis_since(now) <= self.lead_ms())
    }

    /// Plans ahead at `now` (the coordinator's time): each occurrence
    /// within [`Placement::lead_ms`] of now gets a window, seating
    /// `members` (agents in session that the task reaches, sorted; at most
    /// [`MEMBERS_MAX`] seated). With no member, nothing is planned: agents
    /// wait, and the first member to come is seated over the whole stretch
    /// not yet planned (those of its occurrences already past it records
    /// skipped). Windows already planned never change.
    pub fn plan(
        &mut self,
        schedule: &Schedule,
        created_at: Timestamp,
        now: Timestamp,
        members: &[AgentId],
    ) -> PlanStep {
        let mut step = PlanStep::default();
        let lead = self.lead_ms();
        let lease = self.lease.as_millis_i64();
        let mut seated: Vec<AgentId> = members.to_vec();
        seated.sort_unstable();
        seated.dedup();
        seated.truncate(MEMBERS_MAX);
        for _ in 0..4 {
            // A task resumed counts from its resume: the pause is nobody's.
            let plan_end = self
                .planned_until()
                .map_or(created_at, |end| end.max(created_at));
            let Some(next) = schedule.next_after(plan_end.saturating_add_ms(-1)) else {
                step.next_at = None;
                break;
            };
            if next.millis_since(now) > lead {
                step.next_at = Some(next.saturating_add_ms(-lead));
                break;
            }
            if seated.is_empty() {
                // Look again soon: a member may come.
                step.next_at = Some(now);
                break;
            }
            // A plan behind time (no member for a while, the coordinator
            // down) is caught up in one window.
            let until = plan_end
                .saturating_add_ms(lease)
                .max(next.saturating_add_ms(1))
                .max(now);
            self.windows.push(LeaseWindow {
                from: plan_end,
                until,
                count: seated.len() as u32,
                seats: seated
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (i as u32, *a))
                    .collect(),
            });
            step.changed = true;
            step.added += 1;
            step.next_at = Some(now);
        }
        // Forget the oldest windows beyond those kept.
        if self.windows.len() > LEASES_KEPT {
            let drop = self.windows.len() - LEASES_KEPT;
            self.windows.drain(..drop);
            step.changed = true;
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms).expect("test value")
    }

    #[test]
    fn every_occurrence_has_one_owner_among_members() {
        let schedule = Schedule::every(DurationMs(1_000), ts(0)).expect("test value");
        let mut p = Placement::new(PlacementMode::One, DurationMs(10_000));
        let members = [AgentId(3), AgentId(1), AgentId(2)];
        let step = p.plan(&schedule, ts(0), ts(0), &members);
        assert!(step.changed && step.added == 1);
        let mut per = std::collections::HashMap::new();
        for s in 0..10 {
            let at = ts(s * 1_000);
            let mine: Vec<AgentId> = members
                .iter()
                .copied()
                .filter(|a| {
                    let view = p.for_agent(*a);
                    matches!(view.decide(TaskId(7), *a, at), Decision::Mine { .. })
                })
                .collect();
            assert_eq!(mine.len(), 1, "occurrence {s}");
            assert_eq!(p.owner(TaskId(7), at), Some(mine[0]));
            *per.entry(mine[0]).or_insert(0) += 1;
        }
        assert!(per.len() >= 2, "spread over members: {per:?}");
        // Beyond the plan: wait.
        assert_eq!(
            p.decide(TaskId(7), AgentId(1), ts(10_000)),
            Decision::Unplanned
        );
    }

    #[test]
    fn planned_windows_never_change_and_leavers_are_left_out_of_the_next() {
        let schedule = Schedule::every(DurationMs(1_000), ts(0)).expect("test value");
        let mut p = Placement::new(PlacementMode::One, DurationMs(4_000));
        p.plan(&schedule, ts(0), ts(0), &[AgentId(1), AgentId(2)]);
        let first = p.windows.clone();
        // Agent 2 is gone; the plan moves on ahead of time.
        let mut now = ts(0);
        while now < ts(20_000) {
            p.plan(&schedule, ts(0), now, &[AgentId(1)]);
            now = now.saturating_add_ms(500);
        }
        assert_eq!(&p.windows[..first.len()], &first[..]);
        assert!(p.windows.len() > first.len());
        assert!(p.windows[first.len()..]
            .iter()
            .all(|w| w.seats == vec![(0, AgentId(1))]));
        assert!(p.refusal().is_none());
        // Always planned at least the lead ahead.
        assert!(p.planned_until().expect("test value").millis_since(now) >= p.lead_ms() - 500);
    }

    #[test]
    fn a_plan_behind_time_is_caught_up_in_one_window_and_none_without_members() {
        let schedule = Schedule::every(DurationMs(1_000), ts(0)).expect("test value");
        let mut p = Placement::new(PlacementMode::One, DurationMs(4_000));
        let step = p.plan(&schedule, ts(0), ts(60_000), &[]);
        assert!(!step.changed && p.windows.is_empty());
        assert_eq!(step.next_at, Some(ts(60_000)));
        let step = p.plan(&schedule, ts(0), ts(60_000), &[AgentId(1)]);
        assert!(step.changed);
        assert_eq!(p.windows[0].from, ts(0));
        assert_eq!(p.windows[0].until, ts(60_000));
        assert_eq!(p.owner(TaskId(1), ts(30_000)), Some(AgentId(1)));
        // Planned ahead from there.
        assert!(p.planned_until().expect("test value") >= ts(60_000 + p.lead_ms()));
    }

    #[test]
    fn shard_seats_every_member() {
        let schedule = Schedule::every(DurationMs(1_000), ts(0)).expect("test value");
        let mut p = Placement::new(PlacementMode::Shard, DurationMs(4_000));
        p.plan(&schedule, ts(0), ts(0), &[AgentId(5), AgentId(9)]);
        let d5 = p
            .for_agent(AgentId(5))
            .decide(TaskId(1), AgentId(5), ts(1_000));
        let d9 = p
            .for_agent(AgentId(9))
            .decide(TaskId(1), AgentId(9), ts(1_000));
        assert!(matches!(
            d5,
            Decision::Mine {
                shard: Some((0, 2)),
                ..
            }
        ));
        assert!(matches!(
            d9,
            Decision::Mine {
                shard: Some((1, 2)),
                ..
            }
        ));
    }

    fn spec(placement: Option<Placement>) -> crate::TaskSpec {
        crate::TaskSpec {
            id: TaskId(4),
            name: Some("till".into()),
            target: crate::task::Target::Selector(vec![("shop".into(), "1".into())]),
            schedule: Schedule::every(DurationMs(1_000), ts(0)).expect("test value"),
            action: crate::task::Action::Exec(crate::task::ExecSpec {
                program: "/bin/true".into(),
                ..Default::default()
            }),
            policies: Default::default(),
            revision: 9,
            created_at: ts(0),
            placement,
        }
    }

    #[test]
    fn placed_tasks_travel_and_are_stored_whole_and_unplaced_ones_as_before() {
        let mut p = Placement::new(PlacementMode::One, DurationMs(4_000));
        p.plan(
            &Schedule::every(DurationMs(1_000), ts(0)).expect("test value"),
            ts(0),
            ts(0),
            &[AgentId(1), AgentId(2)],
        );
        let placed = spec(Some(p.clone()));
        let bytes = postcard::to_allocvec(&placed).expect("test value");
        assert_eq!(
            postcard::from_bytes::<crate::TaskSpec>(&bytes).expect("test value"),
            placed
        );
        let stored = crate::records::encode_task(&placed);
        assert_eq!(stored[0], crate::records::RECORD_V4);
        assert_eq!(
            crate::records::decode_task("tasks", 4, &stored).expect("test value"),
            placed
        );
        // An unplaced task is encoded as 0.5 encoded it: the action's
        // variant is the first, as before.
        let plain = spec(None);
        let bytes = postcard::to_allocvec(&plain).expect("test value");
        assert_eq!(
            postcard::from_bytes::<crate::TaskSpec>(&bytes).expect("test value"),
            plain
        );
        assert_eq!(
            crate::records::encode_task(&plain)[0],
            crate::records::RECORD_V1
        );
        // An agent is sent its own seat only.
        let mine = placed.for_agent(AgentId(2)).placement.expect("test value");
        assert!(mine
            .windows
            .iter()
            .all(|w| w.seats == vec![(1, AgentId(2))]));
        assert_eq!(mine.windows[0].count, 2);
    }

    #[test]
    fn a_wrong_placement_in_a_draft_decodes_and_is_refused_and_an_old_draft_has_none() {
        let draft = crate::wire::TaskDraft {
            name: None,
            target: crate::task::Target::Selector(vec![]),
            schedule: Schedule::every(DurationMs(1_000), ts(0)).expect("test value"),
            action: crate::task::Action::Exec(Default::default()),
            policies: Default::default(),
            anchor_at_creation: false,
            placement: Some(PlacementAsk {
                mode: 7,
                lease_ms: 60_000,
            })
            .into(),
        };
        let bytes = postcard::to_allocvec(&draft).expect("test value");
        let back: crate::wire::TaskDraft = postcard::from_bytes(&bytes).expect("test value");
        let ask = back.placement.0.expect("kept, not dropped");
        assert!(ask.placement().is_err());
        let short = PlacementAsk::new(PlacementMode::One, DurationMs(10));
        assert!(short.placement().is_err());
        // An older client's draft ends before the field.
        let old = crate::wire::TaskDraft {
            placement: None.into(),
            ..draft
        };
        let mut bytes = postcard::to_allocvec(&old).expect("test value");
        bytes.pop(); // the `None` tag an older client never wrote
        let back: crate::wire::TaskDraft = postcard::from_bytes(&bytes).expect("test value");
        assert_eq!(back.placement.0, None);
    }

    #[test]
    fn hostile_plans_are_refused() {
        let w = |from, until, count, seats: Vec<(u32, AgentId)>| LeaseWindow {
            from: ts(from),
            until: ts(until),
            count,
            seats,
        };
        let bad = [
            vec![w(10, 5, 1, vec![])],
            vec![w(0, 5, 1, vec![]), w(4, 9, 1, vec![])],
            vec![w(0, 5, 1, vec![(1, AgentId(1))])],
            vec![w(0, 5, 2, vec![(0, AgentId(1)), (0, AgentId(2))])],
            vec![w(0, 5, 2, vec![(0, AgentId(1)), (1, AgentId(1))])],
            vec![w(0, 5, 5_000, vec![])],
            vec![w(0, 5, 0, vec![])],
        ];
        for windows in bad {
            let p = Placement {
                mode: PlacementMode::One,
                lease: LEASE_DEFAULT,
                windows: windows.clone(),
            };
            assert!(p.refusal().is_some(), "{windows:?}");
            let bytes = postcard::to_allocvec(&p).expect("test value");
            assert!(postcard::from_bytes::<Placement>(&bytes).is_err());
        }
        let short = Placement::new(PlacementMode::One, DurationMs(10));
        assert!(short.refusal().is_some());
    }
}
