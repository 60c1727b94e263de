-- When a task was created (0.8), for the tasks a resume made count from a
-- later instant: their spec's created_at moved, this did not. NULL: the
-- spec's created_at is the creation.
ALTER TABLE sundial_tasks ADD COLUMN IF NOT EXISTS created_ms bigint;
