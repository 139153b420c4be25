//! PostgreSQL access: the only module that writes SQL. Every state change is a compare-and-set,
//! and every replica of a work unit changes only while that work unit's row is locked, so the
//! claim, reports and the rescuer can run in any number of scheduler processes at once.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{FromRow, PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::error::Error;
use crate::scheduler::{self, Policy};

mod auth;
mod ledger;
mod ops;
pub use auth::*;
mod report;
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
    /// Its volunteer account, if any, and what is left of the account's daily quota (shared by
    /// all the account's workers).
    pub account: Option<String>,
    pub account_quota_left: Option<i32>,
    pub account_daily_quota: Option<i32>,
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
    /// Connections for the hot path's statements only (see [`HOT_SETTINGS`]).
    hot: PgPool,
}

impl Store {
    /// Connects, and applies the embedded migrations. `max_connections` is the hot path's pool;
    /// everything else shares a quarter of that (at least two).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, Error> {
        let base: PgConnectOptions = url.parse::<PgConnectOptions>().map_err(Error::Database)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.div_ceil(4).max(2))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(
                base.clone()
                    .options(COMMON_SETTINGS.iter().copied())
                    .options(CUSTOM_PLANS.iter().copied()),
            )
            .await?;
        sqlx::migrate!("../migrations")
            .run(&pool)
            .await
            .map_err(|e| Error::Database(e.into()))?;
        let hot = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(
                base.options(COMMON_SETTINGS.iter().copied())
                    .options(HOT_SETTINGS.iter().copied()),
            );
        Ok(Store { pool, hot })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The hot path's pool, whose connections plan each statement once ([`HOT_SETTINGS`]); for
    /// the statements of [`HOT_STATEMENTS`] only.
    pub fn hot_pool(&self) -> &PgPool {
        &self.hot
    }

    /// Closes both pools.
    pub async fn close(&self) {
        self.hot.close().await;
        self.pool.close().await;
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

    /// Whether a worker is blocked, and what is left of its daily quota and of its account's.
    pub async fn standing(&self, worker: Uuid) -> Result<Option<Standing>, Error> {
        Ok(sqlx::query_as::<_, Standing>(
            "SELECT k.blocked, k.daily_quota,
                    GREATEST(k.daily_quota - CASE WHEN k.quota_day = (now() AT TIME ZONE 'UTC')::date
                                                  THEN k.quota_used ELSE 0 END, 0) AS quota_left,
                    k.account, a.daily_quota AS account_daily_quota,
                    GREATEST(a.daily_quota - CASE WHEN a.quota_day = (now() AT TIME ZONE 'UTC')::date
                                                  THEN a.quota_used ELSE 0 END, 0)
                        AS account_quota_left,
                    extract(epoch FROM (((now() AT TIME ZONE 'UTC')::date + 1)::timestamp
                                        AT TIME ZONE 'UTC'))::bigint AS resets_unix,
                    to_char((now() AT TIME ZONE 'UTC')::date + 1, 'YYYY-MM-DD') || ' 00:00 UTC'
                        AS resets_at
             FROM workers k LEFT JOIN accounts a ON a.name = k.account
             WHERE k.id = $1",
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

    /// Hands up to `max` replicas to a worker in one statement (on the hot path's pool, for its
    /// plan: [`HOT_SETTINGS`]). It locks the worker's row and
    /// then its account's (so both daily quotas are counted exactly, whichever of the account's
    /// machines claim at once), looks at the next pending work units that still want replicas
    /// and that neither this worker nor any worker of its account holds (locking them, skipping
    /// units another claim has locked), prefers among them units with no replica on this
    /// worker's platform yet (cross-platform validation), and takes at most what is left of the
    /// smaller of the two quotas. Adaptive replication happens here too: when a trusted worker
    /// takes the first replica of an adaptive unit and the spot-check draw says no, the same
    /// statement sets the unit's `unsent` to 0 and marks the replica `solo`, so nothing else is
    /// issued unless that replica fails. A blocked or over-quota worker gets nothing;
    /// [`Store::standing`] says why. Workers excluded from a unit (the original workers of an
    /// adoption's re-run) never get it.
    ///
    /// Cost does not grow with the queue: the scan walks the partial index `work_units_dispatch`
    /// (pending units that still want replicas) in id order within a lane, and each `NOT EXISTS`
    /// reads only one unit's few replicas (through the unique index on `(wu_id, worker_id)`).
    /// `OFFSET 0` keeps those subqueries correlated probes: without it the planner may turn them
    /// into anti-joins that read every replica ever issued in `wu_id` order (about a second per
    /// claim with 800,000 settled replicas). Nor does it grow much with the number of claimers:
    /// the queue is read in [`DISPATCH_LANES`] lanes (`id % 16`, the leading column of
    /// `work_units_dispatch`), each in id order, from a random lane onwards (`ahead`) and then
    /// round to the lanes before it (`behind`), rather than by everybody from its head, where
    /// every claim walked past the units all the others had just locked.
    pub async fn claim(&self, worker: Uuid, max: i64) -> Result<Vec<Claimed>, Error> {
        claim_on(&self.hot, worker, max).await
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

/// Text a worker sent, fit for a `text` column: at most `max` characters and no NUL, which
/// PostgreSQL refuses (a refused value would fail the whole report, again on every retry).
pub fn clean_text(s: &str, max: usize) -> String {
    s.chars().filter(|&c| c != '\0').take(max).collect()
}

/// The claim ([`Store::claim`]).
const CLAIM: &str = "WITH me AS (
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
    ), acct AS (
        SELECT a.name,
               GREATEST(a.daily_quota::bigint
                   - CASE WHEN a.quota_day = (now() AT TIME ZONE 'UTC')::date
                          THEN a.quota_used ELSE 0 END, 0) AS left_today
        FROM accounts a WHERE a.name = (SELECT account FROM me)
        FOR NO KEY UPDATE
    ), lim AS (
        -- Always one row: a NULL limit would mean no limit at all.
        SELECT coalesce((SELECT LEAST(me.allowed,
                                      coalesce((SELECT left_today FROM acct), me.allowed))
                         FROM me), 0) AS allowed
    ), ahead AS (
        SELECT w.id, w.adaptive, w.n_issued FROM work_units w
        WHERE w.id % 16 >= $7 AND w.state = 'pending' AND w.unsent > 0
          AND NOT EXISTS (SELECT 1 FROM replicas r
                          WHERE r.wu_id = w.id
                            AND (r.worker_id = $1 OR r.account = (SELECT account FROM me))
                          OFFSET 0)
          AND NOT EXISTS (SELECT 1 FROM wu_exclusions x
                          WHERE x.wu_id = w.id AND x.worker_id = $1 OFFSET 0)
        ORDER BY w.id % 16, w.id
        LIMIT 2 * (SELECT allowed FROM lim)
        FOR UPDATE SKIP LOCKED
    ), behind AS (
        -- `ahead` again, but for the lanes before the starting one.
        SELECT w.id, w.adaptive, w.n_issued FROM work_units w
        WHERE w.id % 16 < $7 AND w.state = 'pending' AND w.unsent > 0
          AND NOT EXISTS (SELECT 1 FROM replicas r
                          WHERE r.wu_id = w.id
                            AND (r.worker_id = $1 OR r.account = (SELECT account FROM me))
                          OFFSET 0)
          AND NOT EXISTS (SELECT 1 FROM wu_exclusions x
                          WHERE x.wu_id = w.id AND x.worker_id = $1 OFFSET 0)
        ORDER BY w.id % 16, w.id
        LIMIT 2 * (SELECT allowed FROM lim)
        FOR UPDATE SKIP LOCKED
    ), candidates AS (
        -- A CTE runs, and locks, only as far as its reader reads: `behind` only when
        -- `ahead` is short.
        SELECT * FROM (SELECT * FROM ahead UNION ALL SELECT * FROM behind) u
        LIMIT 2 * (SELECT allowed FROM lim)
    ), picked AS (
        SELECT c.id, c.adaptive AND c.n_issued = 0 AND random() >= me.spot_check AS solo
        FROM candidates c CROSS JOIN me
        ORDER BY EXISTS (SELECT 1 FROM replicas r
                         WHERE r.wu_id = c.id AND r.platform = me.platform OFFSET 0), c.id
        LIMIT (SELECT allowed FROM lim)
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
    ), counted_account AS (
        UPDATE accounts a
        SET quota_used = (CASE WHEN a.quota_day = (now() AT TIME ZONE 'UTC')::date
                               THEN a.quota_used ELSE 0 END)
                         + (SELECT count(*) FROM taken),
            quota_day = (now() AT TIME ZONE 'UTC')::date
        WHERE a.name = (SELECT name FROM acct) AND EXISTS (SELECT 1 FROM taken)
    )
    SELECT m.id AS replica_id, t.id AS wu_id, t.module_hash, t.input, t.input_hash,
           t.fuel, t.memory_bytes, t.output_bytes, t.wall_ms,
           extract(epoch FROM m.deadline)::bigint AS deadline_unix
    FROM made m JOIN taken t ON t.id = m.wu_id
    ORDER BY m.id";

/// [`Store::claim`] on a hot connection, or in a hot transaction (a report's: see
/// [`Store::report_and_claim`]).
pub(super) async fn claim_on<'e, E>(on: E, worker: Uuid, max: i64) -> Result<Vec<Claimed>, Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let lane = rand::random_range(0..DISPATCH_LANES) as i32;
    Ok(sqlx::query_as::<_, Claimed>(CLAIM)
        .bind(worker)
        .bind(max)
        .bind(scheduler::TRUST_AFTER_CONSECUTIVE_VALID)
        .bind(scheduler::TRUST_MAX_ERROR_RATE)
        .bind(scheduler::PRIOR_WRONG)
        .bind(scheduler::PRIOR_RIGHT)
        .bind(lane)
        .fetch_all(on)
        .await?)
}

/// Settings of every connection. No JIT: every statement here is short, and with a large queue
/// the planner's cost estimate for the claim crosses `jit_above_cost`, so each claim would spend
/// 300-600 ms compiling (JIT code is not cached across executions); see BENCHMARKS.md, "Hot
/// path". Nor parallel workers: they cost more to start than these statements take.
const COMMON_SETTINGS: &[(&str, &str)] =
    &[("jit", "off"), ("max_parallel_workers_per_gather", "0")];

/// Custom plans always, outside the hot path: sqlx prepares each statement once per
/// connection, and after five runs PostgreSQL may switch to a generic plan costed on the
/// statistics of that moment. A connection opened while `replicas` was nearly empty then kept a
/// sequential scan of it for a `wu_id = ANY(..)` read as the table grew to millions of rows.
const CUSTOM_PLANS: &[(&str, &str)] = &[("plan_cache_mode", "force_custom_plan")];

/// The hot path's connections (claims, reports, credential checks) plan each statement once
/// and keep that generic plan, rather than planning every execution afresh (see ARCHITECTURE.md,
/// "Plans"): planning was about a quarter of the database's CPU at 5,000 replicas/s. Every
/// statement run on them names its rows by key (`= ANY($n)` on a primary key, the claim's lanes
/// of `work_units_dispatch`, the probes of `(wu_id, worker_id)`), so one plan of index probes
/// is right at any table size. But the planner costs a generic plan on the statistics of the
/// moment, and those of an empty or young table (a fresh database) make a full scan look as
/// cheap as a probe; that plan would then stay until the next ANALYZE. So sequential scans,
/// bitmap scans (unordered: the claim's lanes read that way are all read and sorted before its
/// `LIMIT`, seconds with a million units queued), hash joins and merge joins are ruled out on
/// these connections, and the statements are
/// written to leave the planner no full index scan worth taking (no `ORDER BY` that an index
/// could serve instead of the key condition). `tests/it/plans.rs` checks the plans on a fresh
/// database; only statements listed in [`HOT_STATEMENTS`] may run on this pool.
///
/// A hot statement takes milliseconds. One that runs for seconds is stuck behind a lock or on a
/// plan gone wrong, and would hold its connection while the calls behind it pile up, so it is
/// cancelled at `statement_timeout` (the call fails with `UNAVAILABLE`, which workers retry);
/// a transaction left idle (a server stalled mid-report) is ended with its locks.
const HOT_SETTINGS: &[(&str, &str)] = &[
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_bitmapscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    // Milliseconds.
    ("statement_timeout", "10000"),
    ("idle_in_transaction_session_timeout", "30000"),
];

/// Every statement run on the hot pool, by name, for `tests/it/plans.rs`.
pub const HOT_STATEMENTS: &[(&str, &str)] = &[
    ("claim", CLAIM),
    ("lock work units of replicas", report::LOCK_WUS_OF_REPLICAS),
    ("replicas of work units", report::REPLICAS_OF),
    ("write batch", report::WRITE_BATCH),
    ("worker credential", auth::WORKER_CREDENTIAL),
];

/// Lanes of the claim's queue: `work_units_dispatch` leads with `id % 16` (migration
/// `20261128100001_dispatch_lanes.sql`, and the claim's SQL, write the number out).
pub const DISPATCH_LANES: u32 = 16;
