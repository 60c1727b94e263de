//! Output: tables for people, JSON for scripts.

use super::*;

pub(crate) fn opt_ts(t: Option<Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

pub(crate) fn labels_json(labels: &[(String, String)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect::<Map<_, _>>(),
    )
}

pub(crate) fn agent_json(a: &AgentInfo) -> Value {
    json!({
        "agent_id": a.agent_id.to_string(),
        "name": a.name,
        "labels": labels_json(&a.labels),
        "online": a.online,
        "revoked": a.revoked,
        "enrolled_at": a.enrolled_at.to_string(),
        "last_seen": opt_ts(a.last_seen),
        "clock_offset_ms": a.clock_offset_ms,
        "rtt_ms": a.rtt_ms,
        "version": a.version,
        "allow_exec": a.allow_exec,
        "allow_env": a.allow_env,
        "functions": a.functions.as_ref().map(|f| json!({
            "allowed": f.allowed,
            "fuel_max": f.fuel_max,
            "memory_max": f.memory_max,
            "module_max": f.module_max,
            "modules": f.modules.len(),
        })),
        "outbox_len": a.outbox_len,
        "report": a.report.as_ref().map(|r| json!({
            "at": opt_ts(a.reported_at),
            "outbox_len": r.outbox_len,
            "oldest_unsynced": opt_ts(r.oldest_unsynced),
            "applied_revision": r.applied_revision,
            "tasks": r.tasks_held,
            "running": r.running,
            "store_bytes": r.store_bytes,
            "clock": clock_state(r),
            "clock_offset_ms": r.clock_offset_ms,
            "late_max_ms": r.late_max_ms,
        })),
    })
}

/// An agent's clock as it reported it.
pub(crate) fn clock_state(r: &sundial_protocol::wire::AgentReport) -> &'static str {
    if r.clock_held {
        "held"
    } else if r.clock_vouched {
        "vouched"
    } else {
        "unvouched"
    }
}

/// An instant, and for a cron schedule in a zone other than UTC the local
/// time there too (`2026-12-07T08:00:00.000Z (08:00 GMT)`).
pub(crate) fn with_zone(t: Timestamp, schedule: &sundial_protocol::Schedule) -> String {
    use chrono::TimeZone;
    match schedule.kind() {
        sundial_protocol::schedule::ScheduleKind::Cron { tz, .. } if *tz != chrono_tz::UTC => {
            let local = tz.from_utc_datetime(&t.to_naive_utc());
            format!("{t} ({})", local.format("%Y-%m-%d %H:%M %Z"))
        }
        _ => t.to_string(),
    }
}

pub(crate) fn task_state(t: &TaskInfo) -> &'static str {
    if t.cancelled {
        "cancelled"
    } else if t.paused {
        "paused"
    } else if t.done {
        "done"
    } else {
        "active"
    }
}

pub(crate) fn last_run_json(l: &LastRun) -> Value {
    json!({
        "agent_id": l.agent_id.to_string(),
        "scheduled_at": l.scheduled_at.to_string(),
        "attempt": l.attempt,
        "outcome": l.outcome.as_str(),
        "finished_at": opt_ts(l.finished_at),
        "detail": l.detail,
    })
}

pub(crate) fn task_json(t: &TaskInfo) -> Value {
    let action = &t.spec.action;
    let (program, cwd) = match action {
        Action::Exec(e) => (Some(e.program.clone()), e.cwd.clone()),
        Action::Wasm(_) => (None, None),
    };
    let args: &[String] = match action {
        Action::Exec(e) => &e.args,
        Action::Wasm(w) => &w.args,
    };
    let function = match action {
        Action::Exec(_) => Value::Null,
        Action::Wasm(w) => json!({
            "module": w.module.to_string(),
            "module_bytes": w.module_bytes,
            "fuel": w.fuel(),
            "memory_bytes": w.memory_bytes(),
        }),
    };
    let p = &t.spec.policies;
    let (start, end) = t.spec.schedule.window();
    json!({
        "task_id": t.spec.id.to_string(),
        "name": t.spec.name,
        "target": match &t.spec.target {
            Target::Agent(a) => json!({"agent": a.to_string()}),
            Target::Selector(s) => json!({"selector": labels_json(s)}),
        },
        "schedule": t.spec.schedule.to_string(),
        "after": t.spec.schedule.triggers().iter().map(|u| json!({
            "task_id": u.upstream.to_string(),
            "on": u.on.to_string(),
        })).collect::<Vec<_>>(),
        "kind": match action { Action::Exec(_) => "exec", Action::Wasm(_) => "wasm" },
        "program": program,
        "function": function,
        "args": args,
        "env": action.env().iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        "secret_env": action.sealed_env().iter().map(|s| json!({
            "name": s.name,
            "sealed_to": s.recipients().map(|a| a.to_string()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "cwd": cwd,
        "revision": t.spec.revision,
        "created_at": t.created_at.to_string(),
        "only_rejected": t.only_rejected,
        "counts_from": t.spec.created_at.to_string(),
        "state": task_state(t),
        "cancelled": t.cancelled,
        "paused": t.paused,
        "done": t.done,
        "next": opt_ts(t.next),
        "misfire": p.misfire.mode.to_string(),
        "grace_ms": p.misfire.grace.0,
        "retries": p.retry.retries,
        "backoff_ms": p.retry.backoff_initial.0,
        "backoff_max_ms": p.retry.backoff_max.0,
        "overlap": p.overlap.to_string(),
        "timeout_ms": p.timeout.map(|d| d.0),
        "window_start": opt_ts(start),
        "window_end": opt_ts(end),
        "reached": t.reached.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "placement": t.spec.placement.as_ref().map(|pl| {
            let shares = pl.shares(t.spec.id, &t.spec.schedule);
            json!({
                "mode": pl.mode.as_str(),
                "lease_ms": pl.lease.0,
                "shares": shares.iter().map(|(a, n)| json!({"agent_id": a.to_string(), "occurrences": n})).collect::<Vec<_>>(),
                "leases": pl.windows.iter().map(|w| json!({
                    "from": w.from.to_string(),
                    "until": w.until.to_string(),
                    "members": w.seats.iter().map(|(_, a)| a.to_string()).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        }),
        "last_runs": t.last_runs.iter().map(last_run_json).collect::<Vec<_>>(),
    })
}

/// Names of agents and tasks, to show beside their ids.
#[derive(Default)]
pub(crate) struct Names {
    pub(crate) agents: HashMap<AgentId, String>,
    pub(crate) tasks: HashMap<TaskId, String>,
    /// Each task's retry policy: a retry's lateness counts from its own due time.
    pub(crate) retry: HashMap<TaskId, RetryPolicy>,
}

impl Names {
    pub(crate) fn agent(&self, id: AgentId) -> String {
        match self.agents.get(&id) {
            Some(n) => format!("{id} ({n})"),
            None => id.to_string(),
        }
    }

    pub(crate) fn task(&self, id: TaskId) -> String {
        match self.tasks.get(&id) {
            Some(n) => format!("{id} ({n})"),
            None => id.to_string(),
        }
    }
}

pub(crate) fn duration_ms(r: &RunRecord) -> Option<i64> {
    match (r.fired_at, r.finished_at) {
        (Some(f), Some(e)) => Some(e.millis_since(f)),
        _ => None,
    }
}

/// How late a run started: the first attempt from its occurrence, a retry
/// from its own due time (the previous attempt's end plus the backoff),
/// when the previous attempt is in `runs`.
pub(crate) fn lateness_ms(r: &RunRecord, runs: &[RunRecord], names: &Names) -> Option<i64> {
    let fired = r.fired_at?;
    if r.attempt <= 1 {
        return Some(fired.millis_since(r.scheduled_at).max(0));
    }
    let prev = runs.iter().find(|p| {
        p.task_id == r.task_id
            && p.agent_id == r.agent_id
            && p.scheduled_at == r.scheduled_at
            && p.attempt + 1 == r.attempt
    })?;
    let backoff = names.retry.get(&r.task_id)?.backoff_after(prev.attempt);
    let due = prev.finished_at?.saturating_add_ms(backoff.as_millis_i64());
    Some(fired.millis_since(due).max(0))
}

pub(crate) fn run_json(r: &RunRecord, runs: &[RunRecord], names: &Names) -> Value {
    json!({
        "task_id": r.task_id.to_string(),
        "task_name": names.tasks.get(&r.task_id),
        "agent_id": r.agent_id.to_string(),
        "agent_name": names.agents.get(&r.agent_id),
        "scheduled_at": r.scheduled_at.to_string(),
        "fired_at": opt_ts(r.fired_at),
        "finished_at": opt_ts(r.finished_at),
        "duration_ms": duration_ms(r),
        "attempt": r.attempt,
        "outcome": r.outcome.as_str(),
        "exit_code": r.exit_code,
        "offline": r.offline,
        "lateness_ms": lateness_ms(r, runs, names),
        "detail": r.detail,
        "why": why(r),
        "stdout": String::from_utf8_lossy(&r.stdout_tail),
        "stderr": String::from_utf8_lossy(&r.stderr_tail),
    })
}

pub(crate) fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub(crate) fn print_json(v: &Value) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `text` cut to `max` characters with an ellipsis (tables), or whole (wide).
pub(crate) fn cut(text: &str, max: usize, out: Output) -> String {
    let one_line = text.replace('\n', " ");
    if out == Output::Wide || one_line.chars().count() <= max {
        return one_line;
    }
    let mut s: String = one_line.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// A word as a POSIX shell would need it quoted.
pub(crate) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// What a task runs, as one line: the program and its arguments, or the
/// function's module (short hash) and its arguments.
pub(crate) fn command_text(action: &Action) -> String {
    let (head, args) = match action {
        Action::Exec(e) => (shell_quote(&e.program), &e.args),
        Action::Wasm(w) => (format!("function {}", w.module.short()), &w.args),
    };
    std::iter::once(head)
        .chain(args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn ago(t: Timestamp, now: Timestamp) -> String {
    let ms = now.millis_since(t);
    if ms < 0 {
        format!("in {}", human_secs((-ms + 999) / 1000))
    } else {
        format!("{} ago", human_secs(ms / 1000))
    }
}

pub(crate) fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

pub(crate) fn agents_out(agents: &[AgentInfo], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(agents.iter().map(agent_json).collect()));
    }
    let now = cli::now();
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.agent_id.to_string(),
                or_dash(a.name.clone()),
                if a.revoked {
                    "revoked".into()
                } else if a.online {
                    "online".into()
                } else {
                    "offline".into()
                },
                a.last_seen
                    .map_or_else(|| "never".into(), |t| format!("{t} ({})", ago(t, now))),
                or_dash(a.version.clone()),
                or_dash(a.outbox_len),
                or_dash(a.report.as_ref().map(|r| r.tasks_held)),
                or_dash(a.report.as_ref().map(clock_state)),
                or_dash(a.clock_offset_ms.map(|o| format!("{o:+}"))),
                or_dash(a.rtt_ms),
                cut(&labels_text(&a.labels), 30, out),
                cut(&a.allow_exec.join(","), 30, out),
                match &a.functions {
                    Some(f) if f.allowed => "yes".into(),
                    Some(_) => "no".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &[
                "ID",
                "NAME",
                "STATE",
                "LAST SEEN",
                "VERSION",
                "UNSYNCED",
                "TASKS",
                "CLOCK",
                "OFFSET MS",
                "RTT MS",
                "LABELS",
                "ALLOW EXEC",
                "FUNCTIONS"
            ],
            &rows
        )
    );
    Ok(())
}

pub(crate) fn last_text(l: &LastRun, names: &Names, now: Timestamp) -> String {
    format!(
        "{} on {} {}",
        l.outcome,
        names.agent(l.agent_id),
        ago(l.finished_at.unwrap_or(l.scheduled_at), now)
    )
}

pub(crate) fn tasks_out(tasks: &[TaskInfo], names: &Names, out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(tasks.iter().map(task_json).collect()));
    }
    let now = cli::now();
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.spec.id.to_string(),
                or_dash(t.spec.name.clone()),
                match &t.spec.target {
                    Target::Agent(a) => names.agent(*a),
                    Target::Selector(s) => labels_text(s),
                },
                t.spec.schedule.to_string(),
                task_state(t).into(),
                t.next
                    .map_or_else(|| "-".into(), |n| with_zone(n, &t.spec.schedule)),
                t.last_runs
                    .last()
                    .map_or_else(|| "-".into(), |l| last_text(l, names, now)),
                cut(&command_text(&t.spec.action), 40, out),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &["ID", "NAME", "TARGET", "SCHEDULE", "STATE", "NEXT", "LAST", "COMMAND"],
            &rows
        )
    );
    Ok(())
}

/// The live tasks triggered by `id`.
pub(crate) fn downstream_of(id: TaskId, tasks: &[TaskInfo]) -> Vec<TaskId> {
    tasks
        .iter()
        .filter(|t| !t.cancelled && t.spec.schedule.triggers().iter().any(|u| u.upstream == id))
        .map(|t| t.spec.id)
        .collect()
}

/// `task get` for people, as `kubectl describe` does it. `downstream`:
/// the live tasks it triggers.
pub(crate) fn describe_task(t: &TaskInfo, names: &Names, downstream: &[TaskId]) -> String {
    use std::fmt::Write;
    let action = &t.spec.action;
    let p = &t.spec.policies;
    let now = cli::now();
    let mut o = String::new();
    let mut field = |k: &str, v: String| {
        let _ = writeln!(o, "{:<14}{v}", format!("{k}:"));
    };
    field("Task", t.spec.id.to_string());
    field("Name", or_dash(t.spec.name.clone()));
    field("State", task_state(t).into());
    if let Some(n) = t.only_rejected {
        let why = t
            .last_runs
            .iter()
            .max_by_key(|l| (l.scheduled_at, l.attempt))
            .and_then(|l| l.detail.clone())
            .unwrap_or_default();
        let runs = if n >= sundial_protocol::wire::REJECTED_LOOKBACK {
            format!("its latest {n} runs were")
        } else if n == 1 {
            "its one run so far was".to_owned()
        } else {
            format!("all {n} of its runs so far were")
        };
        field(
            "Warning",
            format!("{runs} rejected: the agents refuse it ({why})"),
        );
    }
    field("Revision", t.spec.revision.to_string());
    field("Created", t.created_at.to_string());
    if t.spec.created_at != t.created_at {
        field(
            "Counts from",
            format!("{} (resumed then)", t.spec.created_at),
        );
    }
    field(
        "Target",
        match &t.spec.target {
            Target::Agent(a) => names.agent(*a),
            Target::Selector(s) => format!("selector {}", labels_text(s)),
        },
    );
    let triggers = t.spec.schedule.triggers();
    if triggers.is_empty() {
        field("Schedule", t.spec.schedule.to_string());
    } else {
        field(
            "Schedule",
            "triggered (by its upstreams' runs, on the same agent)".into(),
        );
        field(
            "After",
            triggers
                .iter()
                .map(|u| format!("{} ended {}", names.task(u.upstream), u.on))
                .collect::<Vec<_>>()
                .join(if triggers.len() > 1 { ", and " } else { "" }),
        );
    }
    if !downstream.is_empty() {
        field(
            "Triggers",
            downstream
                .iter()
                .map(|d| names.task(*d))
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let (start, end) = t.spec.schedule.window();
    if start.is_some() || end.is_some() {
        field("Window", format!("[{}, {})", or_dash(start), or_dash(end)));
    }
    field(
        "Next",
        t.next.map_or_else(
            || {
                if triggers.is_empty() {
                    "-".into()
                } else {
                    "when its upstreams end".into()
                }
            },
            |n| format!("{} ({})", with_zone(n, &t.spec.schedule), ago(n, now)),
        ),
    );
    match action {
        Action::Exec(_) => field("Command", command_text(action)),
        Action::Wasm(w) => {
            use sundial_protocol::wasm::show_bytes;
            field(
                "Function",
                format!("{} ({})", w.module, show_bytes(w.module_bytes)),
            );
            field(
                "Arguments",
                if w.args.is_empty() {
                    "-".into()
                } else {
                    w.args
                        .iter()
                        .map(|a| shell_quote(a))
                        .collect::<Vec<_>>()
                        .join(" ")
                },
            );
            field(
                "Limits",
                format!(
                    "fuel {} (about one per instruction), memory {}",
                    w.fuel(),
                    show_bytes(w.memory_bytes())
                ),
            );
        }
    }
    field(
        "Environment",
        if action.env().is_empty() {
            "-".into()
        } else {
            action
                .env()
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    if !action.sealed_env().is_empty() {
        field(
            "Secrets",
            action
                .sealed_env()
                .iter()
                .map(|s| {
                    let to: Vec<String> = s.recipients().map(|a| names.agent(a)).collect();
                    format!(
                        "{} (sealed to {})",
                        s.name,
                        or_dash(Some(to.join(", ")).filter(|t| !t.is_empty()))
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    if let Action::Exec(exec) = action {
        field("Working dir", or_dash(exec.cwd.clone()));
    }
    if triggers.is_empty() {
        field(
            "Misfire",
            format!("{} (grace {})", p.misfire.mode, p.misfire.grace),
        );
    }
    field(
        "Retries",
        if p.retry.retries == 0 {
            "none".into()
        } else {
            format!(
                "{} (backoff {}, doubling up to {})",
                p.retry.retries, p.retry.backoff_initial, p.retry.backoff_max
            )
        },
    );
    field("Timeout", or_dash(p.timeout));
    field("Overlap", p.overlap.to_string());
    let mut reached: Vec<String> = t.reached.iter().map(|a| names.agent(*a)).collect();
    if reached.is_empty() {
        reached.push("none (no agent matches; agents that join with matching labels will)".into());
    }
    field("Agents", reached.join(", "));
    if let Some(pl) = &t.spec.placement {
        field(
            "Placement",
            format!(
                "{} (lease window {}, planned {} ahead)",
                pl.mode,
                pl.lease,
                DurationMs(pl.lead_ms() as u64)
            ),
        );
        let shares = pl.shares(t.spec.id, &t.spec.schedule);
        let total: u64 = match pl.mode {
            PlacementMode::One => shares.iter().map(|(_, n)| n).sum::<u64>(),
            PlacementMode::Shard => 0,
        };
        let text: Vec<String> = shares
            .iter()
            .map(|(a, n)| match pl.mode {
                PlacementMode::One if total > 0 => {
                    format!("{} {n} ({}%)", names.agent(*a), n * 100 / total)
                }
                _ => format!("{} {n}", names.agent(*a)),
            })
            .collect();
        field(
            "Shares",
            if text.is_empty() {
                "no window planned yet".into()
            } else {
                format!("{} (occurrences in the windows kept)", text.join(", "))
            },
        );
        let _ = writeln!(o, "Leases:");
        let rows: Vec<Vec<String>> = pl
            .windows
            .iter()
            .rev()
            .take(8)
            .rev()
            .map(|w| {
                let members: Vec<String> = w.seats.iter().map(|(_, a)| names.agent(*a)).collect();
                vec![
                    format!("  {}", w.from),
                    w.until.to_string(),
                    members.join(", "),
                ]
            })
            .collect();
        if rows.is_empty() {
            let _ = writeln!(
                o,
                "  none yet (planned within a second while members are in session)"
            );
        } else {
            o.push_str(&table(&["  FROM", "UNTIL", "MEMBERS"], &rows));
        }
    }
    let _ = writeln!(o, "Last runs:");
    if t.last_runs.is_empty() {
        let _ = writeln!(o, "  none yet");
    } else {
        let rows: Vec<Vec<String>> = t
            .last_runs
            .iter()
            .map(|l| {
                vec![
                    format!("  {}", names.agent(l.agent_id)),
                    l.scheduled_at.to_string(),
                    l.attempt.to_string(),
                    l.outcome.to_string(),
                    ago(l.finished_at.unwrap_or(l.scheduled_at), now),
                    cut(l.detail.as_deref().unwrap_or("-"), 60, Output::Table),
                ]
            })
            .collect();
        o.push_str(&table(
            &[
                "  AGENT",
                "SCHEDULED AT",
                "ATTEMPT",
                "OUTCOME",
                "WHEN",
                "DETAIL",
            ],
            &rows,
        ));
    }
    o
}

/// Why a run ended as it did, in a few words.
pub(crate) fn why(r: &RunRecord) -> String {
    r.why().unwrap_or_else(|| "-".into())
}

pub(crate) fn runs_out(runs: &[RunRecord], names: &Names, out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(
            runs.iter().map(|r| run_json(r, runs, names)).collect(),
        ));
    }
    out!("{}", runs_text(runs, names, out));
    Ok(())
}

/// The runs as a table (a header line, then a row per run).
pub(crate) fn runs_text(runs: &[RunRecord], names: &Names, out: Output) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                names.task(r.task_id),
                names.agent(r.agent_id),
                r.scheduled_at.to_string(),
                r.attempt.to_string(),
                r.outcome.to_string(),
                or_dash(r.exit_code),
                or_dash(duration_ms(r)),
                or_dash(lateness_ms(r, runs, names)),
                if r.offline { "yes".into() } else { "no".into() },
                cut(&why(r), 50, out),
            ]
        })
        .collect();
    table(
        &[
            "TASK",
            "AGENT",
            "SCHEDULED AT",
            "ATTEMPT",
            "OUTCOME",
            "EXIT",
            "TOOK MS",
            "LATE MS",
            "OFFLINE",
            "DETAIL",
        ],
        &rows,
    )
}

pub(crate) fn tokens_out(tokens: &[TokenInfo], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(
            tokens
                .iter()
                .map(|t| {
                    json!({
                        "id": t.id,
                        "expires_at": t.expires_at.to_string(),
                        "uses_left": t.uses_left,
                        "labels": labels_json(&t.labels),
                    })
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.expires_at.to_string(),
                t.uses_left.to_string(),
                labels_text(&t.labels),
            ]
        })
        .collect();
    out!(
        "{}",
        table(&["ID", "EXPIRES AT", "USES LEFT", "LABELS"], &rows)
    );
    Ok(())
}

pub(crate) fn admin_state(a: &AdminInfo, now: Timestamp) -> &'static str {
    if a.revoked_at.is_some() {
        "revoked"
    } else if a.expires_at <= now {
        "expired"
    } else {
        "active"
    }
}

pub(crate) fn admins_out(admins: &[AdminInfo], out: Output) -> anyhow::Result<()> {
    let now = cli::now();
    if out == Output::Json {
        return print_json(&Value::Array(
            admins
                .iter()
                .map(|a| {
                    json!({
                        "name": a.name,
                        "role": a.role.name(),
                        "state": admin_state(a, now),
                        "cert_sha256": sundial_protocol::token::hex(&a.cert_sha256),
                        "created_at": a.created_at.to_string(),
                        "created_by": a.created_by,
                        "expires_at": a.expires_at.to_string(),
                        "revoked_at": opt_ts(a.revoked_at),
                        "last_used": opt_ts(a.last_used),
                    })
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = admins
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                a.role.to_string(),
                admin_state(a, now).to_string(),
                a.created_at.to_string(),
                a.expires_at.to_string(),
                a.last_used.map_or_else(|| "never".into(), |t| ago(t, now)),
                a.created_by.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &[
                "NAME",
                "ROLE",
                "STATE",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "CREATED BY"
            ],
            &rows
        )
    );
    Ok(())
}

pub(crate) fn audit_out(entries: &[AuditEntry], out: Output) -> anyhow::Result<()> {
    if out == Output::Json {
        return print_json(&Value::Array(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq,
                        "at": e.at.to_string(),
                        "admin": e.admin,
                        "cert_sha256": sundial_protocol::token::hex(&e.cert_sha256),
                        "from": e.from,
                        "action": e.action,
                        "subject": e.subject,
                        "revision": e.revision,
                        "refused": e.refused.is_some(),
                        "reason": e.refused,
                    })
                })
                .collect(),
        ));
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                e.at.to_string(),
                e.admin.clone(),
                or_dash(e.from.as_deref()),
                e.action.clone(),
                or_dash(e.subject.as_deref()),
                or_dash(e.revision),
                match &e.refused {
                    None => "done".into(),
                    Some(why) => cut(&format!("refused: {why}"), 60, out),
                },
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &["SEQ", "AT", "ADMIN", "FROM", "ACTION", "SUBJECT", "REVISION", "RESULT"],
            &rows
        )
    );
    Ok(())
}
