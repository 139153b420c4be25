//! PostgreSQL access: the only module that writes SQL. Every state change is a compare-and-set,
//! and every replica of a work unit changes only while that work unit's row is locked, so the
//! claim, reports and the rescuer can run in any number of scheduler processes at once.

use std::collections::HashMap;
use std::time::Duration;

use accrete_proto::output::parse_metrics;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{FromRow, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::Error;
use crate::scheduler::{self, Decision, Policy, ReplicaOutcome, ReplicaView};

mod auth;
mod ledger;
mod ops;
pub use auth::*;
pub use ledger::*;
pub use ops::Gauges;

/// Where a work unit is. Mirrors the `wu_state` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "wu_state", rename_all = "snake_case")]
pub enum WuState {
    /// Created by a submission; the claim hands out its replicas and reports move it on.
    Pending,
    /// A quorum agreed (the transitioner); it has a canonical replica and exactly one finding.
    Validated,
    /// The transitioner gave up (errors, no consensus, or `max_total_results`); `fail_reason` says why.
    Failed,
    /// Its study was cancelled while it was pending.
    Cancelled,
}

/// Where a replica is. Mirrors the `replica_state` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "replica_state", rename_all = "snake_case")]
pub enum ReplicaState {
    /// Created by the claim and handed to one worker; left by its report or by the rescuer.
    InProgress,
    /// Reported with an output that meets the output contract.
    Success,
    /// Reported as an error by the worker, or its output broke the contract.
    Error,
    /// The rescuer found it past its deadline; a late report may still move it to success/error.
    TimedOut,
    /// The worker gave it back unfinished (shutting down); treated like a timeout at once.
    HandedBack,
}

/// The validator's verdict on a replica. Mirrors the `validate_state` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "validate_state", rename_all = "snake_case")]
pub enum ValidateState {
    Init,
    Valid,
    Invalid,
    Inconclusive,
}

/// Resource bounds of a work unit, with server defaults already applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub fuel: i64,
    pub memory_bytes: i64,
    pub output_bytes: i64,
    pub wall_ms: i64,
}

pub struct NewStudy {
    pub name: String,
    pub description: String,
    pub module_hash: [u8; 32],
    pub policy: Policy,
    /// Numeric tolerance on named metrics; `None` compares outputs by BLAKE3 hash.
    pub tolerance: Option<scheduler::Tolerance>,
    pub bounds: Bounds,
    pub inputs: Vec<Vec<u8>>,
    /// Findings the study builds on (checked to exist by the caller).
    pub parents: Vec<i64>,
    /// Answer inputs already validated (same module, input and policy) with their findings.
    pub dedup: bool,
    /// The API key that submitted it (`None`: made by the server itself); it may cancel it.
    pub owner: Option<i64>,
}

/// What `create_study` made: per input, a new work unit or the finding that already answers it.
#[derive(Debug, Clone)]
pub struct CreatedStudy {
    pub study_id: i64,
    /// Per input, in order; 0 where `existing` has the answer.
    pub work_unit_ids: Vec<i64>,
    /// Per input, in order; 0 where a work unit was created.
    pub existing: Vec<i64>,
}

pub struct NewWorker {
    pub id: Uuid,
    pub token_hash: [u8; 32],
    pub name: String,
    pub arch: String,
    pub os: String,
    pub cores: i32,
    pub memory_bytes: i64,
    pub runtime: String,
    /// The volunteer account the worker belongs to; no two of its workers get replicas of one
    /// work unit.
    pub account: Option<String>,
}

/// Whether a worker may be handed work now, and if not, why.
#[derive(Debug, Clone, FromRow)]
pub struct Standing {
    pub blocked: bool,
    /// Replicas it may still take today (UTC).
    pub quota_left: i32,
    pub daily_quota: i32,
    /// When today's quota count starts again (the next UTC midnight), seconds since the epoch.
    pub resets_unix: i64,
    /// The same, as "YYYY-MM-DD HH:MM UTC".
    pub resets_at: String,
}

/// A worker's reputation, as the trust engine sees it.
#[derive(Debug, Clone, FromRow)]
pub struct Reputation {
    pub account: Option<String>,
    pub valid_count: i64,
    pub invalid_count: i64,
    pub error_count: i64,
    pub timeout_count: i64,
    pub consecutive_valid: i64,
    pub daily_quota: i32,
    pub blocked: bool,
    /// Reports refused as not its to make (see `Store::report`).
    pub rejected_reports: i64,
}

/// A volunteer account's reputation: its workers' counts summed, and the error rate estimated
/// from them with the same Beta(1, 9) prior as a worker's.
#[derive(Debug, Clone, FromRow)]
pub struct AccountReputation {
    pub account: String,
    pub workers: i64,
    pub valid_count: i64,
    pub invalid_count: i64,
    pub error_count: i64,
    pub timeout_count: i64,
    pub error_rate: f64,
}

impl Reputation {
    pub fn error_rate(&self) -> f64 {
        scheduler::error_rate(self.valid_count, self.invalid_count)
    }
}

/// A replica just handed to a worker, with what it needs to run it.
#[derive(Debug, FromRow)]
pub struct Claimed {
    pub replica_id: i64,
    pub wu_id: i64,
    pub module_hash: Vec<u8>,
    pub input: Vec<u8>,
    pub input_hash: Vec<u8>,
    pub fuel: i64,
    pub memory_bytes: i64,
    pub output_bytes: i64,
    pub wall_ms: i64,
    pub deadline_unix: i64,
}

/// What a worker says happened to one replica.
#[derive(Debug, Clone)]
pub enum Outcome {
    Success {
        output: Vec<u8>,
        fuel_used: i64,
    },
    Error {
        kind: String,
        message: String,
        fuel_used: i64,
    },
    HandBack,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub replica_id: i64,
    pub outcome: Outcome,
    pub wall_micros: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckStatus {
    Accepted,
    Duplicate,
    Rejected,
}

#[derive(Debug, Clone)]
pub struct Ack {
    pub replica_id: i64,
    pub status: AckStatus,
    pub message: String,
}

#[derive(Debug, FromRow)]
pub struct StudyStatus {
    pub study_id: i64,
    pub name: String,
    pub description: String,
    pub module_hash: Vec<u8>,
    pub cancelled: bool,
    pub created_unix: i64,
    pub work_units: i64,
    pub pending: i64,
    pub validated: i64,
    pub failed: i64,
    pub cancelled_units: i64,
    pub replicas_in_progress: i64,
    pub replicas_success: i64,
    pub replicas_error: i64,
    pub replicas_timed_out: i64,
    pub replicas_invalid: i64,
}

#[derive(Debug, FromRow)]
pub struct FindingRow {
    pub id: i64,
    pub study_id: i64,
    pub wu_id: i64,
    pub module_hash: Vec<u8>,
    pub input_hash: Vec<u8>,
    pub output_hash: Vec<u8>,
    pub metrics: serde_json::Value,
    pub params: Option<serde_json::Value>,
    /// The current confidence (after later evidence).
    pub confidence: f64,
    pub validated_confidence: f64,
    pub dissenting: i32,
    pub created_unix: i64,
    pub output: Option<Vec<u8>>,
    pub platforms: Vec<String>,
    pub unreplicated: bool,
    pub ledger_seq: Option<i64>,
}

#[derive(Debug, FromRow)]
pub struct AgreeingRow {
    pub finding_id: i64,
    pub replica_id: i64,
    pub worker_id: Uuid,
    pub platform: String,
    pub fuel_used: i64,
}

/// See [`Store::invariant_breaches`]; every field counts work units (or pairs) in breach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromRow)]
pub struct InvariantBreaches {
    pub over_issued: i64,
    pub same_worker: i64,
    pub same_account: i64,
    pub findings_not_one: i64,
    pub bad_canonical: i64,
    pub stray_findings: i64,
    pub unchecked: i64,
}

impl InvariantBreaches {
    pub fn total(&self) -> i64 {
        self.over_issued
            + self.same_worker
            + self.same_account
            + self.findings_not_one
            + self.bad_canonical
            + self.stray_findings
            + self.unchecked
    }
}

/// How one work unit ended; see [`Store::study_outcomes`].
#[derive(Debug, FromRow)]
pub struct WuOutcome {
    pub wu_id: i64,
    pub input: Vec<u8>,
    pub state: WuState,
    /// The finding's output hash, if it validated.
    pub output_hash: Option<Vec<u8>>,
    pub confidence: Option<f64>,
    pub unreplicated: Option<bool>,
    /// Replicas ever issued.
    pub replicas: i64,
    /// Seconds from its first replica to validation or failure.
    pub secs: Option<f64>,
}

#[derive(Debug, FromRow)]
pub struct FailureRow {
    pub wu_id: i64,
    pub reason: String,
    pub params: Option<serde_json::Value>,
}

/// The handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: PgPool,
}

#[derive(FromRow)]
struct LockedWu {
    id: i64,
    state: WuState,
    min_quorum: i32,
    target_nresults: i32,
    max_error_results: i32,
    max_total_results: i32,
    max_success_results: i32,
    delay_bound_secs: i32,
    adaptive: bool,
    tolerance: Option<sqlx::types::Json<scheduler::Tolerance>>,
    output_bytes: i64,
    unsent: i32,
    n_issued: i32,
    study_id: i64,
    module_hash: Vec<u8>,
    input_hash: Vec<u8>,
    params: Option<serde_json::Value>,
    canonical_hash: Option<Vec<u8>>,
    /// The finding's metrics, for comparing late results under a tolerance.
    canonical_metrics: Option<sqlx::types::Json<accrete_proto::output::Metrics>>,
}

impl LockedWu {
    fn policy(&self) -> Policy {
        Policy {
            min_quorum: self.min_quorum,
            target_nresults: self.target_nresults,
            max_error_results: self.max_error_results,
            max_total_results: self.max_total_results,
            max_success_results: self.max_success_results,
            delay_bound_secs: self.delay_bound_secs,
            adaptive: self.adaptive,
        }
    }
}

#[derive(FromRow, Clone)]
struct ReplicaRow {
    id: i64,
    wu_id: i64,
    worker_id: Uuid,
    state: ReplicaState,
    output_hash: Option<Vec<u8>>,
    output: Option<Vec<u8>>,
    error_kind: Option<String>,
    error_message: Option<String>,
    solo: bool,
    platform: String,
    /// The worker's counts now, for its estimated error rate.
    valid_count: i64,
    invalid_count: i64,
    consecutive_valid: i64,
}

const LOCK_WUS: &str = "
    SELECT w.id, w.state, w.min_quorum, w.target_nresults, w.max_error_results,
           w.max_total_results, w.max_success_results, w.delay_bound_secs, w.adaptive,
           w.tolerance, w.output_bytes,
           w.unsent, w.n_issued, w.study_id, w.module_hash, w.input_hash, w.params,
           (SELECT r.output_hash FROM replicas r WHERE r.id = w.canonical_replica_id) AS canonical_hash,
           (SELECT f.metrics FROM findings f WHERE f.wu_id = w.id AND w.tolerance IS NOT NULL)
               AS canonical_metrics
    FROM work_units w WHERE w.id = ANY($1) ORDER BY w.id FOR UPDATE";

const REPLICAS_OF: &str = "
    SELECT r.id, r.wu_id, r.worker_id, r.state, r.output_hash, r.output, r.error_kind,
           r.error_message, r.solo, r.platform, k.valid_count, k.invalid_count,
           k.consecutive_valid
    FROM replicas r JOIN workers k ON k.id = r.worker_id WHERE r.wu_id = ANY($1) ORDER BY r.id";

/// Reputation updates, one statement per kind over `$1` (worker ids, one per result, so a
/// worker with three results in a batch counts three). A valid result extends the streak and
/// grows the daily quota back by `$2` up to `$3`; an invalid or error result ends the streak
/// and halves the quota; a timeout halves the quota. Never below 1.
const CREDIT_VALID: &str = "
    UPDATE workers w SET valid_count = w.valid_count + c.n,
                         consecutive_valid = w.consecutive_valid + c.n,
                         daily_quota = LEAST(w.daily_quota + $2 * c.n, $3)
    FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS id GROUP BY id) c
    WHERE w.id = c.id";
const CREDIT_INVALID: &str = "
    UPDATE workers w SET invalid_count = w.invalid_count + c.n, consecutive_valid = 0,
                         daily_quota = GREATEST(w.daily_quota >> LEAST(c.n, 30), 1)
    FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS id GROUP BY id) c
    WHERE w.id = c.id";
const CREDIT_ERROR: &str = "
    UPDATE workers w SET error_count = w.error_count + c.n, consecutive_valid = 0,
                         daily_quota = GREATEST(w.daily_quota >> LEAST(c.n, 30), 1)
    FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS id GROUP BY id) c
    WHERE w.id = c.id";
/// A refused report (not the sender's replica, unknown, a second different result): counted,
/// and it halves the daily quota like a wrong result, so probing costs the prober.
const CREDIT_REJECTED: &str = "
    UPDATE workers w SET rejected_reports = w.rejected_reports + c.n,
                         daily_quota = GREATEST(w.daily_quota >> LEAST(c.n, 30), 1)
    FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS id GROUP BY id) c
    WHERE w.id = c.id";
const CREDIT_TIMEOUT: &str = "
    UPDATE workers w SET timeout_count = w.timeout_count + c.n,
                         daily_quota = GREATEST(w.daily_quota >> LEAST(c.n, 30), 1)
    FROM (SELECT id, count(*)::int AS n FROM UNNEST($1::uuid[]) AS id GROUP BY id) c
    WHERE w.id = c.id";

/// What one result did to its worker's reputation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credit {
    Valid,
    Invalid,
    Error,
    Timeout,
    Rejected,
}

/// Reputation changes gathered during a transaction and applied at its end, after locking the
/// workers' rows in id order: reports and the rescuer touch many workers, and locking them in
/// one order (always after the work units) keeps transactions from deadlocking.
#[derive(Default)]
struct Credits(Vec<(Uuid, Credit)>);

impl Credits {
    fn add(&mut self, worker: Uuid, credit: Credit) {
        self.0.push((worker, credit));
    }

    fn verdict(&mut self, worker: Uuid, verdict: ValidateState) {
        match verdict {
            ValidateState::Valid => self.add(worker, Credit::Valid),
            ValidateState::Invalid => self.add(worker, Credit::Invalid),
            ValidateState::Init | ValidateState::Inconclusive => {}
        }
    }

    /// Valid results first, so a batch holding both ends with the streak broken.
    async fn apply(self, tx: &mut Transaction<'static, Postgres>) -> Result<(), Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<Uuid> = self.0.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        ids.dedup();
        // NO KEY UPDATE, like the updates that follow: it must not conflict with the KEY SHARE
        // locks that foreign-key checks on replicas take on worker rows (an update of a replica
        // row this transaction already changed re-runs its check), or two reports deadlock.
        sqlx::query("SELECT id FROM workers WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
            .bind(&ids)
            .execute(&mut **tx)
            .await?;
        for (kind, sql) in [
            (Credit::Valid, CREDIT_VALID),
            (Credit::Invalid, CREDIT_INVALID),
            (Credit::Error, CREDIT_ERROR),
            (Credit::Timeout, CREDIT_TIMEOUT),
            (Credit::Rejected, CREDIT_REJECTED),
        ] {
            let workers: Vec<Uuid> = self.0.iter().filter(|c| c.1 == kind).map(|c| c.0).collect();
            if workers.is_empty() {
                continue;
            }
            let mut q = sqlx::query(sql).bind(workers);
            if kind == Credit::Valid {
                q = q.bind(scheduler::QUOTA_STEP).bind(scheduler::QUOTA_MAX);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }
}

impl Store {
    /// Connects, and applies the embedded migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, Error> {
        let options: PgConnectOptions = url.parse().map_err(Error::Database)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        Ok(Store { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Stores a module unless its hash is already there; true if it was.
    pub async fn put_module(
        &self,
        hash: &[u8; 32],
        wasm: &[u8],
        name: &str,
    ) -> Result<bool, Error> {
        let inserted = sqlx::query(
            "INSERT INTO modules (hash, wasm, name, size_bytes) VALUES ($1, $2, $3, $4)
             ON CONFLICT (hash) DO NOTHING",
        )
        .bind(&hash[..])
        .bind(wasm)
        .bind(name)
        .bind(wasm.len() as i32)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 0)
    }

    pub async fn module(&self, hash: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(
            sqlx::query_scalar("SELECT wasm FROM modules WHERE hash = $1")
                .bind(hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn register_worker(&self, w: &NewWorker) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO workers (id, token_hash, name, arch, os, cores, memory_bytes, runtime, account)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(w.id)
        .bind(&w.token_hash[..])
        .bind(&w.name)
        .bind(&w.arch)
        .bind(&w.os)
        .bind(w.cores)
        .bind(w.memory_bytes)
        .bind(&w.runtime)
        .bind(&w.account)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Whether a worker is blocked, and what is left of its daily quota.
    pub async fn standing(&self, worker: Uuid) -> Result<Option<Standing>, Error> {
        Ok(sqlx::query_as::<_, Standing>(
            "SELECT blocked, daily_quota,
                    GREATEST(daily_quota - CASE WHEN quota_day = (now() AT TIME ZONE 'UTC')::date
                                                THEN quota_used ELSE 0 END, 0) AS quota_left,
                    extract(epoch FROM (((now() AT TIME ZONE 'UTC')::date + 1)::timestamp
                                        AT TIME ZONE 'UTC'))::bigint AS resets_unix,
                    to_char((now() AT TIME ZONE 'UTC')::date + 1, 'YYYY-MM-DD') || ' 00:00 UTC'
                        AS resets_at
             FROM workers WHERE id = $1",
        )
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?)
    }

    pub async fn reputation(&self, worker: Uuid) -> Result<Option<Reputation>, Error> {
        Ok(sqlx::query_as::<_, Reputation>(
            "SELECT account, valid_count, invalid_count, error_count, timeout_count,
                    consecutive_valid, daily_quota, blocked, rejected_reports
             FROM workers WHERE id = $1",
        )
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Reputation summed over a volunteer account's workers (the `account_reputation` view).
    pub async fn account_reputation(
        &self,
        account: &str,
    ) -> Result<Option<AccountReputation>, Error> {
        Ok(sqlx::query_as::<_, AccountReputation>(
            "SELECT account, workers, valid_count::bigint, invalid_count::bigint,
                    error_count::bigint, timeout_count::bigint, error_rate
             FROM account_reputation WHERE account = $1",
        )
        .bind(account)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// An operator's block (or unblock): a blocked worker is refused work.
    pub async fn set_blocked(&self, worker: Uuid, blocked: bool) -> Result<bool, Error> {
        Ok(sqlx::query("UPDATE workers SET blocked = $2 WHERE id = $1")
            .bind(worker)
            .bind(blocked)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    pub async fn touch_worker(&self, id: Uuid) -> Result<(), Error> {
        sqlx::query("UPDATE workers SET last_seen = now() WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Creates a study, its parent links and its work units in one transaction. With `dedup`,
    /// an input whose identical work unit (same module, input and replication policy) already
    /// validated gets that finding instead of a new work unit.
    pub async fn create_study(&self, s: &NewStudy) -> Result<CreatedStudy, Error> {
        let mut tx = self.pool.begin().await?;
        let created = create_study_in(&mut tx, s).await?;
        tx.commit().await?;
        Ok(created)
    }

    /// Hands up to `max` replicas to a worker in one statement. It locks the worker's row (so
    /// its daily quota is counted exactly), looks at the next pending work units that still want
    /// replicas and that neither this worker nor any worker of its account holds (locking them,
    /// skipping units another claim has locked), prefers among them units with no replica on
    /// this worker's platform yet (cross-platform validation), and takes at most what is left of
    /// the quota. Adaptive replication happens here too: when a trusted worker takes the first
    /// replica of an adaptive unit and the spot-check draw says no, the same statement sets the
    /// unit's `unsent` to 0 and marks the replica `solo`, so nothing else is issued unless that
    /// replica fails. A blocked or over-quota worker gets nothing; [`Store::standing`] says why.
    /// Workers excluded from a unit (the original workers of an adoption's re-run) never get it.
    pub async fn claim(&self, worker: Uuid, max: i64) -> Result<Vec<Claimed>, Error> {
        Ok(sqlx::query_as::<_, Claimed>(
            "WITH me AS (
                 SELECT k.id, k.account, k.arch || '/' || k.os AS platform,
                        GREATEST(LEAST($2, k.daily_quota::bigint
                            - CASE WHEN k.quota_day = (now() AT TIME ZONE 'UTC')::date
                                   THEN k.quota_used ELSE 0 END), 0) AS allowed,
                        CASE WHEN k.consecutive_valid >= $3
                                  AND (k.invalid_count + $5)::float8
                                      / (k.valid_count + k.invalid_count + $5 + $6) <= $4
                             THEN 1.0 / k.consecutive_valid ELSE 1.0 END AS spot_check
                 FROM workers k WHERE k.id = $1 AND NOT k.blocked
                 FOR NO KEY UPDATE
             ), candidates AS (
                 SELECT w.id, w.adaptive, w.n_issued FROM work_units w
                 WHERE w.state = 'pending' AND w.unsent > 0
                   AND NOT EXISTS (SELECT 1 FROM replicas r, me WHERE r.wu_id = w.id
                                   AND (r.worker_id = $1 OR r.account = me.account))
                   AND NOT EXISTS (SELECT 1 FROM wu_exclusions x WHERE x.wu_id = w.id AND x.worker_id = $1)
                 ORDER BY w.id
                 LIMIT 4 * (SELECT allowed FROM me)
                 FOR UPDATE SKIP LOCKED
             ), picked AS (
                 SELECT c.id, c.adaptive AND c.n_issued = 0 AND random() >= me.spot_check AS solo
                 FROM candidates c CROSS JOIN me
                 ORDER BY EXISTS (SELECT 1 FROM replicas r
                                  WHERE r.wu_id = c.id AND r.platform = me.platform), c.id
                 LIMIT (SELECT allowed FROM me)
             ), taken AS (
                 UPDATE work_units w
                 SET unsent = CASE WHEN p.solo THEN 0 ELSE w.unsent - 1 END,
                     n_issued = w.n_issued + 1
                 FROM picked p WHERE w.id = p.id
                 RETURNING w.id, w.module_hash, w.input, w.input_hash, w.fuel, w.memory_bytes,
                           w.output_bytes, w.wall_ms, w.delay_bound_secs, p.solo
             ), made AS (
                 INSERT INTO replicas (wu_id, worker_id, account, platform, deadline, solo)
                 SELECT t.id, $1, me.account, me.platform,
                        now() + make_interval(secs => t.delay_bound_secs), t.solo
                 FROM taken t CROSS JOIN me
                 RETURNING id, wu_id, deadline
             ), counted AS (
                 UPDATE workers k
                 SET quota_used = (CASE WHEN k.quota_day = (now() AT TIME ZONE 'UTC')::date
                                        THEN k.quota_used ELSE 0 END)
                                  + (SELECT count(*) FROM taken),
                     quota_day = (now() AT TIME ZONE 'UTC')::date
                 WHERE k.id = $1 AND EXISTS (SELECT 1 FROM taken)
             )
             SELECT m.id AS replica_id, t.id AS wu_id, t.module_hash, t.input, t.input_hash,
                    t.fuel, t.memory_bytes, t.output_bytes, t.wall_ms,
                    extract(epoch FROM m.deadline)::bigint AS deadline_unix
             FROM made m JOIN taken t ON t.id = m.wu_id
             ORDER BY m.id",
        )
        .bind(worker)
        .bind(max)
        .bind(scheduler::TRUST_AFTER_CONSECUTIVE_VALID)
        .bind(scheduler::TRUST_MAX_ERROR_RATE)
        .bind(scheduler::PRIOR_WRONG)
        .bind(scheduler::PRIOR_RIGHT)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records a batch of results from one worker, then moves each touched work unit on. One
    /// transaction: either every acknowledged result is durable or none is.
    /// Every refused report, plus `refused_before` (results the service refused before they
    /// reached the store, e.g. a forged hash), is counted against the worker in the same
    /// transaction.
    pub async fn report(
        &self,
        worker: Uuid,
        reports: &[Report],
        refused_before: usize,
    ) -> Result<Vec<Ack>, Error> {
        retry_deadlocks(|| self.report_once(worker, reports, refused_before)).await
    }

    async fn report_once(
        &self,
        worker: Uuid,
        reports: &[Report],
        refused_before: usize,
    ) -> Result<Vec<Ack>, Error> {
        let ids: Vec<i64> = reports.iter().map(|r| r.replica_id).collect();
        // Which work units these replicas belong to, to lock them first (in id order, as every
        // path does, so two transactions never wait on each other in a cycle).
        let wu_ids: Vec<i64> =
            sqlx::query_scalar("SELECT DISTINCT wu_id FROM replicas WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        let mut tx = self.pool.begin().await?;
        let wus = lock_wus(&mut tx, &wu_ids).await?;
        let mut replicas: HashMap<i64, ReplicaRow> = replicas_of(&mut tx, &wu_ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();

        let mut acks = Vec::with_capacity(reports.len());
        let mut touched = Vec::new();
        let mut credits = Credits::default();
        for report in reports {
            let ack = |status, message: &str| Ack {
                replica_id: report.replica_id,
                status,
                message: message.to_string(),
            };
            let Some(row) = replicas.get(&report.replica_id).cloned() else {
                acks.push(ack(AckStatus::Rejected, "unknown replica"));
                continue;
            };
            if row.worker_id != worker {
                acks.push(ack(AckStatus::Rejected, "not this worker's replica"));
                continue;
            }
            let wu = &wus[&row.wu_id];
            let recorded = record(&mut tx, wu, &row, report, &mut credits).await?;
            if recorded.status == AckStatus::Accepted {
                touched.push(row.wu_id);
                // Keep the in-memory view current for a second report of the same replica.
                if let Some(r) = replicas.get_mut(&row.id) {
                    r.state = recorded.new_state;
                }
            }
            acks.push(Ack {
                replica_id: report.replica_id,
                status: recorded.status,
                message: recorded.message,
            });
        }
        touched.sort_unstable();
        touched.dedup();
        transition(&mut tx, &wus, &touched, &mut credits).await?;
        let rejected = acks
            .iter()
            .filter(|a| a.status == AckStatus::Rejected)
            .count();
        for _ in 0..rejected + refused_before {
            credits.add(worker, Credit::Rejected);
        }
        credits.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(acks)
    }

    /// Times out replicas past their deadline and reissues their work; returns how many.
    pub async fn rescue_expired(&self, limit: i64) -> Result<u64, Error> {
        retry_deadlocks(|| self.rescue_once(limit)).await
    }

    async fn rescue_once(&self, limit: i64) -> Result<u64, Error> {
        let wu_ids: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT wu_id FROM (
                 SELECT wu_id FROM replicas WHERE state = 'in_progress' AND deadline < now()
                 LIMIT $1) AS expired",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        if wu_ids.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        let wus = lock_wus(&mut tx, &wu_ids).await?;
        let timed_out: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE replicas SET state = 'timed_out'
             WHERE wu_id = ANY($1) AND state = 'in_progress' AND deadline < now()
             RETURNING worker_id",
        )
        .bind(&wu_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut credits = Credits::default();
        for w in &timed_out {
            credits.add(*w, Credit::Timeout);
        }
        transition(&mut tx, &wus, &wu_ids, &mut credits).await?;
        credits.apply(&mut tx).await?;
        tx.commit().await?;
        Ok(timed_out.len() as u64)
    }

    /// Progress of one study, or of all of them (`None`).
    pub async fn study_status(&self, study: Option<i64>) -> Result<Vec<StudyStatus>, Error> {
        Ok(sqlx::query_as::<_, StudyStatus>(
            "SELECT s.id AS study_id, s.name, s.description, s.module_hash, s.cancelled,
                    extract(epoch FROM s.created_at)::bigint AS created_unix,
                    coalesce(w.total, 0) AS work_units, coalesce(w.pending, 0) AS pending,
                    coalesce(w.validated, 0) AS validated, coalesce(w.failed, 0) AS failed,
                    coalesce(w.cancelled, 0) AS cancelled_units,
                    coalesce(r.in_progress, 0) AS replicas_in_progress,
                    coalesce(r.success, 0) AS replicas_success,
                    coalesce(r.error, 0) AS replicas_error,
                    coalesce(r.timed_out, 0) AS replicas_timed_out,
                    coalesce(r.invalid, 0) AS replicas_invalid
             FROM studies s
             LEFT JOIN LATERAL (
                 SELECT count(*) AS total,
                        count(*) FILTER (WHERE state = 'pending') AS pending,
                        count(*) FILTER (WHERE state = 'validated') AS validated,
                        count(*) FILTER (WHERE state = 'failed') AS failed,
                        count(*) FILTER (WHERE state = 'cancelled') AS cancelled
                 FROM work_units WHERE study_id = s.id) w ON true
             LEFT JOIN LATERAL (
                 SELECT count(*) FILTER (WHERE r.state = 'in_progress') AS in_progress,
                        count(*) FILTER (WHERE r.state = 'success') AS success,
                        count(*) FILTER (WHERE r.state = 'error') AS error,
                        count(*) FILTER (WHERE r.state IN ('timed_out', 'handed_back')) AS timed_out,
                        count(*) FILTER (WHERE r.validate_state = 'invalid') AS invalid
                 FROM replicas r JOIN work_units u ON u.id = r.wu_id WHERE u.study_id = s.id) r ON true
             WHERE $1::bigint IS NULL OR s.id = $1
             ORDER BY s.id",
        )
        .bind(study)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn workers_seen_since(&self, secs: i64) -> Result<i64, Error> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM workers WHERE last_seen > now() - make_interval(secs => $1)",
        )
        .bind(secs as f64)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Cancels a study: its pending work units stop being handed out. None if there is no such study.
    pub async fn cancel_study(&self, study: i64) -> Result<Option<u64>, Error> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query("UPDATE studies SET cancelled = true WHERE id = $1")
            .bind(study)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if found == 0 {
            return Ok(None);
        }
        let n = sqlx::query(
            "UPDATE work_units SET state = 'cancelled', unsent = 0, finished_at = now()
             WHERE id IN (SELECT id FROM work_units WHERE study_id = $1 AND state = 'pending'
                          ORDER BY id FOR UPDATE)
               AND state = 'pending'",
        )
        .bind(study)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(Some(n))
    }

    pub async fn study_exists(&self, study: i64) -> Result<bool, Error> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM studies WHERE id = $1)")
                .bind(study)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The replicas that agreed on each of these findings, in replica order.
    pub async fn agreeing(&self, findings: &[i64]) -> Result<Vec<AgreeingRow>, Error> {
        Ok(sqlx::query_as::<_, AgreeingRow>(
            "SELECT f.id AS finding_id, r.id AS replica_id, r.worker_id, r.platform,
                    coalesce(r.fuel_used, 0) AS fuel_used
             FROM findings f JOIN replicas r ON r.id = ANY(f.agreeing_replicas)
             WHERE f.id = ANY($1) ORDER BY f.id, r.id",
        )
        .bind(findings)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every work unit of a study with how it ended: its finding (if any), how many replicas
    /// it took and how long from its first replica to its end. For the adversarial simulation
    /// and operators' reports.
    pub async fn study_outcomes(&self, study: i64) -> Result<Vec<WuOutcome>, Error> {
        Ok(sqlx::query_as::<_, WuOutcome>(
            "SELECT w.id AS wu_id, w.input, w.state, f.output_hash, f.confidence, f.unreplicated,
                    w.n_issued::bigint AS replicas,
                    extract(epoch FROM (w.finished_at - (SELECT min(r.issued_at) FROM replicas r
                                                         WHERE r.wu_id = w.id)))::float8 AS secs
             FROM work_units w LEFT JOIN findings f ON f.wu_id = w.id
             WHERE w.study_id = $1 ORDER BY w.id",
        )
        .bind(study)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Counts breaches of the replication invariants among a study's work units (all zero when
    /// the trust engine holds): more replicas than `max_total_results`, two replicas on one
    /// worker or one account, a validated unit without exactly one finding or without a valid
    /// canonical replica, a finding on an unvalidated unit, and a reported success on a
    /// settled unit never checked against the canonical output.
    pub async fn invariant_breaches(&self, study: i64) -> Result<InvariantBreaches, Error> {
        Ok(sqlx::query_as::<_, InvariantBreaches>(
            "WITH w AS (SELECT * FROM work_units WHERE study_id = $1),
                  r AS (SELECT r.* FROM replicas r JOIN w ON w.id = r.wu_id)
             SELECT
               (SELECT count(*) FROM w WHERE n_issued > max_total_results
                   OR (SELECT count(*) FROM r WHERE r.wu_id = w.id) > max_total_results) AS over_issued,
               (SELECT count(*) FROM (SELECT 1 FROM r GROUP BY wu_id, worker_id
                                      HAVING count(*) > 1) x) AS same_worker,
               (SELECT count(*) FROM (SELECT 1 FROM r WHERE account IS NOT NULL
                                      GROUP BY wu_id, account HAVING count(*) > 1) x) AS same_account,
               (SELECT count(*) FROM w WHERE state = 'validated'
                   AND (SELECT count(*) FROM findings f WHERE f.wu_id = w.id) <> 1) AS findings_not_one,
               (SELECT count(*) FROM w WHERE state = 'validated' AND NOT EXISTS (
                   SELECT 1 FROM r WHERE r.id = w.canonical_replica_id AND r.wu_id = w.id
                     AND r.validate_state = 'valid')) AS bad_canonical,
               (SELECT count(*) FROM findings f JOIN w ON w.id = f.wu_id
                 WHERE w.state <> 'validated') AS stray_findings,
               (SELECT count(*) FROM r JOIN w ON w.id = r.wu_id
                 WHERE w.state = 'validated' AND r.state = 'success'
                   AND r.validate_state = 'init') AS unchecked",
        )
        .bind(study)
        .fetch_one(&self.pool)
        .await?)
    }

    pub async fn failures(&self, study: i64, limit: i64) -> Result<Vec<FailureRow>, Error> {
        Ok(sqlx::query_as::<_, FailureRow>(
            "SELECT id AS wu_id, fail_reason AS reason, params FROM work_units
             WHERE study_id = $1 AND state = 'failed' ORDER BY id LIMIT $2",
        )
        .bind(study)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Runs a transaction again (a few times) when PostgreSQL aborted it to break a deadlock or a
/// serialization conflict. Work units and then workers are locked in id order, so this is a
/// safety net only: the aborted transaction changed nothing and simply runs again.
async fn retry_deadlocks<T, F, Fut>(mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(Error::Database(sqlx::Error::Database(e)))
                if tries < 5 && matches!(e.code().as_deref(), Some("40P01" | "40001")) =>
            {
                tries += 1;
                tracing::debug!(tries, "transaction aborted by a deadlock; retrying");
                tokio::time::sleep(Duration::from_millis(5 * tries)).await;
            }
            other => return other,
        }
    }
}

/// Creates a study in the caller's transaction (see `Store::create_study`).
pub(crate) async fn create_study_in(
    tx: &mut Transaction<'static, Postgres>,
    s: &NewStudy,
) -> Result<CreatedStudy, Error> {
    let study_id: i64 = sqlx::query_scalar(
        "INSERT INTO studies (name, description, module_hash, owner_key) VALUES ($1, $2, $3, $4)
         RETURNING id",
    )
    .bind(&s.name)
    .bind(&s.description)
    .bind(&s.module_hash[..])
    .bind(s.owner)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO study_parents (study_id, parent_finding_id)
         SELECT $1, p FROM UNNEST($2::bigint[]) AS p ON CONFLICT DO NOTHING",
    )
    .bind(study_id)
    .bind(&s.parents)
    .execute(&mut **tx)
    .await?;
    let all_hashes: Vec<Vec<u8>> = s
        .inputs
        .iter()
        .map(|i| blake3::hash(i).as_bytes().to_vec())
        .collect();
    let known: HashMap<Vec<u8>, i64> = if s.dedup {
        ledger::validated_twins(
            tx,
            &s.module_hash,
            &all_hashes,
            &s.policy,
            s.tolerance.as_ref(),
        )
        .await?
    } else {
        HashMap::new()
    };
    let existing: Vec<i64> = all_hashes
        .iter()
        .map(|h| known.get(h).copied().unwrap_or(0))
        .collect();
    let fresh: Vec<usize> = (0..s.inputs.len()).filter(|&i| existing[i] == 0).collect();
    let mut ids = Vec::with_capacity(fresh.len());
    for chunk in fresh.chunks(10_000) {
        let inputs: Vec<&[u8]> = chunk.iter().map(|&i| s.inputs[i].as_slice()).collect();
        let hashes: Vec<&[u8]> = chunk.iter().map(|&i| all_hashes[i].as_slice()).collect();
        let params: Vec<Option<String>> = inputs.iter().map(|i| params_of(i)).collect();
        let p = &s.policy;
        let b = &s.bounds;
        let mut chunk_ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO work_units (study_id, module_hash, input, input_hash, params,
                 min_quorum, target_nresults, max_error_results, max_total_results,
                 max_success_results, delay_bound_secs, fuel, memory_bytes, output_bytes,
                 wall_ms, unsent, adaptive, tolerance)
             SELECT $1, $2, t.input, t.hash, t.params::jsonb, $6, $7, $8, $9, $10, $11,
                    $12, $13, $14, $15, $7, $16, $17
             FROM UNNEST($3::bytea[], $4::bytea[], $5::text[]) AS t(input, hash, params)
             RETURNING id",
        )
        .bind(study_id)
        .bind(&s.module_hash[..])
        .bind(&inputs)
        .bind(&hashes)
        .bind(&params)
        .bind(p.min_quorum)
        .bind(p.target_nresults)
        .bind(p.max_error_results)
        .bind(p.max_total_results)
        .bind(p.max_success_results)
        .bind(p.delay_bound_secs)
        .bind(b.fuel)
        .bind(b.memory_bytes)
        .bind(b.output_bytes)
        .bind(b.wall_ms)
        .bind(p.adaptive)
        .bind(s.tolerance.as_ref().map(sqlx::types::Json))
        .fetch_all(&mut **tx)
        .await?;
        // Ids come from one sequence in insertion order, which is the input order.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids);
    }
    let mut work_unit_ids = vec![0; s.inputs.len()];
    for (i, id) in fresh.into_iter().zip(ids) {
        work_unit_ids[i] = id;
    }
    Ok(CreatedStudy {
        study_id,
        work_unit_ids,
        existing,
    })
}

/// The input as indexed parameters, when it is a JSON object.
/// jsonb refuses the NUL character, so such an input is kept but not indexed as parameters.
fn params_of(input: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(input) {
        Ok(v @ serde_json::Value::Object(_)) => {
            Some(v.to_string()).filter(|t| !t.contains("\\u0000"))
        }
        _ => None,
    }
}

async fn lock_wus(
    tx: &mut Transaction<'static, Postgres>,
    ids: &[i64],
) -> Result<HashMap<i64, LockedWu>, Error> {
    Ok(sqlx::query_as::<_, LockedWu>(LOCK_WUS)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|w| (w.id, w))
        .collect())
}

async fn replicas_of(
    tx: &mut Transaction<'static, Postgres>,
    wu_ids: &[i64],
) -> Result<Vec<ReplicaRow>, Error> {
    Ok(sqlx::query_as::<_, ReplicaRow>(REPLICAS_OF)
        .bind(wu_ids)
        .fetch_all(&mut **tx)
        .await?)
}

struct Recorded {
    status: AckStatus,
    message: String,
    new_state: ReplicaState,
}

/// Records one report against its replica (whose work unit is locked). A repeat of what is
/// already recorded is a duplicate; anything else after a result is refused.
async fn record(
    tx: &mut Transaction<'static, Postgres>,
    wu: &LockedWu,
    row: &ReplicaRow,
    report: &Report,
    credits: &mut Credits,
) -> Result<Recorded, Error> {
    let done = |status, message: &str| Recorded {
        status,
        message: message.to_string(),
        new_state: row.state,
    };
    // A result that breaks the contract is recorded as the error it is, not as a success.
    let outcome = match &report.outcome {
        Outcome::Success { output, fuel_used } => {
            if output.len() as i64 > wu.output_bytes {
                Outcome::Error {
                    kind: "output_too_large".into(),
                    message: format!(
                        "output of {} bytes over the cap of {}",
                        output.len(),
                        wu.output_bytes
                    ),
                    fuel_used: *fuel_used,
                }
            } else if let Err(e) = parse_metrics(output) {
                Outcome::Error {
                    kind: "bad_output".into(),
                    message: e.to_string(),
                    fuel_used: *fuel_used,
                }
            } else {
                report.outcome.clone()
            }
        }
        other => other.clone(),
    };
    match (row.state, &outcome) {
        (ReplicaState::Success, Outcome::Success { output, .. }) => {
            return Ok(
                if row.output_hash.as_deref() == Some(blake3::hash(output).as_bytes()) {
                    done(AckStatus::Duplicate, "already recorded")
                } else {
                    done(
                        AckStatus::Rejected,
                        "a different result was already recorded",
                    )
                },
            );
        }
        (ReplicaState::Error, Outcome::Error { kind, .. }) => {
            return Ok(if row.error_kind.as_deref() == Some(kind) {
                done(AckStatus::Duplicate, "already recorded")
            } else {
                done(
                    AckStatus::Rejected,
                    "a different result was already recorded",
                )
            });
        }
        (ReplicaState::Success | ReplicaState::Error, _) => {
            return Ok(done(
                AckStatus::Rejected,
                "a different result was already recorded",
            ));
        }
        (ReplicaState::TimedOut | ReplicaState::HandedBack, Outcome::HandBack) => {
            return Ok(done(AckStatus::Duplicate, "already reissued"));
        }
        _ => {}
    }
    let new_state = match &outcome {
        Outcome::HandBack => {
            sqlx::query("UPDATE replicas SET state = 'handed_back', reported_at = now() WHERE id = $1 AND state = 'in_progress'")
                .bind(row.id)
                .execute(&mut **tx)
                .await?;
            ReplicaState::HandedBack
        }
        Outcome::Success { output, fuel_used } => {
            // Late results (after a timeout) still count: they credit or discredit the worker.
            let hash = blake3::hash(output);
            let within = |tol: &scheduler::Tolerance,
                          canonical: &accrete_proto::output::Metrics| {
                parse_metrics(output).is_ok_and(|m| scheduler::within_tolerance(tol, canonical, &m))
            };
            let validate_state = match (&wu.state, &wu.canonical_hash) {
                (WuState::Validated, Some(c)) if c.as_slice() == hash.as_bytes() => {
                    ValidateState::Valid
                }
                (WuState::Validated, Some(_))
                    if wu
                        .tolerance
                        .as_ref()
                        .zip(wu.canonical_metrics.as_ref())
                        .is_some_and(|(t, c)| within(&t.0, &c.0)) =>
                {
                    ValidateState::Valid
                }
                (WuState::Validated, Some(_)) => ValidateState::Invalid,
                _ => ValidateState::Init,
            };
            // Once a unit is settled only the hash is kept; the canonical output lives in the finding.
            let keep_output = wu.state == WuState::Pending;
            sqlx::query(
                "UPDATE replicas SET state = 'success', output = $2, output_hash = $3, fuel_used = $4,
                     wall_micros = $5, reported_at = now(), validate_state = $6
                 WHERE id = $1 AND state IN ('in_progress', 'timed_out', 'handed_back')",
            )
            .bind(row.id)
            .bind(keep_output.then_some(output.as_slice()))
            .bind(&hash.as_bytes()[..])
            .bind(fuel_used)
            .bind(report.wall_micros)
            .bind(validate_state)
            .execute(&mut **tx)
            .await?;
            credits.verdict(row.worker_id, validate_state);
            ReplicaState::Success
        }
        Outcome::Error {
            kind,
            message,
            fuel_used,
        } => {
            sqlx::query(
                "UPDATE replicas SET state = 'error', error_kind = $2, error_message = $3,
                     fuel_used = $4, wall_micros = $5, reported_at = now()
                 WHERE id = $1 AND state IN ('in_progress', 'timed_out', 'handed_back')",
            )
            .bind(row.id)
            .bind(kind)
            .bind(clean_text(message, 2000))
            .bind(fuel_used)
            .bind(report.wall_micros)
            .execute(&mut **tx)
            .await?;
            credits.add(row.worker_id, Credit::Error);
            ReplicaState::Error
        }
    };
    Ok(Recorded {
        status: AckStatus::Accepted,
        message: String::new(),
        new_state,
    })
}

/// Text a worker sent, fit for a `text` column: at most `max` characters and no NUL, which
/// PostgreSQL refuses (a refused value would fail the whole report, again on every retry).
pub fn clean_text(s: &str, max: usize) -> String {
    s.chars().filter(|&c| c != '\0').take(max).collect()
}

/// Runs the transitioner on each pending work unit among `ids` (all locked by the caller) and
/// applies its decision.
async fn transition(
    tx: &mut Transaction<'static, Postgres>,
    wus: &HashMap<i64, LockedWu>,
    ids: &[i64],
    credits: &mut Credits,
) -> Result<(), Error> {
    let pending: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| wus.get(id).is_some_and(|w| w.state == WuState::Pending))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let mut by_wu: HashMap<i64, Vec<ReplicaRow>> = HashMap::new();
    for r in replicas_of(tx, &pending).await? {
        by_wu.entry(r.wu_id).or_default().push(r);
    }
    for id in pending {
        let wu = &wus[&id];
        let rows = by_wu.remove(&id).unwrap_or_default();
        let mut views: Vec<ReplicaView> = rows.iter().map(view).collect();
        if let Some(tol) = &wu.tolerance {
            compare_within(&tol.0, &rows, &mut views);
        }
        match scheduler::decide(&wu.policy(), wu.n_issued, wu.unsent, &views) {
            Decision::Wait { unsent } => {
                if unsent != wu.unsent {
                    sqlx::query(
                        "UPDATE work_units SET unsent = $2 WHERE id = $1 AND state = 'pending'",
                    )
                    .bind(id)
                    .bind(unsent)
                    .execute(&mut **tx)
                    .await?;
                }
            }
            Decision::Fail { reason } => {
                sqlx::query(
                    "UPDATE work_units SET state = 'failed', fail_reason = $2, unsent = 0, finished_at = now()
                     WHERE id = $1 AND state = 'pending'",
                )
                .bind(id)
                .bind(reason)
                .execute(&mut **tx)
                .await?;
            }
            Decision::Validate {
                canonical,
                valid,
                invalid,
            } => {
                validate(tx, wu, &rows, canonical, &valid, &invalid, credits).await?;
            }
        }
    }
    Ok(())
}

fn view(r: &ReplicaRow) -> ReplicaView {
    let outcome = match r.state {
        ReplicaState::InProgress => ReplicaOutcome::InFlight,
        ReplicaState::Success => {
            let mut h = [0u8; 32];
            h.copy_from_slice(r.output_hash.as_deref().unwrap_or(&[0; 32]));
            ReplicaOutcome::Success(h)
        }
        ReplicaState::Error => ReplicaOutcome::Error(format!(
            "{}: {}",
            r.error_kind.as_deref().unwrap_or("error"),
            r.error_message.as_deref().unwrap_or("")
        )),
        ReplicaState::TimedOut | ReplicaState::HandedBack => ReplicaOutcome::Lost,
    };
    ReplicaView {
        id: r.id,
        outcome,
        // A worker that lost its trust since the claim (a spot check caught it) does not get
        // its unchecked work validated alone: the unit goes back to replication.
        solo: r.solo && scheduler::trusted(r.consecutive_valid, r.valid_count, r.invalid_count),
    }
}

/// Under a study's tolerance, replaces each success's hash by that of the first earlier
/// success it agrees with, so `decide` groups agreeing outputs as if they were equal.
fn compare_within(tol: &scheduler::Tolerance, rows: &[ReplicaRow], views: &mut [ReplicaView]) {
    let successes: Vec<(
        usize,
        scheduler::ReplicaOutcome,
        accrete_proto::output::Metrics,
    )> = rows
        .iter()
        .zip(views.iter())
        .enumerate()
        .filter_map(|(i, (r, v))| {
            let metrics = parse_metrics(r.output.as_deref()?).ok()?;
            matches!(v.outcome, ReplicaOutcome::Success(_)).then(|| (i, v.outcome.clone(), metrics))
        })
        .collect();
    let metrics: Vec<_> = successes.iter().map(|s| s.2.clone()).collect();
    for (k, rep) in scheduler::tolerance_groups(tol, &metrics)
        .into_iter()
        .enumerate()
    {
        views[successes[k].0].outcome = successes[rep].1.clone();
    }
}

/// Settles a work unit on its canonical replica: marks verdicts, credits workers, records the
/// one finding, and drops the replicas' copies of the output.
async fn validate(
    tx: &mut Transaction<'static, Postgres>,
    wu: &LockedWu,
    rows: &[ReplicaRow],
    canonical: i64,
    valid: &[i64],
    invalid: &[i64],
    credits: &mut Credits,
) -> Result<(), Error> {
    let canon = rows
        .iter()
        .find(|r| r.id == canonical)
        .expect("the canonical replica is one of the unit's replicas");
    let output = canon.output.clone().unwrap_or_default();
    let metrics = parse_metrics(&output).map_err(|e| {
        Error::Internal(format!(
            "canonical output of work unit {} broke the contract: {e}",
            wu.id
        ))
    })?;
    let verdict = |ids: &[i64], state: ValidateState| {
        sqlx::query("UPDATE replicas SET validate_state = $2 WHERE id = ANY($1)")
            .bind(ids.to_vec())
            .bind(state)
    };
    verdict(valid, ValidateState::Valid)
        .execute(&mut **tx)
        .await?;
    verdict(invalid, ValidateState::Invalid)
        .execute(&mut **tx)
        .await?;
    // An unreplicated result was checked against nothing: it earns its worker no credit.
    let unreplicated = valid.len() == 1 && view(canon).solo;
    // Confidence rests on the workers' reputations before this verdict counts.
    let voters: Vec<scheduler::Voter> = rows
        .iter()
        .filter(|r| valid.contains(&r.id))
        .map(|r| scheduler::Voter {
            error_rate: scheduler::error_rate(r.valid_count, r.invalid_count),
            platform: r.platform.clone(),
        })
        .collect();
    let confidence = scheduler::confidence(&voters);
    let mut platforms: Vec<String> = voters.iter().map(|v| v.platform.clone()).collect();
    platforms.sort_unstable();
    platforms.dedup();
    for (ids, verdict) in [
        (valid, ValidateState::Valid),
        (invalid, ValidateState::Invalid),
    ] {
        if unreplicated && verdict == ValidateState::Valid {
            continue;
        }
        for r in rows.iter().filter(|r| ids.contains(&r.id)) {
            credits.verdict(r.worker_id, verdict);
        }
    }
    sqlx::query(
        "UPDATE work_units SET state = 'validated', canonical_replica_id = $2, unsent = 0, finished_at = now()
         WHERE id = $1 AND state = 'pending'",
    )
    .bind(wu.id)
    .bind(canonical)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO findings (wu_id, study_id, module_hash, input_hash, output_hash, output, metrics,
             params, confidence, agreeing_replicas, dissenting, platforms, unreplicated)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(wu.id)
    .bind(wu.study_id)
    .bind(&wu.module_hash)
    .bind(&wu.input_hash)
    .bind(&canon.output_hash)
    .bind(&output)
    .bind(sqlx::types::Json(&metrics))
    .bind(&wu.params)
    .bind(confidence)
    .bind(valid.to_vec())
    .bind(invalid.len() as i32)
    .bind(&platforms)
    .bind(unreplicated)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE replicas SET output = NULL WHERE wu_id = $1 AND output IS NOT NULL")
        .bind(wu.id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
