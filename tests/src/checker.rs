//! The invariant checker, in the manner of Jepsen's queue checker: from the
//! schedules (computed with `protocol`, as the agents compute them) it
//! derives every occurrence that should have happened up to the end of the
//! run, and compares with two independent histories — what the actions
//! themselves wrote when they started (the probe log), and what the
//! coordinator stored.
//!
//! Invariants (each a failure when broken): nothing lost (every expected
//! occurrence has a record at the coordinator), nothing duplicated (no
//! attempt of an occurrence started twice, no record stored twice), nothing
//! unexpected (no record or start for an occurrence the schedule lacks).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use sundial_protocol::{AgentId, Outcome, RunRecord, TaskId, TaskSpec, Timestamp};

/// A start counts as on time when it is at most this late.
pub const ON_TIME_MS: i64 = 100;

/// One line of a probe log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeStart {
    pub agent: AgentId,
    pub task: TaskId,
    pub scheduled_ms: i64,
    pub attempt: u32,
    pub started_ms: i64,
}

/// Reads a probe log; malformed lines are counted, not fatal.
pub fn read_probe_log(path: &Path) -> (Vec<ProbeStart>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = (|| {
            Some(ProbeStart {
                agent: f.first()?.parse().ok()?,
                task: f.get(1)?.parse().ok()?,
                scheduled_ms: f.get(2)?.parse().ok()?,
                attempt: f.get(3)?.parse().ok()?,
                started_ms: f.get(4)?.parse().ok()?,
            })
        })();
        match parsed {
            Some(p) if f.len() == 5 => out.push(p),
            _ => bad += 1,
        }
    }
    (out, bad)
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    pub expected: usize,
    /// Expected occurrences that started (first attempt seen by the action).
    pub fired: usize,
    pub on_time: usize,
    /// Records made without a live session.
    pub fired_offline: usize,
    /// Expected occurrences with a record at the coordinator.
    pub synced: usize,
    /// Recorded as skipped (misfire or overlap policy) rather than run.
    pub skipped: usize,
    /// Runs cut short by an agent crash (recorded `interrupted`).
    pub interrupted: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub malformed_probe_lines: usize,
    pub lateness_ms_p50: i64,
    pub lateness_ms_p99: i64,
    pub lateness_ms_max: i64,
    /// A few examples of each violation, for the report.
    pub examples: Vec<String>,
}

impl Verdict {
    /// Whether every invariant holds.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.malformed_probe_lines == 0
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Checks the run. `tasks` with the agent each runs on; occurrences after
/// `end` are ignored (they may be in flight when the run stopped).
pub fn check(
    tasks: &[(TaskSpec, AgentId)],
    end: Timestamp,
    starts: &[ProbeStart],
    records: &[RunRecord],
) -> Verdict {
    let mut v = Verdict::default();
    let note = |v: &mut Verdict, s: String| {
        if v.examples.len() < 10 {
            v.examples.push(s);
        }
    };
    // Expected occurrences per (task, agent).
    let mut expected: HashSet<(TaskId, AgentId, i64)> = HashSet::new();
    for (t, agent) in tasks {
        for occ in t
            .schedule
            .occurrences_after(t.created_at.saturating_add_ms(-1))
        {
            if occ > end {
                break;
            }
            expected.insert((t.id, *agent, occ.as_millis()));
        }
    }
    v.expected = expected.len();

    // Starts: duplicates and lateness from the actions' own clocks.
    let mut start_count: HashMap<(TaskId, AgentId, i64, u32), usize> = HashMap::new();
    let mut first_start: BTreeMap<(TaskId, AgentId, i64), i64> = BTreeMap::new();
    for s in starts {
        *start_count
            .entry((s.task, s.agent, s.scheduled_ms, s.attempt))
            .or_default() += 1;
        if s.scheduled_ms > end.as_millis() {
            continue;
        }
        if !expected.contains(&(s.task, s.agent, s.scheduled_ms)) {
            v.unexpected += 1;
            note(
                &mut v,
                format!(
                    "unexpected start: {} on {} at {}",
                    s.task, s.agent, s.scheduled_ms
                ),
            );
            continue;
        }
        if s.attempt == 1 {
            first_start
                .entry((s.task, s.agent, s.scheduled_ms))
                .or_insert(s.started_ms);
        }
    }
    for ((task, agent, sched, attempt), n) in &start_count {
        if *n > 1 {
            v.duplicated += n - 1;
            note(
                &mut v,
                format!(
                    "duplicate: {task} on {agent} at {sched} attempt {attempt} started {n} times"
                ),
            );
        }
    }
    v.fired = first_start.len();
    let mut lateness: Vec<i64> = first_start
        .iter()
        .map(|((_, _, sched), started)| (started - sched).max(0))
        .collect();
    lateness.sort_unstable();
    v.on_time = lateness.iter().filter(|l| **l <= ON_TIME_MS).count();
    v.lateness_ms_p50 = percentile(&lateness, 0.50);
    v.lateness_ms_p99 = percentile(&lateness, 0.99);
    v.lateness_ms_max = lateness.last().copied().unwrap_or(0);

    // Records at the coordinator.
    let mut recorded: HashSet<(TaskId, AgentId, i64)> = HashSet::new();
    let mut record_keys: HashSet<(TaskId, AgentId, i64, u32)> = HashSet::new();
    for r in records {
        let k = (r.task_id, r.agent_id, r.scheduled_at.as_millis());
        if !record_keys.insert((r.task_id, r.agent_id, r.scheduled_at.as_millis(), r.attempt)) {
            v.duplicated += 1;
            note(
                &mut v,
                format!(
                    "record stored twice: {} on {} at {}",
                    r.task_id, r.agent_id, r.scheduled_at
                ),
            );
        }
        if r.scheduled_at > end {
            continue;
        }
        if !expected.contains(&k) {
            v.unexpected += 1;
            note(
                &mut v,
                format!(
                    "unexpected record: {} on {} at {}",
                    r.task_id, r.agent_id, r.scheduled_at
                ),
            );
            continue;
        }
        if r.attempt == 1 {
            if r.offline {
                v.fired_offline += 1;
            }
            if r.outcome == Outcome::Skipped {
                v.skipped += 1;
                if v.skipped <= 3 {
                    note(
                        &mut v,
                        format!(
                            "skipped: {} on {} at {}: {}",
                            r.task_id,
                            r.agent_id,
                            r.scheduled_at,
                            r.detail.as_deref().unwrap_or("")
                        ),
                    );
                }
            }
            if r.outcome == Outcome::Interrupted {
                v.interrupted += 1;
            }
        }
        recorded.insert(k);
    }
    v.synced = recorded.len();
    for k in &expected {
        if !recorded.contains(k) {
            v.lost += 1;
            note(
                &mut v,
                format!(
                    "lost: {} on {} at {}",
                    k.0,
                    k.1,
                    Timestamp::from_millis_saturating(k.2)
                ),
            );
        }
    }
    v
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header = [
            "expected",
            "fired",
            "on time",
            "offline",
            "synced",
            "skipped",
            "interrupted",
            "lost",
            "duplicated",
            "unexpected",
            "p50 ms",
            "p99 ms",
            "max ms",
        ];
        let values = [
            self.expected.to_string(),
            self.fired.to_string(),
            self.on_time.to_string(),
            self.fired_offline.to_string(),
            self.synced.to_string(),
            self.skipped.to_string(),
            self.interrupted.to_string(),
            self.lost.to_string(),
            self.duplicated.to_string(),
            self.unexpected.to_string(),
            self.lateness_ms_p50.to_string(),
            self.lateness_ms_p99.to_string(),
            self.lateness_ms_max.to_string(),
        ];
        let widths: Vec<usize> = header
            .iter()
            .zip(&values)
            .map(|(h, v)| h.len().max(v.len()))
            .collect();
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        writeln!(
            f,
            "{}",
            line(header.iter().map(|s| s.to_string()).collect())
        )?;
        writeln!(f, "{}", line(values.to_vec()))?;
        if self.malformed_probe_lines > 0 {
            writeln!(f, "malformed probe lines: {}", self.malformed_probe_lines)?;
        }
        for e in &self.examples {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::policy::Policies;
    use sundial_protocol::task::{Action, ExecSpec, Target};
    use sundial_protocol::{DurationMs, Schedule};

    fn task() -> TaskSpec {
        let t0 = Timestamp::parse("2026-01-01T00:00:00Z").expect("ts");
        TaskSpec {
            id: TaskId(1),
            name: None,
            target: Target::Agent(AgentId(1)),
            schedule: Schedule::every(DurationMs(1000), t0).expect("valid"),
            action: Action::Exec(ExecSpec::default()),
            policies: Policies::default(),
            revision: 1,
            created_at: t0,
            placement: None,
        }
    }

    fn rec(ms: i64) -> RunRecord {
        RunRecord {
            task_id: TaskId(1),
            agent_id: AgentId(1),
            scheduled_at: Timestamp::from_millis(ms).expect("ts"),
            attempt: 1,
            fired_at: None,
            finished_at: None,
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            offline: false,
            detail: None,
            stdout_tail: vec![],
            stderr_tail: vec![],
        }
    }

    fn start(ms: i64, late: i64) -> ProbeStart {
        ProbeStart {
            agent: AgentId(1),
            task: TaskId(1),
            scheduled_ms: ms,
            attempt: 1,
            started_ms: ms + late,
        }
    }

    #[test]
    fn a_clean_history_passes_and_faults_fail() {
        let t = task();
        let t0 = t.created_at.as_millis();
        let end = Timestamp::from_millis(t0 + 4_500).expect("ts");
        let times: Vec<i64> = (0..5).map(|i| t0 + i * 1000).collect();
        let starts: Vec<ProbeStart> = times.iter().map(|&m| start(m, 3)).collect();
        let records: Vec<RunRecord> = times.iter().map(|&m| rec(m)).collect();
        let v = check(&[(t.clone(), AgentId(1))], end, &starts, &records);
        assert!(v.passed(), "{v}");
        assert_eq!((v.expected, v.fired, v.synced, v.on_time), (5, 5, 5, 5));

        let v = check(&[(t.clone(), AgentId(1))], end, &starts, &records[..4]);
        assert_eq!(v.lost, 1);
        assert!(!v.passed());

        let mut twice = starts.clone();
        twice.push(starts[2]);
        let v = check(&[(t.clone(), AgentId(1))], end, &twice, &records);
        assert_eq!(v.duplicated, 1);

        let mut extra = records.clone();
        extra.push(rec(t0 + 1_500));
        let v = check(&[(t, AgentId(1))], end, &starts, &extra);
        assert_eq!(v.unexpected, 1);
    }
}
