//! `sundial-agent status`: the agent's local view, read from its store. It
//! works offline and beside a running agent (the store allows one writer and
//! any number of readers).

use std::path::Path;

use serde::Serialize;
use sundial_protocol::{RunKey, TaskSpec, Timestamp};

use crate::runtime::store_path;
use crate::scheduler::first_occurrence;
use crate::store::{meta, AgentStore, StartedInfo, StoreError};

/// Tries to open the store (100 ms apart) before reporting an error.
const OPEN_ATTEMPTS_MAX: u32 = 30;

/// One task in the status.
#[derive(Debug, Clone, Serialize)]
pub struct TaskStatus {
    pub task_id: String,
    pub name: Option<String>,
    pub schedule: String,
    pub program: String,
    pub revision: u64,
    /// RFC 3339 UTC, or null when the schedule has no further occurrence.
    pub next_fire: Option<String>,
}

/// The agent's status.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub agent_id: Option<String>,
    pub enrolled: bool,
    /// The coordinator revoked this agent: it makes no more sessions.
    pub revoked: bool,
    pub clock_offset_ms: i64,
    pub clock_held: bool,
    pub last_known_good: Option<String>,
    pub last_sync: Option<String>,
    pub last_revision: u64,
    pub outbox_len: u64,
    /// Runs started and not yet ended.
    pub runs_in_progress: usize,
    /// Runs decided ahead for an instant still to come (their `started`
    /// marks are stored; they start at that instant): see "Starts are
    /// decided ahead" in the README.
    pub runs_decided_ahead: usize,
    /// The tasks listed: all of them, or beyond [`STATUS_TASKS_MAX`] the
    /// next ones to fire.
    pub tasks: Vec<TaskStatus>,
    /// Tasks stored in all.
    pub tasks_total: u64,
    /// The agent stopped uncleanly and its store awaits the repair the
    /// agent makes when it starts: shown from a repaired copy, the store
    /// itself untouched.
    pub store_needs_recovery: bool,
    /// The fingerprint of the agent's public sealing key (what operators'
    /// secrets are sealed to), if it has one yet.
    pub sealing_key: Option<String>,
    /// Whether this agent runs functions (as it last started), and the
    /// modules its store holds.
    pub functions: FunctionsStatus,
}

/// Runs marked started, split at the agent's `now`: those started (in
/// progress) and those decided ahead for an instant still to come.
fn split_started(marks: &[(RunKey, StartedInfo)], now_ms: i64) -> (usize, usize) {
    let started = marks
        .iter()
        .filter(|(_, info)| info.fired_at.as_millis() <= now_ms)
        .count();
    (started, marks.len() - started)
}

/// `status`'s view of functions.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FunctionsStatus {
    /// `None`: the agent has not run since functions exist.
    pub allowed: Option<bool>,
    pub fuel_max: Option<u64>,
    pub memory_max: Option<u64>,
    pub module_max: Option<u64>,
    pub modules: u64,
}

/// Beyond this many tasks stored, `status` lists only the next this many
/// to fire (from the store's due index): a store of ten million tasks is
/// read in milliseconds, not minutes.
pub const STATUS_TASKS_MAX: usize = 100;

fn ts_text(ms: Option<i64>) -> Option<String> {
    ms.and_then(|m| Timestamp::from_millis(m).ok())
        .map(|t| t.to_string())
}

/// Why the status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no agent data in {0} (expected {1}); has `sundial-agent join` or `run` used this directory?")]
    NoData(String, String),
    #[error("{0}; {1}\n(if the agent stopped uncleanly, its store needs recovery: start the agent, which repairs it, then ask again)")]
    Unreadable(Box<StoreError>, String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store key: {0}")]
    Key(String),
}

/// Reads the status of the agent whose data lives in `data_dir`.
pub fn read(data_dir: &Path) -> Result<Status, StatusError> {
    let (store, copy) = open(data_dir)?;
    read_from(data_dir, store, copy)
}

/// Records waiting in the outbox of the agent whose data lives in
/// `data_dir`: what [`read`] says as `outbox_len`, without reading the
/// rest (nor the store key: the count needs no record opened).
pub fn outbox_len(data_dir: &Path) -> Result<u64, StatusError> {
    let (store, _copy) = open(data_dir)?;
    Ok(store.outbox_len()?)
}

/// The agent's store opened for reading, beside a running agent (and the
/// repaired copy it was opened from, if it needed a repair).
fn open(data_dir: &Path) -> Result<(AgentStore, Option<tempfile::TempDir>), StatusError> {
    let path = store_path(data_dir);
    if !path.exists() {
        return Err(StatusError::NoData(
            data_dir.display().to_string(),
            path.display().to_string(),
        ));
    }
    // Read-only first, so a running agent is not disturbed; a store that
    // needs recovery after a crash (and no agent running) is opened for writing.
    // Status only ever reads: it must never hold the writer's lock, or an
    // agent starting at that moment could not open its store. An agent
    // starting after a crash repairs the store first: retry for a moment.
    let mut attempts = 0;
    let mut copy: Option<tempfile::TempDir> = None;
    let store = loop {
        // Without the key ring: `read_from` loads it (from the data
        // directory, where an agent keeps it), and counting the outbox
        // needs none.
        match AgentStore::open_read_only_sealed(&path) {
            Ok(s) => break s,
            Err(e) => {
                attempts += 1;
                if attempts >= OPEN_ATTEMPTS_MAX {
                    // A store left by an unclean stop needs a repair only a
                    // writer makes: make it on a copy, so that the store
                    // itself is not touched (nor its lock taken).
                    let (dir, s) = repaired_copy(&path)
                        .map_err(|why| StatusError::Unreadable(Box::new(e), why))?;
                    copy = Some(dir);
                    break s;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    Ok((store, copy))
}

fn read_from(
    data_dir: &Path,
    mut store: AgentStore,
    copy: Option<tempfile::TempDir>,
) -> Result<Status, StatusError> {
    let key_file = sundial_net::at_rest::key_path(data_dir, None);
    if let Some(cipher) =
        sundial_net::at_rest::StoreCipher::from_file(&key_file, false).map_err(StatusError::Key)?
    {
        store
            .read_with(std::sync::Arc::new(cipher), &key_file)
            .map_err(|e| StatusError::Key(e.to_string()))?;
    }
    let agent_id = store.get_meta::<u64>(meta::AGENT_ID)?;
    let clock_offset_ms: i64 = store.get_meta(meta::CLOCK_OFFSET_MS)?.unwrap_or(0);
    // The agent's time: the wall clock corrected as the agent corrects it.
    let now_ms = crate::clock::SystemClock
        .read()
        .wall_ms
        .saturating_add(clock_offset_ms);
    let (runs_in_progress, runs_decided_ahead) = split_started(&store.started()?, now_ms);
    let tasks_total = store.task_count()?;
    let listed: Vec<(TaskSpec, Option<Timestamp>)> = if tasks_total as usize <= STATUS_TASKS_MAX {
        let states = store.task_states()?;
        let mut tasks: Vec<TaskSpec> = store.tasks()?;
        tasks.sort_by_key(|t| t.id);
        tasks
            .into_iter()
            .map(|t| {
                let next = match states.get(&t.id) {
                    Some(n) => *n,
                    None => first_occurrence(&t.schedule, t.created_at),
                };
                (t, next)
            })
            .collect()
    } else {
        store
            .due_tasks(None, Timestamp::MAX, STATUS_TASKS_MAX)?
            .into_iter()
            .map(|(t, due)| (t, Some(due)))
            .collect()
    };
    let tasks = listed
        .into_iter()
        .map(|(t, next)| {
            let program = match &t.action {
                sundial_protocol::task::Action::Exec(exec) => exec.program.clone(),
                sundial_protocol::task::Action::Wasm(w) => format!("function {}", w.module.short()),
            };
            TaskStatus {
                task_id: t.id.to_string(),
                name: t.name.clone(),
                schedule: t.schedule.to_string(),
                program,
                revision: t.revision,
                next_fire: next.map(|n| n.to_string()),
            }
        })
        .collect();
    Ok(Status {
        agent_id: agent_id.map(|a| sundial_protocol::AgentId(a).to_string()),
        enrolled: agent_id.is_some(),
        clock_offset_ms,
        clock_held: store.get_meta(meta::CLOCK_HELD)?.unwrap_or(false),
        revoked: store.get_meta(meta::REVOKED)?.unwrap_or(false),
        last_known_good: ts_text(store.get_meta(meta::LAST_KNOWN_GOOD_MS)?),
        last_sync: ts_text(store.get_meta(meta::LAST_SYNC_MS)?),
        last_revision: store.get_meta(meta::LAST_REVISION)?.unwrap_or(0),
        outbox_len: store.outbox_len()?,
        runs_in_progress,
        runs_decided_ahead,
        tasks,
        tasks_total,
        store_needs_recovery: copy.is_some(),
        sealing_key: std::fs::read(data_dir.join(crate::sealing::SEAL_KEY_FILE))
            .ok()
            .and_then(|seed| sundial_protocol::seal::SealKeyPair::from_seed(&seed).ok())
            .map(|k| k.public().fingerprint()),
        functions: {
            let told: Option<(bool, u64, u64, u64)> = store.get_meta(meta::FUNCTIONS)?;
            FunctionsStatus {
                allowed: told.map(|t| t.0),
                fuel_max: told.map(|t| t.1),
                memory_max: told.map(|t| t.2),
                module_max: told.map(|t| t.3),
                modules: store.modules(0)?.1,
            }
        },
    })
}

/// Copies the store to a temporary directory and opens the copy for
/// writing, which repairs it.
fn repaired_copy(path: &Path) -> Result<(tempfile::TempDir, AgentStore), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("no temporary directory for a copy: {e}"))?;
    let to = dir.path().join("agent.redb");
    std::fs::copy(path, &to).map_err(|e| format!("cannot copy it to repair the copy: {e}"))?;
    let store = AgentStore::open(&to).map_err(|e| format!("a copy does not repair: {e}"))?;
    Ok((dir, store))
}

/// The status as text for people.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let none = "never".to_string();
    if s.store_needs_recovery {
        let _ = writeln!(
            out,
            "store:          NEEDS RECOVERY (the agent stopped uncleanly; shown from a repaired copy, the store untouched; the agent repairs it when it starts)"
        );
    }
    let _ = writeln!(
        out,
        "agent:          {}",
        s.agent_id.as_deref().unwrap_or("not enrolled")
    );
    if let Some(k) = &s.sealing_key {
        let _ = writeln!(out, "sealing key:    {k}");
    }
    let f = &s.functions;
    let _ = writeln!(
        out,
        "functions:      {}",
        match (f.allowed, f.fuel_max, f.memory_max, f.module_max) {
            (Some(true), Some(fuel), Some(mem), Some(module)) => format!(
                "allowed (at most fuel {fuel}, memory {}, module {}); {} module(s) stored",
                sundial_protocol::wasm::show_bytes(mem),
                sundial_protocol::wasm::show_bytes(module),
                f.modules
            ),
            (Some(true), ..) => format!("allowed; {} module(s) stored", f.modules),
            (Some(false), ..) => "not allowed (start the agent with --allow-wasm)".into(),
            (None, ..) => "unknown (the agent has not run with this version yet)".into(),
        }
    );
    if s.revoked {
        let _ = writeln!(
            out,
            "coordinator:    REVOKED (no sessions, and nothing fires: the outbox no longer grows; join again with a new data directory to return)"
        );
    }
    let _ = writeln!(
        out,
        "clock:          {}, offset {:+} ms, last known good {}",
        if s.clock_held {
            "HELD (wall clock is behind the last known-good time; firing paused)"
        } else {
            "trusted"
        },
        s.clock_offset_ms,
        s.last_known_good.as_ref().unwrap_or(&none)
    );
    let _ = writeln!(
        out,
        "last sync:      {}",
        s.last_sync.as_ref().unwrap_or(&none)
    );
    let _ = writeln!(out, "revision:       {}", s.last_revision);
    let _ = writeln!(
        out,
        "outbox:         {} run(s) waiting to sync",
        s.outbox_len
    );
    if s.runs_decided_ahead > 0 {
        let _ = writeln!(
            out,
            "in progress:    {} run(s), {} more decided for their coming instant",
            s.runs_in_progress, s.runs_decided_ahead
        );
    } else {
        let _ = writeln!(out, "in progress:    {} run(s)", s.runs_in_progress);
    }
    if s.tasks_total as usize > s.tasks.len() {
        let _ = writeln!(
            out,
            "tasks:          {} (the next {} to fire listed)",
            s.tasks_total,
            s.tasks.len()
        );
    } else {
        let _ = writeln!(out, "tasks:          {}", s.tasks_total);
    }
    if !s.tasks.is_empty() {
        let rows: Vec<[String; 5]> = s
            .tasks
            .iter()
            .map(|t| {
                [
                    t.task_id.clone(),
                    t.name.clone().unwrap_or_else(|| "-".into()),
                    t.schedule.clone(),
                    t.program.clone(),
                    t.next_fire.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["ID", "NAME", "SCHEDULE", "PROGRAM", "NEXT FIRE"],
            &rows,
        ));
    }
    out
}

/// An aligned text table.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::task::{Action, ExecSpec, Target};
    use sundial_protocol::{AgentId, Schedule, TaskId};

    fn task(id: u64, at_ms: i64) -> TaskSpec {
        TaskSpec {
            id: TaskId(id),
            name: None,
            target: Target::Agent(AgentId(1)),
            schedule: Schedule::at(Timestamp::from_millis_saturating(at_ms)),
            action: Action::Exec(ExecSpec {
                program: "/bin/true".into(),
                ..ExecSpec::default()
            }),
            policies: Default::default(),
            revision: id,
            created_at: Timestamp::from_millis_saturating(0),
            placement: None,
        }
    }

    #[test]
    fn a_big_store_lists_the_next_tasks_to_fire_and_says_how_many_there_are() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = crate::runtime::store_path(dir.path());
        let n = STATUS_TASKS_MAX as u64 + 50;
        {
            let store = AgentStore::open(&path).expect("store");
            // Due in the reverse order of their ids.
            let tasks = (1..=n).map(|i| task(i, 2_000_000_000_000 - i as i64 * 1_000));
            store.import_tasks(tasks, 1_000).expect("import");
        }
        let s = read(dir.path()).expect("status");
        assert_eq!(s.tasks_total, n);
        assert_eq!(s.tasks.len(), STATUS_TASKS_MAX);
        assert_eq!(s.tasks[0].task_id, TaskId(n).to_string(), "soonest first");
        assert!(render(&s).contains(&format!("{n} (the next {STATUS_TASKS_MAX} to fire listed)")));

        // A small store lists every task, as before.
        let small = tempfile::tempdir().expect("temp dir");
        {
            let store = AgentStore::open(&crate::runtime::store_path(small.path())).expect("store");
            store
                .import_tasks((1..=3).map(|i| task(i, 1)), 10)
                .expect("import");
        }
        let s = read(small.path()).expect("status");
        assert_eq!((s.tasks_total, s.tasks.len()), (3, 3));
    }

    #[test]
    fn runs_decided_ahead_are_not_counted_as_in_progress_before_their_instant() {
        let mark = |fired_ms: i64| {
            (
                RunKey {
                    task_id: TaskId(1),
                    scheduled_at: Timestamp::from_millis_saturating(fired_ms),
                    attempt: 0,
                },
                StartedInfo {
                    fired_at: Timestamp::from_millis_saturating(fired_ms),
                    offline: false,
                },
            )
        };
        let marks = [mark(1_000), mark(1_010), mark(1_020)];
        assert_eq!(split_started(&marks, 1_009), (1, 2));
        assert_eq!(split_started(&marks, 1_010), (2, 1), "due is started");
        assert_eq!(split_started(&marks, 5_000), (3, 0));
        assert_eq!(split_started(&[], 5_000), (0, 0));
    }
}
