-- The trust engine: volunteer accounts, reputation and daily quotas per worker, adaptive
-- (unreplicated) work, numeric tolerance, and the provenance a confidence score rests on.

-- Reputation and quota. `consecutive_valid` resets on an invalid or error result (BOINC);
-- the daily quota halves on an error, invalid result or timeout and grows back on valid ones;
-- `quota_used` counts replicas handed out on `quota_day` (UTC).
ALTER TABLE workers
    ADD COLUMN account           text,
    ADD COLUMN consecutive_valid bigint NOT NULL DEFAULT 0,
    ADD COLUMN daily_quota       integer NOT NULL DEFAULT 1000 CHECK (daily_quota >= 1),
    ADD COLUMN quota_day         date NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date,
    ADD COLUMN quota_used        integer NOT NULL DEFAULT 0,
    ADD COLUMN blocked           boolean NOT NULL DEFAULT false;

CREATE INDEX workers_account ON workers (account) WHERE account IS NOT NULL;

-- Never two replicas of one work unit on workers of one volunteer account.
ALTER TABLE replicas
    ADD COLUMN account text,
    -- Issued unreplicated to a trusted worker (adaptive replication): validates alone.
    ADD COLUMN solo    boolean NOT NULL DEFAULT false;
CREATE UNIQUE INDEX replicas_one_per_account ON replicas (wu_id, account) WHERE account IS NOT NULL;

ALTER TABLE work_units
    ADD COLUMN adaptive  boolean NOT NULL DEFAULT false,
    -- {"metric": {"abs": x, "rel": y}, ...}: outputs agree when these metrics are within
    -- tolerance and every other metric is equal; NULL means exact BLAKE3 equality.
    ADD COLUMN tolerance jsonb;

ALTER TABLE findings
    -- Distinct "arch/os" platforms of the agreeing replicas.
    ADD COLUMN platforms    text[] NOT NULL DEFAULT '{}',
    ADD COLUMN unreplicated boolean NOT NULL DEFAULT false;

-- Reputation per volunteer account, for operators and dashboards. The error rate is the mean
-- of a Beta(1, 9) posterior over wrong results (see ARCHITECTURE.md, "Trust engine").
CREATE VIEW account_reputation AS
SELECT account,
       count(*)            AS workers,
       sum(valid_count)    AS valid_count,
       sum(invalid_count)  AS invalid_count,
       sum(error_count)    AS error_count,
       sum(timeout_count)  AS timeout_count,
       (sum(invalid_count) + 1)::float8 / (sum(valid_count) + sum(invalid_count) + 10) AS error_rate
FROM workers WHERE account IS NOT NULL GROUP BY account;
