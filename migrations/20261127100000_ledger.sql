-- The research ledger: an append-only hash chain of findings and evidence, lineage between
-- studies and findings, evidence from adoption proposals, and indexes for the query API.
-- See ARCHITECTURE.md ("The ledger") for the entry encoding.

-- Findings a study builds on (its parents); a finding's parents are its study's.
CREATE TABLE study_parents (
    study_id          bigint NOT NULL REFERENCES studies (id),
    parent_finding_id bigint NOT NULL REFERENCES findings (id),
    PRIMARY KEY (study_id, parent_finding_id)
);
CREATE INDEX study_parents_parent ON study_parents (parent_finding_id, study_id);

CREATE TYPE evidence_kind AS ENUM ('reproduced', 'failed_to_reproduce', 'adopted', 'superseded');

-- Later evidence about a finding. Rows are written once; the sealer chains them.
CREATE TABLE evidence (
    id               bigserial PRIMARY KEY,
    finding_id       bigint NOT NULL REFERENCES findings (id),
    kind             evidence_kind NOT NULL,
    -- What the evidence rests on (adoption: seeds, metric mean and spread, workers).
    detail           jsonb NOT NULL DEFAULT '{}',
    -- The finding's confidence once this evidence is taken into account.
    confidence_after double precision NOT NULL CHECK (confidence_after >= 0 AND confidence_after <= 1),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Set by the sealer when the entry is chained.
    ledger_seq       bigint
);
CREATE INDEX evidence_finding ON evidence (finding_id, id);
CREATE INDEX evidence_unsealed ON evidence (id) WHERE ledger_seq IS NULL;

-- Set by the sealer when the finding's entry is chained; the confidence after later evidence.
ALTER TABLE findings ADD COLUMN ledger_seq bigint;
ALTER TABLE findings ADD COLUMN current_confidence double precision
    CHECK (current_confidence IS NULL OR (current_confidence >= 0 AND current_confidence <= 1));
CREATE INDEX findings_unsealed ON findings (id) WHERE ledger_seq IS NULL;
-- Identical-work-unit dedup looks findings up by what was computed.
CREATE INDEX findings_computed ON findings (module_hash, input_hash);
-- Parameter filters (`params @> '{"hidden": 8}'`).
CREATE INDEX findings_params ON findings USING gin (params jsonb_path_ops);

-- The hash chain. `hash = BLAKE3("accrete.ledger.v1\n" || seq as u64 BE || len(body) as u64 BE
-- || body || prev_hash)`; the first entry's prev_hash is 32 zero bytes. `body` is canonical JSON
-- (UTF-8, object keys sorted, no whitespace). `kind`, `finding_id`, `evidence_id` repeat what
-- the body says, for indexes; the body is what is hashed.
CREATE TABLE ledger (
    seq         bigint PRIMARY KEY CHECK (seq >= 1),
    hash        bytea NOT NULL UNIQUE CHECK (length(hash) = 32),
    prev_hash   bytea NOT NULL CHECK (length(prev_hash) = 32),
    kind        text NOT NULL CHECK (kind IN ('finding', 'evidence')),
    finding_id  bigint NOT NULL,
    evidence_id bigint,
    body        text NOT NULL,
    sealed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_finding ON ledger (finding_id, seq);

-- PostgreSQL itself refuses to change or remove a ledger entry.
CREATE FUNCTION ledger_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON ledger
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_is_append_only();

-- One row per (finding, numeric metric), kept by a trigger so that "top N by metric" walks an
-- index whatever the metric is called, and keyset pagination stays fast at any depth.
CREATE TABLE finding_metrics (
    finding_id bigint NOT NULL REFERENCES findings (id),
    study_id   bigint NOT NULL,
    name       text NOT NULL,
    value      double precision NOT NULL,
    PRIMARY KEY (finding_id, name)
);
CREATE INDEX finding_metrics_order ON finding_metrics (name, value, finding_id);
CREATE INDEX finding_metrics_study_order ON finding_metrics (study_id, name, value, finding_id);

CREATE FUNCTION finding_metrics_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO finding_metrics (finding_id, study_id, name, value)
    SELECT NEW.id, NEW.study_id, m.key, (m.value #>> '{}')::double precision
    FROM jsonb_each(NEW.metrics) AS m
    WHERE jsonb_typeof(m.value) = 'number';
    RETURN NULL;
END $$;
CREATE TRIGGER findings_metrics_fill AFTER INSERT ON findings
    FOR EACH ROW EXECUTE FUNCTION finding_metrics_fill();

-- Adoption proposals: re-running a finding's work unit on other workers and other seeds.
CREATE TYPE adoption_state AS ENUM ('running', 'settled');
CREATE TABLE adoptions (
    id          bigserial PRIMARY KEY,
    finding_id  bigint NOT NULL REFERENCES findings (id),
    -- The study holding the re-runs: the same input first, then one unit per other seed.
    study_id    bigint NOT NULL REFERENCES studies (id),
    metric      text NOT NULL,
    descending  boolean NOT NULL,
    seeds       bigint[] NOT NULL,
    state       adoption_state NOT NULL DEFAULT 'running',
    evidence_id bigint REFERENCES evidence (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX adoptions_running ON adoptions (id) WHERE state = 'running';

-- Workers a work unit must not be handed to (an adoption re-run excludes the original workers).
CREATE TABLE wu_exclusions (
    wu_id     bigint NOT NULL REFERENCES work_units (id),
    worker_id uuid NOT NULL,
    PRIMARY KEY (wu_id, worker_id)
);

-- Stable views for dashboards (Grafana, Metabase); documented in README.md.
CREATE VIEW v_findings AS
SELECT f.id AS finding_id, f.study_id, s.name AS study_name, f.wu_id AS work_unit_id,
       encode(f.module_hash, 'hex') AS module_hash, encode(f.input_hash, 'hex') AS input_hash,
       encode(f.output_hash, 'hex') AS output_hash, f.metrics, f.params,
       f.confidence AS confidence_at_validation,
       coalesce(f.current_confidence, f.confidence) AS confidence,
       cardinality(f.agreeing_replicas) AS agreeing, f.dissenting,
       encode(l.hash, 'hex') AS ledger_hash, f.ledger_seq, f.created_at
FROM findings f JOIN studies s ON s.id = f.study_id
LEFT JOIN ledger l ON l.seq = f.ledger_seq;

CREATE VIEW v_finding_metrics AS
SELECT finding_id, study_id, name AS metric, value FROM finding_metrics;

CREATE VIEW v_study_progress AS
SELECT s.id AS study_id, s.name, s.cancelled, s.created_at,
       count(w.id) AS work_units,
       count(w.id) FILTER (WHERE w.state = 'pending') AS pending,
       count(w.id) FILTER (WHERE w.state = 'validated') AS validated,
       count(w.id) FILTER (WHERE w.state = 'failed') AS failed,
       count(w.id) FILTER (WHERE w.state = 'cancelled') AS cancelled_units,
       max(w.finished_at) AS last_finished_at
FROM studies s LEFT JOIN work_units w ON w.study_id = s.id
GROUP BY s.id;

CREATE VIEW v_worker_stats AS
SELECT id AS worker_id, name, arch, os, runtime, registered_at, last_seen,
       valid_count, invalid_count, error_count, timeout_count,
       (SELECT count(*) FROM replicas r WHERE r.worker_id = w.id) AS replicas_issued
FROM workers w;
