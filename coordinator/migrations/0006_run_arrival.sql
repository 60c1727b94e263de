-- Runs in the order they were stored (0.8), for readers that follow them
-- (`run list --arrival`): the storing transaction's id, then a sequence. A
-- reader stops short of the oldest transaction still running, so it never
-- passes a run that will commit behind its cursor.
-- Cached per connection: the order within a transaction is all a sequence
-- number must give (the transaction id orders the rest), and a cache spares
-- every row a trip to the shared sequence.
CREATE SEQUENCE IF NOT EXISTS sundial_run_arrival CACHE 1000;
ALTER TABLE sundial_runs ADD COLUMN IF NOT EXISTS arrival_xid xid8;
ALTER TABLE sundial_runs ADD COLUMN IF NOT EXISTS arrival_seq bigint;
-- Runs stored before: one epoch (0) before all others, in time order
-- (when they arrived was not kept).
UPDATE sundial_runs r
   SET arrival_xid = '0'::xid8, arrival_seq = o.n
  FROM (SELECT task_id, agent_id, scheduled_at_ms, attempt,
               row_number() OVER (ORDER BY scheduled_at_ms, task_id, agent_id, attempt) AS n
          FROM sundial_runs) o
 WHERE (r.task_id, r.agent_id, r.scheduled_at_ms, r.attempt)
     = (o.task_id, o.agent_id, o.scheduled_at_ms, o.attempt);
SELECT setval('sundial_run_arrival', (SELECT count(*) + 1 FROM sundial_runs), false);
ALTER TABLE sundial_runs ALTER COLUMN arrival_xid SET DEFAULT pg_current_xact_id();
ALTER TABLE sundial_runs ALTER COLUMN arrival_seq SET DEFAULT nextval('sundial_run_arrival');
ALTER TABLE sundial_runs ALTER COLUMN arrival_xid SET NOT NULL;
ALTER TABLE sundial_runs ALTER COLUMN arrival_seq SET NOT NULL;
CREATE INDEX IF NOT EXISTS sundial_runs_by_arrival ON sundial_runs (arrival_xid, arrival_seq);
