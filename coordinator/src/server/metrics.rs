//! The coordinator's metrics, in the Prometheus text format: fed by the
//! node's events (runs recorded once each, refusals, store failures, audit
//! entries), timed around the store's jobs, and read from the node and the
//! store's pages when scraped (agents, sessions, backlogs, clocks).
//!
//! Every series is bounded: outcomes, refusal reasons and job kinds are
//! fixed sets, and the per-task series stop at `task_series_max` tasks —
//! runs of tasks past the cap are counted under `task="other"`, and
//! `sundial_metrics_tasks_over_cap_total` says how many runs went there.
//! No label grows with runs or agents.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use sundial_core::coord::{ConnRefusal, CoordEvent, FleetFigures, Refusal, RunFacts};
use sundial_core::coord_store::CoordStore;
use sundial_protocol::Timestamp;

/// Tasks with series of their own, unless configured otherwise.
pub const TASK_SERIES_MAX_DEFAULT: usize = 1_000;
/// A scrape reads the store's agents at most this often (a fleet of
/// 100,000 agents is 100 pages).
const FLEET_READ_EVERY: Duration = Duration::from_secs(10);
/// An agent whose clock is off by more than this is counted as such.
const CLOCK_OFF_MS: i64 = 1_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskOutcomeLabel {
    task: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabel {
    refused: &'static str,
}

/// Seconds, from milliseconds.
fn secs(ms: i64) -> f64 {
    ms as f64 / 1_000.0
}

/// The metrics of one coordinator process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<OutcomeLabel, Counter>,
    offline_runs: Counter,
    lateness: Histogram,
    duration: Histogram,
    task_runs: Family<TaskOutcomeLabel, Counter>,
    task_late_runs: Family<TaskLabel, Counter>,
    task_duration: Family<TaskLabel, Counter<f64>>,
    tasks_over_cap: Counter,
    refused: Family<ReasonLabel, Counter>,
    store_errors: Counter,
    store_jobs: Family<JobLabel, Histogram>,
    enrollments: Counter,
    audit: Family<RefusedLabel, Counter>,
    agents: Family<StateLabel, Gauge>,
    agents_clock_off: Gauge,
    sessions: Gauge,
    outbox_runs: Gauge,
    outbox_max_runs: Gauge,
    outbox_oldest: Gauge<f64, std::sync::atomic::AtomicU64>,
    agents_reporting: Gauge,
    agent_tasks: Gauge,
    agent_running: Gauge,
    agent_store_bytes: Gauge,
    agents_clock_unvouched: Gauge,
    agents_clock_held: Gauge,
    assignment_lag: Histogram,
    last_scrape_read: Gauge<f64, std::sync::atomic::AtomicU64>,
    tasks: Mutex<HashSet<String>>,
    task_series_max: usize,
    fleet_read: Mutex<Option<Instant>>,
}

impl Metrics {
    pub fn new(task_series_max: usize) -> Metrics {
        let mut registry = Registry::default();
        let runs = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "sundial_runs_recorded",
            "Run records stored by outcome, each once (resends are not counted)",
            runs.clone(),
        );
        let offline_runs = Counter::default();
        registry.register(
            "sundial_runs_recorded_offline",
            "Run records of runs that fired while their agent had no session",
            offline_runs.clone(),
        );
        // 1 ms to ~65 s: firing is meant to be on time to the millisecond.
        let lateness = Histogram::new(sundial_net::shell::LATENESS_BUCKETS);
        registry.register_with_unit(
            "sundial_run_start_lateness",
            "How late first attempts fired after their due time",
            Unit::Seconds,
            lateness.clone(),
        );
        let duration = Histogram::new(sundial_net::shell::DURATION_BUCKETS);
        registry.register_with_unit(
            "sundial_run_duration",
            "How long runs took, fire to finish",
            Unit::Seconds,
            duration.clone(),
        );
        let task_runs = Family::<TaskOutcomeLabel, Counter>::default();
        registry.register(
            "sundial_task_runs",
            "Run records stored, by task and outcome (tasks past the cap: task=\"other\")",
            task_runs.clone(),
        );
        let task_late_runs = Family::<TaskLabel, Counter>::default();
        registry.register(
            "sundial_task_late_runs",
            "First attempts that fired more than a second after their due time, by task",
            task_late_runs.clone(),
        );
        let task_duration = Family::<TaskLabel, Counter<f64>>::default();
        registry.register_with_unit(
            "sundial_task_run_duration",
            "The summed duration of runs, by task (divide by sundial_task_runs_total for the mean)",
            Unit::Seconds,
            task_duration.clone(),
        );
        let tasks_over_cap = Counter::default();
        registry.register(
            "sundial_metrics_tasks_over_cap",
            "Runs of tasks past the per-task series cap, counted under task=\"other\"",
            tasks_over_cap.clone(),
        );
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "sundial_connections_refused",
            "Connections and sessions refused, by reason",
            refused.clone(),
        );
        let store_errors = Counter::default();
        registry.register(
            "sundial_store_errors",
            "Store operations that failed",
            store_errors.clone(),
        );
        let store_jobs = Family::<JobLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ])
        });
        registry.register_with_unit(
            "sundial_store_job_duration",
            "How long store jobs took, by kind",
            Unit::Seconds,
            store_jobs.clone(),
        );
        let enrollments = Counter::default();
        registry.register(
            "sundial_enrollments",
            "Agents enrolled through this coordinator",
            enrollments.clone(),
        );
        let audit = Family::<RefusedLabel, Counter>::default();
        registry.register(
            "sundial_audit_entries",
            "Audit log entries written by this coordinator: changes (refused=\"false\") and refused requests",
            audit.clone(),
        );
        let agents = Family::<StateLabel, Gauge>::default();
        registry.register(
            "sundial_agents",
            "Agents by state: enrolled (not revoked), revoked, online (in session with any coordinator of the store)",
            agents.clone(),
        );
        let agents_clock_off = Gauge::default();
        registry.register(
            "sundial_agents_clock_off",
            "Enrolled agents whose clock was more than a second off the coordinator's at their last sample",
            agents_clock_off.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sundial_sessions",
            "Agent sessions open on this coordinator",
            sessions.clone(),
        );
        let outbox_runs = Gauge::default();
        registry.register(
            "sundial_outbox_runs",
            "Run records waiting in the outboxes of the agents in session here, as they last reported (agents before 0.3: at their Hello)",
            outbox_runs.clone(),
        );
        let outbox_max_runs = Gauge::default();
        registry.register(
            "sundial_outbox_max_runs",
            "The largest outbox among the agents in session here",
            outbox_max_runs.clone(),
        );
        let outbox_oldest = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "sundial_outbox_oldest_run_age",
            "How long ago the oldest unsynced run among the agents in session here ended (0: none waits)",
            Unit::Seconds,
            outbox_oldest.clone(),
        );
        let agents_reporting = Gauge::default();
        registry.register(
            "sundial_agents_reporting",
            "Agents in session here that report their own figures (0.3 and later)",
            agents_reporting.clone(),
        );
        let agent_tasks = Gauge::default();
        registry.register(
            "sundial_agent_tasks",
            "Tasks stored by the reporting agents in session here, summed",
            agent_tasks.clone(),
        );
        let agent_running = Gauge::default();
        registry.register(
            "sundial_agent_runs_running",
            "Runs going now on the reporting agents in session here",
            agent_running.clone(),
        );
        let agent_store_bytes = Gauge::default();
        registry.register_with_unit(
            "sundial_agent_store_size",
            "The reporting agents' stores on disk, summed",
            Unit::Bytes,
            agent_store_bytes.clone(),
        );
        let agents_clock_unvouched = Gauge::default();
        registry.register(
            "sundial_agents_clock_unvouched",
            "Reporting agents in session here whose clock no coordinator vouched for since their boot",
            agents_clock_unvouched.clone(),
        );
        let agents_clock_held = Gauge::default();
        registry.register(
            "sundial_agents_clock_held",
            "Reporting agents in session here that hold their firing (their clock went back behind the last known-good instant)",
            agents_clock_held.clone(),
        );
        // 10 ms to an hour: a change reaches an agent in session at once,
        // one that was offline when it comes back.
        let assignment_lag = Histogram::new([
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
        ]);
        registry.register_with_unit(
            "sundial_assignment_lag",
            "From a task change announced here to its agent reporting it applied (the oldest change of each update)",
            Unit::Seconds,
            assignment_lag.clone(),
        );
        let last_scrape_read = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "sundial_metrics_fleet_read_age",
            "How old the store figures (agents) of this scrape are",
            Unit::Seconds,
            last_scrape_read.clone(),
        );
        Metrics {
            registry,
            runs,
            offline_runs,
            lateness,
            duration,
            task_runs,
            task_late_runs,
            task_duration,
            tasks_over_cap,
            refused,
            store_errors,
            store_jobs,
            enrollments,
            audit,
            agents,
            agents_clock_off,
            sessions,
            outbox_runs,
            outbox_max_runs,
            outbox_oldest,
            agents_reporting,
            agent_tasks,
            agent_running,
            agent_store_bytes,
            agents_clock_unvouched,
            agents_clock_held,
            assignment_lag,
            last_scrape_read,
            tasks: Mutex::new(HashSet::new()),
            task_series_max,
            fleet_read: Mutex::new(None),
        }
    }

    /// Counts what an event of the node says.
    pub fn observe(&self, e: &CoordEvent) {
        match e {
            CoordEvent::RunsRecorded { runs } => {
                for r in runs {
                    self.run(r);
                }
            }
            CoordEvent::Shed { why, .. } => {
                let reason = match why {
                    Refusal::PendingPerAddress => "pending_per_address",
                    Refusal::Budget(_) => "handshake_budget",
                    Refusal::Behind => "behind",
                };
                self.refused.get_or_create(&ReasonLabel { reason }).inc();
            }
            CoordEvent::ConnRefused { why, .. } => {
                let reason = match why {
                    ConnRefusal::CertRequired => "certificate_unknown",
                    ConnRefusal::EnrollBusy => "enrollments_busy",
                    ConnRefusal::CertExpired => "certificate_expired",
                };
                self.refused.get_or_create(&ReasonLabel { reason }).inc();
            }
            CoordEvent::SessionBusy { .. } => {
                self.refused
                    .get_or_create(&ReasonLabel {
                        reason: "sessions_max",
                    })
                    .inc();
            }
            CoordEvent::StoreFailed { .. } => {
                self.store_errors.inc();
            }
            CoordEvent::Enrolled { .. } => {
                self.enrollments.inc();
            }
            CoordEvent::AssignmentApplied { lag_ms, .. } => {
                self.assignment_lag.observe(*lag_ms as f64 / 1000.0);
            }
            CoordEvent::Audited(entry) => {
                let refused = if entry.refused.is_some() {
                    "true"
                } else {
                    "false"
                };
                self.audit.get_or_create(&RefusedLabel { refused }).inc();
            }
            _ => {}
        }
    }

    fn run(&self, r: &RunFacts) {
        let outcome = r.outcome.as_str();
        self.runs.get_or_create(&OutcomeLabel { outcome }).inc();
        if r.offline {
            self.offline_runs.inc();
        }
        if let Some(ms) = r.lateness_ms {
            self.lateness.observe(secs(ms.max(0)));
        }
        if let Some(ms) = r.duration_ms {
            self.duration.observe(secs(ms.max(0)));
        }
        let task = self.task_label(&r.task.to_string());
        self.task_runs
            .get_or_create(&TaskOutcomeLabel {
                task: task.clone(),
                outcome,
            })
            .inc();
        if r.lateness_ms.is_some_and(|ms| ms > 1_000) {
            self.task_late_runs
                .get_or_create(&TaskLabel { task: task.clone() })
                .inc();
        }
        if let Some(ms) = r.duration_ms {
            self.task_duration
                .get_or_create(&TaskLabel { task })
                .inc_by(secs(ms.max(0)));
        }
    }

    /// The task's own label, or `other` past the cap.
    fn task_label(&self, task: &str) -> String {
        let Ok(mut tasks) = self.tasks.lock() else {
            return "other".into();
        };
        if tasks.contains(task) {
            return task.to_owned();
        }
        if tasks.len() < self.task_series_max {
            tasks.insert(task.to_owned());
            return task.to_owned();
        }
        self.tasks_over_cap.inc();
        "other".into()
    }

    /// A store job of `kind` took `elapsed`.
    pub fn store_job(&self, kind: &'static str, elapsed: Duration) {
        self.store_jobs
            .get_or_create(&JobLabel { job: kind })
            .observe(elapsed.as_secs_f64());
    }

    /// The node's figures, read when scraped.
    pub fn set_node(&self, sessions: usize, f: &FleetFigures) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.sessions
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
        self.outbox_runs.set(n(f.outbox_runs));
        self.outbox_max_runs.set(n(f.outbox_max_runs));
        self.outbox_oldest.set(
            f.oldest_unsynced_age_ms
                .map_or(0.0, |ms| ms as f64 / 1000.0),
        );
        self.agents_reporting.set(n(f.reporting));
        self.agent_tasks.set(n(f.tasks_stored));
        self.agent_running.set(n(f.running));
        self.agent_store_bytes.set(n(f.store_bytes));
        self.agents_clock_unvouched.set(n(f.clock_unvouched));
        self.agents_clock_held.set(n(f.clock_held));
    }

    /// Reads the agents from the store (a page at a time) when the last
    /// read is older than [`FLEET_READ_EVERY`]; a failed read leaves the
    /// figures as they were (and counts a store error).
    pub fn read_fleet(&self, store: &dyn CoordStore, now: Timestamp, shared: bool) {
        let due = {
            let Ok(mut last) = self.fleet_read.lock() else {
                return;
            };
            if let Some(at) = *last {
                self.last_scrape_read.set(at.elapsed().as_secs_f64());
            }
            if last.is_some_and(|at| at.elapsed() < FLEET_READ_EVERY) {
                false
            } else {
                *last = Some(Instant::now());
                true
            }
        };
        if !due {
            return;
        }
        self.last_scrape_read.set(0.0);
        let agents = match sundial_core::coord::admin::all_agents(store) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the agents");
                self.store_errors.inc();
                return;
            }
        };
        let (mut enrolled, mut revoked, mut online, mut clock_off) = (0i64, 0i64, 0i64, 0i64);
        for a in agents.iter().filter(|a| !a.forgotten) {
            if a.revoked {
                revoked += 1;
                continue;
            }
            enrolled += 1;
            let fresh = a.last_seen.is_some_and(|t| {
                now.millis_since(t) < sundial_core::coord::admin::SESSION_MARK_FRESH_MS
            });
            if a.in_session && fresh {
                online += 1;
            }
            if a.clock_offset_ms.is_some_and(|o| o.abs() > CLOCK_OFF_MS) {
                clock_off += 1;
            }
        }
        let set = |state, n| self.agents.get_or_create(&StateLabel { state }).set(n);
        set("enrolled", enrolled);
        set("revoked", revoked);
        // The embedded store does not mark sessions: its one coordinator's
        // own count is the fleet's (`set_online`).
        if shared {
            set("online", online);
        }
        self.agents_clock_off.set(clock_off);
    }

    /// With an embedded store (no session marks), the online count is this
    /// coordinator's sessions.
    pub fn set_online(&self, online: usize) {
        self.agents
            .get_or_create(&StateLabel { state: "online" })
            .set(i64::try_from(online).unwrap_or(i64::MAX));
    }

    /// The classic Prometheus text format (0.0.4), for clients that do not
    /// ask for OpenMetrics (`curl`, `promtool check metrics`): counters'
    /// HELP and TYPE name the `_total` series, no UNIT lines, no EOF.
    pub fn encode_classic(&self) -> String {
        sundial_net::shell::openmetrics_to_classic(&self.encode())
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics: cannot encode");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_format_names_counters_by_their_series() {
        let m = Metrics::new(2);
        for task in 1..=3 {
            m.run(&RunFacts {
                task: sundial_protocol::TaskId(task),
                agent: sundial_protocol::AgentId(1),
                outcome: sundial_protocol::Outcome::Failed,
                attempt: 1,
                scheduled_at: Timestamp::EPOCH,
                lateness_ms: Some(1_500),
                duration_ms: Some(20),
                offline: false,
                why: None,
            });
        }
        let text = m.encode_classic();
        assert!(
            text.contains("# HELP sundial_runs_recorded_total "),
            "{text}"
        );
        assert!(text.contains("# TYPE sundial_runs_recorded_total counter"));
        assert!(text.contains("sundial_runs_recorded_total{outcome=\"failed\"} 3"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        // Two tasks have series; the third is counted as other.
        assert!(text.contains("sundial_task_runs_total{task=\"t1\",outcome=\"failed\"} 1"));
        assert!(text.contains("sundial_task_runs_total{task=\"other\",outcome=\"failed\"} 1"));
        assert!(text.contains("sundial_metrics_tasks_over_cap_total 1"));
        assert!(text.contains("sundial_task_late_runs_total{task=\"t2\"} 1"));
        assert!(m.encode().ends_with("# EOF\n"));
    }
}
