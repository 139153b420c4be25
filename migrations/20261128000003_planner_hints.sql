-- The planner's view of `replicas.wu_id`, fixed rather than sampled. A work unit has a handful
-- of replicas (min_quorum, plus reissues), but ANALYZE of a young table (the first autovacuum
-- sees a few dozen rows of a few units) stores an absolute distinct count, so as the table grows
-- each `wu_id = ANY(..)` looks like it matches a large part of it and the report's read of its
-- units' replicas turns into a (parallel) sequential scan until the next ANALYZE. A negative
-- n_distinct is a fraction of the rows, so it scales with the table: about 2.5 rows per unit.
ALTER TABLE replicas ALTER COLUMN wu_id SET (n_distinct = -0.4);
ANALYZE replicas;
