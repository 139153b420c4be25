//! The hot path after the claim: recording a batch of results, the transitioner, the
//! validator and reputation credits, with a constant number of SQL statements per batch.
//!
//! A report reads everything it needs under the work units' row locks (two statements), decides
//! every replica's, work unit's and worker's next state in memory with the pure rules of
//! `scheduler`, and writes each table once with a statement over `UNNEST`ed arrays. The row
//! locks make the in-memory view exact: every replica of a locked work unit changes only while
//! that work unit is locked, so nothing else can move them between the read and the write (the
//! replica write is still compare-and-set on each row's state, and refuses to commit if a row
//! did not match). See ARCHITECTURE.md, "Hot path".

use std::collections::HashMap;

use accrete_proto::output::{Metrics, parse_metrics};
use sqlx::types::Json;
use sqlx::{FromRow, Postgres, Transaction};
use uuid::Uuid;

use super::{
    Ack, AckStatus, Claimed, Outcome, ReplicaState, Report, Store, ValidateState, WuState,
    clean_text, retry_deadlocks,
};
use crate::error::Error;
use crate::scheduler::{self, Decision, Policy, ReplicaOutcome, ReplicaView};

/// A locked work unit: what the transitioner and the validator need of it.
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
    tolerance: Option<Json<scheduler::Tolerance>>,
    output_bytes: i64,
    unsent: i32,
    n_issued: i32,
    canonical_replica_id: Option<i64>,
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

/// A replica as read under its work unit's lock; changed in memory, then written back.
#[derive(FromRow, Clone)]
struct ReplicaRow {
    id: i64,
    wu_id: i64,
    worker_id: Uuid,
    state: ReplicaState,
    validate_state: ValidateState,
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
    /// The finding's metrics, on the canonical replica of a settled unit with a tolerance only
    /// (late results are compared with them).
    canonical_metrics: Option<Json<Metrics>>,
}

/// Columns of a locked work unit, for both ways of naming the units to lock.
macro_rules! lock_wus_sql {
    ($which:literal) => {
        concat!(
            "SELECT w.id, w.state, w.min_quorum, w.target_nresults, w.max_error_results,
                    w.max_total_results, w.max_success_results, w.delay_bound_secs, w.adaptive,
                    w.tolerance, w.output_bytes, w.unsent, w.n_issued, w.canonical_replica_id
             FROM work_units w WHERE ",
            $which,
            " ORDER BY w.id FOR UPDATE OF w"
        )
    };
}

/// Locks the work units of the reported replicas, in id order, in one statement. The lookup
/// may share the statement: a replica's `wu_id` never changes, and every replica reported was
/// handed out by a committed claim, so the statement's snapshot already holds it. The units
/// are named by an array, not by `IN (subquery)`: a semi-join lets a generic plan read the
/// replicas through another index in `wu_id` order (see `store::HOT_SETTINGS`).
pub(super) const LOCK_WUS_OF_REPLICAS: &str =
    lock_wus_sql!("w.id = ANY(ARRAY(SELECT r.wu_id FROM replicas r WHERE r.id = ANY($1)))");
const LOCK_WUS: &str = lock_wus_sql!("w.id = ANY($1)");

/// Every replica of the locked units. It must be its own statement, after the locks: a
/// statement that waited for a lock sees the locked row's newest version but the rest of the
/// database as of its start. `$2` names canonical replicas whose finding's metrics are needed.
/// Unordered (the caller sorts): an `ORDER BY r.id` would let a generic plan walk the whole
/// primary key in order instead of probing `(wu_id, worker_id)`.
pub(super) const REPLICAS_OF: &str = "
    SELECT r.id, r.wu_id, r.worker_id, r.state, r.validate_state, r.output_hash, r.output,
           r.error_kind, r.error_message, r.solo, r.platform, k.valid_count, k.invalid_count,
           k.consecutive_valid,
           CASE WHEN r.id = ANY($2) THEN (SELECT f.metrics FROM findings f WHERE f.wu_id = r.wu_id)
           END AS canonical_metrics
    FROM replicas r JOIN workers k ON k.id = r.worker_id WHERE r.wu_id = ANY($1)";

/// Everything a batch decided, written in one statement (one round trip while the work units
/// are locked, where four separate statements left the transaction idle between them):
///
/// - `rep`: every changed replica, each compare-and-set on the state it was read in (the
///   statement returns how many matched). Rows only given a verdict keep their report's time
///   and fuel.
/// - `wus`: every work unit the transitioner moved, compare-and-set from `pending` (compared
///   as text, so that it is never an index condition that `work_units_study` could serve).
/// - `fnd`: the findings of every unit validated by this batch, in work unit order; what the
///   work unit already holds (study, hashes, parameters) is taken from its row, which `wus`
///   does not change in those columns (the parts of one statement share its snapshot). Per-row
///   arrays travel as JSON because `UNNEST` flattens a two-dimensional array.
/// - `c`, `locked`, `credited`: reputation changes per worker. A valid result extends the
///   streak and grows the daily quota back by `$28` up to `$29`; an invalid or error result ends
///   the streak; each invalid, error or timeout halves the quota (never below 1), and so does
///   each refused report (not the sender's replica, unknown, a second different result, a
///   forged hash), which is also counted in `rejected_reports`, so probing costs the prober.
///   Applied in that order (valid first), so a worker with both ends the batch with its streak
///   broken. The rows are locked in id order first, as every path locks workers (after the work
///   units). `NO KEY UPDATE`: foreign-key checks on replicas take `KEY SHARE` on worker rows,
///   which must not conflict.
///
/// Each part names its rows by key (`id = ANY($n)`) besides joining on it, so that its
/// generic plan probes the primary key whatever the statistics (see `store::HOT_SETTINGS`).
/// Every part runs to completion whether or not the final `SELECT` reads it; an empty array is
/// a part that writes nothing.
pub(super) const WRITE_BATCH: &str = "
    WITH rep AS (
        UPDATE replicas r
        SET state = u.state::replica_state, validate_state = u.validate_state::validate_state,
            output = u.output, output_hash = u.output_hash, error_kind = u.error_kind,
            error_message = u.error_message,
            fuel_used = CASE WHEN u.reported THEN u.fuel_used ELSE r.fuel_used END,
            wall_micros = CASE WHEN u.reported THEN u.wall_micros ELSE r.wall_micros END,
            reported_at = CASE WHEN u.reported THEN now() ELSE r.reported_at END
        FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[],
                    $7::text[], $8::text[], $9::bool[], $10::bigint[], $11::bigint[])
             AS u(id, from_state, state, validate_state, output, output_hash, error_kind,
                  error_message, reported, fuel_used, wall_micros)
        WHERE r.id = ANY($1) AND r.id = u.id AND r.state = u.from_state::replica_state
        RETURNING 1
    ), wus AS (
        UPDATE work_units w
        SET state = u.state::wu_state, unsent = u.unsent, fail_reason = u.fail_reason,
            canonical_replica_id = u.canonical,
            finished_at = CASE WHEN u.state = 'pending' THEN w.finished_at ELSE now() END
        FROM UNNEST($12::bigint[], $13::text[], $14::int[], $15::text[], $16::bigint[])
             AS u(id, state, unsent, fail_reason, canonical)
        WHERE w.id = ANY($12) AND w.id = u.id AND w.state::text = 'pending'
    ), fnd AS (
        INSERT INTO findings (wu_id, study_id, module_hash, input_hash, output_hash, output,
            metrics, params, confidence, agreeing_replicas, dissenting, platforms, unreplicated)
        SELECT w.id, w.study_id, w.module_hash, w.input_hash, u.output_hash, u.output,
               u.metrics::jsonb, w.params, u.confidence,
               ARRAY(SELECT e.v::bigint FROM jsonb_array_elements_text(u.agreeing::jsonb)
                     WITH ORDINALITY AS e(v, n) ORDER BY e.n),
               u.dissenting,
               ARRAY(SELECT e.v FROM jsonb_array_elements_text(u.platforms::jsonb)
                     WITH ORDINALITY AS e(v, n) ORDER BY e.n),
               u.unreplicated
        FROM UNNEST($17::bigint[], $18::bytea[], $19::bytea[], $20::text[], $21::float8[],
                    $22::text[], $23::int[], $24::text[], $25::bool[])
             AS u(wu_id, output_hash, output, metrics, confidence, agreeing, dissenting,
                  platforms, unreplicated)
        JOIN work_units w ON w.id = u.wu_id
        WHERE w.id = ANY($17)
        ORDER BY w.id
    ), c AS (
        SELECT id, count(*) FILTER (WHERE kind = 'valid')::int AS nv,
               count(*) FILTER (WHERE kind = 'invalid')::int AS ni,
               count(*) FILTER (WHERE kind = 'error')::int AS ne,
               count(*) FILTER (WHERE kind = 'timeout')::int AS nt,
               count(*) FILTER (WHERE kind = 'rejected')::int AS nr
        FROM UNNEST($26::uuid[], $27::text[]) AS t(id, kind) GROUP BY id
    ), locked AS MATERIALIZED (
        SELECT k.id FROM workers k WHERE k.id = ANY($26) AND k.id IN (SELECT id FROM c)
        ORDER BY k.id FOR NO KEY UPDATE
    ), credited AS (
        UPDATE workers w
        SET valid_count = w.valid_count + c.nv, invalid_count = w.invalid_count + c.ni,
            error_count = w.error_count + c.ne, timeout_count = w.timeout_count + c.nt,
            rejected_reports = w.rejected_reports + c.nr,
            consecutive_valid = CASE WHEN c.ni + c.ne > 0 THEN 0
                                     ELSE w.consecutive_valid + c.nv END,
            daily_quota = GREATEST(
                (CASE WHEN c.nv > 0 THEN LEAST(w.daily_quota + $28 * c.nv, $29)
                      ELSE w.daily_quota END)
                    >> LEAST(c.ni + c.ne + c.nt + c.nr, 30),
                1)
        FROM locked l JOIN c ON c.id = l.id
        WHERE w.id = ANY($26) AND w.id = l.id AND c.nv + c.ni + c.ne + c.nt + c.nr > 0
    )
    SELECT count(*) FROM rep";

/// What one result did to its worker's reputation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credit {
    Valid,
    Invalid,
    Error,
    Timeout,
    Rejected,
    /// Counts nothing: the reporting worker's row is locked with the others (in their order)
    /// because a claim follows in the same transaction and would lock it out of order.
    Seen,
}

impl Credit {
    fn as_str(self) -> &'static str {
        match self {
            Credit::Valid => "valid",
            Credit::Invalid => "invalid",
            Credit::Error => "error",
            Credit::Timeout => "timeout",
            Credit::Rejected => "rejected",
            Credit::Seen => "seen",
        }
    }
}

fn replica_state_str(s: ReplicaState) -> &'static str {
    match s {
        ReplicaState::InProgress => "in_progress",
        ReplicaState::Success => "success",
        ReplicaState::Error => "error",
        ReplicaState::TimedOut => "timed_out",
        ReplicaState::HandedBack => "handed_back",
    }
}

fn validate_state_str(s: ValidateState) -> &'static str {
    match s {
        ValidateState::Init => "init",
        ValidateState::Valid => "valid",
        ValidateState::Invalid => "invalid",
        ValidateState::Inconclusive => "inconclusive",
    }
}

/// A replica changed in memory: the state it was read in (the write's compare-and-set), and
/// the fuel and time of a report recorded in this batch.
struct Changed {
    from: ReplicaState,
    reported: Option<(Option<i64>, Option<i64>)>,
}

/// A work unit the transitioner moved.
struct WuChange {
    id: i64,
    state: WuState,
    unsent: i32,
    fail_reason: Option<String>,
    canonical: Option<i64>,
}

struct NewFinding {
    wu_id: i64,
    output_hash: Vec<u8>,
    output: Vec<u8>,
    metrics: String,
    confidence: f64,
    agreeing: Vec<i64>,
    dissenting: i32,
    platforms: Vec<String>,
    unreplicated: bool,
}

/// One transaction's view of its locked work units and their replicas, and everything it will
/// write at the end.
struct Batch {
    wus: HashMap<i64, LockedWu>,
    rows: HashMap<i64, ReplicaRow>,
    /// Replica ids per work unit, in id order.
    by_wu: HashMap<i64, Vec<i64>>,
    changed: HashMap<i64, Changed>,
    wu_changes: Vec<WuChange>,
    findings: Vec<NewFinding>,
    credits: Vec<(Uuid, Credit)>,
}

impl Batch {
    /// Reads every replica of the locked units (one statement).
    async fn read(
        tx: &mut Transaction<'static, Postgres>,
        wus: HashMap<i64, LockedWu>,
    ) -> Result<Batch, Error> {
        let mut batch = Batch {
            wus,
            rows: HashMap::new(),
            by_wu: HashMap::new(),
            changed: HashMap::new(),
            wu_changes: Vec::new(),
            findings: Vec::new(),
            credits: Vec::new(),
        };
        if batch.wus.is_empty() {
            return Ok(batch);
        }
        let mut ids: Vec<i64> = batch.wus.keys().copied().collect();
        ids.sort_unstable();
        let need_metrics: Vec<i64> = batch
            .wus
            .values()
            .filter(|w| w.tolerance.is_some())
            .filter_map(|w| w.canonical_replica_id)
            .collect();
        let rows = sqlx::query_as::<_, ReplicaRow>(REPLICAS_OF)
            .bind(&ids)
            .bind(&need_metrics)
            .fetch_all(&mut **tx)
            .await?;
        for r in rows {
            batch.by_wu.entry(r.wu_id).or_default().push(r.id);
            batch.rows.insert(r.id, r);
        }
        for ids in batch.by_wu.values_mut() {
            ids.sort_unstable();
        }
        Ok(batch)
    }

    /// Marks a replica as changed before its first change, remembering the state it was read in.
    fn touch(&mut self, id: i64) -> &mut ReplicaRow {
        let row = self.rows.get_mut(&id).expect("a replica of a locked unit");
        self.changed.entry(id).or_insert(Changed {
            from: row.state,
            reported: None,
        });
        row
    }

    fn credit(&mut self, worker: Uuid, verdict: ValidateState) {
        match verdict {
            ValidateState::Valid => self.credits.push((worker, Credit::Valid)),
            ValidateState::Invalid => self.credits.push((worker, Credit::Invalid)),
            ValidateState::Init | ValidateState::Inconclusive => {}
        }
    }

    /// Records one report against its replica (whose work unit is locked). A repeat of what is
    /// already recorded is a duplicate; anything else after a result is refused.
    fn record(&mut self, worker: Uuid, report: &Report) -> Ack {
        let ack = |status, message: &str| Ack {
            replica_id: report.replica_id,
            status,
            message: message.to_string(),
        };
        let Some(row) = self.rows.get(&report.replica_id) else {
            return ack(AckStatus::Rejected, "unknown replica");
        };
        if row.worker_id != worker {
            return ack(AckStatus::Rejected, "not this worker's replica");
        }
        let wu = &self.wus[&row.wu_id];
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
        const DIFFERENT: &str = "a different result was already recorded";
        match (row.state, &outcome) {
            (ReplicaState::Success, Outcome::Success { output, .. }) => {
                return if row.output_hash.as_deref() == Some(blake3::hash(output).as_bytes()) {
                    ack(AckStatus::Duplicate, "already recorded")
                } else {
                    ack(AckStatus::Rejected, DIFFERENT)
                };
            }
            (ReplicaState::Error, Outcome::Error { kind, .. }) => {
                return if row.error_kind.as_deref() == Some(kind) {
                    ack(AckStatus::Duplicate, "already recorded")
                } else {
                    ack(AckStatus::Rejected, DIFFERENT)
                };
            }
            (ReplicaState::Success | ReplicaState::Error, _) => {
                return ack(AckStatus::Rejected, DIFFERENT);
            }
            (ReplicaState::TimedOut | ReplicaState::HandedBack, Outcome::HandBack) => {
                return ack(AckStatus::Duplicate, "already reissued");
            }
            _ => {}
        }
        // Late results (after a timeout, or after the unit settled) still count: on a
        // validated unit they are compared with the canonical output and credit or discredit
        // their worker.
        let verdict = match &outcome {
            Outcome::Success { output, .. } => Some(self.late_verdict(wu, output)),
            _ => None,
        };
        let keep_output = wu.state == WuState::Pending;
        let id = report.replica_id;
        let row = self.touch(id);
        let worker_id = row.worker_id;
        match outcome {
            Outcome::HandBack => {
                row.state = ReplicaState::HandedBack;
                self.changed.get_mut(&id).unwrap().reported = Some((None, None));
            }
            Outcome::Success { output, fuel_used } => {
                let verdict = verdict.unwrap_or(ValidateState::Init);
                row.state = ReplicaState::Success;
                row.output_hash = Some(blake3::hash(&output).as_bytes().to_vec());
                // Once a unit is settled only the hash is kept; the canonical output lives in
                // the finding.
                row.output = keep_output.then_some(output);
                row.validate_state = verdict;
                self.changed.get_mut(&id).unwrap().reported =
                    Some((Some(fuel_used), Some(report.wall_micros)));
                self.credit(worker_id, verdict);
            }
            Outcome::Error {
                kind,
                message,
                fuel_used,
            } => {
                row.state = ReplicaState::Error;
                row.error_kind = Some(kind);
                row.error_message = Some(clean_text(&message, 2000));
                self.changed.get_mut(&id).unwrap().reported =
                    Some((Some(fuel_used), Some(report.wall_micros)));
                self.credits.push((worker_id, Credit::Error));
            }
        }
        ack(AckStatus::Accepted, "")
    }

    /// The verdict on a success reported for a unit in `wu`'s state: checked against the
    /// canonical output if the unit is validated, not yet judged otherwise.
    fn late_verdict(&self, wu: &LockedWu, output: &[u8]) -> ValidateState {
        let canonical = match (wu.state, wu.canonical_replica_id) {
            (WuState::Validated, Some(c)) => match self.rows.get(&c) {
                Some(row) => row,
                None => return ValidateState::Init,
            },
            _ => return ValidateState::Init,
        };
        if canonical.output_hash.as_deref() == Some(blake3::hash(output).as_bytes()) {
            return ValidateState::Valid;
        }
        let within = wu
            .tolerance
            .as_ref()
            .zip(canonical.canonical_metrics.as_ref())
            .is_some_and(|(t, c)| {
                parse_metrics(output).is_ok_and(|m| scheduler::within_tolerance(&t.0, &c.0, &m))
            });
        if within {
            ValidateState::Valid
        } else {
            ValidateState::Invalid
        }
    }

    /// Runs the transitioner on each pending work unit among `ids` and records its decision.
    fn transition(&mut self, ids: &[i64]) -> Result<(), Error> {
        for &id in ids {
            let Some(wu) = self.wus.get(&id).filter(|w| w.state == WuState::Pending) else {
                continue;
            };
            let replica_ids = self.by_wu.get(&id).cloned().unwrap_or_default();
            let rows: Vec<&ReplicaRow> = replica_ids.iter().map(|r| &self.rows[r]).collect();
            let mut views: Vec<ReplicaView> = rows.iter().map(|r| view(r)).collect();
            if let Some(tol) = &wu.tolerance {
                compare_within(&tol.0, &rows, &mut views);
            }
            let (n_issued, unsent) = (wu.n_issued, wu.unsent);
            match scheduler::decide(&wu.policy(), n_issued, unsent, &views) {
                Decision::Wait { unsent: want } => {
                    if want != unsent {
                        self.wu_changes.push(WuChange {
                            id,
                            state: WuState::Pending,
                            unsent: want,
                            fail_reason: None,
                            canonical: None,
                        });
                    }
                }
                Decision::Fail { reason } => self.wu_changes.push(WuChange {
                    id,
                    state: WuState::Failed,
                    unsent: 0,
                    fail_reason: Some(reason),
                    canonical: None,
                }),
                Decision::Validate {
                    canonical,
                    valid,
                    invalid,
                } => self.validate(id, &replica_ids, canonical, &valid, &invalid)?,
            }
        }
        Ok(())
    }

    /// Settles a work unit on its canonical replica: verdicts, credits, the one finding, and
    /// the replicas' copies of the output dropped.
    fn validate(
        &mut self,
        wu_id: i64,
        replica_ids: &[i64],
        canonical: i64,
        valid: &[i64],
        invalid: &[i64],
    ) -> Result<(), Error> {
        let canon = &self.rows[&canonical];
        let output = canon.output.clone().unwrap_or_default();
        let metrics = parse_metrics(&output).map_err(|e| {
            Error::Internal(format!(
                "canonical output of work unit {wu_id} broke the contract: {e}"
            ))
        })?;
        let output_hash = canon.output_hash.clone().unwrap_or_default();
        // An unreplicated result was checked against nothing: it earns its worker no credit.
        let unreplicated = valid.len() == 1 && view(canon).solo;
        // Confidence rests on the workers' reputations before this verdict counts.
        let voters: Vec<scheduler::Voter> = valid
            .iter()
            .map(|id| &self.rows[id])
            .map(|r| scheduler::Voter {
                error_rate: scheduler::error_rate(r.valid_count, r.invalid_count),
                platform: r.platform.clone(),
            })
            .collect();
        let confidence = scheduler::confidence(&voters);
        let mut platforms: Vec<String> = voters.into_iter().map(|v| v.platform).collect();
        platforms.sort_unstable();
        platforms.dedup();
        for (ids, verdict) in [
            (valid, ValidateState::Valid),
            (invalid, ValidateState::Invalid),
        ] {
            for &id in ids {
                let row = self.touch(id);
                row.validate_state = verdict;
                let worker = row.worker_id;
                if !(unreplicated && verdict == ValidateState::Valid) {
                    self.credit(worker, verdict);
                }
            }
        }
        for &id in replica_ids {
            if self.rows[&id].output.is_some() {
                self.touch(id).output = None;
            }
        }
        self.wu_changes.push(WuChange {
            id: wu_id,
            state: WuState::Validated,
            unsent: 0,
            fail_reason: None,
            canonical: Some(canonical),
        });
        self.findings.push(NewFinding {
            wu_id,
            output_hash,
            output,
            metrics: serde_json::to_string(&metrics)
                .map_err(|e| Error::Internal(format!("metrics to JSON: {e}")))?,
            confidence,
            agreeing: valid.to_vec(),
            dissenting: invalid.len() as i32,
            platforms,
            unreplicated,
        });
        Ok(())
    }

    /// Writes what the batch decided, in one statement ([`WRITE_BATCH`]).
    async fn write(mut self, tx: &mut Transaction<'static, Postgres>) -> Result<(), Error> {
        if self.changed.is_empty()
            && self.wu_changes.is_empty()
            && self.findings.is_empty()
            && self.credits.is_empty()
        {
            return Ok(());
        }
        let mut ids: Vec<i64> = self.changed.keys().copied().collect();
        ids.sort_unstable();
        let n = ids.len();
        let (mut from, mut state, mut vstate) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut output, mut hash, mut kind, mut message) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut reported, mut fuel, mut wall) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for id in &ids {
            let c = &self.changed[id];
            let r = self.rows.get_mut(id).unwrap();
            from.push(replica_state_str(c.from));
            state.push(replica_state_str(r.state));
            vstate.push(validate_state_str(r.validate_state));
            output.push(r.output.take());
            hash.push(r.output_hash.clone());
            kind.push(r.error_kind.clone());
            message.push(r.error_message.clone());
            reported.push(c.reported.is_some());
            fuel.push(c.reported.and_then(|x| x.0));
            wall.push(c.reported.and_then(|x| x.1));
        }

        let w = &self.wu_changes;
        let wu_ids: Vec<i64> = w.iter().map(|w| w.id).collect();
        let wu_state: Vec<&str> = w
            .iter()
            .map(|w| match w.state {
                WuState::Pending => "pending",
                WuState::Validated => "validated",
                WuState::Failed => "failed",
                WuState::Cancelled => "cancelled",
            })
            .collect();
        let unsent: Vec<i32> = w.iter().map(|w| w.unsent).collect();
        let reason: Vec<Option<&str>> = w.iter().map(|w| w.fail_reason.as_deref()).collect();
        let canonical: Vec<Option<i64>> = w.iter().map(|w| w.canonical).collect();

        let f = &self.findings;
        let f_wu: Vec<i64> = f.iter().map(|x| x.wu_id).collect();
        let f_hash: Vec<&[u8]> = f.iter().map(|x| x.output_hash.as_slice()).collect();
        let f_output: Vec<&[u8]> = f.iter().map(|x| x.output.as_slice()).collect();
        let f_metrics: Vec<&str> = f.iter().map(|x| x.metrics.as_str()).collect();
        let f_confidence: Vec<f64> = f.iter().map(|x| x.confidence).collect();
        let f_agreeing: Vec<String> = f
            .iter()
            .map(|x| serde_json::Value::from(x.agreeing.clone()).to_string())
            .collect();
        let f_dissenting: Vec<i32> = f.iter().map(|x| x.dissenting).collect();
        let f_platforms: Vec<String> = f
            .iter()
            .map(|x| serde_json::Value::from(x.platforms.clone()).to_string())
            .collect();
        let f_unreplicated: Vec<bool> = f.iter().map(|x| x.unreplicated).collect();

        let workers: Vec<Uuid> = self.credits.iter().map(|c| c.0).collect();
        let kinds: Vec<&str> = self.credits.iter().map(|c| c.1.as_str()).collect();

        let written: i64 = sqlx::query_scalar(WRITE_BATCH)
            .bind(&ids)
            .bind(&from)
            .bind(&state)
            .bind(&vstate)
            .bind(&output)
            .bind(&hash)
            .bind(&kind)
            .bind(&message)
            .bind(&reported)
            .bind(&fuel)
            .bind(&wall)
            .bind(&wu_ids)
            .bind(&wu_state)
            .bind(&unsent)
            .bind(&reason)
            .bind(&canonical)
            .bind(&f_wu)
            .bind(&f_hash)
            .bind(&f_output)
            .bind(&f_metrics)
            .bind(&f_confidence)
            .bind(&f_agreeing)
            .bind(&f_dissenting)
            .bind(&f_platforms)
            .bind(&f_unreplicated)
            .bind(&workers)
            .bind(&kinds)
            .bind(scheduler::QUOTA_STEP)
            .bind(scheduler::QUOTA_MAX)
            .fetch_one(&mut **tx)
            .await?;
        if written != n as i64 {
            // Only possible if a replica changed without its work unit's lock: refuse to commit
            // rather than record a decision taken on a stale view.
            return Err(Error::Internal(format!(
                "{} of {n} replicas changed under their work unit's lock",
                n as i64 - written
            )));
        }
        Ok(())
    }
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
fn compare_within(tol: &scheduler::Tolerance, rows: &[&ReplicaRow], views: &mut [ReplicaView]) {
    let successes: Vec<(usize, ReplicaOutcome, Metrics)> = rows
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

async fn lock(
    tx: &mut Transaction<'static, Postgres>,
    sql: &'static str,
    ids: &[i64],
) -> Result<HashMap<i64, LockedWu>, Error> {
    Ok(sqlx::query_as::<_, LockedWu>(sql)
        .bind(ids)
        .fetch_all(&mut **tx)
        .await?
        .into_iter()
        .map(|w| (w.id, w))
        .collect())
}

impl Store {
    /// Records a batch of results from one worker, then moves each touched work unit on. One
    /// transaction: either every acknowledged result is durable or none is. However many
    /// results, it costs five statements (BEGIN, lock, read, write, COMMIT), on the hot path's
    /// pool (each planned once per connection: `store::HOT_SETTINGS`).
    /// Every refused report, plus `refused_before` (results the service refused before they
    /// reached the store, e.g. a forged hash), is counted against the worker in the same
    /// transaction.
    pub async fn report(
        &self,
        worker: Uuid,
        reports: &[Report],
        refused_before: usize,
    ) -> Result<Vec<Ack>, Error> {
        Ok(self
            .report_and_claim(worker, reports, refused_before, 0)
            .await?
            .0)
    }

    /// [`Store::report`], then [`Store::claim`] of up to `fetch` replicas (none if 0) in the
    /// same transaction: a busy worker's round (report what it finished, take what it runs
    /// next) costs one commit, one WAL flush, instead of two. Lock order stays that of every
    /// path (work units, then workers in id order, then the account): the worker's own row is
    /// locked with the others the report credits, before the claim locks it again. If the
    /// claim fails, so does the report, and the worker sends both again.
    pub async fn report_and_claim(
        &self,
        worker: Uuid,
        reports: &[Report],
        refused_before: usize,
        fetch: i64,
    ) -> Result<(Vec<Ack>, Vec<Claimed>), Error> {
        retry_deadlocks(|| self.report_once(worker, reports, refused_before, fetch)).await
    }

    async fn report_once(
        &self,
        worker: Uuid,
        reports: &[Report],
        refused_before: usize,
        fetch: i64,
    ) -> Result<(Vec<Ack>, Vec<Claimed>), Error> {
        let ids: Vec<i64> = reports.iter().map(|r| r.replica_id).collect();
        let mut tx = self.hot.begin().await?;
        let wus = lock(&mut tx, LOCK_WUS_OF_REPLICAS, &ids).await?;
        let mut batch = Batch::read(&mut tx, wus).await?;
        let mut acks = Vec::with_capacity(reports.len());
        let mut touched = Vec::new();
        for report in reports {
            let ack = batch.record(worker, report);
            if ack.status == AckStatus::Accepted {
                touched.push(batch.rows[&report.replica_id].wu_id);
            }
            acks.push(ack);
        }
        let rejected = acks
            .iter()
            .filter(|a| a.status == AckStatus::Rejected)
            .count();
        for _ in 0..rejected + refused_before {
            batch.credits.push((worker, Credit::Rejected));
        }
        if fetch > 0 {
            batch.credits.push((worker, Credit::Seen));
        }
        touched.sort_unstable();
        touched.dedup();
        batch.transition(&touched)?;
        batch.write(&mut tx).await?;
        let claimed = if fetch > 0 {
            super::claim_on(&mut *tx, worker, fetch).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        Ok((acks, claimed))
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
        let wus = lock(&mut tx, LOCK_WUS, &wu_ids).await?;
        let timed_out: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE replicas SET state = 'timed_out'
             WHERE wu_id = ANY($1) AND state = 'in_progress' AND deadline < now()
             RETURNING worker_id",
        )
        .bind(&wu_ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut batch = Batch::read(&mut tx, wus).await?;
        for w in &timed_out {
            batch.credits.push((*w, Credit::Timeout));
        }
        let mut ids = wu_ids;
        ids.sort_unstable();
        batch.transition(&ids)?;
        batch.write(&mut tx).await?;
        tx.commit().await?;
        Ok(timed_out.len() as u64)
    }
}
