-- Volunteer accounts: a worker is tied to one by presenting the account's key at Register, so an
-- account's daily quota and "one replica per account per work unit" hold across its machines and
-- nobody can spend another volunteer's quota by naming their account.

-- Keys are random and shown once; only their BLAKE3 hash is kept. `quota_used` counts replicas
-- handed to any of the account's workers on `quota_day` (UTC), beside each worker's own quota.
CREATE TABLE accounts (
    name        text PRIMARY KEY CHECK (name <> ''),
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    daily_quota integer NOT NULL CHECK (daily_quota >= 0),
    quota_day   date NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date,
    quota_used  integer NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Accounts that workers declared before keys existed keep their name and their workers; their
-- key is random and was never shown, so no new worker can join them.
INSERT INTO accounts (name, prefix, key_hash, daily_quota)
SELECT account, '',
       decode(md5(random()::text || account) || md5(random()::text || clock_timestamp()::text), 'hex'),
       10000
FROM (SELECT DISTINCT account FROM workers WHERE account IS NOT NULL) a;

ALTER TABLE workers ADD CONSTRAINT workers_account_fk FOREIGN KEY (account) REFERENCES accounts (name);
