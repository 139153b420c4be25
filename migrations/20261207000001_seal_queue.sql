-- Sealing no longer writes a new version of every finding. The sealer used to set
-- `findings.ledger_seq`, an update that could not be HOT (the column was in the predicate of
-- `findings_unsealed`), so it wrote the whole row again with an entry in every index but that one,
-- the GIN one on `params` among them. The findings left to seal are now a queue that
-- the sealer empties in the transaction that appends their entries, and a finding's entry is
-- found through the ledger itself, which now holds at most one entry per finding.

CREATE TABLE unsealed_findings (finding_id bigint PRIMARY KEY);
INSERT INTO unsealed_findings SELECT id FROM findings WHERE ledger_seq IS NULL;

CREATE UNIQUE INDEX ledger_one_per_finding ON ledger (finding_id) WHERE kind = 'finding';

-- Every inserted finding is queued by the statement trigger that already fills
-- `finding_metrics` from the insert's transition table, whatever inserted it.
CREATE FUNCTION findings_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO unsealed_findings (finding_id) SELECT id FROM new_findings;
    INSERT INTO finding_metrics (finding_id, study_id, name, value)
    SELECT f.id, f.study_id, m.key, (m.value #>> '{}')::double precision
    FROM new_findings AS f, jsonb_each(f.metrics) AS m
    WHERE jsonb_typeof(m.value) = 'number';
    RETURN NULL;
END $$;
DROP TRIGGER findings_metrics_fill ON findings;
CREATE TRIGGER findings_inserted AFTER INSERT ON findings
    REFERENCING NEW TABLE AS new_findings
    FOR EACH STATEMENT EXECUTE FUNCTION findings_inserted();
DROP FUNCTION finding_metrics_fill_batch();

DROP VIEW v_findings;
DROP INDEX findings_unsealed;
ALTER TABLE findings DROP COLUMN ledger_seq;

-- The same columns as before.
CREATE VIEW v_findings AS
SELECT f.id AS finding_id, f.study_id, s.name AS study_name, f.wu_id AS work_unit_id,
       encode(f.module_hash, 'hex') AS module_hash, encode(f.input_hash, 'hex') AS input_hash,
       encode(f.output_hash, 'hex') AS output_hash, f.metrics, f.params,
       f.confidence AS confidence_at_validation,
       coalesce(f.current_confidence, f.confidence) AS confidence,
       cardinality(f.agreeing_replicas) AS agreeing, f.dissenting,
       encode(l.hash, 'hex') AS ledger_hash, l.seq AS ledger_seq, f.created_at
FROM findings f JOIN studies s ON s.id = f.study_id
LEFT JOIN ledger l ON l.finding_id = f.id AND l.kind = 'finding';
