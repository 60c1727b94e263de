-- Sundial coordinator store, schema version 1.
--
-- Applied by `sundial-coordinator migrate` (and on every start) inside one
-- transaction that holds a transaction-scoped advisory lock, so two
-- coordinators starting at once apply it once. Keys and what queries filter
-- on are columns; a task's spec and a run's full record are the versioned
-- records the embedded store keeps too (one version byte, then postcard).

-- Counters, one row each. Every task change updates `revision` first and
-- holds its row lock to the commit, so task changes commit in revision
-- order and a reader that sees revision R sees every change up to R.
-- `cert_seq` does the same for certificates added and revoked.
CREATE TABLE sundial_counters (
    name  text   PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO sundial_counters (name, value) VALUES
    ('revision', 0), ('next_task', 1), ('next_agent', 1),
    ('lost_ids_from', 0), ('cert_seq', 0);

CREATE TABLE sundial_settings (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- Known client certificates by SHA-256 fingerprint: admins (agent_id NULL)
-- and agents. A revoked agent's row stays, marked, so other coordinators
-- learn of the revocation from the sequence.
CREATE TABLE sundial_certs (
    fingerprint bytea   PRIMARY KEY CHECK (length(fingerprint) = 32),
    agent_id    bigint,
    revoked     boolean NOT NULL DEFAULT false,
    seq         bigint  NOT NULL
);
CREATE INDEX sundial_certs_seq ON sundial_certs (seq);

-- Join tokens by the SHA-256 of their secret (never the secret).
CREATE TABLE sundial_tokens (
    secret_sha256 bytea   PRIMARY KEY CHECK (length(secret_sha256) = 32),
    expires_at_ms bigint  NOT NULL,
    uses_left     integer NOT NULL CHECK (uses_left >= 0),
    labels        text    NOT NULL   -- JSON: [["key","value"], ...]
);

CREATE TABLE sundial_agents (
    id              bigint  PRIMARY KEY,
    name            text,
    labels          text    NOT NULL,   -- JSON: [["key","value"], ...]
    cert_sha256     bytea   NOT NULL,
    revoked         boolean NOT NULL DEFAULT false,
    forgotten       boolean NOT NULL DEFAULT false,
    enrolled_at_ms  bigint  NOT NULL,
    last_seen_ms    bigint,
    clock_offset_ms bigint,
    rtt_ms          bigint
);

-- Tasks, one row each; a cancelled task stays as a tombstone.
CREATE TABLE sundial_tasks (
    id        bigint  PRIMARY KEY,
    revision  bigint  NOT NULL UNIQUE,
    name      text,
    cancelled boolean NOT NULL DEFAULT false,
    paused    boolean NOT NULL DEFAULT false,
    spec      bytea   NOT NULL
);
CREATE UNIQUE INDEX sundial_tasks_live_name ON sundial_tasks (name)
    WHERE NOT cancelled AND name IS NOT NULL;

-- Run records, partitioned by day of their scheduled instant. Partitions
-- are created ahead by the coordinators; a record outside them lands in
-- the default partition and moves when its day's partition is made.
-- Retention drops whole days.
CREATE TABLE sundial_runs (
    scheduled_at_ms bigint  NOT NULL,
    task_id         bigint  NOT NULL,
    agent_id        bigint  NOT NULL,
    attempt         integer NOT NULL,
    outcome         text    NOT NULL,
    record          bytea   NOT NULL,
    PRIMARY KEY (task_id, agent_id, scheduled_at_ms, attempt)
) PARTITION BY RANGE (scheduled_at_ms);
CREATE TABLE sundial_runs_default PARTITION OF sundial_runs DEFAULT;
-- `run list`: by time, of a task, of an agent (keyset paging on each).
CREATE INDEX sundial_runs_by_time  ON sundial_runs (scheduled_at_ms, task_id, agent_id, attempt);
CREATE INDEX sundial_runs_by_task  ON sundial_runs (task_id, scheduled_at_ms, agent_id, attempt);
CREATE INDEX sundial_runs_by_agent ON sundial_runs (agent_id, scheduled_at_ms, task_id, attempt);
CREATE INDEX sundial_runs_by_outcome ON sundial_runs (outcome, scheduled_at_ms);

-- How many runs are stored, in shards so that coordinators storing at
-- once do not queue on one row; the count is their sum.
CREATE TABLE sundial_run_counts (
    shard integer PRIMARY KEY,
    n     bigint  NOT NULL
);

-- The latest run of each task on each agent.
CREATE TABLE sundial_last_runs (
    task_id         bigint  NOT NULL,
    agent_id        bigint  NOT NULL,
    scheduled_at_ms bigint  NOT NULL,
    attempt         integer NOT NULL,
    outcome         text    NOT NULL,
    finished_at_ms  bigint,
    detail          text,
    PRIMARY KEY (task_id, agent_id)
);

-- Run-now requests for agents whose session another coordinator holds:
-- the coordinator holding it takes and delivers them; stale ones expire.
CREATE TABLE sundial_run_now (
    agent_id     bigint NOT NULL,
    task_id      bigint NOT NULL,
    at_ms        bigint NOT NULL,
    queued_at_ms bigint NOT NULL,
    PRIMARY KEY (agent_id, task_id, at_ms)
);
