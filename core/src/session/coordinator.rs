//! The coordinator's side of one agent's session, as a state machine.
//!
//! It starts after the shell accepted the agent's Hello (certificate,
//! revocation and session caps are the shell's, before any state exists).
//! It sends the assignment changes since the agent's revision in pages
//! under [`LIST_CHUNK_BYTES_MAX`], follows the revision feed, takes result
//! batches (identity from the certificate, plausibility, size, upload rate)
//! and acknowledges each only after the shell reports it stored.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use sundial_protocol::task::Action;
use sundial_protocol::wasm::{ModuleHash, MODULE_CHUNK_BYTES};

use sundial_protocol::wire::{
    chunk_by_size, close, AgentMsg, AgentReport, AssignmentChange, CoordMsg, ReconnectPolicy,
    LIST_CHUNK_BYTES_MAX, RESULT_BATCH_RUNS_MAX,
};
use sundial_protocol::{AgentId, RunKey, RunRecord, TaskSpec, Timestamp};

use super::agent::BATCHES_IN_FLIGHT_MAX;
use super::{Event, Now};

/// Result batches received and not yet acknowledged; an honest agent keeps
/// at most [`BATCHES_IN_FLIGHT_MAX`] in flight.
pub const RESULT_QUEUE_MAX: usize = 2 * BATCHES_IN_FLIGHT_MAX;

/// The most tasks one [`CoordEffect::LoadChanges`] looks at. The next page
/// is loaded only once the messages of this one are sent, so a session
/// holds at most one page of changes however far behind its agent is.
pub const CHANGES_PAGE_MAX: usize = 1_024;

/// The upload limits of one agent.
#[derive(Clone, Copy, Debug)]
pub struct UploadLimits {
    pub runs_per_sec: u32,
    pub bytes_per_sec: u64,
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum CoordEffect {
    /// Read the changes for this agent after revision `since`, at most
    /// [`CHANGES_PAGE_MAX`] tasks; answer with `handle_changes`.
    LoadChanges {
        since: u64,
        /// The modules its agent holds, if it runs functions: the answer
        /// carries the modules of the page's function tasks it lacks.
        modules_held: Option<BTreeSet<ModuleHash>>,
    },
    /// Check that every run's task is assigned to this agent and store the
    /// batch (the first record of a run key wins); answer with `handle_stored`.
    StoreRuns { batch_id: u64, runs: Vec<RunRecord> },
    /// The agent's clock estimate, for operators.
    ClockReport { offset_ms: i64, rtt_ms: i64 },
    /// The agent's own figures (checked), for operators and metrics.
    Report(AgentReport),
    /// Close the connection with this code.
    Close { code: u32, reason: String },
}

/// What a session tells its agent first, as far as the agent's version
/// understands it.
#[derive(Clone, Debug, Default)]
pub struct Told {
    /// How to reconnect (agents from 0.2).
    pub policy: Option<ReconnectPolicy>,
    /// How often to report (agents from 0.3).
    pub report_every_ms: Option<u32>,
    /// Whether the agent knows triggered tasks (agents from 0.4): an older
    /// one is sent a cancel in place of one, so it never holds what it
    /// cannot decode or run.
    pub triggers: bool,
    /// Whether the agent opens sealed variables (agents from 0.5): an older
    /// one is sent a cancel in place of a task that has them.
    pub sealed: bool,
    /// Whether the agent follows lease windows (agents from 0.6): an older
    /// one is sent a cancel in place of a placed task.
    pub placement: bool,
    /// Whether the agent knows functions (agents from 0.7): an older one is
    /// sent a cancel in place of a function task.
    pub wasm: bool,
    /// What it said of functions: modules are sent to it only if it runs
    /// them, and only those it lacks and can take.
    pub functions: Option<sundial_protocol::wire::FunctionsHello>,
    /// Seeded bug (simulator): the modules held are not forgotten when a
    /// removal is sent.
    pub modules_bug: bool,
}

/// A message waiting to be sent: a module goes piece by piece, each made
/// when its turn comes, so a queued module costs one shared copy.
#[derive(Debug)]
enum Out {
    Msg(CoordMsg),
    Module {
        hash: ModuleHash,
        bytes: Arc<Vec<u8>>,
        offset: usize,
    },
}

/// A token bucket: `rate` units a second, up to one second's worth saved.
#[derive(Clone, Debug)]
struct Bucket {
    rate: f64,
    level: f64,
    at_ms: u64,
}

impl Bucket {
    fn new(rate: f64, now_ms: u64) -> Bucket {
        Bucket {
            rate: rate.max(1.0),
            level: rate.max(1.0),
            at_ms: now_ms,
        }
    }

    /// Takes `n` units; how many ms to wait before going on.
    fn take(&mut self, n: f64, now_ms: u64) -> u64 {
        let elapsed = now_ms.saturating_sub(self.at_ms) as f64 / 1000.0;
        self.at_ms = self.at_ms.max(now_ms);
        self.level = (self.level + elapsed * self.rate).min(self.rate) - n;
        if self.level >= 0.0 {
            0
        } else {
            (-self.level / self.rate * 1000.0).ceil() as u64
        }
    }
}

/// What is left of one agent's upload limits when its session ends. The
/// shell hands it to the agent's next session
/// ([`CoordSession::carry_allowance`]), so the limits hold per agent, not
/// per session: reconnecting does not refill them.
#[derive(Clone, Debug)]
pub struct UploadAllowance {
    runs: Bucket,
    bytes: Bucket,
}

/// The coordinator's session state machine for one agent.
#[derive(Debug)]
pub struct CoordSession {
    agent: AgentId,
    enrolled_at: Timestamp,
    /// Changes up to this revision were looked at for this agent.
    sent: u64,
    /// The newest revision the feed announced.
    latest: u64,
    loading: bool,
    /// The store said more changes follow the last page: loaded once its
    /// messages are sent.
    more: bool,
    first: bool,
    queue: VecDeque<(u64, Vec<RunRecord>)>,
    storing: bool,
    hold_until_ms: Option<u64>,
    front_paid: bool,
    runs: Bucket,
    bytes: Bucket,
    throttled_told: bool,
    /// The agent knows triggered tasks.
    knows_triggers: bool,
    /// The agent knows sealed variables.
    knows_sealed: bool,
    knows_placement: bool,
    knows_wasm: bool,
    /// The modules its agent holds (or was sent), if it runs functions,
    /// and the largest it takes.
    modules_held: Option<(BTreeSet<ModuleHash>, u64)>,
    modules_bug: bool,
    closed: bool,
    transmit: VecDeque<Out>,
    effects: VecDeque<CoordEffect>,
    events: super::EventQueue,
}

impl CoordSession {
    /// A session for `agent` after its Hello: loads what it lacks at once.
    pub fn new(
        now: Now,
        agent: AgentId,
        enrolled_at: Timestamp,
        last_revision: u64,
        outbox_len: u64,
        limits: UploadLimits,
        told: Told,
    ) -> CoordSession {
        let mut s = CoordSession {
            agent,
            enrolled_at,
            sent: last_revision,
            latest: last_revision,
            loading: false,
            more: false,
            first: true,
            queue: VecDeque::new(),
            storing: false,
            hold_until_ms: None,
            front_paid: false,
            runs: Bucket::new(f64::from(limits.runs_per_sec), now.mono_ms),
            bytes: Bucket::new(limits.bytes_per_sec as f64, now.mono_ms),
            throttled_told: false,
            knows_triggers: told.triggers,
            knows_sealed: told.sealed,
            knows_placement: told.placement,
            knows_wasm: told.wasm,
            modules_held: told
                .functions
                .filter(|f| told.wasm && f.allowed)
                .map(|f| (f.modules.into_iter().collect(), f.module_max)),
            modules_bug: told.modules_bug,
            closed: false,
            transmit: VecDeque::new(),
            effects: VecDeque::new(),
            events: super::EventQueue::default(),
        };
        s.events.push_back(Event::AgentSessionUp {
            agent,
            last_revision,
            outbox_len,
        });
        if let Some(p) = told.policy {
            s.transmit.push_back(Out::Msg(CoordMsg::Policy(p)));
        }
        if let Some(every_ms) = told.report_every_ms {
            s.transmit
                .push_back(Out::Msg(CoordMsg::ReportEvery { every_ms }));
        }
        s.load();
        s
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// What is left of this agent's upload limits (see [`UploadAllowance`]).
    pub fn upload_allowance(&self) -> UploadAllowance {
        UploadAllowance {
            runs: self.runs.clone(),
            bytes: self.bytes.clone(),
        }
    }

    /// Carries on the allowance an earlier session of this agent left, when
    /// the limits are still the same; monotonic times are of one clock.
    pub fn carry_allowance(&mut self, carried: UploadAllowance) {
        if carried.runs.rate == self.runs.rate && carried.bytes.rate == self.bytes.rate {
            self.runs = carried.runs;
            self.bytes = carried.bytes;
        }
    }

    pub fn poll_transmit(&mut self) -> Option<CoordMsg> {
        let m = match self.transmit.front_mut() {
            None => None,
            Some(Out::Module {
                hash,
                bytes,
                offset,
            }) => {
                let end = (*offset + MODULE_CHUNK_BYTES).min(bytes.len());
                let msg = CoordMsg::Module {
                    hash: *hash,
                    size: bytes.len() as u64,
                    offset: *offset as u64,
                    chunk: bytes[*offset..end].to_vec(),
                };
                *offset = end;
                if end >= bytes.len() {
                    self.transmit.pop_front();
                }
                Some(msg)
            }
            Some(Out::Msg(_)) => match self.transmit.pop_front() {
                Some(Out::Msg(m)) => Some(m),
                _ => None,
            },
        };
        if self.transmit.is_empty() && self.more {
            self.more = false;
            self.load();
        }
        m
    }

    /// Messages waiting to be sent.
    pub fn transmit_len(&self) -> usize {
        self.transmit.len()
    }

    pub fn poll_effect(&mut self) -> Option<CoordEffect> {
        debug_assert!(
            self.effects.len() <= super::DRAINED_QUEUE_MAX,
            "the coordinator node drains the session's effects after every call"
        );
        self.effects.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<u64> {
        self.hold_until_ms
    }

    fn load(&mut self) {
        if !self.loading && !self.closed {
            self.loading = true;
            self.effects.push_back(CoordEffect::LoadChanges {
                since: self.sent,
                modules_held: self.modules_held.as_ref().map(|(h, _)| h.clone()),
            });
        }
    }

    fn close(&mut self, code: u32, reason: String) {
        if !self.closed {
            self.closed = true;
            self.queue.clear();
            self.effects.push_back(CoordEffect::Close { code, reason });
        }
    }

    /// The revision feed moved to `revision`.
    pub fn handle_revision(&mut self, revision: u64) {
        self.latest = self.latest.max(revision);
        if self.latest > self.sent {
            self.load();
        }
    }

    /// The answer to [`CoordEffect::LoadChanges`]: `(task, cancelled)` in
    /// revision order, the revision looked at through, and whether more
    /// follow (loaded once this page is sent).
    pub fn handle_changes(
        &mut self,
        changes: Vec<(TaskSpec, bool)>,
        upto: u64,
        more: bool,
        modules: Vec<(ModuleHash, Arc<Vec<u8>>)>,
    ) {
        self.loading = false;
        if self.closed {
            return;
        }
        let since = self.sent;
        let enrolled_at = self.enrolled_at;
        let knows_triggers = self.knows_triggers;
        let knows_sealed = self.knows_sealed;
        let knows_placement = self.knows_placement;
        let knows_wasm = self.knows_wasm;
        let agent = self.agent;
        let changes: Vec<AssignmentChange> = changes
            .into_iter()
            .map(|(mut spec, cancelled)| {
                let unknown = (!knows_triggers && !spec.schedule.triggers().is_empty())
                    || (!knows_sealed && !spec.action.sealed_env().is_empty())
                    || (!knows_placement && spec.placement.is_some())
                    || (!knows_wasm && matches!(spec.action, Action::Wasm(_)));
                if cancelled || unknown {
                    AssignmentChange::Cancel {
                        task_id: spec.id,
                        revision: spec.revision,
                    }
                } else {
                    // A task counts for an agent from its enrollment:
                    // occurrences before that were never its to run.
                    spec.created_at = spec.created_at.max(enrolled_at);
                    // Only the values sealed to this agent, and only its
                    // own seats, travel to it.
                    AssignmentChange::Upsert(Box::new(spec.for_agent(agent)))
                }
            })
            .collect();
        // The modules of its functions go first: an agent stores a module
        // before it applies a task that names it.
        if let Some((held, module_max)) = &mut self.modules_held {
            for (hash, bytes) in modules {
                if bytes.len() as u64 <= *module_max && held.insert(hash) {
                    self.transmit.push_back(Out::Module {
                        hash,
                        bytes,
                        offset: 0,
                    });
                }
            }
            // A removal lets the agent drop the modules no task of its
            // names any more: from here on none is taken to be held, and
            // the next function task's module is sent again.
            if !self.modules_bug
                && changes
                    .iter()
                    .any(|c| matches!(c, AssignmentChange::Cancel { .. }))
            {
                held.clear();
            }
        }
        let count = changes.len();
        let msgs = assignment_pages(changes, since, upto);
        if msgs.is_empty() && self.first {
            // The first answer always comes: the agent learns the revision.
            self.transmit.push_back(Out::Msg(CoordMsg::Assignments {
                snapshot: false,
                changes: Vec::new(),
                upto_revision: upto,
            }));
        }
        if !msgs.is_empty() || self.first {
            self.events.push_back(Event::AssignmentsSent {
                agent: self.agent,
                changes: count,
                messages: msgs.len().max(1),
                upto_revision: upto,
            });
        }
        self.first = false;
        self.transmit.extend(msgs.into_iter().map(Out::Msg));
        // Seen, whether or not any of it was ours: the next look starts here
        // (a reconnect starts from the agent's own revision).
        self.sent = self.sent.max(upto);
        self.latest = self.latest.max(upto);
        if more {
            if self.transmit.is_empty() {
                self.load();
            } else {
                self.more = true;
            }
        } else if self.latest > self.sent {
            self.load();
        }
    }

    /// A message from admin work to pass on (an operator's run-now).
    pub fn handle_push(&mut self, msg: CoordMsg) {
        if !self.closed {
            self.transmit.push_back(Out::Msg(msg));
        }
    }

    pub fn handle_message(&mut self, now: Now, msg: AgentMsg) {
        if self.closed {
            return;
        }
        match msg {
            AgentMsg::Results { batch_id, mut runs } => {
                if let Some(why) = refusal(&runs) {
                    self.events.push_back(Event::ResultsRefused {
                        agent: self.agent,
                        batch_id,
                        why: why.clone(),
                    });
                    self.close(close::PROTOCOL, format!("refused: {why}"));
                    return;
                }
                if self.queue.len() >= RESULT_QUEUE_MAX {
                    self.close(
                        close::PROTOCOL,
                        format!("more than {RESULT_QUEUE_MAX} result batches unacknowledged"),
                    );
                    return;
                }
                // Identity comes from the certificate, never from the record.
                for r in &mut runs {
                    r.agent_id = self.agent;
                }
                self.queue.push_back((batch_id, runs));
                self.next_batch(now);
            }
            AgentMsg::ClockProbe { t1 } => {
                self.transmit.push_back(Out::Msg(CoordMsg::ClockReply {
                    t1,
                    t2: now.wall,
                    t3: now.wall,
                }));
            }
            AgentMsg::ClockReport { offset_ms, rtt_ms } => {
                self.effects
                    .push_back(CoordEffect::ClockReport { offset_ms, rtt_ms });
            }
            AgentMsg::Report(report) => match report.refusal() {
                Some(why) => self.close(close::PROTOCOL, format!("refused report: {why}")),
                None => self.effects.push_back(CoordEffect::Report(report)),
            },
            AgentMsg::Hello { .. } => self.close(close::PROTOCOL, "Hello twice".into()),
        }
    }

    pub fn handle_timeout(&mut self, now: Now) {
        if self.hold_until_ms.is_some_and(|t| now.mono_ms >= t) {
            self.hold_until_ms = None;
            self.next_batch(now);
        }
    }

    /// Hands the next queued batch to the store, unless one is being
    /// stored or the upload limit holds it.
    fn next_batch(&mut self, now: Now) {
        if self.storing || self.hold_until_ms.is_some() || self.closed {
            return;
        }
        let Some((batch_id, runs)) = self.queue.pop_front() else {
            return;
        };
        if !self.front_paid {
            let size = postcard::experimental::serialized_size(&runs).unwrap_or(0);
            let wait = self
                .runs
                .take(runs.len() as f64, now.mono_ms)
                .max(self.bytes.take(size as f64, now.mono_ms));
            if wait > 0 {
                // Paid for already: stored when the wait is over.
                self.front_paid = true;
                self.queue.push_front((batch_id, runs));
                self.hold_until_ms = Some(now.mono_ms + wait);
                if !self.throttled_told {
                    self.throttled_told = true;
                    self.events.push_back(Event::UploadThrottled {
                        agent: self.agent,
                        wait_ms: wait,
                    });
                }
                return;
            }
        }
        self.front_paid = false;
        self.storing = true;
        self.effects
            .push_back(CoordEffect::StoreRuns { batch_id, runs });
    }

    /// The answer to [`CoordEffect::StoreRuns`]: stored (the keys of the
    /// batch), or refused with a reason (a run of a task not assigned to
    /// this agent), which closes the session.
    pub fn handle_stored(&mut self, now: Now, batch_id: u64, verdict: Result<Vec<RunKey>, String>) {
        self.storing = false;
        match verdict {
            Ok(keys) => {
                self.events.push_back(Event::ResultsStored {
                    agent: self.agent,
                    batch_id,
                    runs: keys.len(),
                });
                self.transmit
                    .push_back(Out::Msg(CoordMsg::ResultsAck { batch_id, keys }));
                self.next_batch(now);
            }
            Err(why) => {
                self.events.push_back(Event::ResultsRefused {
                    agent: self.agent,
                    batch_id,
                    why: why.clone(),
                });
                self.close(close::PROTOCOL, format!("refused: {why}"));
            }
        }
    }
}

/// Why a result batch is refused before it reaches the store, if it is.
pub fn refusal(runs: &[RunRecord]) -> Option<String> {
    if runs.len() > RESULT_BATCH_RUNS_MAX {
        return Some(format!(
            "result batch of {} runs exceeds {RESULT_BATCH_RUNS_MAX}",
            runs.len()
        ));
    }
    runs.iter().find_map(RunRecord::implausibility)
}

/// Assignment changes as messages each under [`LIST_CHUNK_BYTES_MAX`].
/// Every message but the last carries the revision of its own last change,
/// so an agent cut off midway resumes after it; the last carries `upto`.
pub fn assignment_pages(changes: Vec<AssignmentChange>, since: u64, upto: u64) -> Vec<CoordMsg> {
    if changes.is_empty() {
        return Vec::new();
    }
    let pages = chunk_by_size(changes, LIST_CHUNK_BYTES_MAX);
    let last = pages.len() - 1;
    pages
        .into_iter()
        .enumerate()
        .map(|(i, changes)| {
            let upto_revision = if i == last {
                upto
            } else {
                changes.last().map_or(since, change_revision)
            };
            CoordMsg::Assignments {
                snapshot: false,
                changes,
                upto_revision,
            }
        })
        .collect()
}

fn change_revision(c: &AssignmentChange) -> u64 {
    match c {
        AssignmentChange::Upsert(spec) => spec.revision,
        AssignmentChange::Cancel { revision, .. } => *revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::fixtures::at;

    fn record(task: u64, agent: u64) -> RunRecord {
        crate::session::fixtures::record(task, agent, 1_800_000_000_000)
    }
    use sundial_protocol::codec::{encode, FRAME_BYTES_MAX};
    use sundial_protocol::task::{Action, ExecSpec, Target};
    use sundial_protocol::{Schedule, TaskId};

    fn spec(id: u64) -> TaskSpec {
        TaskSpec {
            id: TaskId(id),
            name: Some(format!("task-{id}")),
            target: Target::Agent(AgentId(1)),
            schedule: Schedule::at(Timestamp::from_millis_saturating(1_900_000_000_000)),
            action: Action::Exec(ExecSpec {
                program: "/bin/true".into(),
                args: vec!["--flag".into()],
                env: Vec::new(),
                cwd: None,
                sealed_env: Vec::new(),
            }),
            policies: Default::default(),
            revision: id,
            created_at: Timestamp::from_millis_saturating(1_700_000_000_000),
            placement: None,
        }
    }

    fn limits() -> UploadLimits {
        UploadLimits {
            runs_per_sec: 1_000,
            bytes_per_sec: 1 << 30,
        }
    }

    fn session() -> CoordSession {
        CoordSession::new(
            at(0),
            AgentId(1),
            Timestamp::from_millis_saturating(1_750_000_000_000),
            0,
            0,
            limits(),
            Told::default(),
        )
    }

    #[test]
    fn two_hundred_thousand_tasks_go_in_pages_under_the_frame_cap_and_resume_midway() {
        let mut s = session();
        assert_eq!(
            s.poll_effect(),
            Some(CoordEffect::LoadChanges {
                since: 0,
                modules_held: None
            })
        );
        let n = 200_000u64;
        s.handle_changes(
            (1..=n).map(|i| (spec(i), false)).collect(),
            n + 5,
            false,
            Vec::new(),
        );
        let mut seen = 0usize;
        let mut last_upto = 0;
        let mut pages = 0;
        while let Some(m) = s.poll_transmit() {
            let bytes = encode(&m).expect("encodes").len();
            assert!(bytes <= FRAME_BYTES_MAX, "a page of {bytes} bytes");
            assert!(
                bytes <= LIST_CHUNK_BYTES_MAX + 1024,
                "a page of {bytes} bytes"
            );
            let CoordMsg::Assignments {
                changes,
                upto_revision,
                ..
            } = m
            else {
                panic!("only assignments")
            };
            // Every page but the last says how far it got: a cut agent
            // resumes after it, never skips a change.
            let last_rev = match changes.last() {
                Some(AssignmentChange::Upsert(t)) => t.revision,
                other => panic!("{other:?}"),
            };
            assert!(upto_revision >= last_rev && upto_revision > last_upto);
            for c in &changes {
                let AssignmentChange::Upsert(t) = c else {
                    panic!()
                };
                // Counted from the agent's enrollment, not the task's creation.
                assert_eq!(t.created_at.as_millis(), 1_750_000_000_000);
            }
            last_upto = upto_revision;
            seen += changes.len();
            pages += 1;
        }
        assert_eq!(seen, n as usize);
        assert_eq!(last_upto, n + 5);
        assert!(pages > 1, "{pages} page(s)");
    }

    #[test]
    fn the_first_answer_always_comes_and_the_feed_loads_once_at_a_time() {
        let mut s = session();
        assert_eq!(
            s.poll_effect(),
            Some(CoordEffect::LoadChanges {
                since: 0,
                modules_held: None
            })
        );
        s.handle_revision(3);
        assert_eq!(s.poll_effect(), None, "one load at a time");
        s.handle_changes(Vec::new(), 2, false, Vec::new());
        assert!(matches!(
            s.poll_transmit(),
            Some(CoordMsg::Assignments { upto_revision: 2, ref changes, .. }) if changes.is_empty()
        ));
        assert_eq!(
            s.poll_effect(),
            Some(CoordEffect::LoadChanges {
                since: 2,
                modules_held: None
            })
        );
        s.handle_changes(Vec::new(), 3, false, Vec::new());
        assert_eq!(s.poll_transmit(), None, "nothing new is not news");
        s.handle_revision(3);
        assert_eq!(s.poll_effect(), None);
    }

    #[test]
    fn a_page_with_more_to_follow_loads_the_next_once_it_is_sent() {
        let mut s = session();
        assert_eq!(
            s.poll_effect(),
            Some(CoordEffect::LoadChanges {
                since: 0,
                modules_held: None
            })
        );
        s.handle_changes(
            (1..=3).map(|i| (spec(i), false)).collect(),
            3,
            true,
            Vec::new(),
        );
        assert_eq!(s.poll_effect(), None, "not before this page is out");
        let mut sent = 0;
        while s.poll_transmit().is_some() {
            sent += 1;
        }
        assert!(sent >= 1);
        assert_eq!(
            s.poll_effect(),
            Some(CoordEffect::LoadChanges {
                since: 3,
                modules_held: None
            })
        );
        s.handle_changes(
            (4..=5).map(|i| (spec(i), false)).collect(),
            9,
            false,
            Vec::new(),
        );
        while s.poll_transmit().is_some() {}
        assert_eq!(s.poll_effect(), None, "the last page asks for nothing more");
    }

    #[test]
    fn results_are_acknowledged_only_once_stored_and_identity_comes_from_the_session() {
        let mut s = session();
        let _ = s.poll_effect();
        s.handle_changes(Vec::new(), 0, false, Vec::new());
        let _ = s.poll_transmit();
        s.handle_message(
            at(1),
            AgentMsg::Results {
                batch_id: 9,
                runs: vec![record(5, 77)],
            },
        );
        let Some(CoordEffect::StoreRuns { batch_id: 9, runs }) = s.poll_effect() else {
            panic!("a store first")
        };
        assert_eq!(
            runs[0].agent_id,
            AgentId(1),
            "the record's own agent id is ignored"
        );
        assert_eq!(s.poll_transmit(), None, "no ack before the store");
        s.handle_stored(at(2), 9, Ok(vec![runs[0].key()]));
        assert!(matches!(
            s.poll_transmit(),
            Some(CoordMsg::ResultsAck { batch_id: 9, .. })
        ));
        // A refusal by the store closes the session.
        s.handle_message(
            at(3),
            AgentMsg::Results {
                batch_id: 10,
                runs: vec![record(6, 1)],
            },
        );
        let _ = s.poll_effect();
        s.handle_stored(at(4), 10, Err("not assigned".into()));
        assert!(matches!(
            s.poll_effect(),
            Some(CoordEffect::Close {
                code: close::PROTOCOL,
                ..
            })
        ));
        assert!(s.is_closed());
    }

    #[test]
    fn uploads_beyond_the_limit_wait_and_too_many_batches_close() {
        let mut s = CoordSession::new(
            at(0),
            AgentId(1),
            Timestamp::from_millis_saturating(0),
            0,
            0,
            UploadLimits {
                runs_per_sec: 10,
                bytes_per_sec: 1 << 30,
            },
            Told::default(),
        );
        let _ = s.poll_effect();
        let batch = |id| AgentMsg::Results {
            batch_id: id,
            runs: (0..10).map(|t| record(t, 1)).collect(),
        };
        s.handle_message(at(0), batch(1));
        let Some(CoordEffect::StoreRuns { batch_id: 1, runs }) = s.poll_effect() else {
            panic!("the first second's worth goes at once")
        };
        s.handle_stored(at(0), 1, Ok(runs.iter().map(RunRecord::key).collect()));
        s.handle_message(at(0), batch(2));
        assert_eq!(s.poll_effect(), None, "the second waits");
        let due = s.poll_timeout().expect("a wait");
        assert!((900..=1_100).contains(&due), "{due}");
        s.handle_timeout(at(due));
        assert!(matches!(
            s.poll_effect(),
            Some(CoordEffect::StoreRuns { batch_id: 2, .. })
        ));
        // One being stored, RESULT_QUEUE_MAX queued: one more is too many.
        for id in 3..(4 + RESULT_QUEUE_MAX as u64) {
            s.handle_message(at(due), batch(id));
        }
        assert!(matches!(
            s.poll_effect(),
            Some(CoordEffect::Close {
                code: close::PROTOCOL,
                ..
            })
        ));
    }

    #[test]
    fn a_reconnecting_agent_does_not_refill_its_upload_limit() {
        let limits = UploadLimits {
            runs_per_sec: 10,
            bytes_per_sec: 1 << 30,
        };
        let batch = |id| AgentMsg::Results {
            batch_id: id,
            runs: (0..10).map(|t| record(t, 1)).collect(),
        };
        let fresh = |t| {
            CoordSession::new(
                at(t),
                AgentId(1),
                Timestamp::from_millis_saturating(0),
                0,
                0,
                limits,
                Told::default(),
            )
        };
        let mut first = fresh(0);
        let _ = first.poll_effect();
        first.handle_message(at(0), batch(1));
        assert!(matches!(
            first.poll_effect(),
            Some(CoordEffect::StoreRuns { batch_id: 1, .. })
        ));
        let left = first.upload_allowance();

        // A new session of the same agent 10 ms later, carrying on: waits.
        let mut second = fresh(10);
        second.carry_allowance(left);
        let _ = second.poll_effect();
        second.handle_message(at(10), batch(2));
        assert_eq!(second.poll_effect(), None, "the limit is per agent");
        assert!(second.poll_timeout().is_some_and(|t| t >= 900));

        // Without carrying it on, a reconnect would have refilled it.
        let mut third = fresh(10);
        let _ = third.poll_effect();
        third.handle_message(at(10), batch(2));
        assert!(matches!(
            third.poll_effect(),
            Some(CoordEffect::StoreRuns { batch_id: 2, .. })
        ));
    }
}
