//! The agent session ALPN: Hello checked here, then a driver of the core's
//! `CoordSession` (the store work it asks for runs on the blocking pool).

use super::*;

pub(super) async fn handle_session(
    state: &Arc<State>,
    conn: quinn::Connection,
    agent: AgentId,
) -> Result<(), NetError> {
    let remote = conn.remote_address();
    // A connection that says nothing is not kept: Hello comes within the
    // exchange deadline, and is small.
    let opened = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let (send, recv) = conn.accept_bi().await?;
        let mut recv = FramedRecv::with_limit(recv, HELLO_FRAME_BYTES_MAX);
        let hello: AgentMsg = recv.next().await?;
        Ok::<_, NetError>((send, recv, hello))
    })
    .await;
    let (mut send, mut recv, hello) = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Err(close_for(&conn, e)),
        Err(_) => {
            tracing::warn!(%agent, %remote, "no Hello within the deadline; closing");
            conn.close(close::PROTOCOL.into(), b"no Hello in time");
            return Ok(());
        }
    };
    recv.set_limit(FRAME_BYTES_MAX);
    let AgentMsg::Hello {
        last_revision,
        outbox_len,
        agent_version,
        allow_exec,
    } = hello
    else {
        conn.close(close::PROTOCOL.into(), b"expected Hello");
        return Ok(());
    };
    let record = match blocking(state, move |s| s.store.agent(agent)).await {
        Some(Ok(Some(r))) if !r.revoked => r,
        Some(Ok(_)) => {
            conn.close(close::REVOKED.into(), b"agent revoked");
            return Ok(());
        }
        _ => {
            conn.close(close::STORE.into(), b"coordinator store failed");
            return Ok(());
        }
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(SESSION_OUTBOX_MAX);
    let (kick_tx, kick_rx) = watch::channel(0u64);
    {
        let Ok(mut live) = state.live.lock() else {
            return Ok(());
        };
        let open = state.sessions_open.load(Ordering::Relaxed);
        if open >= state.limits.sessions_max {
            drop(live);
            tracing::warn!(%agent, max = state.limits.sessions_max, "session refused: the coordinator serves its maximum of sessions");
            let after = state.reconnect_policy().busy_spread_ms;
            conn.close(
                close::BUSY.into(),
                busy_reason(u64::from(after), "too many sessions").as_bytes(),
            );
            return Ok(());
        }
        state.sessions_open.fetch_add(1, Ordering::Relaxed);
        let l = live.entry(agent).or_default();
        // One agent, one session: an older one (a connection the agent
        // gave up on, or a second process with the same certificate) ends
        // here, so per-agent limits cannot be multiplied by sessions.
        for old in &l.conns {
            tracing::info!(%agent, "a newer session of this agent replaces an older one");
            old.close(
                close::REPLACED.into(),
                b"replaced by a newer session of this agent",
            );
        }
        l.conns.push(conn.clone());
        l.outs.push(out_tx);
        l.kicks.push(kick_tx);
        l.labels = record.labels.clone();
    }
    let knows_policy = sundial_protocol::wire::agent_knows_policy(&agent_version);
    if let Ok(mut seen) = state.seen.lock() {
        let uploads = seen.get_mut(&agent).and_then(|s| s.uploads.take());
        seen.insert(
            agent,
            Seen {
                version: Some(agent_version),
                allow_exec,
                outbox_len: Some(outbox_len),
                last_contact_ms: Some(now().as_millis()),
                uploads,
            },
        );
    }
    tracing::info!(%agent, last_revision, outbox_len, %remote, sessions = state.live_sessions(), "agent session up");
    let seen = AgentSeen {
        at: now(),
        clock: None,
    };
    let _ = blocking(state, move |s| s.store.agent_seen(agent, seen)).await;
    // Reading runs on its own, so the coordinator never stops reading while
    // it writes a long assignment: an agent blocked writing its result
    // batches (at most BATCHES_IN_FLIGHT_MAX unacknowledged) always gets
    // them through, goes back to reading, and the writes here complete.
    let (msg_tx, msg_rx) = tokio::sync::mpsc::channel(SESSION_INBOX_MAX);
    let reader = tokio::spawn(async move {
        loop {
            let m = recv.next::<AgentMsg>().await;
            let end = m.is_err();
            if msg_tx.send(m).await.is_err() || end {
                return;
            }
        }
    });
    let result = session_loop(
        state,
        &conn,
        &mut send,
        SessionQueues {
            inbox: msg_rx,
            outbox: out_rx,
            kicks: kick_rx,
        },
        agent,
        &record,
        (last_revision, outbox_len, knows_policy),
    )
    .await;
    reader.abort();
    if let Ok(mut live) = state.live.lock() {
        if let Some(l) = live.get_mut(&agent) {
            if let Some(i) = l
                .conns
                .iter()
                .position(|c| c.stable_id() == conn.stable_id())
            {
                l.conns.remove(i);
                l.outs.remove(i);
                l.kicks.remove(i);
                state.sessions_open.fetch_sub(1, Ordering::Relaxed);
            }
            if l.conns.is_empty() {
                live.remove(&agent);
            }
        }
    }
    let seen = AgentSeen {
        at: now(),
        clock: None,
    };
    let _ = blocking(state, move |s| s.store.agent_seen(agent, seen)).await;
    tracing::info!(%agent, "agent session down");
    result.map_err(|e| close_for(&conn, e))
}

/// A cancel for a task id a restored store may have lost (only its id
/// and revision are sent).
fn lost_task(id: TaskId, revision: u64) -> sundial_protocol::TaskSpec {
    sundial_protocol::TaskSpec {
        id,
        name: None,
        target: sundial_protocol::task::Target::Selector(Vec::new()),
        schedule: sundial_protocol::Schedule::at(Timestamp::MIN),
        action: sundial_protocol::task::Action::Exec(Default::default()),
        policies: Default::default(),
        revision,
        created_at: Timestamp::MIN,
    }
}

/// Whether a task's runs may come from this agent: `None` when the store
/// knows no such task (a store restored from a backup older than it).
type Assigned = HashMap<TaskId, Option<bool>>;

/// Why an agent's result batch is refused, if it is; else the tasks of the
/// batch the store does not know at all. Their records cannot be stored
/// (and would wedge the agent's outbox if they closed the session): they
/// are acknowledged and dropped, and said so. A record of a task the store
/// knows but did not assign to this agent closes the session.
fn check_results(
    state: &State,
    agent: AgentId,
    labels: &[(String, String)],
    assigned: &mut Assigned,
    runs: &[RunRecord],
) -> Result<Result<Vec<TaskId>, String>, StoreError> {
    // Size and plausibility were checked by the session machine before it
    // asked for this store (`refusal`); ownership needs the store.
    let mut unknown = Vec::new();
    for r in runs {
        if assigned.len() > ASSIGNED_CACHE_MAX {
            assigned.clear();
        }
        let ok = match assigned.get(&r.task_id) {
            Some(ok) => *ok,
            None => {
                let ok = state
                    .store
                    .task(r.task_id)?
                    .map(|t| crate::store::targets(&t.spec.target, agent, labels));
                assigned.insert(r.task_id, ok);
                ok
            }
        };
        match ok {
            Some(true) => {}
            Some(false) => {
                return Ok(Err(format!(
                    "run of task {} which is not assigned to this agent",
                    r.task_id
                )))
            }
            None => {
                if !unknown.contains(&r.task_id) {
                    unknown.push(r.task_id);
                }
            }
        }
    }
    Ok(Ok(unknown))
}

/// What a session loop reads besides its stream: the agent's messages (read
/// on their own task) and messages from admin work to send.
struct SessionQueues {
    inbox: tokio::sync::mpsc::Receiver<Result<AgentMsg, NetError>>,
    outbox: tokio::sync::mpsc::Receiver<CoordMsg>,
    /// Revisions of changes that concern this agent.
    kicks: watch::Receiver<u64>,
}

async fn session_loop(
    state: &Arc<State>,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    queues: SessionQueues,
    agent: AgentId,
    record: &Agent,
    hello: (u64, u64, bool),
) -> Result<(), NetError> {
    let SessionQueues {
        mut inbox,
        mut outbox,
        kicks: mut revisions,
    } = queues;
    let origin = state.started;
    let clock = || Now {
        mono_ms: origin.elapsed().as_millis() as u64,
        wall: now(),
    };
    let store_failed = |e: StoreError| {
        tracing::error!(error = %e, %agent, "store failed during a session");
        state.note_store_error(&e);
        conn.close(close::STORE.into(), b"coordinator store failed");
        NetError::Eof
    };
    let labels = Arc::new(record.labels.clone());
    let enrolled_at = record.enrolled_at;
    let mut assigned: Assigned = HashMap::new();
    // An agent ahead of the store: the store was restored from an older
    // backup. Counters jump past it, and the agent is resynchronised from
    // the start: every task the store knows for it, and a cancel for every
    // id that may have been lost.
    let agent_revision = hello.0;
    let restored = blocking(state, move |s| s.store.catch_up_restored(agent_revision))
        .await
        .unwrap_or_else(|| Err(StoreError::Refused("store worker failed".into())))
        .map_err(store_failed)?;
    let mut lost_ids: Option<(std::ops::Range<u64>, u64)> = None;
    let start_revision = match restored {
        Some((ids, revision)) => {
            tracing::warn!(%agent, agent_revision, lost_ids = ?ids, revision, "this agent is ahead of the store, which was restored from an older backup: counters moved past it, and the agent is sent its whole assignment again");
            lost_ids = Some((ids, revision));
            0
        }
        None => agent_revision,
    };
    let mut sm = CoordSession::new(
        clock(),
        agent,
        enrolled_at,
        start_revision,
        hello.1,
        UploadLimits {
            runs_per_sec: state.limits.upload_runs_per_sec,
            bytes_per_sec: state.limits.upload_bytes_per_sec,
        },
        hello.2.then(|| state.reconnect_policy()),
    );
    // The upload limits are the agent's, not the session's: carried on
    // from its last session, and kept up to date for its next (after every
    // batch, so a session replaced mid-way has left what it used).
    if let Some(left) = state
        .seen
        .lock()
        .ok()
        .and_then(|seen| seen.get(&agent).and_then(|s| s.uploads.clone()))
    {
        sm.carry_allowance(left);
    }
    let keep_allowance = |sm: &CoordSession| {
        if let Ok(mut seen) = state.seen.lock() {
            seen.entry(agent).or_default().uploads = Some(sm.upload_allowance());
        }
    };
    async {
    loop {
        // Drive the machine until it has nothing more to say.
        loop {
            let mut busy = false;
            while let Some(effect) = sm.poll_effect() {
                busy = true;
                match effect {
                    CoordEffect::LoadChanges { since } => {
                        let labels = labels.clone();
                        let lost = lost_ids.take();
                        let (changes, upto, more) = blocking(state, move |s| {
                            let page = s.store.changes_for(agent, &labels, since, CHANGES_PAGE_MAX)?;
                            let (mut changes, upto, more) = (page.changes, page.upto, page.more);
                            if let Some((ids, revision)) = lost {
                                // Cancels for the ids the store does not know
                                // (those it knows are in `changes` already).
                                for id in ids {
                                    if s.store.task(TaskId(id))?.is_none() {
                                        changes.push((lost_task(TaskId(id), revision), true));
                                    }
                                }
                            }
                            Ok((changes, upto, more))
                        })
                        .await
                        .unwrap_or_else(|| Err(StoreError::Refused("store worker failed".into())))
                        .map_err(store_failed)?;
                        sm.handle_changes(changes, upto, more);
                    }
                    CoordEffect::StoreRuns { batch_id, runs } => {
                        let labels = labels.clone();
                        let cache = std::mem::take(&mut assigned);
                        let checked = blocking(state, move |s| {
                            let mut cache = cache;
                            let verdict = check_results(s, agent, &labels, &mut cache, &runs);
                            let stored = match &verdict {
                                Ok(Ok(unknown)) => {
                                    let known: Vec<RunRecord> = runs
                                        .iter()
                                        .filter(|r| !unknown.contains(&r.task_id))
                                        .cloned()
                                        .collect();
                                    Some(s.store.put_runs(&known))
                                }
                                _ => None,
                            };
                            let keys: Vec<RunKey> = runs.iter().map(RunRecord::key).collect();
                            (verdict, stored, cache, keys)
                        })
                        .await;
                        let Some((verdict, stored, cache, keys)) = checked else {
                            return Err(store_failed(StoreError::Refused(
                                "store worker failed".into(),
                            )));
                        };
                        assigned = cache;
                        let verdict = match verdict.map_err(store_failed)? {
                            Err(why) => Err(why),
                            Ok(unknown) => {
                                for task in unknown {
                                    tracing::warn!(%agent, %task, "records of a task this store does not know (restored from an older backup?) were acknowledged and dropped: they cannot be stored");
                                }
                                Ok(keys)
                            }
                        };
                        if let Some(stored) = stored {
                            let conflicts = stored.map_err(store_failed)?;
                            for (task, _, sched, attempt) in conflicts {
                                tracing::warn!(%agent, task = %TaskId(task), scheduled_at = %Timestamp::from_millis_saturating(sched), attempt, "a different record for a run already stored was refused; the first record stands");
                            }
                        }
                        sm.handle_stored(clock(), batch_id, verdict);
                        keep_allowance(&sm);
                    }
                    CoordEffect::ClockReport { offset_ms, rtt_ms } => {
                        let seen = AgentSeen {
                            at: now(),
                            clock: Some((offset_ms, rtt_ms)),
                        };
                        let _ = blocking(state, move |s| s.store.agent_seen(agent, seen)).await;
                    }
                    CoordEffect::Close { code, reason } => {
                        // What was answered before the close still goes out.
                        while let Some(m) = sm.poll_transmit() {
                            let _ = net::send(send, &m).await;
                        }
                        while let Some(event) = sm.poll_event() {
                            log_session_event(&event);
                        }
                        conn.close(code.into(), reason.as_bytes());
                        return Ok(());
                    }
                }
            }
            while let Some(m) = sm.poll_transmit() {
                busy = true;
                net::send(send, &m).await?;
            }
            while let Some(event) = sm.poll_event() {
                log_session_event(&event);
            }
            if !busy {
                break;
            }
        }
        let wake = sm
            .poll_timeout()
            .map(|ms| origin + Duration::from_millis(ms));
        let sleep = async {
            match wake {
                Some(w) => tokio::time::sleep_until(w.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = inbox.recv() => {
                let Some(msg) = msg else { return Err(NetError::Eof) };
                let msg = msg?;
                if let Ok(mut seen) = state.seen.lock() {
                    seen.entry(agent).or_default().last_contact_ms = Some(now().as_millis());
                }
                let results = matches!(msg, AgentMsg::Results { .. });
                sm.handle_message(clock(), msg);
                if results {
                    keep_allowance(&sm);
                }
            }
            Some(m) = outbox.recv() => sm.handle_push(m),
            changed = revisions.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let revision = *revisions.borrow_and_update();
                sm.handle_revision(revision);
            }
            _ = sleep => {}
        }
        let t = clock();
        if sm.poll_timeout().is_some_and(|due| t.mono_ms >= due) {
            sm.handle_timeout(t);
        }
    }
    }
    .await
}

fn log_session_event(event: &Event) {
    match event {
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
