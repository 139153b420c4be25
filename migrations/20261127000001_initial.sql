-- The initial schema: modules, workers, studies, work units, replicas, findings.
-- States are PostgreSQL enums mirrored by Rust enums in server/src/store.rs.

CREATE TYPE wu_state AS ENUM ('pending', 'validated', 'failed', 'cancelled');
CREATE TYPE replica_state AS ENUM ('in_progress', 'success', 'error', 'timed_out', 'handed_back');
CREATE TYPE validate_state AS ENUM ('init', 'valid', 'invalid', 'inconclusive');

CREATE TABLE modules (
    hash        bytea PRIMARY KEY CHECK (length(hash) = 32),
    wasm        bytea NOT NULL,
    name        text NOT NULL DEFAULT '',
    size_bytes  integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    id              uuid PRIMARY KEY,
    token_hash      bytea NOT NULL CHECK (length(token_hash) = 32),
    name            text NOT NULL DEFAULT '',
    arch            text NOT NULL,
    os              text NOT NULL,
    cores           integer NOT NULL,
    memory_bytes    bigint NOT NULL,
    runtime         text NOT NULL,
    registered_at   timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now(),
    valid_count     bigint NOT NULL DEFAULT 0,
    invalid_count   bigint NOT NULL DEFAULT 0,
    error_count     bigint NOT NULL DEFAULT 0,
    timeout_count   bigint NOT NULL DEFAULT 0
);

CREATE TABLE studies (
    id                   bigserial PRIMARY KEY,
    name                 text NOT NULL,
    description          text NOT NULL DEFAULT '',
    module_hash          bytea NOT NULL REFERENCES modules (hash),
    cancelled            boolean NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE work_units (
    id                   bigserial PRIMARY KEY,
    study_id             bigint NOT NULL REFERENCES studies (id),
    module_hash          bytea NOT NULL REFERENCES modules (hash),
    input                bytea NOT NULL,
    input_hash           bytea NOT NULL CHECK (length(input_hash) = 32),
    -- The input when it is a JSON object (the sweep parameters), for queries.
    params               jsonb,
    state                wu_state NOT NULL DEFAULT 'pending',
    -- Replication policy (BOINC's names and meanings).
    min_quorum           integer NOT NULL CHECK (min_quorum >= 1),
    target_nresults      integer NOT NULL CHECK (target_nresults >= min_quorum),
    max_error_results    integer NOT NULL CHECK (max_error_results >= 1),
    max_total_results    integer NOT NULL CHECK (max_total_results >= target_nresults),
    max_success_results  integer NOT NULL CHECK (max_success_results >= min_quorum),
    delay_bound_secs     integer NOT NULL CHECK (delay_bound_secs >= 1),
    -- Resource bounds.
    fuel                 bigint NOT NULL CHECK (fuel > 0),
    memory_bytes         bigint NOT NULL CHECK (memory_bytes > 0),
    output_bytes         bigint NOT NULL CHECK (output_bytes > 0),
    wall_ms              bigint NOT NULL CHECK (wall_ms > 0),
    -- Replicas wanted but not yet handed to a worker; the claim takes from it.
    unsent               integer NOT NULL CHECK (unsent >= 0),
    -- Replicas ever created; never above max_total_results.
    n_issued             integer NOT NULL DEFAULT 0 CHECK (n_issued <= max_total_results),
    canonical_replica_id bigint,
    fail_reason          text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finished_at          timestamptz,
    CHECK ((state = 'failed') = (fail_reason IS NOT NULL)),
    CHECK ((state = 'validated') = (canonical_replica_id IS NOT NULL)),
    CHECK (state = 'pending' OR unsent = 0)
);

CREATE INDEX work_units_study ON work_units (study_id, state);
-- The claim scans only work units that still want replicas.
CREATE INDEX work_units_dispatch ON work_units (id) WHERE state = 'pending' AND unsent > 0;

CREATE TABLE replicas (
    id              bigserial PRIMARY KEY,
    wu_id           bigint NOT NULL REFERENCES work_units (id),
    worker_id       uuid NOT NULL REFERENCES workers (id),
    state           replica_state NOT NULL DEFAULT 'in_progress',
    validate_state  validate_state NOT NULL DEFAULT 'init',
    platform        text NOT NULL,
    issued_at       timestamptz NOT NULL DEFAULT now(),
    deadline        timestamptz NOT NULL,
    reported_at     timestamptz,
    output          bytea,
    output_hash     bytea CHECK (output_hash IS NULL OR length(output_hash) = 32),
    fuel_used       bigint,
    wall_micros     bigint,
    error_kind      text,
    error_message   text,
    -- Never two replicas of one work unit on one worker.
    UNIQUE (wu_id, worker_id),
    CHECK ((state = 'success') = (output_hash IS NOT NULL)),
    CHECK (state = 'success' OR validate_state IN ('init', 'invalid'))
);

CREATE INDEX replicas_wu ON replicas (wu_id);
-- The rescuer looks for replicas past their deadline.
CREATE INDEX replicas_deadline ON replicas (deadline) WHERE state = 'in_progress';

CREATE TABLE findings (
    id                bigserial PRIMARY KEY,
    -- Exactly one finding per validated work unit.
    wu_id             bigint NOT NULL UNIQUE REFERENCES work_units (id),
    study_id          bigint NOT NULL REFERENCES studies (id),
    module_hash       bytea NOT NULL,
    input_hash        bytea NOT NULL,
    output_hash       bytea NOT NULL,
    output            bytea NOT NULL,
    metrics           jsonb NOT NULL,
    params            jsonb,
    confidence        double precision NOT NULL CHECK (confidence >= 0 AND confidence <= 1),
    agreeing_replicas bigint[] NOT NULL,
    dissenting        integer NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX findings_study ON findings (study_id, id);
