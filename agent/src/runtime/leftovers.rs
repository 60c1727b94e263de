//! Actions a crashed predecessor left running (pid files in `running/`):
//! found and killed before the node starts.

use super::*;

/// The pid file of a running action.
pub(super) fn pid_file(dir: &Path, key: RunKey) -> PathBuf {
    dir.join(format!(
        "{}-{}-{}",
        key.task_id.0,
        key.scheduled_at.as_millis(),
        key.attempt
    ))
}

/// A process's start time (clock ticks since boot, field 22 of
/// `/proc/PID/stat`): with the pid it names one process, even after the
/// pid is reused.
pub(super) fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it start past the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

pub(super) fn group_alive(pgid: u32) -> bool {
    i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .is_some_and(|p| rustix::process::test_kill_process_group(p).is_ok())
}

/// Ends the process groups that runs of a previous (crashed) agent left
/// behind, and says for each run key what was found. Pid files are written
/// as a run's program starts and removed when its record is stored; they
/// need no fsync: a power loss ends the processes too.
pub(super) async fn end_leftovers(dir: &Path) -> HashMap<(u64, i64, u32), String> {
    let mut found = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        let key = match (parts.next(), parts.next(), parts.next()) {
            (Some(t), Some(s), Some(a)) => match (t.parse(), s.parse(), a.parse()) {
                (Ok(t), Ok(s), Ok(a)) => Some((t, s, a)),
                _ => None,
            },
            _ => None,
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let Some(key) = key else { continue };
        let mut fields = text.split_whitespace();
        let (Some(Ok(pid)), Some(Ok(ticks))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            continue;
        };
        // The leader may have exited while others of its group live on;
        // the start time guards against a reused pid when it is there.
        let same = process_start_ticks(pid).is_none_or(|t| t == ticks);
        if !(same && group_alive(pid)) {
            continue;
        }
        tracing::warn!(
            pid,
            "a run of the previous agent process is still going; killing its process group"
        );
        if let Some(p) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process_group(p, rustix::process::Signal::KILL);
        }
        let mut waited = 0;
        while group_alive(pid) && waited < LEFTOVER_KILL_WAIT_MS {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            waited += 50;
        }
        found.insert(
            key,
            format!("the agent stopped while this run was going; its processes (group {pid}) were still running when the agent restarted and were killed"),
        );
    }
    found
}
