-- `finding_metrics` is filled once per INSERT statement from its transition table instead of
-- once per finding row: a report batch inserts its findings in one statement, and a row trigger
-- ran a PL/pgSQL INSERT for each of them. The rows written are the same.
CREATE FUNCTION finding_metrics_fill_batch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO finding_metrics (finding_id, study_id, name, value)
    SELECT f.id, f.study_id, m.key, (m.value #>> '{}')::double precision
    FROM new_findings AS f, jsonb_each(f.metrics) AS m
    WHERE jsonb_typeof(m.value) = 'number';
    RETURN NULL;
END $$;
DROP TRIGGER findings_metrics_fill ON findings;
CREATE TRIGGER findings_metrics_fill AFTER INSERT ON findings
    REFERENCING NEW TABLE AS new_findings
    FOR EACH STATEMENT EXECUTE FUNCTION finding_metrics_fill_batch();
DROP FUNCTION finding_metrics_fill();
