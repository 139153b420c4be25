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

mod ledger;
pub use ledger::*;

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
    pub bounds: Bounds,
    pub inputs: Vec<Vec<u8>>,
    /// Findings the study builds on (checked to exist by the caller).
    pub parents: Vec<i64>,
    /// Answer inputs already validated (same module, input and policy) with their findings.
    pub dedup: bool,
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
    output_bytes: i64,
    unsent: i32,
    n_issued: i32,
    study_id: i64,
    module_hash: Vec<u8>,
    input_hash: Vec<u8>,
    params: Option<serde_json::Value>,
    canonical_hash: Option<Vec<u8>>,
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
}

const LOCK_WUS: &str = "
    SELECT w.id, w.state, w.min_quorum, w.target_nresults, w.max_error_results,
           w.max_total_results, w.max_success_results, w.delay_bound_secs, w.output_bytes,
           w.unsent, w.n_issued, w.study_id, w.module_hash, w.input_hash, w.params,
           (SELECT r.output_hash FROM replicas r WHERE r.id = w.canonical_replica_id) AS canonical_hash
    FROM work_units w WHERE w.id = ANY($1) ORDER BY w.id FOR UPDATE";

const REPLICAS_OF: &str = "
    SELECT id, wu_id, worker_id, state, output_hash, output, error_kind, error_message
    FROM replicas WHERE wu_id = ANY($1) ORDER BY id";

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
            "INSERT INTO workers (id, token_hash, name, arch, os, cores, memory_bytes, runtime)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(w.id)
        .bind(&w.token_hash[..])
        .bind(&w.name)
        .bind(&w.arch)
        .bind(&w.os)
        .bind(w.cores)
        .bind(w.memory_bytes)
        .bind(&w.runtime)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn worker_token_hash(&self, id: Uuid) -> Result<Option<Vec<u8>>, Error> {
        Ok(
            sqlx::query_scalar("SELECT token_hash FROM workers WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
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

    /// Hands up to `max` replicas to a worker in one statement: locks work units that still want
    /// replicas and that this worker holds none of (nor is excluded from, as the original
    /// workers are from an adoption's re-run), skipping units another claim has locked.
    pub async fn claim(&self, worker: Uuid, max: i64) -> Result<Vec<Claimed>, Error> {
        Ok(sqlx::query_as::<_, Claimed>(
            "WITH picked AS (
                 SELECT w.id FROM work_units w
                 WHERE w.state = 'pending' AND w.unsent > 0
                   AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.wu_id = w.id AND r.worker_id = $1)
                   AND NOT EXISTS (SELECT 1 FROM wu_exclusions x WHERE x.wu_id = w.id AND x.worker_id = $1)
                 ORDER BY w.id
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             ), taken AS (
                 UPDATE work_units w SET unsent = w.unsent - 1, n_issued = w.n_issued + 1
                 FROM picked WHERE w.id = picked.id
                 RETURNING w.id, w.module_hash, w.input, w.input_hash, w.fuel, w.memory_bytes,
                           w.output_bytes, w.wall_ms, w.delay_bound_secs
             ), made AS (
                 INSERT INTO replicas (wu_id, worker_id, platform, deadline)
                 SELECT t.id, $1,
                        (SELECT k.arch || '/' || k.os FROM workers k WHERE k.id = $1),
                        now() + make_interval(secs => t.delay_bound_secs)
                 FROM taken t
                 RETURNING id, wu_id, deadline
             )
             SELECT m.id AS replica_id, t.id AS wu_id, t.module_hash, t.input, t.input_hash,
                    t.fuel, t.memory_bytes, t.output_bytes, t.wall_ms,
                    extract(epoch FROM m.deadline)::bigint AS deadline_unix
             FROM made m JOIN taken t ON t.id = m.wu_id
             ORDER BY m.id",
        )
        .bind(worker)
        .bind(max)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records a batch of results from one worker, then moves each touched work unit on. One
    /// transaction: either every acknowledged result is durable or none is.
    pub async fn report(&self, worker: Uuid, reports: &[Report]) -> Result<Vec<Ack>, Error> {
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
            let recorded = record(&mut tx, wu, &row, report).await?;
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
        transition(&mut tx, &wus, &touched).await?;
        tx.commit().await?;
        Ok(acks)
    }

    /// Times out replicas past their deadline and reissues their work; returns how many.
    pub async fn rescue_expired(&self, limit: i64) -> Result<u64, Error> {
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
        sqlx::query(
            "UPDATE workers w SET timeout_count = w.timeout_count + c.n
             FROM (SELECT id, count(*) AS n FROM UNNEST($1::uuid[]) AS id GROUP BY id) c
             WHERE w.id = c.id",
        )
        .bind(&timed_out)
        .execute(&mut *tx)
        .await?;
        transition(&mut tx, &wus, &wu_ids).await?;
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
             WHERE study_id = $1 AND state = 'pending'",
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

/// Creates a study in the caller's transaction (see `Store::create_study`).
pub(crate) async fn create_study_in(
    tx: &mut Transaction<'static, Postgres>,
    s: &NewStudy,
) -> Result<CreatedStudy, Error> {
    let study_id: i64 = sqlx::query_scalar(
        "INSERT INTO studies (name, description, module_hash) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(&s.name)
    .bind(&s.description)
    .bind(&s.module_hash[..])
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
        ledger::validated_twins(tx, &s.module_hash, &all_hashes, &s.policy).await?
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
                 wall_ms, unsent)
             SELECT $1, $2, t.input, t.hash, t.params::jsonb, $6, $7, $8, $9, $10, $11,
                    $12, $13, $14, $15, $7
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
fn params_of(input: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(input) {
        Ok(v @ serde_json::Value::Object(_)) => Some(v.to_string()),
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
            let validate_state = match (&wu.state, &wu.canonical_hash) {
                (WuState::Validated, Some(c)) if c.as_slice() == hash.as_bytes() => {
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
            credit(tx, row.worker_id, validate_state).await?;
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
            .bind(truncate(message, 2000))
            .bind(fuel_used)
            .bind(report.wall_micros)
            .execute(&mut **tx)
            .await?;
            sqlx::query("UPDATE workers SET error_count = error_count + 1 WHERE id = $1")
                .bind(row.worker_id)
                .execute(&mut **tx)
                .await?;
            ReplicaState::Error
        }
    };
    Ok(Recorded {
        status: AckStatus::Accepted,
        message: String::new(),
        new_state,
    })
}

async fn credit(
    tx: &mut Transaction<'static, Postgres>,
    worker: Uuid,
    verdict: ValidateState,
) -> Result<(), Error> {
    let sql = match verdict {
        ValidateState::Valid => "UPDATE workers SET valid_count = valid_count + 1 WHERE id = $1",
        ValidateState::Invalid => {
            "UPDATE workers SET invalid_count = invalid_count + 1 WHERE id = $1"
        }
        ValidateState::Init | ValidateState::Inconclusive => return Ok(()),
    };
    sqlx::query(sql).bind(worker).execute(&mut **tx).await?;
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Runs the transitioner on each pending work unit among `ids` (all locked by the caller) and
/// applies its decision.
async fn transition(
    tx: &mut Transaction<'static, Postgres>,
    wus: &HashMap<i64, LockedWu>,
    ids: &[i64],
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
        let views: Vec<ReplicaView> = rows.iter().map(view).collect();
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
                validate(tx, wu, &rows, canonical, &valid, &invalid).await?;
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
    ReplicaView { id: r.id, outcome }
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
    for (ids, column) in [(valid, "valid"), (invalid, "invalid")] {
        let workers: Vec<Uuid> = rows
            .iter()
            .filter(|r| ids.contains(&r.id))
            .map(|r| r.worker_id)
            .collect();
        let sql = if column == "valid" {
            "UPDATE workers SET valid_count = valid_count + 1 WHERE id = ANY($1)"
        } else {
            "UPDATE workers SET invalid_count = invalid_count + 1 WHERE id = ANY($1)"
        };
        sqlx::query(sql).bind(&workers).execute(&mut **tx).await?;
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
             params, confidence, agreeing_replicas, dissenting)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(wu.id)
    .bind(wu.study_id)
    .bind(&wu.module_hash)
    .bind(&wu.input_hash)
    .bind(&canon.output_hash)
    .bind(&output)
    .bind(sqlx::types::Json(&metrics))
    .bind(&wu.params)
    .bind(scheduler::confidence(valid.len()))
    .bind(valid.to_vec())
    .bind(invalid.len() as i32)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE replicas SET output = NULL WHERE wu_id = $1 AND output IS NOT NULL")
        .bind(wu.id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
