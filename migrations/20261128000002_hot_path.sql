-- The hot path writes every replica row at least twice (the claim inserts it, the report moves
-- it out of `in_progress`, which is never a HOT update because `state` is in the predicate of
-- `replicas_deadline`), so each index on replicas costs a write per replica per step.
-- `replicas_wu (wu_id)` duplicates the leading column of the unique index on
-- `(wu_id, worker_id)`, which serves every lookup by work unit just as well.
DROP INDEX replicas_wu;
