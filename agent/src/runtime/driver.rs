//! The driver loop: the node handed the clocks, run ends and frames; its
//! effects carried out (spawn, kill, dial, send); the connection's reader
//! and writer tasks.

use super::*;

/// Bound of the frames waiting to be written on the live connection (the
/// session's window keeps far fewer in flight).
pub const WRITE_QUEUE_MAX: usize = 256;
/// Bound of the connection events (frames read, ends, dial results).
pub(super) const CONN_EVENTS_MAX: usize = 64;
/// How often a live connection's packet count is looked at, for link silence.
pub(super) const HEARD_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// What the connection's tasks report.
pub(super) enum ConnEvent {
    Dialed(Result<session::Live, (Closed, String)>),
    Frame(u64, CoordMsg),
    Ended(u64, Closed, String),
}

/// A QUIC connection and the endpoint it lives on.
pub(super) struct LiveConn {
    pub(super) _endpoint: quinn::Endpoint,
    pub(super) conn: quinn::Connection,
}

/// The live connection: its id, and the queue of its writer task.
pub(super) struct Conn {
    pub(super) id: u64,
    pub(super) live: Arc<LiveConn>,
    pub(super) writer: mpsc::Sender<AgentMsg>,
    pub(super) tasks: [tokio::task::JoinHandle<()>; 2],
    pub(super) rx_datagrams: u64,
}

impl Conn {
    pub(super) fn close(self) {
        self.live.conn.close(0u32.into(), b"bye");
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub(super) struct Driver {
    pub(super) node: AgentNode<RedbNode>,
    pub(super) store: Arc<AgentStore>,
    pub(super) agent_id: AgentId,
    pub(super) exec: Arc<ExecPolicy>,
    /// Running actions: how to kill each.
    pub(super) running: HashMap<RunKey, oneshot::Sender<()>>,
    pub(super) done_tx: mpsc::Sender<(RunKey, ExecResult)>,
    pub(super) running_dir: PathBuf,
    pub(super) session: Option<Arc<SessionConfig>>,
    pub(super) conn: Option<Conn>,
    pub(super) next_conn: u64,
    pub(super) events_tx: mpsc::Sender<ConnEvent>,
    /// What the log last said about reaching the coordinator, so that a
    /// device offline for a week says so once, not every 30 s.
    pub(super) reported: Option<&'static str>,
    /// The agent's own metrics, when served (`--metrics`).
    pub(super) metrics: Option<Arc<crate::metrics::AgentMetrics>>,
}

pub(super) fn reading() -> crate::clock::Reading {
    SystemClock.read()
}

impl Driver {
    pub(super) fn fault(&self, f: StoreFault) -> AgentError {
        match self.node.store().take_error() {
            Some(e) => AgentError::Store(e),
            None => AgentError::StoreFault(f.0),
        }
    }

    /// Carries out what the node asks and logs what it says, until it has
    /// nothing more.
    pub(super) fn pump(&mut self) -> Result<(), AgentError> {
        loop {
            let effect = self.node.poll_effect();
            let event = self.node.poll_event();
            if effect.is_none() && event.is_none() {
                if let Some(m) = &self.metrics {
                    use std::sync::atomic::Ordering::Relaxed;
                    let c = self.node.clock_view();
                    m.live.clock_vouched.store(c.vouched, Relaxed);
                    m.live.clock_held.store(c.held, Relaxed);
                    m.live.clock_offset_ms.store(c.offset_ms, Relaxed);
                    m.live.running.store(self.node.running() as u64, Relaxed);
                }
                return Ok(());
            }
            if let Some(e) = event {
                if let Some(m) = &self.metrics {
                    m.observe(&e, self.node.time_of(reading()));
                }
                log_event(&e);
            }
            if let Some(e) = effect {
                self.effect(e)?;
            }
        }
    }

    pub(super) fn effect(&mut self, effect: NodeEffect) -> Result<(), AgentError> {
        match effect {
            NodeEffect::Spawn { key, spec } => self.spawn(key, spec),
            NodeEffect::Kill { key } => {
                if let Some(k) = self.running.remove(&key) {
                    tracing::warn!(task = %key.task_id, scheduled_at = %key.scheduled_at, "killing a run's process group (timed out, or the agent stops)");
                    let _ = k.send(());
                }
            }
            NodeEffect::Connect { timeout_ms } => {
                let Some(cfg) = self.session.clone() else {
                    // Not enrolled, or revoked: no coordinator to dial.
                    return Ok(());
                };
                let tx = self.events_tx.clone();
                let timeout = std::time::Duration::from_millis(timeout_ms);
                tokio::spawn(async move {
                    let r = session::dial(&cfg, timeout).await.map_err(|e| {
                        let kind = session::closed_kind(None, &Err(e));
                        (kind, String::new())
                    });
                    let _ = tx.send(ConnEvent::Dialed(r)).await;
                });
            }
            NodeEffect::Transmit(msg) => {
                let Some(c) = self.conn.as_ref() else {
                    return Ok(());
                };
                if let (true, AgentMsg::Results { runs, .. }) =
                    (crate::fault::active("ack-early"), &msg)
                {
                    // A seeded bug for the process simulator's checker:
                    // records deleted before the coordinator stored them.
                    let keys: Vec<RunKey> = runs.iter().map(RunRecord::key).collect();
                    let _ = self.store.outbox_ack(&keys);
                }
                if c.writer.try_send(msg).is_err() {
                    tracing::warn!("the link does not take frames fast enough; reconnecting");
                    self.end_conn(Closed::Lost)?;
                }
            }
            NodeEffect::Disconnect => {
                if let Some(c) = self.conn.take() {
                    c.close();
                }
            }
        }
        Ok(())
    }

    pub(super) fn end_conn(&mut self, kind: Closed) -> Result<(), AgentError> {
        if let Some(c) = self.conn.take() {
            c.close();
            // A session lost: the next dial tries another coordinator,
            // when there are several.
            if let Some(s) = self.session.as_ref() {
                s.move_on();
            }
            self.node
                .handle_closed(reading(), kind)
                .map_err(|f| self.fault(f))?;
        }
        Ok(())
    }

    pub(super) fn spawn(&mut self, key: RunKey, mut action: Action) {
        let (kill_tx, kill_rx) = oneshot::channel();
        self.running.insert(key, kill_tx);
        // The action knows which occurrence it is.
        action.env_mut().extend([
            ("SUNDIAL_TASK_ID".to_owned(), key.task_id.to_string()),
            ("SUNDIAL_AGENT_ID".to_owned(), self.agent_id.to_string()),
            (
                "SUNDIAL_SCHEDULED_AT".to_owned(),
                key.scheduled_at.to_string(),
            ),
            (
                "SUNDIAL_SCHEDULED_AT_MS".to_owned(),
                key.scheduled_at.as_millis().to_string(),
            ),
            ("SUNDIAL_ATTEMPT".to_owned(), key.attempt.to_string()),
        ]);
        let policy = Arc::clone(&self.exec);
        let done = self.done_tx.clone();
        let pid_path = pid_file(&self.running_dir, key);
        tracing::debug!(task = %key.task_id, scheduled_at = %key.scheduled_at, attempt = key.attempt, "starting run");
        let note_pid = move |pid: u32| {
            let ticks = process_start_ticks(pid).unwrap_or(0);
            if let Err(e) = std::fs::write(&pid_path, format!("{pid} {ticks}\n")) {
                tracing::warn!(error = %e, path = %pid_path.display(), "could not note a run's pid; after a crash it could not be found");
            }
        };
        let spec = match action {
            Action::Exec(spec) => spec,
            Action::Wasm(w) => {
                let store = Arc::clone(&self.store);
                tokio::spawn(async move {
                    let hash = w.module;
                    // Read off the driver's loop: a module may be megabytes.
                    let module = match tokio::task::spawn_blocking(move || store.module(hash)).await
                    {
                        Ok(Ok(m)) => m,
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, module = %hash, "could not read a function's module");
                            None
                        }
                        Err(_) => None,
                    };
                    let name = format!("{}", key.task_id);
                    let result =
                        exec::run_function(&w, &name, module, &policy, kill_rx, note_pid).await;
                    let _ = done.send((key, result)).await;
                });
                return;
            }
        };
        if crate::fault::active("double-fire") {
            let spec = spec.clone();
            let policy = Arc::clone(&policy);
            tokio::spawn(async move {
                let (_keep, never) = oneshot::channel();
                let _ = exec::run(&spec, &policy, never).await;
            });
        }
        tokio::spawn(async move {
            let result = exec::run_with(&spec, &policy, kill_rx, note_pid).await;
            // The driver outlives every executor unless it is stopping.
            let _ = done.send((key, result)).await;
        });
    }

    pub(super) fn finished(&mut self, key: RunKey, result: ExecResult) -> Result<(), AgentError> {
        self.running.remove(&key);
        let end = Finished {
            outcome: result.outcome,
            exit_code: result.exit_code,
            detail: result.detail,
            stdout_tail: result.stdout_tail,
            stderr_tail: result.stderr_tail,
        };
        self.node
            .handle_finished(reading(), key, end)
            .map_err(|f| self.fault(f))?;
        let _ = std::fs::remove_file(pid_file(&self.running_dir, key));
        Ok(())
    }

    pub(super) fn conn_event(&mut self, ev: ConnEvent) -> Result<(), AgentError> {
        match ev {
            ConnEvent::Dialed(Ok(live)) => {
                self.reported = None;
                if let Some(c) = self.conn.take() {
                    c.close();
                }
                self.next_conn += 1;
                let id = self.next_conn;
                let session::Live {
                    endpoint,
                    conn,
                    tx: mut send,
                    rx: mut recv,
                } = live;
                let live = Arc::new(LiveConn {
                    _endpoint: endpoint,
                    conn,
                });
                let (writer, mut queue) = mpsc::channel::<AgentMsg>(WRITE_QUEUE_MAX);
                let tx = self.events_tx.clone();
                let w_live = Arc::clone(&live);
                let write_task = tokio::spawn(async move {
                    while let Some(msg) = queue.recv().await {
                        if let Err(e) = session::send(&mut send, &msg).await {
                            let result = Err(e);
                            let kind = session::ended_kind(&w_live.conn, &result).await;
                            let why = result.err().map(|e| e.to_string()).unwrap_or_default();
                            let _ = tx.send(ConnEvent::Ended(id, kind, why)).await;
                            return;
                        }
                    }
                });
                let tx = self.events_tx.clone();
                let r_live = Arc::clone(&live);
                let read_task = tokio::spawn(async move {
                    loop {
                        match recv.next::<CoordMsg>().await {
                            Ok(m) => {
                                if tx.send(ConnEvent::Frame(id, m)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let result: Result<(), SessionError> = Err(e);
                                let kind = session::ended_kind(&r_live.conn, &result).await;
                                let why = result.err().map(|e| e.to_string()).unwrap_or_default();
                                let _ = tx.send(ConnEvent::Ended(id, kind, why)).await;
                                return;
                            }
                        }
                    }
                });
                let rx_datagrams = live.conn.stats().udp_rx.datagrams;
                tracing::info!("connected to the coordinator");
                self.conn = Some(Conn {
                    id,
                    live,
                    writer,
                    tasks: [write_task, read_task],
                    rx_datagrams,
                });
                self.node
                    .handle_connected(reading())
                    .map_err(|f| self.fault(f))?;
            }
            ConnEvent::Dialed(Err((kind, _))) => {
                let coordinator = self.session.as_ref().map(|c| c.coordinators_text());
                let coordinator = coordinator.unwrap_or_default();
                if kind == Closed::RefusedByTls {
                    if self.reported != Some("refused") {
                        tracing::error!(%coordinator, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                        self.reported = Some("refused");
                    }
                } else if self.reported != Some("unreachable") {
                    tracing::info!(%coordinator, "cannot reach the coordinator; tasks keep firing and runs wait in the outbox");
                    self.reported = Some("unreachable");
                }
                self.node
                    .handle_connect_failed(reading(), kind)
                    .map_err(|f| self.fault(f))?;
            }
            ConnEvent::Frame(id, m) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    self.node
                        .handle_message(reading(), m)
                        .map_err(|f| self.fault(f))?;
                }
            }
            ConnEvent::Ended(id, kind, why) => {
                if self.conn.as_ref().is_some_and(|c| c.id == id) {
                    if kind == Closed::RefusedByTls {
                        tracing::error!(error = %why, "the coordinator refused this agent's certificate (revoked, or another coordinator?); retrying rarely");
                    } else if kind != Closed::Revoked {
                        tracing::warn!(error = %why, "session down");
                    }
                    self.end_conn(kind)?;
                }
            }
        }
        Ok(())
    }

    /// The keep-alives of both ends keep packets coming on a live link: a
    /// silence says it is cut well before the idle timeout does.
    pub(super) fn heard_poll(&mut self) -> Result<(), AgentError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        let rx = c.live.conn.stats().udp_rx.datagrams;
        if rx != c.rx_datagrams {
            c.rx_datagrams = rx;
            self.node
                .handle_heard(reading())
                .map_err(|f| self.fault(f))?;
        }
        Ok(())
    }
}
