//! Turning flags into requests: task drafts, patches, schedule previews.

use super::*;

/// What `task update` changes.
/// `function`: the task's new function (from `--wasm`, `--fuel`,
/// `--memory`), which replaces the action the words after `--` would make.
pub(crate) fn patch(
    a: UpdateArgs,
    function: Option<sundial_protocol::wasm::WasmSpec>,
) -> anyhow::Result<TaskPatch> {
    let schedule =
        if a.schedule.at.is_some() || a.schedule.every.is_some() || a.schedule.cron.is_some() {
            for note in a.schedule.notes() {
                eprintln!("sundialctl: note: {note}");
            }
            Some(
                a.schedule
                    .to_schedule(cli::now())
                    .map_err(anyhow::Error::msg)?,
            )
        } else {
            None
        };
    let mut command = a.command.into_iter();
    let action = match function {
        Some(w) => Some(Action::Wasm(w)),
        None => command.next().map(|program| {
            Action::Exec(ExecSpec {
                program,
                args: command.collect(),
                ..ExecSpec::default()
            })
        }),
    };
    let p = TaskPatch {
        schedule,
        action,
        env: if a.clear_env {
            Some(Vec::new())
        } else if a.env.is_empty() {
            None
        } else {
            Some(a.env)
        },
        cwd: a.cwd.map(Some),
        misfire: a.misfire,
        grace: a.grace,
        retries: a.retries,
        backoff: a.backoff,
        backoff_max: a.backoff_max,
        timeout: if a.no_timeout {
            Some(None)
        } else {
            a.timeout.map(Some)
        },
        overlap: a.overlap,
    };
    if p == TaskPatch::default() {
        bail!(
            "nothing to change: give a schedule, a policy flag, --env, --cwd, --wasm, --fuel, --memory, or `-- PROGRAM ARGS`"
        );
    }
    Ok(p)
}

/// How far in the past `--at` or `--end` may be (`--at now` is parsed a
/// moment before it is checked).
pub(crate) const PAST_SLACK_MS: i64 = 1_000;
/// The grace when none is given and the schedule's period is longer.
pub(crate) const GRACE_DEFAULT: DurationMs = DurationMs(60_000);

/// `TASK[:OUTCOMES]` of `--after`: the task as typed, and the outcomes.
pub(crate) fn parse_after(text: &str) -> anyhow::Result<(String, OutcomeSet)> {
    let (task, outcomes) = match text.rsplit_once(':') {
        Some((t, o)) => (
            t,
            OutcomeSet::parse(o).map_err(|e| anyhow::anyhow!("--after {text}: {e}"))?,
        ),
        None => (text, OutcomeSet::SUCCEEDED),
    };
    if task.trim().is_empty() {
        bail!("--after {text}: no task named (expected TASK[:OUTCOMES], e.g. backup:failed)");
    }
    Ok((task.to_owned(), outcomes))
}

/// A task to create. `triggers`: the resolved `--after` upstreams, and
/// `inherited`: the target to take when none is given (the first
/// upstream's).
pub(crate) fn draft(
    a: CreateArgs,
    agent: Option<AgentId>,
    triggers: Vec<Trigger>,
    inherited: Option<Target>,
    module: Option<(sundial_protocol::wasm::ModuleHash, u64)>,
) -> anyhow::Result<TaskDraft> {
    let now = cli::now();
    if let Some(at) = a.schedule.at {
        if at.millis_since(now) < -PAST_SLACK_MS {
            bail!("--at {at} is in the past (now is {now}); use --at now to run at once, or --at +DUR");
        }
    }
    if let Some(end) = a.end {
        if end.millis_since(now) < -PAST_SLACK_MS {
            bail!("--end {end} is in the past (now is {now})");
        }
    }
    if a.timeout.is_some_and(|t| t.0 == 0) {
        bail!("--timeout must be longer than 0s");
    }
    let anchor_at_creation =
        a.schedule.every().map_err(anyhow::Error::msg)?.is_some() && a.schedule.anchor.is_none();
    for note in a.schedule.notes() {
        eprintln!("sundialctl: note: {note}");
    }
    let schedule = if triggers.is_empty() {
        a.schedule
            .to_schedule(now)
            .map_err(|e| anyhow::anyhow!("{e} (or --after TASK for a triggered task)"))?
            .with_window(a.start, a.end)
            .map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        Schedule::after(triggers).map_err(|e| anyhow::anyhow!("{e}"))?
    };
    // A catch-up within the grace runs as if on time: the default grace is
    // no longer than the schedule's period, so a short outage does not
    // replay a burst of a frequent task.
    let grace = a.grace.unwrap_or_else(|| {
        let mut next = schedule.occurrences_after(now).take(2);
        match (next.next(), next.next()) {
            (Some(x), Some(y)) => DurationMs(
                u64::try_from(y.millis_since(x))
                    .unwrap_or(u64::MAX)
                    .min(GRACE_DEFAULT.0),
            ),
            _ => GRACE_DEFAULT,
        }
    });
    let target = match (agent, a.selector, inherited) {
        (Some(id), _, _) => Target::Agent(id),
        (None, Some(sel), _) => Target::Selector(sel.0),
        (None, None, Some(t)) => t,
        (None, None, None) => bail!("one of --agent or --selector is required"),
    };
    let placement = match a.placement.as_deref() {
        None => None,
        Some(mode) if !matches!(target, Target::Selector(_)) => {
            bail!("--placement {mode} needs --selector: it chooses among the agents a selector matches")
        }
        Some(mode) => {
            let mode: PlacementMode = mode.parse().map_err(anyhow::Error::msg)?;
            let ask = PlacementAsk::new(mode, a.lease);
            if let Err(why) = ask.placement() {
                bail!("--lease {}: {why}", a.lease);
            }
            Some(ask)
        }
    };
    let action = match module {
        Some((module, module_bytes)) => {
            let spec = sundial_protocol::wasm::WasmSpec {
                module,
                module_bytes,
                args: a.command,
                env: a.env,
                sealed_env: Vec::new(),
                fuel: a.fuel,
                memory_bytes: a.memory,
            };
            if let Some(why) = spec.refusal() {
                bail!("--wasm: {why}");
            }
            Action::Wasm(spec)
        }
        None => {
            let mut command = a.command.into_iter();
            let Some(program) = command.next() else {
                bail!("no program given after `--` (or --wasm FILE for a function)");
            };
            Action::Exec(ExecSpec {
                program,
                args: command.collect(),
                env: a.env,
                cwd: a.cwd,
                sealed_env: Vec::new(),
            })
        }
    };
    Ok(TaskDraft {
        name: a.name,
        target,
        schedule,
        action,
        policies: Policies {
            misfire: MisfirePolicy {
                mode: a.misfire,
                grace,
            },
            retry: RetryPolicy {
                retries: a.retries,
                backoff_initial: a.backoff,
                backoff_max: a.backoff_max,
            },
            overlap: a.overlap,
            timeout: a.timeout,
        },
        anchor_at_creation,
        placement: placement.into(),
    })
}

pub(crate) fn schedule_next(
    schedule: &ScheduleArgs,
    from: Option<Timestamp>,
    count: usize,
    output: Output,
) -> anyhow::Result<()> {
    if count > cli::SCHEDULE_COUNT_MAX {
        bail!(
            "--count {count} is more than the {} occurrences this command prints",
            cli::SCHEDULE_COUNT_MAX
        );
    }
    let now = cli::now();
    for note in schedule.notes() {
        eprintln!("sundialctl: note: {note}");
    }
    let sched = schedule.to_schedule(now).map_err(anyhow::Error::msg)?;
    let from = from.unwrap_or(now);
    let next = cli::next_occurrences(&sched, from, count);
    match output {
        Output::Json => {
            let texts: Vec<String> = next.iter().map(ToString::to_string).collect();
            outln!("{}", serde_json::to_string(&texts)?);
        }
        Output::Table | Output::Wide => {
            if next.is_empty() {
                outln!("no occurrences after {from}");
            }
            let zone = schedule.zone();
            for t in next {
                match zone {
                    Some(tz) if tz != chrono_tz::UTC => {
                        let local = tz.from_utc_datetime(&t.to_naive_utc());
                        outln!("{t}  {}", local.format("%Y-%m-%d %H:%M:%S %Z"));
                    }
                    _ => outln!("{t}"),
                }
            }
        }
    }
    Ok(())
}

/// A secret's name and value, as the operator gave it (never printed).
pub(crate) struct Secret {
    pub(crate) name: String,
    pub(crate) value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({}, {} bytes)", self.name, self.value.len())
    }
}

/// The secrets `--secret-env` and `--secret-env-file` give, checked: names
/// valid and given once, values within bounds. Errors name the variable,
/// never its value.
pub(crate) fn secrets(a: &SecretArgs) -> anyhow::Result<Vec<Secret>> {
    use sundial_protocol::seal::{valid_env_name, SEALED_ENV_MAX, SECRET_VALUE_BYTES_MAX};
    let mut out: Vec<Secret> = Vec::new();
    let mut add = |name: &str, value: Vec<u8>, from: &str| -> anyhow::Result<()> {
        if !valid_env_name(name) {
            bail!("{from}: `{name}` is not an environment variable name (letters, digits and _, not starting with a digit)");
        }
        if out.iter().any(|s| s.name == name) {
            bail!("{from}: the secret {name} is given twice");
        }
        if value.len() > SECRET_VALUE_BYTES_MAX {
            bail!(
                "{from}: the secret {name} is {} bytes; the most is {SECRET_VALUE_BYTES_MAX} (pass large data in a file on the device)",
                value.len()
            );
        }
        out.push(Secret {
            name: name.to_owned(),
            value,
        });
        Ok(())
    };
    for text in &a.secret_env {
        match text.split_once('=') {
            Some((name, value)) => add(name, value.as_bytes().to_vec(), "--secret-env")?,
            None => {
                use std::os::unix::ffi::OsStringExt;
                let Some(value) = std::env::var_os(text) else {
                    bail!("--secret-env {text}: no value given and {text} is not set in this shell's environment (give NAME=VALUE, or export {text} first)");
                };
                add(text, value.into_vec(), "--secret-env")?
            }
        }
    }
    for path in &a.secret_env_file {
        let from = path.display().to_string();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("--secret-env-file {from}"))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                bail!("{from}:{}: expected NAME=VALUE", i + 1);
            };
            add(
                name.trim(),
                value.as_bytes().to_vec(),
                &format!("{from}:{}", i + 1),
            )?;
        }
    }
    if out.len() > SEALED_ENV_MAX {
        bail!(
            "{} secrets; the most for one task is {SEALED_ENV_MAX}",
            out.len()
        );
    }
    Ok(out)
}

/// `secrets` sealed to each agent in `keys` (HPKE, a fresh ephemeral key
/// per value and agent).
pub(crate) fn seal_all(
    secrets: &[Secret],
    keys: &[(AgentId, sundial_protocol::seal::SealPublicKey)],
) -> anyhow::Result<Vec<sundial_protocol::seal::SealedEnv>> {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    secrets
        .iter()
        .map(|s| {
            let sealed = keys
                .iter()
                .map(|(agent, key)| {
                    let mut seed = [0u8; 32];
                    rng.fill(&mut seed)
                        .map_err(|_| anyhow::anyhow!("the random generator failed"))?;
                    let v = sundial_protocol::seal::seal(key, *agent, &s.name, &s.value, seed)
                        .map_err(|e| anyhow::anyhow!("sealing {} to {agent}: {e}", s.name))?;
                    Ok((*agent, v))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(sundial_protocol::seal::SealedEnv {
                name: s.name.clone(),
                sealed,
            })
        })
        .collect()
}
