//! The ledger's SQL: sealing findings and evidence into the hash chain, reading the chain back,
//! the finding queries (filters, metric order, keyset cursors, lineage, leaves, best), evidence,
//! identical-work-unit lookup and adoption proposals.

use std::collections::HashMap;

use serde_json::{Value, json};
use sqlx::{FromRow, Postgres, Transaction};
use uuid::Uuid;

use super::{NewStudy, Store};
use crate::error::Error;
use crate::ledger::{Chain, Entry, GENESIS, canonical_json, hex};
use crate::scheduler::Policy;

/// Only one sealer appends at a time, across every server process.
const SEALER_LOCK: i64 = 0x6163_6372_6574_6501;

/// The sequence number of finding `f`'s ledger entry (NULL until sealed): the findings table
/// does not hold it, so that sealing never writes a finding again (see ARCHITECTURE.md, "The
/// sealer").
macro_rules! entry_seq {
    () => {
        "(SELECT l.seq FROM ledger l WHERE l.finding_id = f.id AND l.kind = 'finding')"
    };
}

/// The columns every finding query returns, as `FindingRow`.
macro_rules! finding_cols {
    () => {
        concat!(
            "f.id, f.study_id, f.wu_id, f.module_hash, f.input_hash, f.output_hash, f.metrics,
             f.params, coalesce(f.current_confidence, f.confidence) AS confidence,
             f.confidence AS validated_confidence, f.dissenting,
             extract(epoch FROM f.created_at)::bigint AS created_unix, NULL::bytea AS output, ",
            entry_seq!(),
            " AS ledger_seq, f.platforms, f.unreplicated"
        )
    };
}

/// Filters that apply to findings `f`: parameters contained ($3, or NULL for none) and metric
/// ranges ($4 names, $5 minimums, $6 maximums; NULL bounds are open). `walk` hides the
/// parameter filter from the GIN index (`IS TRUE`), so the plan walks the metric index in order
/// and filters as it goes; otherwise the planner may start from the GIN index (see
/// `SELECTIVE_PARAMS`).
macro_rules! finding_filters {
    (walk) => {
        concat!(
            " AND ($3::jsonb IS NULL OR (f.params @> $3::jsonb) IS TRUE)",
            metric_ranges!()
        )
    };
    (index) => {
        concat!(" AND f.params @> $3::jsonb", metric_ranges!())
    };
}

macro_rules! metric_ranges {
    () => {
        " AND NOT EXISTS (
              SELECT 1 FROM UNNEST($4::text[], $5::float8[], $6::float8[]) AS r(n, lo, hi)
              WHERE NOT coalesce((f.metrics->>r.n)::float8
                  BETWEEN coalesce(r.lo, '-Infinity') AND coalesce(r.hi, 'Infinity'), false))"
    };
}

/// With a parameter filter, the walk along the metric index visits at most this many entries;
/// a filter too selective to fill the page within them is answered from the GIN index instead
/// (fetch the matches, sort them), which is then cheap because the matches are few.
const WALK_CAP: i64 = 5000;

/// By metric: $1 metric, $2 study (by_study variants), $7 cursor value, $8 cursor id, $9 limit,
/// $10 how many metric-index entries the walk may visit.
///
/// `walk` reads the metric index in order (a fenced subquery) and filters each finding as it
/// comes; `index` lets the planner start from the parameter GIN index and sort the matches.
macro_rules! by_metric {
    ($study:expr, $cmp:literal, $dir:literal, walk) => {
        concat!(
            "SELECT ",
            finding_cols!(),
            ", m.value AS sort_value
             FROM (SELECT m.finding_id, m.value FROM finding_metrics m
                   WHERE m.name = $1 AND ",
            $study,
            " AND (m.value, m.finding_id) ",
            $cmp,
            " ($7::float8, $8::bigint)
                   ORDER BY m.value ",
            $dir,
            ", m.finding_id ",
            $dir,
            " LIMIT $10) AS m
             JOIN findings f ON f.id = m.finding_id WHERE true",
            finding_filters!(walk),
            " ORDER BY m.value ",
            $dir,
            ", m.finding_id ",
            $dir,
            " LIMIT $9"
        )
    };
    ($study:expr, $cmp:literal, $dir:literal, index) => {
        concat!(
            "SELECT ",
            finding_cols!(),
            ", m.value AS sort_value FROM finding_metrics m JOIN findings f ON f.id = m.finding_id
             WHERE m.name = $1 AND $10::bigint > 0 AND ",
            $study,
            " AND (m.value, m.finding_id) ",
            $cmp,
            " ($7::float8, $8::bigint)",
            finding_filters!(index),
            " ORDER BY m.value ",
            $dir,
            ", m.finding_id ",
            $dir,
            " LIMIT $9"
        )
    };
}

/// By id: $2 study, $8 cursor id, $9 limit. Every listing statement is bound with the same ten
/// parameters; the always-true terms mention the ones this order does not use.
macro_rules! by_id {
    ($study:expr, $cmp:literal, $dir:literal) => {
        concat!(
            "SELECT ",
            finding_cols!(),
            ", NULL::float8 AS sort_value FROM findings f
             WHERE ($1::text IS NULL OR true) AND ($7::float8 IS NULL OR true)
               AND ($10::bigint > 0) AND ",
            $study,
            " AND f.id ",
            $cmp,
            " $8::bigint",
            finding_filters!(walk),
            " ORDER BY f.id ",
            $dir,
            " LIMIT $9"
        )
    };
}

#[derive(Debug, FromRow)]
struct SortedFinding {
    #[sqlx(flatten)]
    row: super::FindingRow,
    sort_value: Option<f64>,
}

/// An inclusive range on one metric; `None` bounds are open.
#[derive(Debug, Clone, Default)]
pub struct MetricRange {
    pub metric: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// Where a page of findings starts: after this (metric value, id) in the query's order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cursor {
    pub value: Option<f64>,
    pub id: i64,
}

/// Filters, order and page of a findings listing.
#[derive(Debug, Clone, Default)]
pub struct FindingQuery {
    pub study_id: Option<i64>,
    pub order_by_metric: Option<String>,
    pub descending: bool,
    pub limit: i64,
    /// A JSON object the finding's parameters must contain.
    pub params: Option<Value>,
    pub ranges: Vec<MetricRange>,
    pub after: Option<Cursor>,
}

#[derive(Debug, FromRow)]
pub struct LedgerRow {
    pub seq: i64,
    pub body: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl LedgerRow {
    /// The entry as the format module sees it; a malformed hash column becomes all ones, which
    /// verification then reports as the altered entry it is.
    pub fn entry(self) -> Entry {
        let h = |v: &[u8]| <[u8; 32]>::try_from(v).unwrap_or([0xff; 32]);
        Entry {
            seq: self.seq as u64,
            prev_hash: h(&self.prev_hash),
            hash: h(&self.hash),
            body: self.body,
        }
    }
}

#[derive(Debug, FromRow)]
pub struct EvidenceRow {
    pub id: i64,
    pub finding_id: i64,
    pub kind: String,
    pub detail: Value,
    pub confidence_after: f64,
    pub created_unix: i64,
    pub ledger_seq: Option<i64>,
}

#[derive(Debug, FromRow)]
struct SealFinding {
    id: i64,
    study_id: i64,
    wu_id: i64,
    module_hash: Vec<u8>,
    input_hash: Vec<u8>,
    output_hash: Vec<u8>,
    metrics: Value,
    params: Option<Value>,
    confidence: f64,
    dissenting: i32,
    validated_at_us: i64,
    parents: Vec<i64>,
    agreeing: Value,
}

#[derive(Debug, FromRow)]
struct SealEvidence {
    id: i64,
    finding_id: i64,
    kind: String,
    detail: Value,
    confidence_after: f64,
    created_at_us: i64,
    finding_entry: Vec<u8>,
}

/// An adoption proposal and, once settled, its outcome.
#[derive(Debug, FromRow)]
pub struct AdoptionRow {
    pub id: i64,
    pub finding_id: i64,
    pub study_id: i64,
    pub settled: bool,
    pub evidence_id: Option<i64>,
}

/// The finding's work unit, as an adoption re-runs it.
#[derive(Debug, FromRow)]
struct AdoptSource {
    study_id: i64,
    module_hash: Vec<u8>,
    input: Vec<u8>,
    metrics: Value,
    min_quorum: i32,
    target_nresults: i32,
    max_error_results: i32,
    max_total_results: i32,
    max_success_results: i32,
    delay_bound_secs: i32,
    fuel: i64,
    memory_bytes: i64,
    output_bytes: i64,
    wall_ms: i64,
    workers: Vec<Uuid>,
}

#[derive(Debug, FromRow)]
struct RunningAdoption {
    id: i64,
    finding_id: i64,
    study_id: i64,
    metric: String,
    descending: bool,
    seeds: Vec<i64>,
}

/// The finding of each input of an adoption study, in work-unit order.
#[derive(Debug, FromRow)]
struct AdoptRun {
    wu_id: i64,
    state: super::WuState,
    output_hash: Option<Vec<u8>>,
    metrics: Option<Value>,
    agreeing: i32,
}

/// Findings already validated for these inputs of this module under this replication policy,
/// by input hash (the earliest when there are several).
pub(super) async fn validated_twins(
    tx: &mut Transaction<'static, Postgres>,
    module_hash: &[u8; 32],
    input_hashes: &[Vec<u8>],
    p: &Policy,
    tolerance: Option<&crate::scheduler::Tolerance>,
) -> Result<HashMap<Vec<u8>, i64>, Error> {
    let rows: Vec<(Vec<u8>, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (f.input_hash) f.input_hash, f.id
         FROM findings f JOIN work_units w ON w.id = f.wu_id
         WHERE f.module_hash = $1 AND f.input_hash = ANY($2)
           AND w.min_quorum = $3 AND w.target_nresults = $4 AND w.max_error_results = $5
           AND w.max_total_results = $6 AND w.max_success_results = $7
           AND w.adaptive = $8 AND w.tolerance IS NOT DISTINCT FROM $9::jsonb
         ORDER BY f.input_hash, f.id",
    )
    .bind(&module_hash[..])
    .bind(input_hashes)
    .bind(p.min_quorum)
    .bind(p.target_nresults)
    .bind(p.max_error_results)
    .bind(p.max_total_results)
    .bind(p.max_success_results)
    .bind(p.adaptive)
    .bind(tolerance.map(sqlx::types::Json))
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The body of a finding's ledger entry: its provenance.
fn finding_body(f: &SealFinding) -> String {
    canonical_json(&json!({
        "type": "finding",
        "finding": f.id,
        "study": f.study_id,
        "work_unit": f.wu_id,
        "module_hash": hex(&f.module_hash),
        "input_hash": hex(&f.input_hash),
        "output_hash": hex(&f.output_hash),
        "metrics": f.metrics,
        "params": f.params,
        "parents": f.parents,
        "agreeing": f.agreeing,
        "dissenting": f.dissenting,
        "confidence": f.confidence,
        "validated_at_us": f.validated_at_us,
    }))
}

fn evidence_body(e: &SealEvidence) -> String {
    canonical_json(&json!({
        "type": "evidence",
        "evidence": e.id,
        "finding": e.finding_id,
        "finding_entry": hex(&e.finding_entry),
        "kind": e.kind,
        "detail": e.detail,
        "confidence_after": e.confidence_after,
        "recorded_at_us": e.created_at_us,
    }))
}

async fn append(
    tx: &mut Transaction<'static, Postgres>,
    entries: &[Entry],
    kinds: &[&str],
    findings: &[i64],
    evidence: &[Option<i64>],
) -> Result<(), Error> {
    let seqs: Vec<i64> = entries.iter().map(|e| e.seq as i64).collect();
    let hashes: Vec<&[u8]> = entries.iter().map(|e| &e.hash[..]).collect();
    let prevs: Vec<&[u8]> = entries.iter().map(|e| &e.prev_hash[..]).collect();
    let bodies: Vec<&str> = entries.iter().map(|e| e.body.as_str()).collect();
    sqlx::query(
        "INSERT INTO ledger (seq, hash, prev_hash, kind, finding_id, evidence_id, body)
         SELECT * FROM UNNEST($1::bigint[], $2::bytea[], $3::bytea[], $4::text[], $5::bigint[],
                              $6::bigint[], $7::text[])",
    )
    .bind(&seqs)
    .bind(&hashes)
    .bind(&prevs)
    .bind(kinds)
    .bind(findings)
    .bind(evidence)
    .bind(&bodies)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Store {
    /// Chains up to `batch` unsealed findings, then the unsealed evidence about sealed findings,
    /// in id order, in one transaction. Returns how many entries it appended; 0 also when
    /// another process holds the sealer lock (it is sealing the same rows).
    pub async fn seal(&self, batch: i64) -> Result<u64, Error> {
        let mut tx = self.pool.begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(SEALER_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            return Ok(0);
        }
        let head: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let mut chain = match head {
            Some((seq, hash)) => Chain::new(
                seq as u64,
                hash.as_slice()
                    .try_into()
                    .map_err(|_| Error::Internal("ledger head hash is not 32 bytes".into()))?,
            ),
            None => Chain::new(0, GENESIS),
        };
        // The worker's runtime is a scalar subquery, one primary-key probe per replica: as a
        // join, the planner hashed the whole `workers` table once per finding (half a second
        // per seal with 1,000 workers, growing with the fleet).
        let findings = sqlx::query_as::<_, SealFinding>(
            "SELECT f.id, f.study_id, f.wu_id, f.module_hash, f.input_hash, f.output_hash,
                    f.metrics, f.params, f.confidence, f.dissenting,
                    (extract(epoch FROM f.created_at) * 1000000)::bigint AS validated_at_us,
                    coalesce((SELECT array_agg(p.parent_finding_id ORDER BY p.parent_finding_id)
                              FROM study_parents p WHERE p.study_id = f.study_id), '{}') AS parents,
                    coalesce((SELECT jsonb_agg(jsonb_build_object(
                                  'replica', r.id, 'worker', r.worker_id, 'platform', r.platform,
                                  'runtime', (SELECT k.runtime FROM workers k
                                              WHERE k.id = r.worker_id),
                                  'fuel_used', r.fuel_used) ORDER BY r.id)
                              FROM replicas r
                              WHERE r.id = ANY(f.agreeing_replicas)), '[]') AS agreeing
             FROM unsealed_findings q JOIN findings f ON f.id = q.finding_id
             ORDER BY q.finding_id LIMIT $1",
        )
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut appended = 0;
        if !findings.is_empty() {
            let entries: Vec<Entry> = findings
                .iter()
                .map(|f| chain.append(finding_body(f)))
                .collect();
            let ids: Vec<i64> = findings.iter().map(|f| f.id).collect();
            append(
                &mut tx,
                &entries,
                &vec!["finding"; ids.len()],
                &ids,
                &vec![None; ids.len()],
            )
            .await?;
            sqlx::query("DELETE FROM unsealed_findings WHERE finding_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            appended += entries.len() as u64;
        }
        // Evidence follows its finding's entry, which is sealed by now or in a later round.
        let evidence = sqlx::query_as::<_, SealEvidence>(
            "SELECT e.id, e.finding_id, e.kind::text AS kind, e.detail, e.confidence_after,
                    (extract(epoch FROM e.created_at) * 1000000)::bigint AS created_at_us,
                    l.hash AS finding_entry
             FROM evidence e JOIN ledger l ON l.finding_id = e.finding_id AND l.kind = 'finding'
             WHERE e.ledger_seq IS NULL ORDER BY e.id LIMIT $1",
        )
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if !evidence.is_empty() {
            let entries: Vec<Entry> = evidence
                .iter()
                .map(|e| chain.append(evidence_body(e)))
                .collect();
            let ids: Vec<i64> = evidence.iter().map(|e| e.id).collect();
            let findings: Vec<i64> = evidence.iter().map(|e| e.finding_id).collect();
            let some_ids: Vec<Option<i64>> = ids.iter().map(|&i| Some(i)).collect();
            append(
                &mut tx,
                &entries,
                &vec!["evidence"; ids.len()],
                &findings,
                &some_ids,
            )
            .await?;
            let seqs: Vec<i64> = entries.iter().map(|e| e.seq as i64).collect();
            sqlx::query(
                "UPDATE evidence e SET ledger_seq = t.seq
                 FROM UNNEST($1::bigint[], $2::bigint[]) AS t(id, seq) WHERE e.id = t.id",
            )
            .bind(&ids)
            .bind(&seqs)
            .execute(&mut *tx)
            .await?;
            appended += entries.len() as u64;
        }
        tx.commit().await?;
        Ok(appended)
    }

    /// Seals until nothing is left to seal (for tests and tools; servers seal on an interval).
    pub async fn seal_now(&self) -> Result<u64, Error> {
        let mut total = 0;
        loop {
            match self.seal(10_000).await? {
                0 => {
                    // Zero may mean another process holds the lock: wait for it unless idle.
                    let left: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM unsealed_findings)
                             OR EXISTS (SELECT 1 FROM evidence WHERE ledger_seq IS NULL)",
                    )
                    .fetch_one(&self.pool)
                    .await?;
                    if !left {
                        return Ok(total);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                n => total += n,
            }
        }
    }

    /// Up to `limit` entries after `after_seq`, in order.
    pub async fn ledger_page(&self, after_seq: i64, limit: i64) -> Result<Vec<LedgerRow>, Error> {
        Ok(sqlx::query_as::<_, LedgerRow>(
            "SELECT seq, body, prev_hash, hash FROM ledger WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The hash of each of these entries.
    pub async fn ledger_hashes(&self, seqs: &[i64]) -> Result<HashMap<i64, Vec<u8>>, Error> {
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, hash FROM ledger WHERE seq = ANY($1)")
                .bind(seqs)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// Findings by filters, in metric or id order, one page after `q.after`.
    ///
    /// In metric order the plan is chosen here, not by the planner, which cannot estimate
    /// how many findings a parameter filter matches (jsonb containment has no statistics) and
    /// otherwise sorts every match even when a walk along the metric index would stop after a
    /// few entries: first a walk (capped at `WALK_CAP` entries when parameters are filtered);
    /// if that does not fill the page, the GIN-first plan, which is then cheap.
    pub async fn list_findings(
        &self,
        q: &FindingQuery,
    ) -> Result<(Vec<super::FindingRow>, Option<Cursor>), Error> {
        let Some(_) = &q.order_by_metric else {
            let sql = match (q.study_id.is_some(), q.descending) {
                (false, false) => by_id!("($2::bigint IS NULL)", ">", "ASC"),
                (false, true) => by_id!("($2::bigint IS NULL)", "<", "DESC"),
                (true, false) => by_id!("f.study_id = $2", ">", "ASC"),
                (true, true) => by_id!("f.study_id = $2", "<", "DESC"),
            };
            return self.finding_page(q, sql, i64::MAX, false).await;
        };
        let walk = match (q.study_id.is_some(), q.descending) {
            (false, false) => by_metric!("($2::bigint IS NULL)", ">", "ASC", walk),
            (false, true) => by_metric!("($2::bigint IS NULL)", "<", "DESC", walk),
            (true, false) => by_metric!("m.study_id = $2", ">", "ASC", walk),
            (true, true) => by_metric!("m.study_id = $2", "<", "DESC", walk),
        };
        if q.params.is_none() {
            return self.finding_page(q, walk, i64::MAX, true).await;
        }
        let (rows, next) = self.finding_page(q, walk, WALK_CAP, true).await?;
        if rows.len() as i64 == q.limit {
            return Ok((rows, next));
        }
        let index = match (q.study_id.is_some(), q.descending) {
            (false, false) => by_metric!("($2::bigint IS NULL)", ">", "ASC", index),
            (false, true) => by_metric!("($2::bigint IS NULL)", "<", "DESC", index),
            (true, false) => by_metric!("m.study_id = $2", ">", "ASC", index),
            (true, true) => by_metric!("m.study_id = $2", "<", "DESC", index),
        };
        self.finding_page(q, index, WALK_CAP, false).await
    }

    /// Runs one of the listing statements. `in_order` keeps the planner on the ordered index
    /// walk: no explicit sort, and no parallel workers (their start-up costs more than the
    /// few index entries a page needs).
    async fn finding_page(
        &self,
        q: &FindingQuery,
        sql: &'static str,
        cap: i64,
        in_order: bool,
    ) -> Result<(Vec<super::FindingRow>, Option<Cursor>), Error> {
        let (start_value, start_id) = match (q.after, q.descending) {
            (Some(c), _) => (c.value, c.id),
            (None, false) => (Some(f64::NEG_INFINITY), i64::MIN),
            (None, true) => (Some(f64::INFINITY), i64::MAX),
        };
        let names: Vec<&str> = q.ranges.iter().map(|r| r.metric.as_str()).collect();
        let mins: Vec<Option<f64>> = q.ranges.iter().map(|r| r.min).collect();
        let maxs: Vec<Option<f64>> = q.ranges.iter().map(|r| r.max).collect();
        let mut tx = self.pool.begin().await?;
        if in_order {
            sqlx::query(
                "SELECT set_config('enable_sort', 'off', true),
                        set_config('max_parallel_workers_per_gather', '0', true)",
            )
            .execute(&mut *tx)
            .await?;
        }
        let rows = sqlx::query_as::<_, SortedFinding>(sqlx::AssertSqlSafe(sql))
            .bind(q.order_by_metric.as_deref())
            .bind(q.study_id)
            .bind(q.params.as_ref().map(sqlx::types::Json))
            .bind(&names)
            .bind(&mins)
            .bind(&maxs)
            .bind(if q.order_by_metric.is_some() {
                start_value
            } else {
                None
            })
            .bind(start_id)
            .bind(q.limit)
            .bind(cap)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        let next = if rows.len() as i64 == q.limit {
            rows.last().map(|r| Cursor {
                value: r.sort_value,
                id: r.row.id,
            })
        } else {
            None
        };
        Ok((rows.into_iter().map(|r| r.row).collect(), next))
    }

    /// One finding with its canonical output.
    pub async fn finding(&self, id: i64) -> Result<Option<super::FindingRow>, Error> {
        Ok(sqlx::query_as::<_, super::FindingRow>(concat!(
            "SELECT f.id, f.study_id, f.wu_id, f.module_hash, f.input_hash, f.output_hash,
                    f.metrics, f.params, coalesce(f.current_confidence, f.confidence) AS confidence,
                    f.confidence AS validated_confidence, f.dissenting,
                    extract(epoch FROM f.created_at)::bigint AS created_unix, f.output, ",
            entry_seq!(),
            " AS ledger_seq, f.platforms, f.unreplicated FROM findings f WHERE f.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Which of these finding ids do not exist.
    pub async fn missing_findings(&self, ids: &[i64]) -> Result<Vec<i64>, Error> {
        Ok(sqlx::query_scalar(
            "SELECT i FROM UNNEST($1::bigint[]) AS i
             WHERE NOT EXISTS (SELECT 1 FROM findings f WHERE f.id = i) ORDER BY i",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The findings a finding's study declared as parents.
    pub async fn parents_of(&self, finding: i64) -> Result<Vec<i64>, Error> {
        Ok(sqlx::query_scalar(
            "SELECT p.parent_finding_id FROM findings f
             JOIN study_parents p ON p.study_id = f.study_id
             WHERE f.id = $1 ORDER BY p.parent_finding_id",
        )
        .bind(finding)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Evidence about a finding, oldest first.
    pub async fn evidence_of(&self, finding: i64) -> Result<Vec<EvidenceRow>, Error> {
        Ok(sqlx::query_as::<_, EvidenceRow>(
            "SELECT id, finding_id, kind::text AS kind, detail, confidence_after,
                    extract(epoch FROM created_at)::bigint AS created_unix, ledger_seq
             FROM evidence WHERE finding_id = $1 ORDER BY id",
        )
        .bind(finding)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn evidence(&self, id: i64) -> Result<Option<EvidenceRow>, Error> {
        Ok(sqlx::query_as::<_, EvidenceRow>(
            "SELECT id, finding_id, kind::text AS kind, detail, confidence_after,
                    extract(epoch FROM created_at)::bigint AS created_unix, ledger_seq
             FROM evidence WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records evidence about a finding and makes its confidence the finding's current one.
    /// `kind` is one of the `evidence_kind` values.
    pub async fn record_evidence(
        &self,
        finding: i64,
        kind: &str,
        detail: &Value,
        confidence_after: f64,
    ) -> Result<i64, Error> {
        let mut tx = self.pool.begin().await?;
        let id = record_evidence_in(&mut tx, finding, kind, detail, confidence_after).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// A finding's ancestors (parents of its study, their parents, ...), by id.
    pub async fn lineage(&self, finding: i64) -> Result<Vec<super::FindingRow>, Error> {
        Ok(sqlx::query_as::<_, super::FindingRow>(concat!(
            "WITH RECURSIVE anc(id) AS (
                 SELECT p.parent_finding_id FROM findings c
                 JOIN study_parents p ON p.study_id = c.study_id WHERE c.id = $1
                 UNION
                 SELECT p.parent_finding_id FROM anc a JOIN findings c ON c.id = a.id
                 JOIN study_parents p ON p.study_id = c.study_id)
             SELECT ",
            finding_cols!(),
            " FROM findings f WHERE f.id IN (SELECT id FROM anc) ORDER BY f.id"
        ))
        .bind(finding)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Findings of the studies that declared this finding a parent, by id.
    pub async fn children(&self, finding: i64) -> Result<Vec<super::FindingRow>, Error> {
        Ok(sqlx::query_as::<_, super::FindingRow>(concat!(
            "SELECT ",
            finding_cols!(),
            " FROM study_parents p JOIN findings f ON f.study_id = p.study_id
             WHERE p.parent_finding_id = $1 ORDER BY f.id"
        ))
        .bind(finding)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The frontier: findings (of one study, or all) that no finding builds on, by id.
    pub async fn leaves(
        &self,
        study: Option<i64>,
        limit: i64,
    ) -> Result<Vec<super::FindingRow>, Error> {
        Ok(sqlx::query_as::<_, super::FindingRow>(concat!(
            "SELECT ",
            finding_cols!(),
            " FROM findings f WHERE ($1::bigint IS NULL OR f.study_id = $1)
               AND NOT EXISTS (SELECT 1 FROM study_parents p JOIN findings c ON c.study_id = p.study_id
                               WHERE p.parent_finding_id = f.id)
             ORDER BY f.id LIMIT $2"
        ))
        .bind(study)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The best finding by `metric` in each study (or in one), by study.
    pub async fn best(
        &self,
        metric: &str,
        descending: bool,
        study: Option<i64>,
    ) -> Result<Vec<super::FindingRow>, Error> {
        macro_rules! best {
            ($dir:literal) => {
                concat!(
                    "SELECT DISTINCT ON (m.study_id) ",
                    finding_cols!(),
                    " FROM finding_metrics m JOIN findings f ON f.id = m.finding_id
                     WHERE m.name = $1 AND ($2::bigint IS NULL OR m.study_id = $2)
                     ORDER BY m.study_id, m.value ",
                    $dir,
                    ", m.finding_id"
                )
            };
        }
        let sql = if descending {
            best!("DESC")
        } else {
            best!("ASC")
        };
        Ok(sqlx::query_as::<_, super::FindingRow>(sql)
            .bind(metric)
            .bind(study)
            .fetch_all(&self.pool)
            .await?)
    }
}

async fn record_evidence_in(
    tx: &mut Transaction<'static, Postgres>,
    finding: i64,
    kind: &str,
    detail: &Value,
    confidence_after: f64,
) -> Result<i64, Error> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO evidence (finding_id, kind, detail, confidence_after)
         VALUES ($1, $2::evidence_kind, $3, $4) RETURNING id",
    )
    .bind(finding)
    .bind(kind)
    .bind(sqlx::types::Json(detail))
    .bind(confidence_after)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query("UPDATE findings SET current_confidence = $2 WHERE id = $1")
        .bind(finding)
        .bind(confidence_after)
        .execute(&mut **tx)
        .await?;
    Ok(id)
}

/// What `create_adoption` opened.
#[derive(Debug, Clone, Copy)]
pub struct OpenedAdoption {
    pub id: i64,
    pub study_id: i64,
}

impl Store {
    /// Opens an adoption proposal: a study re-running the finding's work unit (first work unit;
    /// the workers that took part in the original are excluded from it) and, when the input has
    /// a seed, `seeds` other seeds. None if there is no such finding.
    pub async fn create_adoption(
        &self,
        finding: i64,
        metric: Option<&str>,
        descending: bool,
        seeds: u32,
        owner: Option<i64>,
    ) -> Result<Option<OpenedAdoption>, Error> {
        let Some(src) = sqlx::query_as::<_, AdoptSource>(
            "SELECT f.study_id, w.module_hash, w.input, f.metrics, w.min_quorum, w.target_nresults,
                    w.max_error_results, w.max_total_results, w.max_success_results,
                    w.delay_bound_secs, w.fuel, w.memory_bytes, w.output_bytes, w.wall_ms,
                    coalesce((SELECT array_agg(DISTINCT r.worker_id) FROM replicas r
                              WHERE r.wu_id = w.id), '{}') AS workers
             FROM findings f JOIN work_units w ON w.id = f.wu_id WHERE f.id = $1",
        )
        .bind(finding)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let metric = match metric {
            Some(m) => m.to_string(),
            None => src
                .metrics
                .as_object()
                .and_then(|o| o.keys().min().cloned())
                .ok_or_else(|| Error::InvalidArgument("the finding has no metrics".into()))?,
        };
        if src.metrics.get(&metric).and_then(Value::as_f64).is_none() {
            return Err(Error::InvalidArgument(format!(
                "finding {finding} has no numeric metric {metric:?}"
            )));
        }
        let module_hash: [u8; 32] = src
            .module_hash
            .as_slice()
            .try_into()
            .map_err(|_| Error::Internal("module hash is not 32 bytes".into()))?;
        let variants = crate::adoption::seed_variants(&src.input, seeds);
        let seed_list: Vec<i64> = variants
            .as_ref()
            .map(|(_, v)| v.iter().map(|(s, _)| *s as i64).collect())
            .unwrap_or_default();
        let mut inputs = vec![src.input.clone()];
        inputs.extend(
            variants
                .into_iter()
                .flat_map(|(_, v)| v.into_iter().map(|(_, i)| i)),
        );
        let mut tx = self.pool.begin().await?;
        let created = super::create_study_in(
            &mut tx,
            &NewStudy {
                name: format!("adoption of finding {finding}"),
                description: format!(
                    "Re-runs finding {finding} (study {}) on other workers and other seeds.",
                    src.study_id
                ),
                module_hash,
                policy: Policy {
                    min_quorum: src.min_quorum,
                    target_nresults: src.target_nresults,
                    max_error_results: src.max_error_results,
                    max_total_results: src.max_total_results,
                    max_success_results: src.max_success_results,
                    delay_bound_secs: src.delay_bound_secs,
                    // A re-run that checks someone's claim is always replicated.
                    adaptive: false,
                },
                // Reproduction means the same bytes; a tolerant study's adoption is stricter.
                tolerance: None,
                bounds: super::Bounds {
                    fuel: src.fuel,
                    memory_bytes: src.memory_bytes,
                    output_bytes: src.output_bytes,
                    wall_ms: src.wall_ms,
                },
                inputs,
                parents: Vec::new(),
                dedup: false,
                owner,
            },
        )
        .await?;
        sqlx::query(
            "INSERT INTO wu_exclusions (wu_id, worker_id) SELECT $1, w FROM UNNEST($2::uuid[]) AS w",
        )
        .bind(created.work_unit_ids[0])
        .bind(&src.workers)
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO adoptions (finding_id, study_id, metric, descending, seeds)
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(finding)
        .bind(created.study_id)
        .bind(&metric)
        .bind(descending)
        .bind(&seed_list)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(OpenedAdoption {
            id,
            study_id: created.study_id,
        }))
    }

    pub async fn adoption(&self, id: i64) -> Result<Option<AdoptionRow>, Error> {
        Ok(sqlx::query_as::<_, AdoptionRow>(
            "SELECT id, finding_id, study_id, state = 'settled' AS settled, evidence_id
             FROM adoptions WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Settles adoptions whose re-runs are all done: records the outcome as evidence (and, when
    /// an adopted finding beat its parent beyond the seed noise, `superseded` on the parent).
    /// Compare-and-set on the adoption's state, so racing servers settle each once.
    pub async fn settle_adoptions(&self) -> Result<u64, Error> {
        let ready = sqlx::query_as::<_, RunningAdoption>(
            "SELECT a.id, a.finding_id, a.study_id, a.metric, a.descending, a.seeds
             FROM adoptions a WHERE a.state = 'running'
               AND NOT EXISTS (SELECT 1 FROM work_units w
                               WHERE w.study_id = a.study_id AND w.state = 'pending')
             ORDER BY a.id LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut settled = 0;
        for a in ready {
            let runs = sqlx::query_as::<_, AdoptRun>(
                "SELECT w.id AS wu_id, w.state, f.output_hash, f.metrics,
                        coalesce(cardinality(f.agreeing_replicas), 0) AS agreeing
                 FROM work_units w LEFT JOIN findings f ON f.wu_id = w.id
                 WHERE w.study_id = $1 ORDER BY w.id",
            )
            .bind(a.study_id)
            .fetch_all(&self.pool)
            .await?;
            let Some(original) = self.finding(a.finding_id).await? else {
                continue;
            };
            let input: Vec<u8> = sqlx::query_scalar("SELECT input FROM work_units WHERE id = $1")
                .bind(original.wu_id)
                .fetch_one(&self.pool)
                .await?;
            let seed_field = crate::adoption::seed_variants(&input, 0).map(|(f, _)| f);
            let original_seed = seed_field.and_then(|f| {
                serde_json::from_slice::<Value>(&input)
                    .ok()
                    .and_then(|v| v.get(f).and_then(Value::as_u64))
            });
            let parents: Vec<(i64, f64)> = sqlx::query_as(
                "SELECT m.finding_id, m.value FROM findings c
                 JOIN study_parents p ON p.study_id = c.study_id
                 JOIN finding_metrics m ON m.finding_id = p.parent_finding_id AND m.name = $2
                 WHERE c.id = $1",
            )
            .bind(a.finding_id)
            .bind(&a.metric)
            .fetch_all(&self.pool)
            .await?;
            // The parent to beat is the best of them.
            let parent = parents.into_iter().reduce(|x, y| {
                let y_better = if a.descending { y.1 > x.1 } else { y.1 < x.1 };
                if y_better { y } else { x }
            });
            let metric_of = |m: &Option<Value>| {
                m.as_ref()
                    .and_then(|m| m.get(&a.metric))
                    .and_then(Value::as_f64)
            };
            let rerun = runs.first().and_then(|r| {
                (r.state == super::WuState::Validated)
                    .then(|| (r.output_hash.clone().unwrap_or_default(), r.agreeing))
            });
            let seed_values: Vec<(u64, f64)> = runs
                .iter()
                .skip(1)
                .zip(&a.seeds)
                .filter_map(|(r, s)| metric_of(&r.metrics).map(|v| (*s as u64, v)))
                .collect();
            let reruns = crate::adoption::Reruns {
                original_hash: original.output_hash.clone(),
                original_value: metric_of(&Some(original.metrics.clone())).unwrap_or(f64::NAN),
                confidence: original.confidence,
                rerun,
                seed_field: seed_field.map(str::to_string),
                seed_values,
                original_seed,
                parent,
                metric: a.metric.clone(),
                descending: a.descending,
            };
            let (kind, mut detail, confidence_after) = crate::adoption::outcome(&reruns);
            detail["adoption"] = json!(a.id);
            detail["adoption_study"] = json!(a.study_id);
            detail["rerun_work_unit"] = json!(runs.first().map(|r| r.wu_id));
            let mut tx = self.pool.begin().await?;
            let won = sqlx::query(
                "UPDATE adoptions SET state = 'settled' WHERE id = $1 AND state = 'running'",
            )
            .bind(a.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if won == 0 {
                continue;
            }
            let evidence =
                record_evidence_in(&mut tx, a.finding_id, kind, &detail, confidence_after).await?;
            sqlx::query("UPDATE adoptions SET evidence_id = $2 WHERE id = $1")
                .bind(a.id)
                .bind(evidence)
                .execute(&mut *tx)
                .await?;
            if kind == "adopted"
                && let Some((parent_id, _)) = parent
            {
                let parent_confidence: f64 = sqlx::query_scalar(
                    "SELECT coalesce(current_confidence, confidence) FROM findings WHERE id = $1",
                )
                .bind(parent_id)
                .fetch_one(&mut *tx)
                .await?;
                record_evidence_in(
                    &mut tx,
                    parent_id,
                    "superseded",
                    &json!({ "by_finding": a.finding_id, "adoption": a.id, "metric": a.metric }),
                    parent_confidence,
                )
                .await?;
            }
            tx.commit().await?;
            settled += 1;
        }
        Ok(settled)
    }
}
