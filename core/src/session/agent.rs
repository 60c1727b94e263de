//! The agent's side of the coordinator session, as a state machine.
//!
//! Inputs are `handle_*` calls with the time; outputs are drained with
//! `poll_transmit` (messages for the coordinator), `poll_effect` (what the
//! shell must do: dial, read the outbox, apply assignments, delete
//! acknowledged records…), `poll_event` (what happened, for logs and
//! metrics) and `poll_timeout` (when to call `handle_timeout` next).
//!
//! Invariant: a record leaves the outbox only by [`AgentEffect::Ack`], on
//! an acknowledgement from the coordinator (sent after its commit); after a
//! reconnect everything not acknowledged is sent again (the coordinator
//! stores by run key, so nothing doubles).

use std::collections::{BTreeMap, VecDeque};

use sundial_protocol::wire::{
    AgentMsg, AgentReport, AssignmentChange, CoordMsg, LinkTiming, ReconnectPolicy,
    REPORT_EVERY_MS_MAX, REPORT_EVERY_MS_MIN, RESULT_BATCH_RUNS_MAX,
};
use sundial_protocol::{RunKey, RunRecord, TaskId, Timestamp};

use super::{Event, Now, Rng};

/// How often clock samples are exchanged, in ms, at least: in a fleet
/// of up to 25,000 agents (keep-alives up to 5 s apart).
pub const CLOCK_PROBE_INTERVAL_MS: u64 = 30_000;
/// Clock samples are at most this far apart, in ms: a device clock that
/// drifts 50 ppm (no NTP of its own) moves 6 ms between two.
pub const CLOCK_PROBE_INTERVAL_MAX_MS: u64 = 120_000;
/// Clock samples are this many keep-alive intervals apart, within the
/// bounds above: a large fleet, whose coordinator keeps sessions alive
/// less often, also samples clocks less often (a sample is three
/// messages, more than a keep-alive; 100,000 agents sampling every 30 s
/// were 3,300 samples a second).
const CLOCK_PROBE_KEEP_ALIVES: u64 = 6;

/// How often a session whose coordinator stated `timing` samples the
/// clock, in ms.
pub fn clock_probe_every_ms(timing: LinkTiming) -> u64 {
    u64::from(timing.keep_alive_ms)
        .saturating_mul(CLOCK_PROBE_KEEP_ALIVES)
        .clamp(CLOCK_PROBE_INTERVAL_MS, CLOCK_PROBE_INTERVAL_MAX_MS)
}
/// After an unusable sample, the next probe goes this soon, in ms.
pub const CLOCK_PROBE_RETRY_MS: u64 = 1_000;
/// The first wait after a failed connection, in ms, until the coordinator
/// states its own ([`ReconnectPolicy`]).
pub const RECONNECT_DELAY_MIN_MS: u64 = 250;
/// The longest wait between reconnect attempts, in ms (as above).
pub const RECONNECT_DELAY_MAX_MS: u64 = 30_000;
/// Before any coordinator stated a policy, an agent refused for load
/// again and again spreads its next dial over the default spread doubled
/// at most this many times (10 s to 80 s).
pub const BUSY_SPREAD_DOUBLINGS: u32 = 3;
/// The wait between attempts while the coordinator refuses our certificate,
/// in ms: retrying harder cannot help, and a fleet of revoked devices must
/// not load the coordinator.
pub const RECONNECT_DELAY_REFUSED_MS: u64 = 600_000;
/// A session that lasted this long resets the backoff, in ms.
pub const SESSION_STABLE_MS: u64 = 5_000;
/// Nothing heard from the coordinator for this long: runs fired from now on
/// are marked `offline`, before the idle timeout closes the connection, in
/// ms — unless the coordinator's [`LinkTiming`] says otherwise (a large
/// fleet is pinged less often). Also: a message of the agent's own left
/// unanswered this long (a run's record, a clock probe) marks it at once,
/// whatever the keep-alive interval: while runs fire, a cut is seen in
/// seconds.
pub const LINK_SILENT_MAX_MS: u64 = 2_500;
/// A coordinator that sends no keep-alives of its own (older than 0.8,
/// which states no [`LinkTiming`]) is asked for the time this often, in
/// ms, so that the link is kept alive from this side.
pub const KEEP_ALIVE_FALLBACK_MS: u64 = 1_000;
/// The idle timeout of a coordinator older than 0.8, which states none, ms
/// (the same 5 s every peer before 0.8 used).
pub const IDLE_FALLBACK_MS: u64 = sundial_protocol::wire::IDLE_MS_BEFORE_0_8 as u64;
/// Result batches sent and not yet acknowledged.
pub const BATCHES_IN_FLIGHT_MAX: usize = 8;
/// Bytes of records in one batch (the frame limit is larger).
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Runs in one batch.
pub const BATCH_RUNS_MAX: usize = RESULT_BATCH_RUNS_MAX;
/// How soon the outbox is looked at again, without a notification, after
/// a read found it empty, in ms. Every new record notifies the session
/// ([`AgentSession::outbox_changed`]); the poll only covers a record
/// written without one, so each further empty read doubles the wait, up to
/// [`OUTBOX_POLL_MAX_MS`]: an idle agent wakes for its outbox every half a
/// minute, not twice a second (a device's battery, and 100,000 agents
/// simulated on one machine).
pub const OUTBOX_POLL_MS: u64 = 500;
/// The longest wait between two looks at an outbox found empty, in ms.
pub const OUTBOX_POLL_MAX_MS: u64 = 30_000;
/// How often a live session records its time as the last sync, in ms (a
/// durable write: kept rare so a large fleet does not drown in fsyncs).
pub const LAST_SYNC_PERSIST_MS: u64 = 300_000;
/// An acknowledgement persists the time as the last sync when the last was
/// persisted at least this long ago, in ms: "last sync" then says when
/// records last reached a coordinator, to within this.
pub const LAST_SYNC_ACK_PERSIST_MS: u64 = 30_000;
/// A clock sample whose round trip took longer than this is not used, in
/// ms: its error (up to half the round trip) is too large.
pub const CLOCK_SAMPLE_RTT_MAX_MS: i64 = 1_000;
/// The first sample of a boot whose time nothing vouched for yet is taken
/// with a round trip up to this, in ms: late by at most that, where the
/// wall clock alone could be hours off.
pub const CLOCK_FIRST_SAMPLE_RTT_MAX_MS: i64 = 10_000;
/// A report that said runs wait is followed this soon after the last batch
/// in flight is acknowledged, so the coordinator sees the backlog go to
/// zero without waiting for the report interval, in ms (after the store
/// deleted what was acknowledged).
pub const REPORT_AFTER_DRAIN_MS: u64 = 250;
pub use sundial_protocol::wire::{
    HELLO_ENV_PATTERNS_MAX, HELLO_ENV_PATTERN_BYTES_MAX, HELLO_PATTERNS_MAX,
    HELLO_PATTERN_BYTES_MAX,
};
/// Bytes of the agent's version told.
pub const HELLO_VERSION_BYTES_MAX: usize = 64;

/// The largest Hello, encoded: a tag, two u64 varints, the version and the
/// patterns, each with its length varint, and the frame's header.
const HELLO_ENCODED_MAX: usize = 1
    + 2 * 10
    + (2 + HELLO_VERSION_BYTES_MAX)
    + 2
    + HELLO_PATTERNS_MAX * (2 + HELLO_PATTERN_BYTES_MAX)
    + 3
    + HELLO_ENV_PATTERNS_MAX * (2 + HELLO_ENV_PATTERN_BYTES_MAX)
    + 16;
const _: () = assert!(
    HELLO_ENCODED_MAX <= sundial_protocol::wire::HELLO_FRAME_BYTES_MAX,
    "the largest Hello must fit its frame limit"
);

/// `text` cut to at most `max` bytes at a character boundary, marked `…`.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// What the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentEffect {
    /// Dial the coordinator, giving up after `timeout_ms`; answer with
    /// `handle_connected` or `handle_connect_failed`.
    Connect { timeout_ms: u64 },
    /// Read up to this much of the outbox after sequence `after`; answer
    /// with `handle_outbox`.
    ReadOutbox {
        after: u64,
        runs_max: usize,
        bytes_max: usize,
    },
    /// Store a function's module (whole, its hash checked), before the
    /// changes that name it are applied.
    StoreModule {
        hash: sundial_protocol::wasm::ModuleHash,
        bytes: Vec<u8>,
    },
    /// Apply these changes in order, then persist `upto_revision` as applied.
    Apply {
        changes: Vec<AssignmentChange>,
        upto_revision: u64,
    },
    /// The coordinator stored these runs: delete them from the outbox.
    Ack { keys: Vec<RunKey> },
    /// The coordinator's clock, measured.
    Clock { offset_ms: i64, rtt_ms: i64 },
    /// An operator's extra run.
    RunNow { task_id: TaskId, at: Timestamp },
    /// Whether runs fired from now on are online (the link is heard).
    Online(bool),
    /// Persist this instant as the last sync.
    PersistLastSync { wall: Timestamp },
    /// Gather the agent's figures; answer with `handle_report`.
    Report,
    /// The coordinator revoked this agent: persist it; no more sessions.
    Revoked,
    /// End the connection (the coordinator refused the session).
    Disconnect,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Lost, timed out, or closed without a reason that changes anything.
    Lost,
    /// TLS refused our certificate (revoked or another coordinator).
    RefusedByTls,
    /// The coordinator closed it with the REVOKED code.
    Revoked,
    /// The coordinator is at a limit: it refused the handshake, or closed
    /// with the BUSY code, saying when to come back or not.
    Busy { retry_after_ms: Option<u64> },
}

/// What the agent tells in Hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloInfo {
    pub last_revision: u64,
    pub outbox_len: u64,
    pub agent_version: String,
    pub allow_exec: Vec<String>,
    pub seal_key: Option<sundial_protocol::seal::SealPublicKey>,
    /// Whether it runs functions, its ceilings, the modules it holds.
    pub functions: Option<sundial_protocol::wire::FunctionsHello>,
    /// Its `--allow-env` patterns.
    pub allow_env: Vec<String>,
}

#[derive(Debug)]
struct Up {
    since_ms: u64,
    in_flight: BTreeMap<u64, Vec<RunKey>>,
    cursor: u64,
    next_batch: u64,
    reading: bool,
    /// The last read found nothing new; wait for a notification or the poll.
    drained: bool,
    next_poll_ms: u64,
    /// Reads in a row that found the outbox empty, since the last
    /// notification or record.
    empty_reads: u32,
    heard_ms: u64,
    /// When the oldest message sent since the coordinator was last heard
    /// went (monotonic ms).
    unanswered_ms: Option<u64>,
    online: bool,
    next_probe_ms: u64,
    /// This session's keep-alives and silence, as its coordinator stated
    /// (`None`: it sends no keep-alives; the agent probes instead).
    timing: Option<LinkTiming>,
    /// Reports the coordinator asked for in this session.
    report: Option<Reporting>,
    /// The module coming in, piece by piece, and the largest taken (set
    /// when the agent runs functions).
    module: Option<Box<sundial_protocol::wasm::Assembly>>,
    module_max: Option<u64>,
}

impl Up {
    /// Silence longer than this ends the connection, ms: the session's
    /// idle timeout, enforced here too. QUIC's own is at least three times
    /// its retransmission timeout, which an agent that sends nothing while
    /// idle never measures again after its handshake: one made in a storm
    /// keeps a round trip of seconds, and would wait out a cut many times
    /// longer than the coordinator asked before dialling again.
    fn idle_after_ms(&self) -> u64 {
        self.timing
            .map_or(IDLE_FALLBACK_MS, |t| u64::from(t.idle_ms))
    }

    /// Silence longer than this marks the link cut, ms.
    fn silent_after_ms(&self) -> u64 {
        self.timing
            .map_or(LINK_SILENT_MAX_MS, |t| u64::from(t.silent_ms))
    }

    /// A message went that the coordinator's stack will acknowledge.
    fn sent(&mut self, now: Now) {
        self.unanswered_ms.get_or_insert(now.mono_ms);
    }
}

/// Reports asked for: the interval, when the next may go, the last sent.
#[derive(Debug)]
struct Reporting {
    every_ms: u64,
    next_ms: u64,
    asking: bool,
    last: Option<AgentReport>,
}

#[derive(Debug)]
enum Link {
    /// Waiting to dial at `retry_ms` (`None`: dial at the next timeout).
    Down {
        retry_ms: Option<u64>,
    },
    /// An attempt started at `since_ms` (monotonic).
    Connecting {
        since_ms: u64,
    },
    Up(Box<Up>),
    /// Revoked: no more sessions.
    Ended,
}

/// The agent's session state machine.
#[derive(Debug)]
pub struct AgentSession {
    link: Link,
    /// How to reconnect, as the coordinator last said.
    policy: ReconnectPolicy,
    failures: u32,
    refused: bool,
    /// TLS refusals since the last session, and how many coordinators the
    /// agent knows: one that has not yet read a certificate enrolled
    /// through another refuses it for up to its feed's interval, so the
    /// long wait comes only once each may have refused.
    refusals: u32,
    /// Refusals for load in a row, since the last session or other failure.
    busy_in_a_row: u32,
    coordinators: u32,
    rng: Rng,
    /// Its place when refused for load (its agent number; `None`: random).
    place: Option<u64>,
    last_sync_ms: Option<u64>,
    transmit: VecDeque<AgentMsg>,
    effects: VecDeque<AgentEffect>,
    events: super::EventQueue,
}

/// Backoff before reconnect attempt `failures` (1-based): full jitter over
/// the upper half of `min(cap, floor × 2^failures)`.
pub fn reconnect_delay_ms(failures: u32, random: u64, policy: &ReconnectPolicy) -> u64 {
    let floor = u64::from(policy.backoff_floor_ms);
    let base = floor.saturating_mul(1u64 << failures.min(20));
    let ceiling = base.clamp(1, u64::from(policy.backoff_cap_ms).max(1));
    ceiling / 2 + random % (ceiling / 2 + 1)
}

/// How long an agent refused for load waits to come back at its place:
/// the fleet's places are `1000 / rate` ms apart on a wall-clock cycle of
/// `spread` ms (what the whole fleet needs at the handshake budget), so a
/// refused fleet comes back at the budget's rate, each agent once, without
/// luck. Agents' clocks agree to within the coordinator's clock samples;
/// a clock far off only moves that agent's place.
pub fn place_delay_ms(place: u64, rate_per_sec: u32, spread_ms: u64, wall: Timestamp) -> u64 {
    let spread = spread_ms.max(1);
    let offset = (u128::from(place) * 1_000 / u128::from(rate_per_sec.max(1))) % u128::from(spread);
    let phase = u128::from(
        wall.as_millis()
            .rem_euclid(i64::try_from(spread).unwrap_or(i64::MAX))
            .unsigned_abs(),
    );
    let delay = (offset + u128::from(spread) - phase) % u128::from(spread);
    u64::try_from(delay).unwrap_or(spread)
}

/// The policy an agent follows before its coordinator stated one.
pub fn default_policy() -> ReconnectPolicy {
    ReconnectPolicy {
        backoff_floor_ms: RECONNECT_DELAY_MIN_MS as u32,
        backoff_cap_ms: RECONNECT_DELAY_MAX_MS as u32,
        ..ReconnectPolicy::default()
    }
}

impl AgentSession {
    /// A session that dials at once; `seed` drives the jitter.
    pub fn new(seed: u64) -> AgentSession {
        AgentSession {
            link: Link::Down { retry_ms: None },
            policy: default_policy(),
            failures: 0,
            refused: false,
            refusals: 0,
            busy_in_a_row: 0,
            coordinators: 1,
            rng: Rng::new(seed),
            place: None,
            last_sync_ms: None,
            transmit: VecDeque::new(),
            effects: VecDeque::new(),
            events: super::EventQueue::default(),
        }
    }

    /// How many coordinators the agent dials in turn (at least one).
    pub fn set_coordinators(&mut self, n: usize) {
        self.coordinators = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    }

    /// Its place among the fleet when refused for load: its agent number
    /// (see [`place_delay_ms`]).
    pub fn set_place(&mut self, place: u64) {
        self.place = Some(place);
    }

    /// The reconnect policy in force.
    pub fn policy(&self) -> ReconnectPolicy {
        self.policy
    }

    pub fn is_up(&self) -> bool {
        matches!(self.link, Link::Up(_))
    }

    /// Revoked: this agent makes no more sessions.
    pub fn is_ended(&self) -> bool {
        matches!(self.link, Link::Ended)
    }

    /// Batches sent and not acknowledged on this connection.
    pub fn in_flight(&self) -> usize {
        match &self.link {
            Link::Up(up) => up.in_flight.len(),
            _ => 0,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<AgentMsg> {
        debug_assert!(
            self.transmit.len() <= super::DRAINED_QUEUE_MAX,
            "the agent node drains the session's messages after every call"
        );
        self.transmit.pop_front()
    }

    pub fn poll_effect(&mut self) -> Option<AgentEffect> {
        debug_assert!(
            self.effects.len() <= super::DRAINED_QUEUE_MAX,
            "the agent node drains the session's effects after every call"
        );
        self.effects.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` is due next (monotonic ms).
    pub fn poll_timeout(&self) -> Option<u64> {
        match &self.link {
            Link::Down { retry_ms } => Some(retry_ms.unwrap_or(0)),
            Link::Connecting { .. } | Link::Ended => None,
            Link::Up(up) => {
                let mut t = up.next_probe_ms.min(up.heard_ms + up.idle_after_ms() + 1);
                if up.online {
                    t = t.min(up.heard_ms + up.silent_after_ms() + 1);
                    if let Some(u) = up.unanswered_ms {
                        t = t.min(u + LINK_SILENT_MAX_MS + 1);
                    }
                }
                if up.drained && !up.reading {
                    t = t.min(up.next_poll_ms);
                }
                if let Some(s) = self.last_sync_ms {
                    t = t.min(s + LAST_SYNC_PERSIST_MS);
                }
                if let Some(r) = up.report.as_ref().filter(|r| !r.asking) {
                    t = t.min(r.next_ms);
                }
                Some(t)
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Now) {
        match &mut self.link {
            Link::Down { retry_ms } => {
                if retry_ms.is_none_or(|r| now.mono_ms >= r) {
                    self.link = Link::Connecting {
                        since_ms: now.mono_ms,
                    };
                    self.effects.push_back(AgentEffect::Connect {
                        timeout_ms: u64::from(self.policy.attempt_timeout_ms),
                    });
                }
            }
            Link::Connecting { .. } | Link::Ended => {}
            Link::Up(up) => {
                if now.mono_ms > up.heard_ms + up.idle_after_ms() {
                    let silent_ms = now.mono_ms - up.heard_ms;
                    self.events.push_back(Event::LinkIdle { silent_ms });
                    self.effects.push_back(AgentEffect::Disconnect);
                    // Down here, whatever the driver does with the effect
                    // (the node's own `handle_closed` then changes nothing).
                    self.handle_closed(now, Closed::Lost);
                    return;
                }
                if now.mono_ms >= up.next_probe_ms {
                    let every = match up.timing {
                        Some(t) => clock_probe_every_ms(t),
                        None => KEEP_ALIVE_FALLBACK_MS,
                    };
                    up.next_probe_ms = now.mono_ms + every;
                    up.sent(now);
                    self.transmit
                        .push_back(AgentMsg::ClockProbe { t1: now.wall });
                }
                let unanswered = up
                    .unanswered_ms
                    .is_some_and(|u| now.mono_ms > u + LINK_SILENT_MAX_MS);
                if up.online && (now.mono_ms > up.heard_ms + up.silent_after_ms() || unanswered) {
                    up.online = false;
                    self.effects.push_back(AgentEffect::Online(false));
                    self.events.push_back(Event::LinkSilent {
                        silent_ms: now.mono_ms - up.heard_ms,
                    });
                }
                if up.drained && !up.reading && now.mono_ms >= up.next_poll_ms {
                    up.drained = false;
                }
                if self
                    .last_sync_ms
                    .is_some_and(|s| now.mono_ms >= s + LAST_SYNC_PERSIST_MS)
                {
                    self.last_sync_ms = Some(now.mono_ms);
                    self.effects
                        .push_back(AgentEffect::PersistLastSync { wall: now.wall });
                }
                if let Some(r) = up.report.as_mut() {
                    if !r.asking && now.mono_ms >= r.next_ms {
                        r.asking = true;
                        self.effects.push_back(AgentEffect::Report);
                    }
                }
                self.fill_window();
            }
        }
    }

    /// The answer to [`AgentEffect::Report`]: sent when it differs from
    /// the last one sent in this session.
    pub fn handle_report(&mut self, now: Now, report: AgentReport) {
        let Link::Up(up) = &mut self.link else { return };
        let Some(r) = up.report.as_mut() else { return };
        r.asking = false;
        r.next_ms = now.mono_ms + r.every_ms;
        if r.last.as_ref() != Some(&report) {
            r.last = Some(report.clone());
            self.transmit.push_back(AgentMsg::Report(report));
        }
    }

    /// The connection is up: say Hello, start sending the outbox.
    pub fn handle_connected(&mut self, now: Now, hello: HelloInfo) {
        if !matches!(self.link, Link::Connecting { .. }) {
            return;
        }
        self.refused = false;
        self.refusals = 0;
        self.busy_in_a_row = 0;
        self.transmit.push_back(AgentMsg::Hello {
            last_revision: hello.last_revision,
            outbox_len: hello.outbox_len,
            agent_version: clip(&hello.agent_version, HELLO_VERSION_BYTES_MAX),
            allow_exec: hello
                .allow_exec
                .iter()
                .take(HELLO_PATTERNS_MAX)
                .map(|p| clip(p, HELLO_PATTERN_BYTES_MAX))
                .collect(),
            seal_key: hello.seal_key.into(),
            functions: hello.functions.clone().into(),
            allow_env: Some(
                hello
                    .allow_env
                    .iter()
                    .take(HELLO_ENV_PATTERNS_MAX)
                    .map(|p| clip(p, HELLO_ENV_PATTERN_BYTES_MAX))
                    .collect(),
            )
            .into(),
        });
        self.link = Link::Up(Box::new(Up {
            since_ms: now.mono_ms,
            in_flight: BTreeMap::new(),
            cursor: 0,
            next_batch: 1,
            reading: false,
            drained: false,
            next_poll_ms: now.mono_ms,
            empty_reads: 0,
            heard_ms: now.mono_ms,
            unanswered_ms: None,
            online: true,
            next_probe_ms: now.mono_ms,
            timing: None,
            report: None,
            module: None,
            module_max: hello
                .functions
                .as_ref()
                .filter(|f| f.allowed)
                .map(|f| f.module_max),
        }));
        self.effects.push_back(AgentEffect::Online(true));
        self.events.push_back(Event::SessionUp {
            last_revision: hello.last_revision,
            outbox_len: hello.outbox_len,
        });
        // The first sync of a session is persisted at once.
        self.last_sync_ms = Some(now.mono_ms);
        self.effects
            .push_back(AgentEffect::PersistLastSync { wall: now.wall });
        self.handle_timeout(now);
    }

    pub fn handle_connect_failed(&mut self, now: Now, closed: Closed) {
        if matches!(self.link, Link::Connecting { .. }) {
            self.schedule_retry(now, closed);
        }
    }

    /// The connection ended (after `handle_connected`).
    pub fn handle_closed(&mut self, now: Now, closed: Closed) {
        let Link::Up(up) = &self.link else {
            if matches!(self.link, Link::Connecting { .. }) {
                self.schedule_retry(now, closed);
            }
            return;
        };
        if now.mono_ms.saturating_sub(up.since_ms) > SESSION_STABLE_MS {
            self.failures = 0;
        }
        let was_online = up.online;
        self.events.push_back(Event::SessionDown { closed });
        if was_online {
            self.effects.push_back(AgentEffect::Online(false));
        }
        self.last_sync_ms = None;
        self.schedule_retry(now, closed);
    }

    fn schedule_retry(&mut self, now: Now, closed: Closed) {
        if closed == Closed::Revoked {
            self.link = Link::Ended;
            self.effects.push_back(AgentEffect::Revoked);
            self.events.push_back(Event::Revoked);
            return;
        }
        self.failures = self.failures.saturating_add(1);
        let refused = closed == Closed::RefusedByTls;
        if refused && !self.refused {
            self.events.push_back(Event::HandshakeRefused {
                why: "the coordinator refused this agent's certificate".into(),
            });
        }
        self.refused = refused;
        if refused {
            self.refusals = self.refusals.saturating_add(1);
        }
        let floor = u64::from(self.policy.backoff_floor_ms);
        // A failed attempt that lasted at least its backoff (it waited out
        // its timeout: the coordinator unreachable) has already waited: the
        // next starts at once. A small fleet cut from its coordinator (a
        // backoff of at most 2 s against attempts of 3 s) then tries every
        // 3 s, QUIC resending the first packet within each try, and is
        // back within a second or so of a heal, instead of up to the
        // timeout plus a whole backoff later. A backoff longer than the
        // attempt (a large fleet) is waited in full after it, as before:
        // the load a large fleet's attempts put on a coordinator coming
        // back does not change.
        let attempt_started = match self.link {
            Link::Connecting { since_ms } => Some(since_ms),
            _ => None,
        };
        let busy_before = self.busy_in_a_row;
        self.busy_in_a_row = match closed {
            Closed::Busy { .. } => busy_before.saturating_add(1),
            _ => 0,
        };
        let delay = match closed {
            // Every coordinator may have refused: wait long.
            _ if refused && self.refusals >= self.coordinators => RECONNECT_DELAY_REFUSED_MS,
            // Told when: come back then, spread over its second half.
            Closed::Busy {
                retry_after_ms: Some(after),
            } => {
                // Never sooner than the policy's floor, whatever it said
                // (a retry-after of 0 must not make a dialling loop).
                let after = after.max(floor);
                (after / 2 + self.rng.next_u64() % (after / 2 + 1)).max(floor)
            }
            // Refused for load without a time: spread over what the
            // coordinator said its whole fleet needs to come back.
            Closed::Busy {
                retry_after_ms: None,
            } => {
                let spread = u64::from(self.policy.busy_spread_ms).max(floor);
                match (self.place, self.policy.handshakes_per_sec) {
                    (Some(place), rate) if rate > 0 => {
                        // Its place is too near: the one a cycle on (never
                        // a dialling loop, and never another agent's place).
                        let d = place_delay_ms(place, rate, spread, now.wall);
                        if d < floor {
                            d + spread
                        } else {
                            d
                        }
                    }
                    // No coordinator has stated a policy yet (a first
                    // contact): the fleet's size is not known, so the
                    // spread doubles with each refusal in a row, up to
                    // eight times the default, and a fleet larger than
                    // the default spread assumes comes in at the pace the
                    // coordinator admits it instead of dialing it down.
                    _ if self.policy.handshakes_per_sec == 0 => {
                        let doublings = self
                            .busy_in_a_row
                            .saturating_sub(1)
                            .min(BUSY_SPREAD_DOUBLINGS);
                        let grown = spread << doublings;
                        floor + self.rng.next_u64() % (grown - floor + 1)
                    }
                    _ => floor + self.rng.next_u64() % (spread - floor + 1),
                }
            }
            _ => {
                let delay = reconnect_delay_ms(self.failures, self.rng.next_u64(), &self.policy);
                let spent = attempt_started.map_or(0, |since| now.mono_ms.saturating_sub(since));
                if spent >= delay {
                    0
                } else {
                    delay
                }
            }
        };
        self.link = Link::Down {
            retry_ms: Some(now.mono_ms + delay),
        };
    }

    /// Packets arrived from the coordinator (keep-alives included).
    pub fn handle_heard(&mut self, now: Now) {
        if let Link::Up(up) = &mut self.link {
            up.heard_ms = now.mono_ms;
            up.unanswered_ms = None;
            if !up.online {
                up.online = true;
                self.effects.push_back(AgentEffect::Online(true));
                self.events.push_back(Event::LinkHeard);
            }
        }
    }

    /// New records are in the outbox.
    pub fn outbox_changed(&mut self) {
        if let Link::Up(up) = &mut self.link {
            up.drained = false;
            up.empty_reads = 0;
        }
        self.fill_window();
    }

    /// The answer to [`AgentEffect::ReadOutbox`]: `(sequence, record)` in order.
    pub fn handle_outbox(&mut self, now: Now, batch: Vec<(u64, RunRecord)>) {
        let Link::Up(up) = &mut self.link else { return };
        if !up.reading {
            // Not asked for (a read from a session that has ended).
            return;
        }
        up.reading = false;
        let Some((last, _)) = batch.last() else {
            up.drained = true;
            let wait = (OUTBOX_POLL_MS << up.empty_reads.min(16)).min(OUTBOX_POLL_MAX_MS);
            up.next_poll_ms = now.mono_ms + wait;
            up.empty_reads = up.empty_reads.saturating_add(1);
            return;
        };
        up.empty_reads = 0;
        up.cursor = up.cursor.max(*last);
        let batch_id = up.next_batch;
        up.next_batch += 1;
        let keys: Vec<RunKey> = batch.iter().map(|(_, r)| r.key()).collect();
        self.events.push_back(Event::ResultsSent {
            batch_id,
            runs: keys.len(),
        });
        up.in_flight.insert(batch_id, keys);
        up.sent(now);
        self.transmit.push_back(AgentMsg::Results {
            batch_id,
            runs: batch.into_iter().map(|(_, r)| r).collect(),
        });
        self.fill_window();
    }

    fn fill_window(&mut self) {
        let Link::Up(up) = &mut self.link else { return };
        if !up.reading && !up.drained && up.in_flight.len() < BATCHES_IN_FLIGHT_MAX {
            up.reading = true;
            self.effects.push_back(AgentEffect::ReadOutbox {
                after: up.cursor,
                runs_max: BATCH_RUNS_MAX,
                bytes_max: BATCH_BYTES_MAX,
            });
        }
    }

    pub fn handle_message(&mut self, now: Now, msg: CoordMsg) {
        self.handle_heard(now);
        let Link::Up(up) = &mut self.link else { return };
        match msg {
            CoordMsg::Assignments {
                changes,
                upto_revision,
                ..
            } => {
                self.events.push_back(Event::AssignmentsApplied {
                    changes: changes.len(),
                    upto_revision,
                });
                self.effects.push_back(AgentEffect::Apply {
                    changes,
                    upto_revision,
                });
                // Told at once (after the changes are applied, as effects
                // are carried out in order): the coordinator measures how
                // long a change took to reach this agent.
                if let Some(r) = up.report.as_mut().filter(|r| !r.asking) {
                    r.asking = true;
                    self.effects.push_back(AgentEffect::Report);
                }
            }
            CoordMsg::Module {
                hash,
                size,
                offset,
                chunk,
            } => {
                // An agent that does not run functions takes no modules:
                // its runs of them are recorded rejected.
                let Some(max) = up.module_max else { return };
                let piece = match up.module.as_mut() {
                    Some(a) if offset > 0 && a.hash == hash && a.size == size => {
                        a.add(offset, &chunk)
                    }
                    _ => sundial_protocol::wasm::Assembly::start(hash, size, max)
                        .map(|a| up.module.insert(Box::new(a)))
                        .and_then(|a| a.add(offset, &chunk)),
                };
                match piece {
                    Ok(None) => {}
                    Ok(Some(bytes)) => {
                        up.module = None;
                        self.events.push_back(Event::ModuleReceived { hash, size });
                        self.effects
                            .push_back(AgentEffect::StoreModule { hash, bytes });
                    }
                    Err(why) => {
                        up.module = None;
                        self.events.push_back(Event::ModuleRefused { why });
                    }
                }
            }
            CoordMsg::ResultsAck { batch_id, keys } => {
                // Only what the coordinator says it stored is deleted; an
                // acknowledgement for an unknown batch deletes by its keys
                // too (they are stored), but frees no window slot.
                up.in_flight.remove(&batch_id);
                if let Some(r) = up.report.as_mut() {
                    if up.in_flight.is_empty() && r.last.as_ref().is_some_and(|l| l.outbox_len > 0)
                    {
                        r.next_ms = r.next_ms.min(now.mono_ms + REPORT_AFTER_DRAIN_MS);
                    }
                }
                self.events.push_back(Event::ResultsAcked {
                    batch_id,
                    runs: keys.len(),
                });
                self.effects.push_back(AgentEffect::Ack { keys });
                if self
                    .last_sync_ms
                    .is_some_and(|t| now.mono_ms >= t + LAST_SYNC_ACK_PERSIST_MS)
                {
                    self.last_sync_ms = Some(now.mono_ms);
                    self.effects
                        .push_back(AgentEffect::PersistLastSync { wall: now.wall });
                }
                self.fill_window();
            }
            CoordMsg::ClockReply { t1, t2, t3 } => {
                let t4 = now.wall.as_millis();
                let (t1, t2, t3) = (t1.as_millis(), t2.as_millis(), t3.as_millis());
                let offset_ms = ((t2 - t1) + (t3 - t4)) / 2;
                let rtt_ms = (t4 - t1) - (t3 - t2);
                self.transmit
                    .push_back(AgentMsg::ClockReport { offset_ms, rtt_ms });
                // The true offset lies within half the round trip of the
                // estimate; the lower end never makes the agent early (it
                // is late by at most the round trip). A sample that sat in
                // a stalled link is not used at all.
                if (0..=CLOCK_FIRST_SAMPLE_RTT_MAX_MS).contains(&rtt_ms) {
                    // The node takes a slow sample only as the first of a
                    // boot (better than an unvouched wall clock).
                    self.effects.push_back(AgentEffect::Clock {
                        offset_ms: offset_ms - (rtt_ms + 1) / 2,
                        rtt_ms,
                    });
                }
                if !(0..=CLOCK_SAMPLE_RTT_MAX_MS).contains(&rtt_ms) {
                    // Unusable (a stalled link, or the wall clock stepped
                    // between probe and reply): ask again soon.
                    up.next_probe_ms = up.next_probe_ms.min(now.mono_ms + CLOCK_PROBE_RETRY_MS);
                }
            }
            CoordMsg::Refused { reason } => {
                self.events
                    .push_back(Event::HandshakeRefused { why: reason });
                self.effects.push_back(AgentEffect::Disconnect);
            }
            CoordMsg::RunNow { task_id, at } => {
                self.effects.push_back(AgentEffect::RunNow { task_id, at });
            }
            CoordMsg::Policy(p) => {
                self.policy = p.sanitized();
                up.timing = self.policy.link.0;
                if up.timing.is_some() {
                    // The coordinator keeps the link alive: the probe the
                    // session began with is the clock's, not a keep-alive.
                    up.next_probe_ms = up.next_probe_ms.max(up.since_ms + CLOCK_PROBE_INTERVAL_MS);
                }
                self.events.push_back(Event::ReconnectPolicy(self.policy));
            }
            CoordMsg::ReportEvery { every_ms } => {
                let every_ms = u64::from(every_ms.clamp(REPORT_EVERY_MS_MIN, REPORT_EVERY_MS_MAX));
                let asking = up.report.as_ref().is_some_and(|r| r.asking);
                up.report = Some(Reporting {
                    every_ms,
                    next_ms: now.mono_ms,
                    asking: true,
                    last: None,
                });
                if !asking {
                    self.effects.push_back(AgentEffect::Report);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::fixtures::at;

    fn record(n: i64) -> RunRecord {
        crate::session::fixtures::record(1, 1, n)
    }

    fn drain(s: &mut AgentSession) -> (Vec<AgentMsg>, Vec<AgentEffect>) {
        let mut m = Vec::new();
        let mut e = Vec::new();
        while let Some(x) = s.poll_transmit() {
            m.push(x);
        }
        while let Some(x) = s.poll_effect() {
            e.push(x);
        }
        (m, e)
    }

    fn hello() -> HelloInfo {
        HelloInfo {
            last_revision: 7,
            outbox_len: 2,
            agent_version: "t".into(),
            allow_exec: vec!["x".repeat(1000); 100],
            seal_key: None,
            functions: None,
            allow_env: vec!["E".repeat(1000); 100],
        }
    }

    #[test]
    fn dials_says_hello_and_sends_the_outbox_only_acked_records_leave() {
        let mut s = AgentSession::new(1);
        assert_eq!(s.poll_timeout(), Some(0));
        s.handle_timeout(at(0));
        assert_eq!(
            drain(&mut s).1,
            vec![AgentEffect::Connect {
                timeout_ms: u64::from(default_policy().attempt_timeout_ms)
            }]
        );
        s.handle_connected(at(10), hello());
        let (msgs, effects) = drain(&mut s);
        let AgentMsg::Hello { allow_exec, .. } = &msgs[0] else {
            panic!("Hello first: {msgs:?}")
        };
        assert_eq!(allow_exec.len(), HELLO_PATTERNS_MAX);
        assert!(allow_exec
            .iter()
            .all(|p| p.len() == HELLO_PATTERN_BYTES_MAX && p.ends_with('…')));
        assert!(matches!(msgs[1], AgentMsg::ClockProbe { .. }));
        assert!(effects.contains(&AgentEffect::ReadOutbox {
            after: 0,
            runs_max: BATCH_RUNS_MAX,
            bytes_max: BATCH_BYTES_MAX
        }));
        s.handle_outbox(at(11), vec![(3, record(1)), (4, record(2))]);
        let (msgs, effects) = drain(&mut s);
        assert!(matches!(&msgs[0], AgentMsg::Results { batch_id: 1, runs } if runs.len() == 2));
        assert_eq!(
            effects,
            vec![AgentEffect::ReadOutbox {
                after: 4,
                runs_max: BATCH_RUNS_MAX,
                bytes_max: BATCH_BYTES_MAX
            }]
        );
        s.handle_outbox(at(12), vec![]);
        assert_eq!(s.in_flight(), 1);
        // Lost before the ack: nothing deleted; the next session resends from 0.
        s.handle_closed(at(13), Closed::Lost);
        let (_, effects) = drain(&mut s);
        assert!(!effects.iter().any(|e| matches!(e, AgentEffect::Ack { .. })));
        let retry = s.poll_timeout().expect("a retry");
        assert!((13 + RECONNECT_DELAY_MIN_MS..=13 + 2 * RECONNECT_DELAY_MIN_MS).contains(&retry));
        s.handle_timeout(at(retry));
        s.handle_connected(at(retry + 1), hello());
        let (_, effects) = drain(&mut s);
        assert!(effects.contains(&AgentEffect::ReadOutbox {
            after: 0,
            runs_max: BATCH_RUNS_MAX,
            bytes_max: BATCH_BYTES_MAX
        }));
        s.handle_outbox(at(retry + 2), vec![(3, record(1))]);
        drain(&mut s);
        s.handle_message(
            at(retry + 3),
            CoordMsg::ResultsAck {
                batch_id: 1,
                keys: vec![record(1).key()],
            },
        );
        let (_, effects) = drain(&mut s);
        assert_eq!(
            effects[0],
            AgentEffect::Ack {
                keys: vec![record(1).key()]
            }
        );
    }

    #[test]
    fn an_idle_outbox_is_looked_at_less_often_and_a_notification_reads_it_at_once() {
        let mut s = up_with(Some(LinkTiming {
            keep_alive_ms: 30_000,
            silent_ms: 45_000,
            idle_ms: 90_000,
        }));
        // Each empty read waits twice as long for the next, up to the cap.
        let read = |e: &[AgentEffect]| {
            e.iter()
                .any(|e| matches!(e, AgentEffect::ReadOutbox { .. }))
        };
        let mut reads = Vec::new();
        let mut t = 0;
        while t < 200_000 {
            let (next, _, effects) = heard_step(&mut s, t);
            if read(&effects) {
                reads.push(next);
            }
            t = next;
        }
        let gaps: Vec<u64> = reads.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.len() >= 6, "{reads:?}");
        assert_eq!(&gaps[..4], &[1_000, 2_000, 4_000, 8_000], "{reads:?}");
        assert!(gaps.iter().all(|g| *g <= OUTBOX_POLL_MAX_MS), "{gaps:?}");
        assert!(
            gaps.ends_with(&[OUTBOX_POLL_MAX_MS, OUTBOX_POLL_MAX_MS]),
            "{gaps:?}"
        );
        // A new record is read at once, and the polls start short again.
        s.outbox_changed();
        let (_, effects) = drain(&mut s);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, AgentEffect::ReadOutbox { .. })),
            "{effects:?}"
        );
        let notified = t;
        s.handle_outbox(at(notified), vec![]);
        let read_at = loop {
            let (next, _, effects) = heard_step(&mut s, t);
            t = next;
            if read(&effects) {
                break t;
            }
        };
        assert_eq!(read_at, notified + OUTBOX_POLL_MS);
    }

    #[test]
    fn clock_samples_are_spaced_with_the_fleets_keep_alives_within_bounds() {
        let probes_until = |timing: LinkTiming, until: u64| {
            let mut s = up_with(Some(timing));
            let mut sent = Vec::new();
            let mut t = 0;
            loop {
                let (next, msgs, _) = heard_step(&mut s, t);
                if next > until {
                    break;
                }
                if msgs
                    .iter()
                    .any(|m| matches!(m, AgentMsg::ClockProbe { .. }))
                {
                    sent.push(next);
                }
                t = next;
            }
            sent.windows(2).map(|w| w[1] - w[0]).collect::<Vec<u64>>()
        };
        // The coordinator's timing for fleets of these sizes.
        let fleet = crate::coord::link_for_fleet;
        for (agents, every, until) in [
            (3_000, CLOCK_PROBE_INTERVAL_MS, 200_000),
            (50_000, 60_000, 400_000),
            (100_000, CLOCK_PROBE_INTERVAL_MAX_MS, 600_000),
        ] {
            let gaps = probes_until(fleet(agents), until);
            assert!(
                gaps.len() >= 2 && gaps.iter().all(|g| *g == every),
                "{agents} agents: {gaps:?}"
            );
        }
    }

    #[test]
    fn the_window_bounds_unacknowledged_batches() {
        let mut s = AgentSession::new(2);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        let mut reads = 0;
        let mut seq = 0;
        // An outbox that never runs dry: every read asked for is answered.
        loop {
            let (_, effects) = drain(&mut s);
            let asked = effects
                .iter()
                .filter(|e| matches!(e, AgentEffect::ReadOutbox { .. }))
                .count();
            if asked == 0 {
                break;
            }
            reads += asked;
            seq += 1;
            s.handle_outbox(at(1), vec![(seq, record(seq as i64))]);
        }
        assert_eq!(s.in_flight(), BATCHES_IN_FLIGHT_MAX);
        assert_eq!(reads, BATCHES_IN_FLIGHT_MAX, "no read beyond the window");
        s.handle_message(
            at(2),
            CoordMsg::ResultsAck {
                batch_id: 1,
                keys: vec![record(1).key()],
            },
        );
        let (_, effects) = drain(&mut s);
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, AgentEffect::ReadOutbox { .. })),
            "an acknowledgement opens the window again"
        );
    }

    #[test]
    fn clock_samples_count_at_their_low_end_and_slow_ones_not_at_all() {
        let mut s = AgentSession::new(5);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        drain(&mut s);
        let ts = |ms: i64| Timestamp::from_millis_saturating(ms);
        // Sent at agent wall 1000, the coordinator read 6000 and replied at
        // once, received at agent wall 1100: offset 4950 ± 50.
        let reply = |t4: i64| Now {
            mono_ms: 1,
            wall: ts(t4),
        };
        s.handle_message(
            reply(1_100),
            CoordMsg::ClockReply {
                t1: ts(1_000),
                t2: ts(6_000),
                t3: ts(6_000),
            },
        );
        let (msgs, effects) = drain(&mut s);
        assert!(effects.contains(&AgentEffect::Clock {
            offset_ms: 4_900,
            rtt_ms: 100
        }));
        assert!(msgs.contains(&AgentMsg::ClockReport {
            offset_ms: 4_950,
            rtt_ms: 100
        }));
        // A reply that sat 5 s in a stalled link goes to the node with its
        // round trip (taken only as a boot's first vouching there).
        s.handle_message(
            reply(6_000),
            CoordMsg::ClockReply {
                t1: ts(1_000),
                t2: ts(6_000),
                t3: ts(6_000),
            },
        );
        let (_, effects) = drain(&mut s);
        assert!(effects
            .iter()
            .any(|e| matches!(e, AgentEffect::Clock { rtt_ms: 5_000, .. })));
        // One that sat 20 s is reported, not used at all.
        s.handle_message(
            reply(21_000),
            CoordMsg::ClockReply {
                t1: ts(1_000),
                t2: ts(21_000),
                t3: ts(21_000),
            },
        );
        let (_, effects) = drain(&mut s);
        assert!(!effects
            .iter()
            .any(|e| matches!(e, AgentEffect::Clock { .. })));
    }

    #[test]
    fn silence_marks_offline_and_a_packet_online_again() {
        let mut s = AgentSession::new(3);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        s.handle_outbox(at(0), vec![]);
        drain(&mut s);
        let t = s.poll_timeout().expect("a timeout");
        assert!(t <= LINK_SILENT_MAX_MS + 1);
        s.handle_timeout(at(LINK_SILENT_MAX_MS + 1));
        assert!(drain(&mut s).1.contains(&AgentEffect::Online(false)));
        s.handle_heard(at(LINK_SILENT_MAX_MS + 2));
        assert!(drain(&mut s).1.contains(&AgentEffect::Online(true)));
    }

    /// A session up whose coordinator stated `timing` (or none).
    fn up_with(timing: Option<LinkTiming>) -> AgentSession {
        let mut s = AgentSession::new(3);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        s.handle_message(
            at(0),
            CoordMsg::Policy(ReconnectPolicy {
                link: timing.into(),
                ..ReconnectPolicy::default()
            }),
        );
        s.handle_outbox(at(0), vec![]);
        drain(&mut s);
        s
    }

    /// Runs the session's timeouts up to `until`, hearing nothing.
    fn quiet_until(s: &mut AgentSession, until: u64) -> (Vec<AgentMsg>, Vec<AgentEffect>) {
        let (mut msgs, mut effects) = (Vec::new(), Vec::new());
        while let Some(t) = s.poll_timeout().filter(|t| *t <= until) {
            s.handle_timeout(at(t));
            let (m, e) = drain(s);
            msgs.extend(m);
            effects.extend(e);
        }
        (msgs, effects)
    }

    /// Hears the coordinator at `t` (its keep-alives), then runs the
    /// session's next timeout; returns when that was and what it sent and
    /// asked for, an outbox read answered as empty.
    fn heard_step(s: &mut AgentSession, t: u64) -> (u64, Vec<AgentMsg>, Vec<AgentEffect>) {
        s.handle_heard(at(t));
        let next = s.poll_timeout().expect("a timer while up").max(t);
        s.handle_timeout(at(next));
        let (msgs, effects) = drain(s);
        if effects
            .iter()
            .any(|e| matches!(e, AgentEffect::ReadOutbox { .. }))
        {
            s.handle_outbox(at(next), vec![]);
        }
        (next, msgs, effects)
    }

    #[test]
    fn a_large_fleets_link_is_silent_only_after_its_own_interval_or_an_unanswered_message() {
        let timing = LinkTiming {
            keep_alive_ms: 10_000,
            silent_ms: 15_000,
            idle_ms: 30_000,
        };
        let mut s = up_with(Some(timing));
        // Quiet between the coordinator's keep-alives is not silence.
        let (msgs, effects) = quiet_until(&mut s, 14_000);
        assert!(
            !effects.contains(&AgentEffect::Online(false)),
            "{effects:?}"
        );
        assert!(msgs.is_empty(), "the agent sends no keep-alives: {msgs:?}");
        s.handle_heard(at(14_000));
        let (_, effects) = quiet_until(&mut s, 14_000 + 15_001);
        assert!(effects.contains(&AgentEffect::Online(false)));

        // A record sent and not answered within 2.5 s: silent at once,
        // however long the keep-alive interval.
        let mut s = up_with(Some(timing));
        s.handle_heard(at(1_000));
        s.outbox_changed();
        drain(&mut s);
        s.handle_outbox(at(2_000), vec![(1, record(1))]);
        drain(&mut s);
        let (_, effects) = quiet_until(&mut s, 2_000 + LINK_SILENT_MAX_MS);
        assert!(!effects.contains(&AgentEffect::Online(false)));
        let (_, effects) = quiet_until(&mut s, 2_000 + LINK_SILENT_MAX_MS + 1);
        assert!(effects.contains(&AgentEffect::Online(false)), "{effects:?}");

        // Answered in time: not silent.
        let mut s = up_with(Some(timing));
        s.outbox_changed();
        drain(&mut s);
        s.handle_outbox(at(2_000), vec![(1, record(1))]);
        s.handle_heard(at(2_040));
        let (_, effects) = quiet_until(&mut s, 14_000);
        assert!(
            !effects.contains(&AgentEffect::Online(false)),
            "{effects:?}"
        );
    }

    #[test]
    fn silence_for_the_idle_timeout_ends_the_connection_whatever_quic_measured() {
        for (timing, idle) in [
            (
                Some(LinkTiming {
                    keep_alive_ms: 10_000,
                    silent_ms: 15_000,
                    idle_ms: 30_000,
                }),
                30_000,
            ),
            (None, IDLE_FALLBACK_MS),
        ] {
            let mut s = up_with(timing);
            s.handle_heard(at(1_000));
            let (_, effects) = quiet_until(&mut s, 1_000 + idle);
            assert!(!effects.contains(&AgentEffect::Disconnect), "{effects:?}");
            let (_, effects) = quiet_until(&mut s, 1_000 + idle + 1);
            assert!(effects.contains(&AgentEffect::Disconnect), "{effects:?}");
        }
    }

    #[test]
    fn a_coordinator_without_keep_alives_is_probed_every_second() {
        let mut s = up_with(None);
        let (msgs, _) = quiet_until(&mut s, 2_000);
        let probes = msgs
            .iter()
            .filter(|m| matches!(m, AgentMsg::ClockProbe { .. }))
            .count();
        assert_eq!(probes, 2, "{msgs:?}");
        // With keep-alives from the coordinator, probes are the clock's own.
        let mut s = up_with(Some(sundial_protocol::wire::LinkTiming {
            keep_alive_ms: 1_000,
            silent_ms: 2_500,
            idle_ms: 5_000,
        }));
        s.handle_heard(at(1_500));
        let (msgs, _) = quiet_until(&mut s, 2_000);
        assert!(msgs.is_empty(), "{msgs:?}");
    }

    #[test]
    fn a_fleet_refused_for_load_comes_back_at_the_budgets_rate_each_in_its_place() {
        // 2,000 agents refused within the same second; budget 100/s: the
        // fleet needs 20 s.
        let rate = 100u32;
        let policy = ReconnectPolicy {
            handshakes_per_sec: rate,
            busy_spread_ms: 20_000,
            ..ReconnectPolicy::default()
        };
        let mut per_tenth = std::collections::BTreeMap::<u64, u32>::new();
        let mut latest = 0;
        for place in 1..=2_000u64 {
            let mut s = AgentSession::new(place);
            s.set_place(place);
            s.handle_timeout(at(0));
            s.handle_connected(at(0), hello());
            s.handle_message(at(0), CoordMsg::Policy(policy));
            s.handle_closed(at(0), Closed::Lost);
            let refused_at = 1_000 + (place * 7_919) % 1_000;
            s.handle_timeout(at(refused_at));
            s.handle_connect_failed(
                at(refused_at),
                Closed::Busy {
                    retry_after_ms: None,
                },
            );
            let back = s.poll_timeout().expect("comes back");
            // `at` reads the same on the wall clock.
            *per_tenth.entry(back / 100).or_default() += 1;
            latest = latest.max(back);
        }
        assert!(
            per_tenth.values().all(|n| *n <= rate / 10 + 1),
            "at most the budget in any tenth of a second: {per_tenth:?}"
        );
        // Within the spread, or a cycle on for those whose place came
        // sooner than the backoff floor.
        let floor = u64::from(policy.sanitized().backoff_floor_ms);
        assert!(
            latest <= 2_000 + 20_000 + floor,
            "all back within the spread: {latest}"
        );
    }

    #[test]
    fn with_several_coordinators_the_long_wait_comes_only_once_each_may_have_refused() {
        // A coordinator that has not yet read a certificate enrolled
        // through another refuses it for a moment: the next is tried soon.
        let mut s = AgentSession::new(11);
        s.set_coordinators(3);
        let mut t = 0;
        for n in 1..=3 {
            s.handle_timeout(at(t));
            s.handle_connect_failed(at(t), Closed::RefusedByTls);
            let wait = s.poll_timeout().expect("retry") - t;
            if n < 3 {
                assert!(wait < RECONNECT_DELAY_REFUSED_MS, "refusal {n}: {wait}");
            } else {
                assert_eq!(wait, RECONNECT_DELAY_REFUSED_MS);
            }
            t += wait;
        }
    }

    #[test]
    fn backoff_grows_to_its_cap_resets_after_a_stable_session_and_revocation_ends_it() {
        let mut s = AgentSession::new(4);
        let mut t = 0;
        let mut last = 0;
        for _ in 0..12 {
            s.handle_timeout(at(t));
            s.handle_connect_failed(at(t), Closed::Lost);
            let next = s.poll_timeout().expect("retry");
            last = next - t;
            assert!(last <= RECONNECT_DELAY_MAX_MS);
            t = next;
        }
        assert!(last >= RECONNECT_DELAY_MAX_MS / 2);
        s.handle_timeout(at(t));
        s.handle_connect_failed(at(t), Closed::RefusedByTls);
        assert_eq!(s.poll_timeout(), Some(t + RECONNECT_DELAY_REFUSED_MS));
        t += RECONNECT_DELAY_REFUSED_MS;
        s.handle_timeout(at(t));
        s.handle_connected(at(t), hello());
        s.handle_closed(at(t + SESSION_STABLE_MS + 1), Closed::Lost);
        let next = s.poll_timeout().expect("retry");
        assert!(next - (t + SESSION_STABLE_MS + 1) <= 2 * RECONNECT_DELAY_MIN_MS);
        s.handle_timeout(at(next));
        s.handle_connected(at(next), hello());
        drain(&mut s);
        s.handle_closed(at(next + 1), Closed::Revoked);
        assert!(drain(&mut s).1.contains(&AgentEffect::Revoked));
        assert!(s.is_ended());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn refused_for_load_before_any_policy_an_agent_waits_longer_each_time_in_a_row() {
        // The first contact: no coordinator has said how large its fleet
        // is. Each refusal in a row doubles the spread (10 s, 20 s, 40 s,
        // then 80 s at most); a session or another failure starts over.
        let mut firsts = Vec::new();
        let mut fourths = Vec::new();
        for seed in 0..100 {
            let mut s = AgentSession::new(seed);
            let mut t = 0;
            for k in 0..6 {
                s.handle_timeout(at(t));
                assert!(matches!(
                    drain(&mut s).1.as_slice(),
                    [AgentEffect::Connect { .. }]
                ));
                s.handle_connect_failed(
                    at(t),
                    Closed::Busy {
                        retry_after_ms: None,
                    },
                );
                let wait = s.poll_timeout().expect("retry") - t;
                let cap = 10_000u64 << k.min(BUSY_SPREAD_DOUBLINGS);
                assert!(
                    (RECONNECT_DELAY_MIN_MS..=cap).contains(&wait),
                    "refusal {k}: {wait} ms"
                );
                match k {
                    0 => firsts.push(wait),
                    3 => fourths.push(wait),
                    _ => {}
                }
                t += wait;
            }
            // Lost (not refused): the next refusal is a first one again.
            s.handle_timeout(at(t));
            drain(&mut s);
            s.handle_connect_failed(at(t), Closed::Lost);
            t = s.poll_timeout().expect("retry");
            s.handle_timeout(at(t));
            drain(&mut s);
            s.handle_connect_failed(
                at(t),
                Closed::Busy {
                    retry_after_ms: None,
                },
            );
            assert!(s.poll_timeout().expect("retry") - t <= 10_000);
        }
        assert!(firsts.iter().all(|w| *w <= 10_000));
        assert!(
            fourths.iter().any(|w| *w > 40_000),
            "the spread grew: {fourths:?}"
        );
    }

    #[test]
    fn an_attempt_that_outlasted_its_backoff_is_followed_at_once() {
        // The policy of a small fleet: attempts of 3 s, backoff up to 2 s.
        let policy = ReconnectPolicy {
            attempt_timeout_ms: 3_000,
            backoff_floor_ms: 250,
            backoff_cap_ms: 2_000,
            busy_spread_ms: 2_000,
            handshakes_per_sec: 500,
            link: None.into(),
        };
        let mut s = AgentSession::new(21);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        s.handle_message(at(1), CoordMsg::Policy(policy));
        let mut t = 10;
        s.handle_closed(at(t), Closed::Lost);
        drain(&mut s);
        // Cut: every attempt waits out its timeout. Each next attempt
        // starts as that one gives up (its backoff, at most 2 s, already
        // passed), so the coordinator hears an Initial at least every 3 s.
        for k in 0..8 {
            let start = s.poll_timeout().expect("retry");
            assert!(start >= t, "attempt {k}: dials before it is due");
            s.handle_timeout(at(start));
            assert_eq!(
                drain(&mut s).1,
                vec![AgentEffect::Connect { timeout_ms: 3_000 }]
            );
            t = start + 3_000;
            s.handle_connect_failed(at(t), Closed::Lost);
            if k > 0 {
                assert_eq!(s.poll_timeout(), Some(t), "attempt {k}: not at once");
            }
        }
        // An attempt that fails at once still waits its whole backoff: no
        // dialling loop.
        let start = s.poll_timeout().expect("retry");
        s.handle_timeout(at(start));
        drain(&mut s);
        s.handle_connect_failed(at(start + 5), Closed::Lost);
        let wait = s.poll_timeout().expect("retry") - start;
        assert!((1_000..=2_000).contains(&wait), "{wait}");
        // A large fleet's backoff (10 to 20 s once grown) is longer than
        // the attempt: it is waited in full after each attempt.
        let mut s = AgentSession::new(22);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        let policy = ReconnectPolicy {
            backoff_cap_ms: 20_000,
            ..policy
        };
        s.handle_message(at(1), CoordMsg::Policy(policy));
        s.handle_closed(at(10), Closed::Lost);
        drain(&mut s);
        let mut starts = Vec::new();
        for _ in 0..12 {
            let start = s.poll_timeout().expect("retry");
            s.handle_timeout(at(start));
            drain(&mut s);
            s.handle_connect_failed(at(start + 3_000), Closed::Lost);
            starts.push(start);
        }
        let gaps: Vec<u64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g <= 3_000 + 20_000), "{gaps:?}");
        assert!(gaps[6..].iter().all(|g| *g >= 3_000 + 10_000), "{gaps:?}");
    }

    #[test]
    fn the_coordinators_policy_sets_attempts_backoff_and_busy_waits_clamped() {
        let mut s = AgentSession::new(9);
        s.handle_timeout(at(0));
        s.handle_connected(at(0), hello());
        drain(&mut s);
        let policy = ReconnectPolicy {
            attempt_timeout_ms: 2_000,
            backoff_floor_ms: 300,
            backoff_cap_ms: 4_000,
            busy_spread_ms: 20_000,
            handshakes_per_sec: 500,
            link: None.into(),
        };
        s.handle_message(at(1), CoordMsg::Policy(policy));
        assert_eq!(s.policy(), policy);
        // Lost: backoff under the stated cap; each attempt with its timeout.
        let mut t = 10;
        s.handle_closed(at(t), Closed::Lost);
        drain(&mut s);
        for _ in 0..10 {
            let next = s.poll_timeout().expect("retry");
            assert!(next - t <= 4_000, "{} over the cap", next - t);
            t = next;
            s.handle_timeout(at(t));
            assert_eq!(
                drain(&mut s).1,
                vec![AgentEffect::Connect { timeout_ms: 2_000 }]
            );
            s.handle_connect_failed(at(t), Closed::Lost);
        }
        // Busy with a retry-after: back in its second half.
        t = s.poll_timeout().expect("retry");
        let mut waits = Vec::new();
        for _ in 0..50 {
            s.handle_timeout(at(t));
            s.handle_connect_failed(
                at(t),
                Closed::Busy {
                    retry_after_ms: Some(8_000),
                },
            );
            let next = s.poll_timeout().expect("retry");
            waits.push(next - t);
            t = next;
        }
        assert!(
            waits.iter().all(|w| (4_000..=8_000).contains(w)),
            "{waits:?}"
        );
        // Busy without one: spread from the floor over the stated span.
        let mut waits = Vec::new();
        for _ in 0..200 {
            s.handle_timeout(at(t));
            s.handle_connect_failed(
                at(t),
                Closed::Busy {
                    retry_after_ms: None,
                },
            );
            let next = s.poll_timeout().expect("retry");
            waits.push(next - t);
            t = next;
        }
        assert!(
            waits.iter().all(|w| (300..=20_000).contains(w)),
            "{waits:?}"
        );
        assert!(waits.iter().any(|w| *w < 5_000) && waits.iter().any(|w| *w > 15_000));
        // A hostile policy is clamped: no tight loop, no endless wait.
        s.handle_timeout(at(t));
        s.handle_connected(at(t), hello());
        s.handle_message(
            at(t),
            CoordMsg::Policy(ReconnectPolicy {
                attempt_timeout_ms: 0,
                backoff_floor_ms: 0,
                backoff_cap_ms: u32::MAX,
                busy_spread_ms: 0,
                handshakes_per_sec: 0,
                link: Some(LinkTiming {
                    keep_alive_ms: 0,
                    silent_ms: 0,
                    idle_ms: u32::MAX,
                })
                .into(),
            }),
        );
        let p = s.policy();
        let link = p.link.0.expect("kept");
        assert!(link.keep_alive_ms >= 1_000 && link.idle_ms <= 120_000);
        assert!(p.attempt_timeout_ms >= 1_000 && p.backoff_floor_ms >= 100);
        assert!(p.backoff_cap_ms <= 600_000 && p.busy_spread_ms >= 1_000);
    }

    #[test]
    fn the_largest_hello_fits_its_frame_also_in_four_byte_characters() {
        for ch in ["x", "é", "€", "𝄞"] {
            let mut s = AgentSession::new(1);
            s.handle_timeout(at(0));
            drain(&mut s);
            let info = HelloInfo {
                allow_exec: vec![ch.repeat(1_000); 100],
                allow_env: vec![ch.repeat(1_000); 100],
                seal_key: None,
                agent_version: ch.repeat(1_000),
                ..hello()
            };
            s.handle_connected(at(10), info);
            let (msgs, _) = drain(&mut s);
            let frame = sundial_protocol::codec::encode(&msgs[0]).expect("encodes");
            assert!(
                frame.len() <= sundial_protocol::wire::HELLO_FRAME_BYTES_MAX,
                "{ch}: a Hello of {} bytes",
                frame.len()
            );
            let AgentMsg::Hello { allow_exec, .. } = &msgs[0] else {
                panic!("Hello first")
            };
            assert!(allow_exec.iter().all(|p| p.ends_with('…')), "{ch}");
        }
    }

    #[test]
    fn a_busy_retry_after_of_zero_waits_the_floor() {
        let mut s = AgentSession::new(7);
        for _ in 0..50 {
            s.handle_timeout(at(0));
            drain(&mut s);
            s.handle_connect_failed(
                at(0),
                Closed::Busy {
                    retry_after_ms: Some(0),
                },
            );
            let wake = s.poll_timeout().expect("a retry is planned");
            assert!(
                wake >= u64::from(default_policy().backoff_floor_ms),
                "dials again after {wake} ms"
            );
        }
    }

    #[test]
    fn reports_go_when_asked_when_changed_and_at_once_after_assignments() {
        let mut s = AgentSession::new(1);
        s.handle_timeout(at(0));
        s.handle_connected(at(10), hello());
        drain(&mut s);
        // Not asked: no report.
        assert!(!drain(&mut s).1.contains(&AgentEffect::Report));
        s.handle_message(at(20), CoordMsg::ReportEvery { every_ms: 0 });
        assert!(drain(&mut s).1.contains(&AgentEffect::Report));
        let report = AgentReport {
            outbox_len: 2,
            ..AgentReport::default()
        };
        s.handle_report(at(21), report.clone());
        assert_eq!(drain(&mut s).0, vec![AgentMsg::Report(report.clone())]);
        // Clamped to a second: the next ask is not before then.
        let due = s.poll_timeout().expect("a timeout");
        assert!(due <= 21 + u64::from(REPORT_EVERY_MS_MIN));
        s.handle_timeout(at(500));
        assert!(!drain(&mut s).1.contains(&AgentEffect::Report));
        s.handle_timeout(at(21 + u64::from(REPORT_EVERY_MS_MIN)));
        assert!(drain(&mut s).1.contains(&AgentEffect::Report));
        // Unchanged: nothing sent.
        s.handle_report(at(1_100), report.clone());
        assert!(drain(&mut s).0.is_empty());
        // Assignments: applied first, then reported, without waiting.
        s.handle_message(
            at(1_200),
            CoordMsg::Assignments {
                snapshot: false,
                changes: Vec::new(),
                upto_revision: 9,
            },
        );
        let effects = drain(&mut s).1;
        let apply = effects
            .iter()
            .position(|e| matches!(e, AgentEffect::Apply { .. }));
        let ask = effects.iter().position(|e| *e == AgentEffect::Report);
        assert!(apply.is_some() && ask > apply, "{effects:?}");
        let applied = AgentReport {
            applied_revision: 9,
            ..report
        };
        s.handle_report(at(1_201), applied.clone());
        assert_eq!(drain(&mut s).0, vec![AgentMsg::Report(applied)]);
        // The last batch acknowledged after a report with a backlog: the
        // next report comes soon, not at the interval.
        s.handle_outbox(at(1_210), vec![(1, record(1))]);
        drain(&mut s);
        s.handle_message(
            at(1_220),
            CoordMsg::ResultsAck {
                batch_id: 1,
                keys: vec![record(1).key()],
            },
        );
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(1_220 + REPORT_AFTER_DRAIN_MS));
        // A new session is not asked until its coordinator asks.
        s.handle_closed(at(1_300), Closed::Lost);
        let retry = s.poll_timeout().expect("retry");
        s.handle_timeout(at(retry));
        s.handle_connected(at(retry + 1), hello());
        s.handle_timeout(at(retry + 100_000));
        assert!(!drain(&mut s).1.contains(&AgentEffect::Report));
    }

    #[test]
    fn an_acknowledgement_persists_the_last_sync_at_most_every_thirty_seconds() {
        let mut s = AgentSession::new(1);
        s.handle_timeout(at(0));
        s.handle_connected(at(10), hello());
        assert!(drain(&mut s)
            .1
            .iter()
            .any(|e| matches!(e, AgentEffect::PersistLastSync { .. })));
        let ack = |s: &mut AgentSession, t: u64| {
            s.handle_message(
                at(t),
                CoordMsg::ResultsAck {
                    batch_id: 1,
                    keys: vec![record(1).key()],
                },
            );
            drain(s)
                .1
                .iter()
                .any(|e| matches!(e, AgentEffect::PersistLastSync { .. }))
        };
        assert!(!ack(&mut s, 1_000), "persisted again within 30 s");
        assert!(
            ack(&mut s, 10 + LAST_SYNC_ACK_PERSIST_MS),
            "records synced: persisted"
        );
        assert!(!ack(&mut s, 20 + LAST_SYNC_ACK_PERSIST_MS));
    }
}
