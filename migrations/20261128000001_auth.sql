-- Identities and roles: API keys for researchers, dashboards and operators; who owns a study;
-- report refusals counted against the worker that sent them.

-- `reader` queries; `researcher` also uploads modules, submits, adopts and cancels its own
-- studies; `admin` does everything, including managing keys and blocking workers.
CREATE TYPE api_role AS ENUM ('reader', 'researcher', 'admin');

-- Keys are random and shown once; only their BLAKE3 hash is kept. `prefix` (the key's first
-- characters) lets people tell keys apart in listings without the secret.
CREATE TABLE api_keys (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL DEFAULT '',
    role        api_role NOT NULL,
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- The key a study was submitted (or an adoption proposed) with; NULL for studies made before
-- keys existed, which only an admin may cancel.
ALTER TABLE studies ADD COLUMN owner_key bigint REFERENCES api_keys (id);

-- Reports refused because they were not the sender's to make: another worker's replica, an
-- unknown replica, a second different result, a forged hash. Each also halves the daily quota.
ALTER TABLE workers ADD COLUMN rejected_reports bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE VIEW v_worker_stats AS
SELECT id AS worker_id, name, arch, os, runtime, registered_at, last_seen,
       valid_count, invalid_count, error_count, timeout_count,
       (SELECT count(*) FROM replicas r WHERE r.worker_id = w.id) AS replicas_issued,
       account, blocked, rejected_reports
FROM workers w;
