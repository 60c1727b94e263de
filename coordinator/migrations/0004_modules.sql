-- Functions' modules (0.7), content-addressed: one row per SHA-256,
-- shared by every task that names it.
CREATE TABLE IF NOT EXISTS sundial_modules (
    sha256 bytea PRIMARY KEY CHECK (length(sha256) = 32),
    bytes bytea NOT NULL
);
