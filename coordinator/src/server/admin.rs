//! The admin ALPN: `sundialctl`'s requests, answered on the blocking pool.

use super::*;

pub(super) async fn handle_admin(
    state: &Arc<State>,
    conn: quinn::Connection,
) -> Result<(), NetError> {
    loop {
        let (mut send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        let mut recv = FramedRecv::with_limit(recv, ADMIN_REQUEST_BYTES_MAX);
        let req: AdminRequest = match tokio::time::timeout(EXCHANGE_TIMEOUT, recv.next()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(close_for(&conn, e)),
            Err(_) => return Ok(()),
        };
        // Admin work is bounded and runs on the blocking pool: four large
        // `run list`s cannot starve the sessions.
        let Ok(_slot) = state.admin_slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let answers = blocking(state, move |s| match admin(s, req) {
            Ok(a) => a,
            Err(e) => {
                s.note_store_error(&e);
                vec![AdminResponse::Error(e.to_string())]
            }
        })
        .await
        .unwrap_or_else(|| vec![AdminResponse::Error("the request failed".into())]);
        for a in &answers {
            net::send(&mut send, a).await?;
        }
        send.finish()?;
    }
}

fn agent_info(state: &State, r: Agent) -> AgentInfo {
    let id = r.id;
    let online = state
        .live
        .lock()
        .map(|l| l.contains_key(&id))
        .unwrap_or(false);
    let seen = state
        .seen
        .lock()
        .ok()
        .and_then(|s| s.get(&id).cloned())
        .unwrap_or_default();
    let last_seen = match (seen.last_contact_ms, r.last_seen.map(Timestamp::as_millis)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    AgentInfo {
        agent_id: id,
        name: r.name,
        labels: r.labels,
        online,
        revoked: r.revoked,
        enrolled_at: r.enrolled_at,
        last_seen: last_seen.map(Timestamp::from_millis_saturating),
        clock_offset_ms: r.clock_offset_ms,
        rtt_ms: r.rtt_ms,
        version: seen.version,
        allow_exec: seen.allow_exec,
        outbox_len: seen.outbox_len,
    }
}

/// A task as the admin sees it: state, next occurrence, latest runs, reach.
fn task_info(
    state: &State,
    task: StoredTask,
    agents: &[Agent],
    detailed: bool,
    now: Timestamp,
) -> Result<TaskInfo, StoreError> {
    let StoredTask {
        spec,
        cancelled,
        paused,
    } = task;
    let mut last_runs = state.store.last_runs(spec.id, PAGE_MAX)?;
    let reached: Vec<AgentId> = agents
        .iter()
        .filter(|r| !r.revoked && crate::store::targets(&spec.target, r.id, &r.labels))
        .map(|r| r.id)
        .collect();
    // Done: a one-shot whose run is recorded, finally, on every agent it reaches.
    let done = match spec.schedule.kind() {
        ScheduleKind::At(at) if !cancelled && !reached.is_empty() => reached.iter().all(|a| {
            last_runs.iter().any(|l| {
                l.agent_id == *a
                    && l.scheduled_at == *at
                    && (!l.outcome.is_retryable() || l.attempt > spec.policies.retry.retries)
            })
        }),
        _ => false,
    };
    let next = if cancelled || paused || done {
        None
    } else {
        spec.schedule.next_after(now)
    };
    if !detailed {
        last_runs.sort_by_key(|l| (l.scheduled_at, l.attempt));
        let latest = last_runs.pop();
        last_runs = latest.into_iter().collect();
    }
    Ok(TaskInfo {
        spec,
        cancelled,
        paused,
        done,
        next,
        last_runs,
        reached: if detailed { reached } else { Vec::new() },
    })
}

/// Why a task may not be created as drafted: the coordinator's own checks,
/// whatever client sent it.
fn draft_refusal(limits: &Limits, draft: &TaskDraft, now: Timestamp) -> Option<String> {
    let Action::Exec(exec) = &draft.action;
    if exec.program.trim().is_empty() {
        return Some("the program is empty".into());
    }
    let p = &draft.policies;
    if p.timeout.is_some_and(|t| t.0 == 0) {
        return Some("--timeout must be longer than 0s".into());
    }
    if p.retry.retries > RETRIES_MAX {
        return Some(format!(
            "--retries {} exceeds the most allowed, {RETRIES_MAX}",
            p.retry.retries
        ));
    }
    if p.retry.retries > 0 && p.retry.backoff_initial < limits.backoff_min {
        return Some(format!(
            "--backoff {} is shorter than this coordinator's minimum of {} (serve --backoff-min)",
            p.retry.backoff_initial, limits.backoff_min
        ));
    }
    if p.retry.backoff_max < p.retry.backoff_initial {
        return Some(format!(
            "--backoff-max {} is shorter than --backoff {}",
            p.retry.backoff_max, p.retry.backoff_initial
        ));
    }
    match draft.schedule.kind() {
        ScheduleKind::Every { period, .. } if *period < limits.period_min => {
            return Some(format!(
                "--every {period} is shorter than this coordinator's minimum period of {} (serve --period-min)",
                limits.period_min
            ));
        }
        ScheduleKind::At(at) if at.millis_since(now) < -PAST_SLACK_MS => {
            return Some(format!(
                "--at {at} is in the past (now is {now}); use --at now to run at once"
            ));
        }
        _ => {}
    }
    if let (_, Some(end)) = draft.schedule.window() {
        if end.millis_since(now) < -PAST_SLACK_MS {
            return Some(format!("--end {end} is in the past (now is {now})"));
        }
    }
    let size = postcard::experimental::serialized_size(draft).unwrap_or(usize::MAX);
    if size > TASK_SPEC_BYTES_MAX {
        return Some(format!(
            "the task is {size} bytes (program, arguments, environment); the most allowed is {TASK_SPEC_BYTES_MAX}: pass large data in a file on the device instead"
        ));
    }
    None
}

/// Applies `task update`'s changes to a task.
fn apply_patch(spec: &mut TaskSpec, p: TaskPatch) -> Result<(), StoreError> {
    if let Some(s) = p.schedule {
        spec.schedule = s;
    }
    let Action::Exec(exec) = &mut spec.action;
    if let Some(Action::Exec(new)) = p.action {
        exec.program = new.program;
        exec.args = new.args;
    }
    if let Some(env) = p.env {
        exec.env = env;
    }
    if let Some(cwd) = p.cwd {
        exec.cwd = cwd;
    }
    let pol = &mut spec.policies;
    if let Some(m) = p.misfire {
        pol.misfire.mode = m;
    }
    if let Some(g) = p.grace {
        pol.misfire.grace = g;
    }
    if let Some(r) = p.retries {
        pol.retry.retries = r;
    }
    if let Some(b) = p.backoff {
        pol.retry.backoff_initial = b;
    }
    if let Some(b) = p.backoff_max {
        pol.retry.backoff_max = b;
    }
    if let Some(t) = p.timeout {
        pol.timeout = t;
    }
    if let Some(o) = p.overlap {
        pol.overlap = o;
    }
    Ok(())
}

/// Answers one admin request: one message, or several for a long list.
fn admin(state: &State, req: AdminRequest) -> Result<Vec<AdminResponse>, StoreError> {
    let one = |r: AdminResponse| Ok(vec![r]);
    match req {
        AdminRequest::TokenCreate {
            ttl_ms,
            uses,
            labels,
        } => {
            if uses == 0 {
                return Err(StoreError::Refused("--uses must be at least 1".into()));
            }
            let rng = ring::rand::SystemRandom::new();
            let mut secret = vec![0u8; sundial_protocol::token::SECRET_BYTES];
            ring::rand::SecureRandom::fill(&rng, &mut secret)
                .map_err(|_| StoreError::Refused("no randomness available".into()))?;
            let ttl = i64::try_from(ttl_ms).unwrap_or(i64::MAX);
            state.store.put_token(&JoinToken {
                secret_sha256: sha256(&secret),
                expires_at: now().saturating_add_ms(ttl),
                uses_left: uses,
                labels,
            })?;
            let server_name = state
                .store
                .setting("server_name")?
                .unwrap_or_else(|| sundial_net::tls::SERVER_NAME_DEFAULT.into());
            let token = sundial_protocol::token::JoinToken {
                secret,
                ca_sha256: sha256(state.pki.ca_der.as_ref()),
                server_name,
            };
            one(AdminResponse::Token(token.encode()))
        }
        AdminRequest::AgentList => {
            let agents: Vec<AgentInfo> = all_agents(state.store.as_ref())?
                .into_iter()
                .filter(|a| !a.forgotten)
                .map(|a| agent_info(state, a))
                .collect();
            // A fleet of agents with long allowlists is megabytes: in pages.
            Ok(chunk_by_size(agents, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Agents)
                .collect())
        }
        AdminRequest::AgentGet(id) => match state.store.agent(id)? {
            Some(r) => one(AdminResponse::Agent(Box::new(agent_info(state, r)))),
            None => one(AdminResponse::Error(format!("no agent {id}"))),
        },
        AdminRequest::AgentRevoke(id) => {
            let rec = state.store.revoke_agent(id)?;
            if let Ok(mut k) = state.known.write() {
                k.remove(&rec.cert_sha256);
            }
            // Cut off at once: live sessions end now, not at the next reconnect.
            let closed = state.close_sessions(id, close::REVOKED, b"agent revoked");
            tracing::warn!(agent = %id, sessions_closed = closed, "agent revoked");
            one(AdminResponse::Done)
        }
        AdminRequest::TaskCreate(draft) => {
            let mut draft = *draft;
            let now = now();
            if let Some(why) = draft_refusal(&state.limits, &draft, now) {
                return Err(StoreError::Refused(why));
            }
            let mut warnings = Vec::new();
            match &draft.target {
                Target::Agent(a) => match state.store.agent(*a)? {
                    None => return Err(StoreError::NotFound(format!("no agent {a}"))),
                    Some(r) if r.revoked => {
                        return Err(StoreError::Refused(format!(
                            "agent {a} is revoked; it receives no tasks"
                        )))
                    }
                    Some(_) => {}
                },
                Target::Selector(sel) => {
                    let agents = all_agents(state.store.as_ref())?;
                    let reached = agents
                        .iter()
                        .filter(|r| !r.revoked && sel.iter().all(|p| r.labels.contains(p)))
                        .count();
                    if reached == 0 {
                        warnings.push(format!(
                            "the selector {} matches no agent yet; agents that join with these labels will receive the task",
                            crate::cli::labels_text(sel)
                        ));
                    }
                }
            }
            if draft.anchor_at_creation {
                if let ScheduleKind::Every { period, .. } = draft.schedule.kind() {
                    let (start, end) = draft.schedule.window();
                    draft.schedule = sundial_protocol::Schedule::every(*period, now)
                        .and_then(|s| s.with_window(start, end))
                        .map_err(|e| StoreError::Refused(e.to_string()))?;
                }
            }
            let spec = state.store.create_task(draft, now)?;
            tracing::info!(task = %spec.id, revision = spec.revision, "task created");
            state.announce(&spec.target, spec.revision);
            if warnings.is_empty() {
                one(AdminResponse::TaskCreated(spec.id))
            } else {
                one(AdminResponse::TaskCreatedWarn {
                    id: spec.id,
                    warnings,
                })
            }
        }
        AdminRequest::TaskList => {
            let agents = all_agents(state.store.as_ref())?;
            let now = now();
            let tasks: Vec<TaskInfo> = all_tasks(state.store.as_ref())?
                .into_iter()
                .map(|t| task_info(state, t, &agents, false, now))
                .collect::<Result<_, _>>()?;
            Ok(chunk_by_size(tasks, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Tasks)
                .collect())
        }
        AdminRequest::TaskGet(id) => match state.store.task(id)? {
            Some(task) => {
                let agents = all_agents(state.store.as_ref())?;
                one(AdminResponse::Task(Box::new(task_info(
                    state,
                    task,
                    &agents,
                    true,
                    now(),
                )?)))
            }
            None => one(AdminResponse::Error(format!("no task {id}"))),
        },
        AdminRequest::TaskCancel(id) => {
            let revision = state.store.cancel_task(id)?;
            tracing::info!(task = %id, revision, "task cancelled");
            if let Some(t) = state.store.task(id)? {
                state.announce(&t.spec.target, revision);
            }
            one(AdminResponse::Done)
        }
        AdminRequest::TaskUpdate { id, patch } => {
            let Some(StoredTask {
                mut spec,
                cancelled,
                ..
            }) = state.store.task(id)?
            else {
                return Err(StoreError::NotFound(format!("no task {id}")));
            };
            let read_revision = spec.revision;
            if cancelled {
                return Err(StoreError::Refused(format!("task {id} is cancelled")));
            }
            apply_patch(&mut spec, *patch)?;
            let draft = TaskDraft {
                name: spec.name.clone(),
                target: spec.target.clone(),
                schedule: spec.schedule.clone(),
                action: spec.action.clone(),
                policies: spec.policies,
                anchor_at_creation: false,
            };
            if let Some(why) = draft_refusal(&state.limits, &draft, now()) {
                return Err(StoreError::Refused(why));
            }
            let revision = state.store.update_task(&spec, read_revision)?;
            tracing::info!(task = %id, revision, "task updated");
            state.announce(&spec.target, revision);
            one(AdminResponse::Updated { revision })
        }
        AdminRequest::TaskRunNow(id) => {
            let Some(StoredTask {
                spec,
                cancelled,
                paused,
            }) = state.store.task(id)?
            else {
                return Err(StoreError::NotFound(format!("no task {id}")));
            };
            if cancelled || paused {
                return Err(StoreError::Refused(format!(
                    "task {id} is {}; resume it first",
                    if cancelled { "cancelled" } else { "paused" }
                )));
            }
            let at = now();
            let mut sent = Vec::new();
            let mut offline = Vec::new();
            let live = state.live.lock().map(|l| {
                l.iter()
                    .map(|(a, v)| (*a, v.outs.clone()))
                    .collect::<HashMap<_, _>>()
            });
            let live = live.unwrap_or_default();
            for r in all_agents(state.store.as_ref())? {
                let agent = r.id;
                if r.revoked || !crate::store::targets(&spec.target, agent, &r.labels) {
                    continue;
                }
                // One session is enough: the run is keyed, the agent runs it once.
                let delivered = live.get(&agent).is_some_and(|outs| {
                    outs.iter()
                        .any(|o| o.try_send(CoordMsg::RunNow { task_id: id, at }).is_ok())
                });
                if delivered {
                    sent.push(agent);
                } else {
                    offline.push(agent);
                }
            }
            tracing::info!(task = %id, %at, sent = sent.len(), offline = offline.len(), "run now");
            one(AdminResponse::RunNowSent { at, sent, offline })
        }
        AdminRequest::TaskPause(id) | AdminRequest::TaskResume(id) => {
            let pause = matches!(req, AdminRequest::TaskPause(_));
            let revision = state.store.set_paused(id, pause, now())?;
            tracing::info!(task = %id, revision, paused = pause, "task pause state changed");
            if let Some(t) = state.store.task(id)? {
                state.announce(&t.spec.target, revision);
            }
            one(AdminResponse::Done)
        }
        AdminRequest::AgentForget(id) => {
            state.store.forget_agent(id)?;
            tracing::info!(agent = %id, "revoked agent forgotten; its runs stay");
            one(AdminResponse::Done)
        }
        AdminRequest::TokenList => {
            let now = now();
            let tokens: Vec<TokenInfo> = all_tokens(state.store.as_ref())?
                .into_iter()
                .filter(|t| t.expires_at > now && t.uses_left > 0)
                .map(|t| TokenInfo {
                    id: sundial_protocol::token::hex(&t.secret_sha256[..4]),
                    expires_at: t.expires_at,
                    uses_left: t.uses_left,
                    labels: t.labels,
                })
                .collect();
            Ok(chunk_by_size(tokens, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Tokens)
                .collect())
        }
        AdminRequest::TokenRevoke(id) => {
            let id = id.to_ascii_lowercase();
            let matching: Vec<[u8; 32]> = all_tokens(state.store.as_ref())?
                .into_iter()
                .map(|t| t.secret_sha256)
                .filter(|h| sundial_protocol::token::hex(&h[..4]) == id)
                .collect();
            match matching.as_slice() {
                [h] => {
                    state.store.delete_token(*h)?;
                    tracing::info!(token = %id, "join token revoked");
                    one(AdminResponse::Done)
                }
                [] => Err(StoreError::Refused(format!(
                    "no token {id} (see sundialctl token list)"
                ))),
                _ => Err(StoreError::Refused(format!(
                    "{id} names several tokens; wait for them to expire or use them up"
                ))),
            }
        }
        AdminRequest::RunList {
            task,
            agent,
            since,
            limit,
            after,
            before,
        } => {
            if limit == 0 {
                return Err(StoreError::Refused("--limit must be at least 1".into()));
            }
            let limit = limit.min(RUN_LIST_MAX) as usize;
            let cursor = |s: Option<String>| {
                s.map(|s| s.parse::<RunCursor>().map_err(StoreError::Refused))
                    .transpose()
            };
            let page = match (cursor(after)?, cursor(before)?) {
                (Some(_), Some(_)) => {
                    return Err(StoreError::Refused(
                        "--after and --before do not go together".into(),
                    ))
                }
                (Some(a), None) => Page::After(a),
                (None, Some(b)) => Page::Before(b),
                (None, None) => Page::Latest,
            };
            let page = state.store.runs(&RunQuery {
                task,
                agent,
                since,
                limit,
                page,
                forward_from_since: false,
            })?;
            if page.unreadable > 0 {
                tracing::warn!(
                    unreadable = page.unreadable,
                    "run list skipped stored records that could not be read"
                );
            }
            let mut out: Vec<AdminResponse> = chunk_by_size(page.runs, LIST_CHUNK_BYTES_MAX)
                .into_iter()
                .map(AdminResponse::Runs)
                .collect();
            out.push(AdminResponse::RunsSummary {
                matched: page.matched,
                unreadable: page.unreadable,
                more: page.more,
                first: page.first.map(|c| c.to_string()),
                last: page.last.map(|c| c.to_string()),
            });
            Ok(out)
        }
    }
}
