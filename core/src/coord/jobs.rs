//! The store work a [`super::CoordNode`] asks for: each [`StoreJob`] is a
//! value the shell runs against its [`CoordStore`] wherever it likes (the
//! coordinator on its blocking pool, the simulator inline) and hands back as
//! a [`StoreDone`]. The rules of what is read and written are here, in the
//! core; only the running is the shell's.

use std::collections::HashMap;
use std::ops::Range;

use sundial_protocol::seal::SealPublicKey;
use sundial_protocol::wire::{AdminRequest, AuditEntry, EnrollRequest};
use sundial_protocol::{AgentId, RunKey, RunRecord, Schedule, TaskId, TaskSpec, Timestamp};

use super::admin::{self, AdminAnswer, AdminContext};
use super::placement;
use super::ConnId;
use crate::coord_store::{
    targets, Agent, AgentSeen, CertPage, ChangePage, CoordStore, Enrollment, QueuedRunNow,
    RunKeyOf, SessionMark, StoreError, StoreResult, TokenRefusal,
};

/// Tasks whose assignment to a session's agent is remembered (a cache;
/// cleared when full).
pub const ASSIGNED_CACHE_MAX: usize = 100_000;

/// Whether a task's runs may come from a session's agent: `None` when the
/// store knows no such task (a store restored from a backup older than it).
pub type Assigned = HashMap<TaskId, Option<bool>>;

/// Task ids a restored store may have lost, and the revision of the news.
pub type Restored = Option<(Range<u64>, u64)>;
/// A Hello's check: the agent (`None`: unknown or revoked) and [`Restored`].
pub type HelloAnswer = Option<(Agent, Restored)>;
/// A page of changes: `(task, removed)`, the revision looked at through,
/// and whether more follow.
/// With the modules of the page's function tasks its agent lacks.
pub type ChangesAnswer = (
    Vec<(TaskSpec, bool)>,
    u64,
    bool,
    Vec<(sundial_protocol::wasm::ModuleHash, Vec<u8>)>,
);

/// A run-now waiting for its audit entry to be committed: what is then
/// sent, and what the admin is then told.
#[derive(Clone, Debug)]
pub struct RunNowAudited {
    pub entry: AuditEntry,
    pub task: TaskId,
    pub at: Timestamp,
    pub agents: Vec<AgentId>,
    /// The request's other answers, told with the run-now's.
    pub answers: Vec<sundial_protocol::wire::AdminResponse>,
}

/// Store work for the shell to run (see the module docs).
#[derive(Clone, Debug)]
pub enum StoreJob {
    /// An agent said Hello: its record, the restore check, and when it was seen.
    Hello {
        conn: ConnId,
        agent: AgentId,
        last_revision: u64,
        at: Timestamp,
        /// On a shared store: this coordinator, which now holds the session.
        holder: Option<u64>,
        /// The agent's public sealing key, as its Hello said.
        seal_key: Option<SealPublicKey>,
    },
    /// The next page of a session's assignment changes.
    Changes {
        conn: ConnId,
        agent: AgentId,
        labels: Vec<(String, String)>,
        since: u64,
        /// The modules the agent holds, if it runs functions.
        modules_held: Option<std::collections::BTreeSet<sundial_protocol::wasm::ModuleHash>>,
        limit: usize,
        /// Ids a restored store may have lost, and the revision of the news:
        /// cancels for those the store does not know.
        lost: Option<(Range<u64>, u64)>,
    },
    /// A result batch: ownership checked, then stored (first record wins).
    Runs {
        conn: ConnId,
        agent: AgentId,
        labels: Vec<(String, String)>,
        batch_id: u64,
        runs: Vec<RunRecord>,
        cache: Assigned,
    },
    /// What a session saw of its agent (last contact, clock estimate).
    Seen { agent: AgentId, seen: AgentSeen },
    /// Agents' clock reports gathered over a second, in one job.
    Clocks { seen: Vec<(AgentId, AgentSeen)> },
    Admin {
        conn: ConnId,
        req: u64,
        request: AdminRequest,
        ctx: Box<AdminContext>,
    },
    /// An enrollment's token checked and an agent id reserved, before the
    /// certificate is signed.
    EnrollCheck {
        conn: ConnId,
        token_sha256: [u8; 32],
        at: Timestamp,
        request: Box<EnrollRequest>,
    },
    /// The signed agent stored and the token spent.
    Enroll {
        conn: ConnId,
        enrollment: Enrollment,
        cert_der: Vec<u8>,
        /// The agent's public sealing key, as its request said.
        seal_key: Option<SealPublicKey>,
    },
    /// Retention: runs scheduled before `before`, at most `max` of them.
    Purge { before: Timestamp, max: usize },
    /// A store shared with other coordinators: what they changed since
    /// these positions (tasks by revision, certificates by sequence), and
    /// the run-nows they left for the agents in session here.
    Feed {
        revision: u64,
        cert_seq: u64,
        limit: usize,
        agents: Vec<AgentId>,
        at: Timestamp,
    },
    /// Run-nows for agents not in session here, left for the coordinator
    /// that holds their session.
    QueueRunNow {
        runs: Vec<QueuedRunNow>,
        at: Timestamp,
    },
    /// A run-now's audit entry (it changes nothing stored): the run is
    /// sent to its agents, and the admin answered, once the entry is
    /// committed — no run-now takes effect unlogged.
    AuditRunNow {
        conn: ConnId,
        req: u64,
        run: RunNowAudited,
    },
    /// A refused admin request's audit entry: the refusal is answered once
    /// it is committed, so that the log holds it before the admin hears of
    /// it, and one admin's requests are logged in the order they were made.
    AuditRefused {
        conn: ConnId,
        req: u64,
        entry: AuditEntry,
    },
    /// An admin connected.
    AdminUsed {
        cert_sha256: [u8; 32],
        at: Timestamp,
    },
    /// Audit retention: entries before `before`, at most `max` of them.
    PurgeAudit { before: Timestamp, max: usize },
    /// Placement: plan the next lease windows of these placed tasks with
    /// the agents in session here.
    Plan {
        tasks: Vec<TaskId>,
        members: Vec<placement::Member>,
        /// Every agent in session here (members or not).
        here: Vec<AgentId>,
        /// Other coordinators share the store: their sessions count too.
        shared: bool,
        at: Timestamp,
        replan_bug: bool,
    },
}

/// One read of a shared store's feeds ([`StoreJob::Feed`]).
#[derive(Clone, Debug, PartialEq)]
pub struct FeedPage {
    pub tasks: ChangePage,
    pub certs: CertPage,
    pub run_now: Vec<QueuedRunNow>,
}

/// How a result batch fared.
#[derive(Clone, Debug, PartialEq)]
pub enum RunsVerdict {
    /// Stored: the keys of the batch (to acknowledge), the tasks the store
    /// does not know (their records acknowledged and dropped) and the keys
    /// of different records refused (the first record stands).
    Stored {
        keys: Vec<RunKey>,
        unknown: Vec<TaskId>,
        conflicts: Vec<RunKeyOf>,
        /// The records stored now for the first time (not resends).
        recorded: Vec<RunRecord>,
    },
    /// A run of a task the store knows but did not assign to this agent.
    NotAssigned(TaskId),
}

/// What metrics and alerts need of a run record stored for the first
/// time: counted once, however often the agent sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFacts {
    pub task: TaskId,
    pub agent: AgentId,
    pub outcome: sundial_protocol::Outcome,
    pub attempt: u32,
    pub scheduled_at: Timestamp,
    /// Fired after its due time by this much (first attempts only: a
    /// retry's due time is its backoff's).
    pub lateness_ms: Option<i64>,
    /// From fire to finish.
    pub duration_ms: Option<i64>,
    pub offline: bool,
    /// Why it ended, when it did not succeed.
    pub why: Option<String>,
}

impl RunFacts {
    pub fn of(r: &RunRecord) -> RunFacts {
        RunFacts {
            task: r.task_id,
            agent: r.agent_id,
            outcome: r.outcome,
            attempt: r.attempt,
            scheduled_at: r.scheduled_at,
            lateness_ms: r
                .fired_at
                .filter(|_| r.attempt == 1)
                .map(|f| f.millis_since(r.scheduled_at)),
            duration_ms: r
                .fired_at
                .zip(r.finished_at)
                .map(|(f, e)| e.millis_since(f)),
            offline: r.offline,
            why: (r.outcome != sundial_protocol::Outcome::Succeeded)
                .then(|| r.why())
                .flatten(),
        }
    }
}

/// A finished [`StoreJob`], for [`super::CoordNode::handle_store_done`].
#[derive(Clone, Debug)]
pub enum StoreDone {
    Hello {
        conn: ConnId,
        agent: AgentId,
        /// `None`: no such agent, or revoked.
        result: StoreResult<HelloAnswer>,
    },
    Changes {
        conn: ConnId,
        result: StoreResult<ChangesAnswer>,
    },
    Runs {
        conn: ConnId,
        batch_id: u64,
        result: StoreResult<RunsVerdict>,
        cache: Assigned,
    },
    Seen {
        result: StoreResult<()>,
    },
    Clocks {
        result: StoreResult<()>,
    },
    Admin {
        conn: ConnId,
        req: u64,
        result: StoreResult<AdminAnswer>,
        /// The request's audit entry when it is a change (to log it as
        /// refused when the store refused it).
        audit: Option<Box<AuditEntry>>,
    },
    PurgeAudit {
        before: Timestamp,
        max: usize,
        result: StoreResult<usize>,
    },
    EnrollCheck {
        conn: ConnId,
        result: StoreResult<Result<AgentId, TokenRefusal>>,
        request: Box<EnrollRequest>,
    },
    Enroll {
        conn: ConnId,
        result: StoreResult<Result<Agent, TokenRefusal>>,
        cert_der: Vec<u8>,
    },
    Purge {
        before: Timestamp,
        max: usize,
        result: StoreResult<usize>,
    },
    Feed {
        result: StoreResult<FeedPage>,
    },
    Queued {
        result: StoreResult<()>,
    },
    AuditRefused {
        conn: ConnId,
        req: u64,
        /// The refusal, as the admin is told it.
        why: String,
        result: StoreResult<()>,
    },
    AuditRunNow {
        conn: ConnId,
        req: u64,
        run: RunNowAudited,
        result: StoreResult<()>,
    },
    Plan {
        result: StoreResult<Vec<placement::Planned>>,
    },
}

/// A cancel for a task id a restored store may have lost (only its id
/// and revision are sent).
fn lost_task(id: TaskId, revision: u64) -> TaskSpec {
    TaskSpec {
        id,
        name: None,
        target: sundial_protocol::task::Target::Selector(Vec::new()),
        schedule: Schedule::at(Timestamp::MIN),
        action: sundial_protocol::task::Action::Exec(Default::default()),
        policies: Default::default(),
        revision,
        created_at: Timestamp::MIN,
        placement: None,
    }
}

/// Which tasks of a batch may come from `agent` (see [`RunsVerdict`]).
fn check_owned(
    store: &dyn CoordStore,
    agent: AgentId,
    labels: &[(String, String)],
    cache: &mut Assigned,
    runs: &[RunRecord],
) -> StoreResult<Result<Vec<TaskId>, TaskId>> {
    let mut unknown = Vec::new();
    for r in runs {
        if cache.len() > ASSIGNED_CACHE_MAX {
            cache.clear();
        }
        let ok = match cache.get(&r.task_id) {
            Some(ok) => *ok,
            None => {
                let ok = store
                    .task(r.task_id)?
                    .map(|t| targets(&t.spec.target, agent, labels));
                cache.insert(r.task_id, ok);
                ok
            }
        };
        match ok {
            Some(true) => {}
            Some(false) => return Ok(Err(r.task_id)),
            None => {
                if !unknown.contains(&r.task_id) {
                    unknown.push(r.task_id);
                }
            }
        }
    }
    Ok(Ok(unknown))
}

impl StoreJob {
    /// The job's kind, for metrics (a label with a handful of values).
    pub fn kind(&self) -> &'static str {
        match self {
            StoreJob::Hello { .. } => "hello",
            StoreJob::Changes { .. } => "changes",
            StoreJob::Runs { .. } => "runs",
            StoreJob::Seen { .. } => "seen",
            StoreJob::Clocks { .. } => "clocks",
            StoreJob::Admin { .. } => "admin",
            StoreJob::EnrollCheck { .. } => "enroll_check",
            StoreJob::Enroll { .. } => "enroll",
            StoreJob::Purge { .. } => "purge",
            StoreJob::Feed { .. } => "feed",
            StoreJob::QueueRunNow { .. } => "queue_run_now",
            StoreJob::AuditRunNow { .. } | StoreJob::AuditRefused { .. } => "audit",
            StoreJob::AdminUsed { .. } => "admin_used",
            StoreJob::PurgeAudit { .. } => "purge_audit",
            StoreJob::Plan { .. } => "plan",
        }
    }

    /// The job as it ends when the store fails before committing anything
    /// (a shell whose store is gone, the simulator's faults).
    pub fn fail(self, error: StoreError) -> StoreDone {
        match self {
            StoreJob::Hello { conn, agent, .. } => StoreDone::Hello {
                conn,
                agent,
                result: Err(error),
            },
            StoreJob::Changes { conn, .. } => StoreDone::Changes {
                conn,
                result: Err(error),
            },
            StoreJob::Runs {
                conn,
                batch_id,
                cache,
                ..
            } => StoreDone::Runs {
                conn,
                batch_id,
                result: Err(error),
                cache,
            },
            StoreJob::Seen { .. } => StoreDone::Seen { result: Err(error) },
            StoreJob::Clocks { .. } => StoreDone::Clocks { result: Err(error) },
            StoreJob::Admin {
                conn,
                req,
                request,
                ctx,
            } => StoreDone::Admin {
                conn,
                req,
                result: Err(error),
                audit: admin::is_change(&request).then(|| Box::new(ctx.audit)),
            },
            StoreJob::AuditRunNow { conn, req, run } => StoreDone::AuditRunNow {
                conn,
                req,
                run,
                result: Err(error),
            },
            StoreJob::AuditRefused { conn, req, entry } => StoreDone::AuditRefused {
                conn,
                req,
                why: entry.refused.unwrap_or_default(),
                result: Err(error),
            },
            StoreJob::AdminUsed { .. } => StoreDone::Seen { result: Err(error) },
            StoreJob::PurgeAudit { before, max } => StoreDone::PurgeAudit {
                before,
                max,
                result: Err(error),
            },
            StoreJob::EnrollCheck { conn, request, .. } => StoreDone::EnrollCheck {
                conn,
                result: Err(error),
                request,
            },
            StoreJob::Enroll { conn, cert_der, .. } => StoreDone::Enroll {
                conn,
                result: Err(error),
                cert_der,
            },
            StoreJob::Purge { before, max } => StoreDone::Purge {
                before,
                max,
                result: Err(error),
            },
            StoreJob::Feed { .. } => StoreDone::Feed { result: Err(error) },
            StoreJob::QueueRunNow { .. } => StoreDone::Queued { result: Err(error) },
            StoreJob::Plan { .. } => StoreDone::Plan { result: Err(error) },
        }
    }

    /// Runs the job against `store`.
    pub fn run(self, store: &dyn CoordStore) -> StoreDone {
        match self {
            StoreJob::Hello {
                conn,
                agent,
                last_revision,
                at,
                holder,
                seal_key,
            } => {
                let result = (|| {
                    let Some(rec) = store.agent(agent)?.filter(|r| !r.revoked) else {
                        return Ok(None);
                    };
                    if let Some(key) = seal_key {
                        crate::coord_store::put_seal_key(store, agent, key)?;
                    }
                    let restored = store.catch_up_restored(last_revision)?;
                    let session = holder.map(|holder| SessionMark::Up { holder });
                    store.agent_seen(
                        agent,
                        AgentSeen {
                            at,
                            clock: None,
                            session,
                        },
                    )?;
                    Ok(Some((rec, restored)))
                })();
                StoreDone::Hello {
                    conn,
                    agent,
                    result,
                }
            }
            StoreJob::Changes {
                conn,
                agent,
                labels,
                since,
                modules_held,
                limit,
                lost,
            } => {
                let result = (|| {
                    let page = store.changes_for(agent, &labels, since, limit)?;
                    let mut changes = page.changes;
                    if let Some((ids, revision)) = lost {
                        // Cancels for the ids the store does not know (those
                        // it knows are among the changes from revision 0).
                        for id in ids {
                            if store.task(TaskId(id))?.is_none() {
                                changes.push((lost_task(TaskId(id), revision), true));
                            }
                        }
                    }
                    let mut modules = Vec::new();
                    if let Some(held) = modules_held {
                        let mut wanted = std::collections::BTreeSet::new();
                        for (t, removed) in &changes {
                            if let (false, Some(m)) = (*removed, t.action.module()) {
                                if !held.contains(&m) {
                                    wanted.insert(m);
                                }
                            }
                        }
                        for m in wanted {
                            // A module missing from the store (it never
                            // should be) is not sent: the agent records
                            // its runs rejected, naming it.
                            if let Some(bytes) = store.module(m)? {
                                modules.push((m, bytes));
                            }
                        }
                    }
                    Ok((changes, page.upto, page.more, modules))
                })();
                StoreDone::Changes { conn, result }
            }
            StoreJob::Runs {
                conn,
                agent,
                labels,
                batch_id,
                runs,
                mut cache,
            } => {
                let result = (|| match check_owned(store, agent, &labels, &mut cache, &runs)? {
                    Err(task) => Ok(RunsVerdict::NotAssigned(task)),
                    Ok(unknown) => {
                        let known: Vec<RunRecord> = runs
                            .iter()
                            .filter(|r| !unknown.contains(&r.task_id))
                            .cloned()
                            .collect();
                        let stored = store.store_runs(&known)?;
                        let fresh: std::collections::HashSet<RunKeyOf> =
                            stored.fresh.into_iter().collect();
                        let recorded = known
                            .iter()
                            .filter(|r| {
                                fresh.contains(&(
                                    r.task_id.0,
                                    r.agent_id.0,
                                    r.scheduled_at.as_millis(),
                                    r.attempt,
                                ))
                            })
                            .cloned()
                            .collect();
                        Ok(RunsVerdict::Stored {
                            keys: runs.iter().map(RunRecord::key).collect(),
                            unknown,
                            conflicts: stored.conflicts,
                            recorded,
                        })
                    }
                })();
                StoreDone::Runs {
                    conn,
                    batch_id,
                    result,
                    cache,
                }
            }
            StoreJob::Clocks { seen } => StoreDone::Clocks {
                result: store.agents_seen(&seen),
            },
            StoreJob::Seen { agent, seen } => StoreDone::Seen {
                result: match store.agent_seen(agent, seen) {
                    // Forgotten meanwhile: nothing to note.
                    Err(StoreError::NotFound(_)) => Ok(()),
                    other => other,
                },
            },
            StoreJob::Admin {
                conn,
                req,
                request,
                ctx,
            } => {
                let audit = admin::is_change(&request).then(|| Box::new(ctx.audit.clone()));
                StoreDone::Admin {
                    conn,
                    req,
                    result: admin::answer(store, &ctx, request),
                    audit,
                }
            }
            StoreJob::AuditRunNow { conn, req, run } => StoreDone::AuditRunNow {
                conn,
                req,
                result: store.append_audit(&run.entry),
                run,
            },
            StoreJob::AuditRefused { conn, req, entry } => StoreDone::AuditRefused {
                conn,
                req,
                result: store.append_audit(&entry),
                why: entry.refused.unwrap_or_default(),
            },
            StoreJob::AdminUsed { cert_sha256, at } => StoreDone::Seen {
                result: store.admin_used(cert_sha256, at),
            },
            StoreJob::PurgeAudit { before, max } => StoreDone::PurgeAudit {
                before,
                max,
                result: store.purge_audit_before(before, max),
            },
            StoreJob::EnrollCheck {
                conn,
                token_sha256,
                at,
                request,
            } => {
                let result = (|| match store.check_token(token_sha256, at)? {
                    Err(refusal) => Ok(Err(refusal)),
                    Ok(_) => Ok(Ok(store.reserve_agent_id()?)),
                })();
                StoreDone::EnrollCheck {
                    conn,
                    result,
                    request,
                }
            }
            StoreJob::Enroll {
                conn,
                enrollment,
                cert_der,
                seal_key,
            } => {
                let result = store.enroll(&enrollment);
                // The key is published again in every Hello: an enrollment
                // whose key write fails is not refused.
                if let (Ok(Ok(agent)), Some(key)) = (&result, seal_key) {
                    if let Err(e) = crate::coord_store::put_seal_key(store, agent.id, key) {
                        tracing::warn!(agent = %agent.id, error = %e, "storing the sealing key of a new agent failed; its first Hello will bring it");
                    }
                }
                StoreDone::Enroll {
                    conn,
                    result,
                    cert_der,
                }
            }
            StoreJob::Purge { before, max } => StoreDone::Purge {
                before,
                max,
                result: store.purge_runs_before(before, max),
            },
            StoreJob::Feed {
                revision,
                cert_seq,
                limit,
                agents,
                at,
            } => StoreDone::Feed {
                result: (|| {
                    Ok(FeedPage {
                        tasks: store.task_changes(revision, limit)?,
                        certs: store.cert_changes(cert_seq, limit)?,
                        run_now: if agents.is_empty() {
                            Vec::new()
                        } else {
                            store.take_run_now(&agents, at)?
                        },
                    })
                })(),
            },
            StoreJob::QueueRunNow { runs, at } => StoreDone::Queued {
                result: store.queue_run_now(&runs, at),
            },
            StoreJob::Plan {
                tasks,
                members,
                here,
                shared,
                at,
                replan_bug,
            } => StoreDone::Plan {
                result: placement::plan(store, &tasks, &members, &here, shared, at, replan_bug),
            },
        }
    }
}
