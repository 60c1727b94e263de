-- Named admins: each admin certificate belongs to one, with a role and a
-- lifetime. A revoked admin's row stays (revoked_at_ms set) until its name
-- is taken over; its entries stay in the audit log.
CREATE TABLE sundial_admins (
    name          text    PRIMARY KEY,
    role          text    NOT NULL CHECK (role IN ('viewer', 'operator', 'owner')),
    cert_sha256   bytea   NOT NULL CHECK (length(cert_sha256) = 32),
    created_at_ms bigint  NOT NULL,
    created_by    text    NOT NULL,
    expires_at_ms bigint  NOT NULL,
    revoked_at_ms bigint,
    last_used_ms  bigint
);
CREATE INDEX sundial_admins_cert ON sundial_admins (cert_sha256);

-- The admin certificates of a database from before named admins become
-- owners named owner, owner-2, ..., valid as their certificates are (to
-- the year 4000; the README says how to rotate them).
INSERT INTO sundial_admins (name, role, cert_sha256, created_at_ms, created_by, expires_at_ms)
SELECT CASE WHEN n = 1 THEN 'owner' ELSE 'owner-' || n END, 'owner', fingerprint, 0, 'init',
       64060588800000
  FROM (SELECT fingerprint, row_number() OVER (ORDER BY seq) AS n
          FROM sundial_certs WHERE agent_id IS NULL AND NOT revoked) legacy;

-- The audit log, append-only: who (name and certificate), what, when,
-- from where, and whether it was refused. A change writes its entry in
-- its own transaction.
CREATE TABLE sundial_audit (
    seq         bigserial PRIMARY KEY,
    at_ms       bigint    NOT NULL,
    admin       text      NOT NULL,
    cert_sha256 bytea     NOT NULL,
    address     text,
    action      text      NOT NULL,
    subject     text,
    revision    bigint,
    refused     text
);
CREATE INDEX sundial_audit_at ON sundial_audit (at_ms);
