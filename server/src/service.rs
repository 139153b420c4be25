//! The gRPC edge: the worker, research and ledger services. Converts proto messages to store
//! types by hand, checks who calls (`auth`) and what they send, and maps errors to status codes
//! via `Error`.
//!
//! Access control is one line at the top of every method: `self.caller(&request, ROLE, WHAT)`
//! for API-key calls, `self.worker(...)` for worker calls. Not a tower layer, so each method
//! says what it needs where it is read, and the check can use the database (async).

use std::collections::HashMap;
use std::time::Duration;

use accrete_proto::v1::{
    self as pb, ledger_service_server::LedgerService, research_service_server::ResearchService,
    worker_service_server::WorkerService,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::auth::{self, Authenticator, Caller, Role};
use crate::error::Error;
use crate::scheduler::{self, Policy};
use crate::store::{
    self, AckStatus, Bounds, FindingQuery, NewStudy, NewWorker, Outcome, Standing, Store,
};
use crate::{Limits, module_check};

/// State shared by the services.
#[derive(Clone)]
pub struct Api {
    pub(crate) store: Store,
    limits: Limits,
    /// Checks keys and worker credentials; caches them for a few seconds only.
    pub(crate) auth: Authenticator,
}

/// The `authorization` metadata of a request, if any.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

impl Api {
    /// `auth_ttl`: how long a key's or worker credential's state read from the database is
    /// trusted (see `auth::DEFAULT_CACHE_TTL`).
    pub fn new(store: Store, limits: Limits, auth_ttl: Duration) -> Api {
        Api {
            auth: Authenticator::new(store.clone(), auth_ttl),
            store,
            limits,
        }
    }

    /// The API key a request comes with, if it may do `what`, which needs `need`.
    pub(crate) async fn caller<T>(
        &self,
        request: &Request<T>,
        need: Role,
        what: &str,
    ) -> Result<Caller, Error> {
        let caller = self.auth.api_key(bearer(request)).await?;
        caller.require(need, what)?;
        Ok(caller)
    }

    /// The worker a worker call comes from, if its credential is right and it is not blocked.
    /// `with_key`: the call carries `authorization` metadata, so its sender is told plainly that
    /// API keys do not make worker calls.
    async fn worker(&self, auth: Option<&pb::WorkerAuth>, with_key: bool) -> Result<Uuid, Error> {
        let Some(auth) = auth else {
            if with_key {
                return Err(Error::PermissionDenied(
                    "API keys cannot make worker calls; a worker sends the credential Register gave it"
                        .into(),
                ));
            }
            return Err(Error::Unauthenticated("missing worker auth".into()));
        };
        self.auth.worker(&auth.worker_id, &auth.token).await
    }

    /// Claimed replicas as the worker sees them, and how long to wait if there are none.
    fn assignments(&self, claimed: Vec<store::Claimed>) -> (Vec<pb::Assignment>, u32) {
        let assignments: Vec<pb::Assignment> = claimed
            .into_iter()
            .map(|c| pb::Assignment {
                replica_id: c.replica_id as u64,
                work_unit_id: c.wu_id as u64,
                random_seed: u64::from_le_bytes(c.input_hash[..8].try_into().unwrap_or_default()),
                module_hash: c.module_hash,
                input: c.input,
                bounds: Some(pb::ResourceBounds {
                    fuel: c.fuel as u64,
                    memory_bytes: c.memory_bytes as u64,
                    output_bytes: c.output_bytes as u64,
                    wall_ms: c.wall_ms as u64,
                }),
                deadline_unix: c.deadline_unix,
            })
            .collect();
        let retry_after_ms = if assignments.is_empty() {
            self.limits.idle_retry_ms
        } else {
            0
        };
        (assignments, retry_after_ms)
    }
}

fn hash32(bytes: &[u8], what: &str) -> Result<[u8; 32], Error> {
    bytes
        .try_into()
        .map_err(|_| Error::InvalidArgument(format!("{what} must be a 32-byte BLAKE3 hash")))
}

/// Account names appear in logs, listings and SQL views: keep them short and plain.
fn valid_account_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn id_of(v: u64, what: &str) -> Result<i64, Error> {
    i64::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} out of range")))
}

#[tonic::async_trait]
impl WorkerService for Api {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = request.into_inner();
        let p = r.platform.unwrap_or_default();
        let clip = |s: &str| store::clean_text(s, 64);
        if p.arch.is_empty() || p.os.is_empty() {
            return Err(Error::InvalidArgument("platform arch and os are required".into()).into());
        }
        // An account is joined by its key, never by its name: a name alone would let anybody
        // spend another volunteer's quota.
        let account = match r.account_key.trim() {
            "" => None,
            key => Some(
                self.store
                    .account_by_key_hash(&auth::key_hash(key))
                    .await?
                    .ok_or_else(|| {
                        Error::Unauthenticated(
                            "unknown account key; CreateAccount (accrete-worker \
                             --create-account NAME) makes an account and prints its key"
                                .into(),
                        )
                    })?,
            ),
        };
        let id = Uuid::new_v4();
        let token = format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple());
        self.store
            .register_worker(&NewWorker {
                id,
                token_hash: *blake3::hash(token.as_bytes()).as_bytes(),
                name: clip(&r.name),
                arch: clip(&p.arch),
                os: clip(&p.os),
                cores: p.cores.min(1 << 20) as i32,
                memory_bytes: p.memory_bytes.min(i64::MAX as u64) as i64,
                runtime: clip(&p.runtime),
                account: account.clone(),
            })
            .await?;
        tracing::info!(worker = %id, arch = %p.arch, os = %p.os, cores = p.cores,
                       account = account.as_deref().unwrap_or(""), "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id.to_string(),
            token,
            account: account.unwrap_or_default(),
        }))
    }

    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let name = request.into_inner().name;
        if !valid_account_name(&name) {
            return Err(Error::InvalidArgument(format!(
                "account name {:?}: 1 to 64 letters, digits, '-', '_' or '.'",
                store::clean_text(&name, 80)
            ))
            .into());
        }
        let key = auth::new_key();
        let daily_quota = self.limits.account_daily_quota.min(i32::MAX as u32);
        if !self
            .store
            .create_account(
                &name,
                &auth::key_prefix(&key),
                &auth::key_hash(&key),
                daily_quota as i32,
            )
            .await?
        {
            return Err(Error::AlreadyExists(format!("account {name:?} already exists")).into());
        }
        tracing::info!(account = %name, daily_quota, "volunteer account created");
        Ok(Response::new(pb::CreateAccountResponse {
            name,
            account_key: key,
            daily_quota,
        }))
    }

    async fn fetch_work(
        &self,
        request: Request<pb::FetchWorkRequest>,
    ) -> Result<Response<pb::FetchWorkResponse>, Status> {
        let key = bearer(&request).is_some();
        let r = request.into_inner();
        let worker = self.worker(r.auth.as_ref(), key).await?;
        let max = r.max.clamp(1, self.limits.fetch_batch_cap()) as i64;
        let mut claimed = if r.resume {
            self.store.in_flight(worker, max).await?
        } else {
            Vec::new()
        };
        let resumed = claimed.len();
        if (resumed as i64) < max {
            claimed.extend(self.store.claim(worker, max - resumed as i64).await?);
        }
        if resumed > 0 {
            tracing::info!(%worker, replicas = resumed, "replicas resumed by a returning worker");
        }
        if claimed.is_empty() {
            // Nothing handed out: say so plainly if the worker may not have work.
            match self.store.standing(worker).await? {
                Some(s) if s.blocked => {
                    return Err(Error::PermissionDenied(
                        "this worker is blocked by the operator".into(),
                    )
                    .into());
                }
                Some(Standing {
                    account: Some(account),
                    account_quota_left: Some(0),
                    account_daily_quota: Some(quota),
                    resets_at,
                    resets_unix,
                    ..
                }) => {
                    return Err(Error::ResourceExhausted(format!(
                        "the daily quota of {quota} replicas of account {account:?}, shared by \
                         all its workers, is used; it resets at {resets_at} (unix {resets_unix})"
                    ))
                    .into());
                }
                Some(s) if s.quota_left == 0 => {
                    return Err(Error::ResourceExhausted(format!(
                        "daily quota of {} replicas used; it resets at {} (unix {}); the quota \
                         halves on error or invalid results and grows back on valid ones",
                        s.daily_quota, s.resets_at, s.resets_unix
                    ))
                    .into());
                }
                _ => {}
            }
        }
        let (assignments, retry_after_ms) = self.assignments(claimed);
        Ok(Response::new(pb::FetchWorkResponse {
            assignments,
            retry_after_ms,
        }))
    }

    async fn report_results(
        &self,
        request: Request<pb::ReportResultsRequest>,
    ) -> Result<Response<pb::ReportResultsResponse>, Status> {
        let key = bearer(&request).is_some();
        let r = request.into_inner();
        let worker = self.worker(r.auth.as_ref(), key).await?;
        if r.results.len() > self.limits.max_report_batch as usize {
            return Err(Error::InvalidArgument(format!(
                "at most {} results per report",
                self.limits.max_report_batch
            ))
            .into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = r.results.iter().find(|res| !seen.insert(res.replica_id)) {
            return Err(Error::InvalidArgument(format!(
                "replica {} appears twice in one report",
                dup.replica_id
            ))
            .into());
        }
        // A malformed result is refused on its own; the rest of the batch still counts.
        let mut refused = Vec::new();
        let mut reports = Vec::with_capacity(r.results.len());
        for res in r.results {
            let outcome = match res.outcome {
                // The server trusts no hash it did not compute.
                Some(pb::replica_result::Outcome::Success(s))
                    if s.output_hash != blake3::hash(&s.output).as_bytes() =>
                {
                    refused.push((res.replica_id, "output_hash is not the BLAKE3 of output"));
                    continue;
                }
                Some(pb::replica_result::Outcome::Success(s)) => Outcome::Success {
                    output: s.output,
                    fuel_used: s.fuel_used.min(i64::MAX as u64) as i64,
                },
                Some(pb::replica_result::Outcome::Failure(f)) => Outcome::Error {
                    kind: error_kind_name(f.kind()).to_string(),
                    message: f.message,
                    fuel_used: f.fuel_used.min(i64::MAX as u64) as i64,
                },
                Some(pb::replica_result::Outcome::HandBack(_)) => Outcome::HandBack,
                None => {
                    refused.push((res.replica_id, "no outcome"));
                    continue;
                }
            };
            let Ok(replica_id) = i64::try_from(res.replica_id) else {
                refused.push((res.replica_id, "unknown replica"));
                continue;
            };
            reports.push(store::Report {
                replica_id,
                outcome,
                wall_micros: res.wall_micros.min(i64::MAX as u64) as i64,
            });
        }
        // A claim that follows asks for what a FetchWork may (its cap keeps the response,
        // assignments and acks together, under the message limit).
        let fetch = i64::from(r.fetch.min(self.limits.fetch_batch_cap()));
        let (mut acks, claimed) = self
            .store
            .report_and_claim(worker, &reports, refused.len(), fetch)
            .await?;
        acks.extend(refused.into_iter().map(|(id, why)| store::Ack {
            replica_id: id as i64,
            status: AckStatus::Rejected,
            message: why.to_string(),
        }));
        let acks = acks
            .into_iter()
            .map(|a| {
                if a.status == AckStatus::Rejected {
                    tracing::warn!(%worker, replica = a.replica_id, reason = %a.message, "report rejected");
                }
                pb::ReportAck {
                    replica_id: a.replica_id as u64,
                    status: match a.status {
                        AckStatus::Accepted => pb::ReportStatus::Accepted,
                        AckStatus::Duplicate => pb::ReportStatus::Duplicate,
                        AckStatus::Rejected => pb::ReportStatus::Rejected,
                    } as i32,
                    message: a.message,
                }
            })
            .collect();
        let (assignments, retry_after_ms) = if fetch > 0 {
            self.assignments(claimed)
        } else {
            (Vec::new(), 0)
        };
        Ok(Response::new(pb::ReportResultsResponse {
            acks,
            assignments,
            retry_after_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = self
            .worker(request.get_ref().auth.as_ref(), bearer(&request).is_some())
            .await?;
        self.store.touch_worker(worker).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Ok(Response::new(pb::HeartbeatResponse {
            server_time_unix: now,
        }))
    }

    async fn get_module(
        &self,
        request: Request<pb::GetModuleRequest>,
    ) -> Result<Response<pb::GetModuleResponse>, Status> {
        let key = bearer(&request).is_some();
        let r = request.into_inner();
        self.worker(r.auth.as_ref(), key).await?;
        let hash = hash32(&r.hash, "hash")?;
        match self.store.module(&hash).await? {
            Some(wasm) => Ok(Response::new(pb::GetModuleResponse { wasm })),
            None => Err(Error::NotFound("no module with that hash".into()).into()),
        }
    }
}

/// The stored name of an error kind (also what `accrete status` and failure reasons show).
fn error_kind_name(kind: pb::ErrorKind) -> &'static str {
    match kind {
        pb::ErrorKind::Unspecified | pb::ErrorKind::Trap => "trap",
        pb::ErrorKind::OutOfFuel => "out_of_fuel",
        pb::ErrorKind::OutOfMemory => "out_of_memory",
        pb::ErrorKind::OutputTooLarge => "output_too_large",
        pb::ErrorKind::BadOutput => "bad_output",
        pb::ErrorKind::WallTimeout => "wall_timeout",
        pb::ErrorKind::Module => "module",
    }
}

#[tonic::async_trait]
impl ResearchService for Api {
    async fn put_module(
        &self,
        request: Request<pb::PutModuleRequest>,
    ) -> Result<Response<pb::PutModuleResponse>, Status> {
        self.caller(&request, Role::Researcher, "PutModule").await?;
        let r = request.into_inner();
        if r.wasm.len() > self.limits.max_module_bytes {
            return Err(Error::InvalidArgument(format!(
                "module of {} bytes is over the cap of {} bytes",
                r.wasm.len(),
                self.limits.max_module_bytes
            ))
            .into());
        }
        // Validating up to 32 MiB of wasm is CPU work: keep it off the async threads.
        let (wasm, checked) = tokio::task::spawn_blocking(move || {
            let checked = module_check::check(&r.wasm);
            (r.wasm, checked)
        })
        .await
        .map_err(|e| Error::Internal(format!("module check panicked: {e}")))?;
        checked.map_err(Error::InvalidArgument)?;
        let hash = *blake3::hash(&wasm).as_bytes();
        let name = store::clean_text(&r.name, 200);
        let already_present = self.store.put_module(&hash, &wasm, &name).await?;
        Ok(Response::new(pb::PutModuleResponse {
            hash: hash.to_vec(),
            already_present,
        }))
    }

    async fn submit_study(
        &self,
        request: Request<pb::SubmitStudyRequest>,
    ) -> Result<Response<pb::SubmitStudyResponse>, Status> {
        let caller = self
            .caller(&request, Role::Researcher, "SubmitStudy")
            .await?;
        let r = request.into_inner();
        let module_hash = hash32(&r.module_hash, "module_hash")?;
        if self.store.module(&module_hash).await?.is_none() {
            return Err(Error::NotFound("no module with that hash; upload it first".into()).into());
        }
        if r.work_units.is_empty() {
            return Err(
                Error::InvalidArgument("a study needs at least one work unit".into()).into(),
            );
        }
        if r.name.trim().is_empty() {
            return Err(Error::InvalidArgument("a study needs a name".into()).into());
        }
        if let Some(big) = r
            .work_units
            .iter()
            .find(|w| w.input.len() > self.limits.max_input_bytes)
        {
            return Err(Error::InvalidArgument(format!(
                "an input of {} bytes is over the cap of {} bytes",
                big.input.len(),
                self.limits.max_input_bytes
            ))
            .into());
        }
        let p = r.policy.unwrap_or_default();
        let mut tolerance = scheduler::Tolerance::new();
        for t in &r.tolerance {
            let ok = |v: f64| v.is_finite() && v >= 0.0;
            if t.metric.is_empty() || !ok(t.abs) || !ok(t.rel) || t.abs + t.rel == 0.0 {
                return Err(Error::InvalidArgument(format!(
                    "tolerance on {:?}: needs a metric name and a finite, non-negative abs or rel \
                     (not both zero)",
                    t.metric
                ))
                .into());
            }
            tolerance.insert(t.metric.clone(), (t.abs, t.rel));
        }
        let policy = Policy::with_defaults(
            p.min_quorum,
            p.target_nresults,
            p.max_error_results,
            p.max_total_results,
            p.max_success_results,
            p.delay_bound_secs,
        )
        .map(|policy| Policy {
            adaptive: p.adaptive,
            ..policy
        })
        .map_err(Error::InvalidArgument)?;
        let bounds = self.limits.bounds(r.bounds.unwrap_or_default())?;
        if r.parent_findings.len() > 1000 {
            return Err(Error::InvalidArgument("at most 1000 parent findings".into()).into());
        }
        let parents = r
            .parent_findings
            .iter()
            .map(|&p| id_of(p, "parent_findings"))
            .collect::<Result<Vec<_>, _>>()?;
        let missing = self.store.missing_findings(&parents).await?;
        if !missing.is_empty() {
            return Err(Error::NotFound(format!("no parent finding {missing:?}")).into());
        }
        let created = self
            .store
            .create_study(&NewStudy {
                name: store::clean_text(&r.name, 200),
                description: store::clean_text(&r.description, 4000),
                module_hash,
                policy,
                tolerance: (!tolerance.is_empty()).then_some(tolerance),
                bounds,
                inputs: r.work_units.into_iter().map(|w| w.input).collect(),
                parents,
                dedup: true,
                owner: Some(caller.key_id),
            })
            .await?;
        let known = created.existing.iter().filter(|&&f| f != 0).count();
        tracing::info!(
            study = created.study_id,
            owner_key = caller.key_id,
            work_units = created.work_unit_ids.len() - known,
            already_validated = known,
            "study submitted"
        );
        Ok(Response::new(pb::SubmitStudyResponse {
            study_id: created.study_id as u64,
            work_unit_ids: created
                .work_unit_ids
                .into_iter()
                .map(|i| i as u64)
                .collect(),
            existing_findings: created.existing.into_iter().map(|i| i as u64).collect(),
        }))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.caller(&request, Role::Reader, "GetStatus").await?;
        let study = request.into_inner().study_id;
        let filter = (study != 0).then(|| id_of(study, "study_id")).transpose()?;
        let rows = self.store.study_status(filter).await?;
        if filter.is_some() && rows.is_empty() {
            return Err(Error::NotFound(format!("no study {study}")).into());
        }
        let studies = rows
            .into_iter()
            .map(|s| pb::StudyStatus {
                study_id: s.study_id as u64,
                name: s.name,
                module_hash: s.module_hash,
                cancelled: s.cancelled,
                work_units: s.work_units as u64,
                pending: s.pending as u64,
                validated: s.validated as u64,
                failed: s.failed as u64,
                cancelled_units: s.cancelled_units as u64,
                replicas_in_progress: s.replicas_in_progress as u64,
                replicas_success: s.replicas_success as u64,
                replicas_error: s.replicas_error as u64,
                replicas_timed_out: s.replicas_timed_out as u64,
                replicas_invalid: s.replicas_invalid as u64,
                created_unix: s.created_unix,
                description: s.description,
            })
            .collect();
        let workers_seen_recently = self.store.workers_seen_since(120).await? as u64;
        Ok(Response::new(pb::GetStatusResponse {
            studies,
            workers_seen_recently,
        }))
    }

    async fn cancel_study(
        &self,
        request: Request<pb::CancelStudyRequest>,
    ) -> Result<Response<pb::CancelStudyResponse>, Status> {
        let caller = self
            .caller(&request, Role::Researcher, "CancelStudy")
            .await?;
        let study = request.into_inner().study_id;
        let id = id_of(study, "study_id")?;
        match self.store.study_owner(id).await? {
            None => return Err(Error::NotFound(format!("no study {study}")).into()),
            Some(owner) if caller.role < Role::Admin && owner != Some(caller.key_id) => {
                return Err(Error::PermissionDenied(format!(
                    "study {study} belongs to another API key; a researcher may cancel only its own studies (an admin may cancel any)"
                ))
                .into());
            }
            Some(_) => {}
        }
        tracing::info!(study = id, key = caller.key_id, "study cancelled");
        match self.store.cancel_study(id).await? {
            Some(n) => Ok(Response::new(pb::CancelStudyResponse {
                cancelled_units: n,
            })),
            None => Err(Error::NotFound(format!("no study {study}")).into()),
        }
    }
}

fn finding_to_pb(f: store::FindingRow, agreeing: Vec<pb::AgreeingReplica>) -> pb::Finding {
    pb::Finding {
        id: f.id as u64,
        study_id: f.study_id as u64,
        work_unit_id: f.wu_id as u64,
        module_hash: f.module_hash,
        input_hash: f.input_hash,
        output_hash: f.output_hash,
        metrics_json: f.metrics.to_string(),
        params_json: f.params.map(|p| p.to_string()).unwrap_or_default(),
        confidence: f.confidence,
        agreeing,
        dissenting: f.dissenting as u32,
        created_unix: f.created_unix,
        output: f.output.unwrap_or_default(),
        unreplicated: f.unreplicated,
        platforms: f.platforms,
        validated_confidence: f.validated_confidence,
        ledger_seq: f.ledger_seq.unwrap_or(0) as u64,
        ledger_hash: Vec::new(),
        parent_findings: Vec::new(),
        evidence: Vec::new(),
    }
}

fn evidence_to_pb(e: store::EvidenceRow) -> pb::Evidence {
    pb::Evidence {
        id: e.id as u64,
        kind: e.kind,
        detail_json: e.detail.to_string(),
        confidence_after: e.confidence_after,
        created_unix: e.created_unix,
        ledger_seq: e.ledger_seq.unwrap_or(0) as u64,
    }
}

fn entry_to_pb(r: store::LedgerRow) -> pb::LedgerEntry {
    pb::LedgerEntry {
        seq: r.seq as u64,
        body: r.body,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

/// Cursors are opaque to callers: hex of `v1|<metric>|<a or d>|<value bits>|<id>`. They carry
/// the ordering they came from, so one from another ordering is refused, not misread.
fn encode_cursor(metric: Option<&str>, descending: bool, c: store::Cursor) -> String {
    let text = format!(
        "v1|{}|{}|{}|{}",
        metric.unwrap_or(""),
        if descending { 'd' } else { 'a' },
        c.value
            .map_or(String::new(), |v| format!("{:016x}", v.to_bits())),
        c.id
    );
    crate::ledger::hex(text.as_bytes())
}

fn decode_cursor(
    cursor: &str,
    metric: Option<&str>,
    descending: bool,
) -> Result<store::Cursor, Error> {
    let bad = || Error::InvalidArgument("malformed cursor".into());
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| {
            cursor
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let parts: Vec<&str> = text.rsplitn(4, '|').collect();
    // rsplitn gives: id, value, direction, "v1|metric".
    let [id, value, dir, head] = parts[..] else {
        return Err(bad());
    };
    let cursor_metric = head.strip_prefix("v1|").ok_or_else(bad)?;
    if cursor_metric != metric.unwrap_or("") || dir != if descending { "d" } else { "a" } {
        return Err(Error::InvalidArgument(
            "the cursor belongs to a listing with another order".into(),
        ));
    }
    let value = if value.is_empty() {
        None
    } else {
        Some(f64::from_bits(
            u64::from_str_radix(value, 16).map_err(|_| bad())?,
        ))
    };
    if metric.is_some() != value.is_some() {
        return Err(bad());
    }
    Ok(store::Cursor {
        value,
        id: id.parse().map_err(|_| bad())?,
    })
}

/// `param_equals` as a JSON object the parameters must contain.
fn params_filter(m: &HashMap<String, String>) -> Option<serde_json::Value> {
    if m.is_empty() {
        return None;
    }
    let obj = m
        .iter()
        .map(|(k, v)| {
            let value = serde_json::from_str::<serde_json::Value>(v)
                .unwrap_or_else(|_| serde_json::Value::String(v.clone()));
            (k.clone(), value)
        })
        .collect();
    Some(serde_json::Value::Object(obj))
}

impl Api {
    /// Attaches the agreeing replicas to each finding.
    async fn with_agreeing(&self, rows: Vec<store::FindingRow>) -> Result<Vec<pb::Finding>, Error> {
        let ids: Vec<i64> = rows.iter().map(|f| f.id).collect();
        let mut by_finding: HashMap<i64, Vec<pb::AgreeingReplica>> = HashMap::new();
        for a in self.store.agreeing(&ids).await? {
            by_finding
                .entry(a.finding_id)
                .or_default()
                .push(pb::AgreeingReplica {
                    replica_id: a.replica_id as u64,
                    worker_id: a.worker_id.to_string(),
                    platform: a.platform,
                    fuel_used: a.fuel_used as u64,
                });
        }
        let seqs: Vec<i64> = rows.iter().filter_map(|f| f.ledger_seq).collect();
        let mut hashes = self.store.ledger_hashes(&seqs).await?;
        Ok(rows
            .into_iter()
            .map(|f| {
                let agreeing = by_finding.remove(&f.id).unwrap_or_default();
                let hash = f.ledger_seq.and_then(|s| hashes.remove(&s));
                let mut p = finding_to_pb(f, agreeing);
                p.ledger_hash = hash.unwrap_or_default();
                p
            })
            .collect())
    }

    async fn finding_list(
        &self,
        rows: Vec<store::FindingRow>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        Ok(Response::new(pb::ListFindingsResponse {
            findings: self.with_agreeing(rows).await?,
            next_cursor: String::new(),
        }))
    }

    async fn existing_finding(&self, id: u64) -> Result<i64, Error> {
        let id = id_of(id, "finding_id")?;
        if self.store.finding(id).await?.is_none() {
            return Err(Error::NotFound(format!("no finding {id}")));
        }
        Ok(id)
    }

    fn study_filter(&self, study: u64) -> Result<Option<i64>, Error> {
        (study != 0).then(|| id_of(study, "study_id")).transpose()
    }

    /// Streams ledger entries after `after` in pages; with `follow`, then polls for new ones
    /// until the caller goes away. Polling (not LISTEN/NOTIFY) keeps every server equal.
    fn entry_stream(&self, after: u64, follow: bool) -> Result<EntryStream, Error> {
        const PAGE: i64 = 5000;
        let mut after = id_of(after, "after_seq")?;
        let store = self.store.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let page = match store.ledger_page(after, PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let full = page.len() as i64 == PAGE;
                for row in page {
                    after = row.seq;
                    if tx.send(Ok(entry_to_pb(row))).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                if !follow {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })))
    }
}

type EntryStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LedgerEntry, Status>> + Send>>;

#[tonic::async_trait]
impl LedgerService for Api {
    async fn list_findings(
        &self,
        request: Request<pb::ListFindingsRequest>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        self.caller(&request, Role::Reader, "ListFindings").await?;
        let r = request.into_inner();
        let study_id = self.study_filter(r.study_id)?;
        if let Some(s) = study_id
            && !self.store.study_exists(s).await?
        {
            return Err(Error::NotFound(format!("no study {s}")).into());
        }
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) } as i64;
        let metric = (!r.order_by_metric.is_empty()).then_some(r.order_by_metric);
        let after = (!r.cursor.is_empty())
            .then(|| decode_cursor(&r.cursor, metric.as_deref(), r.descending))
            .transpose()?;
        if r.metric_ranges.len() > 32 || r.param_equals.len() > 32 {
            return Err(Error::InvalidArgument("at most 32 filters of each kind".into()).into());
        }
        let ranges = r
            .metric_ranges
            .into_iter()
            .map(|m| {
                if m.metric.is_empty() {
                    Err(Error::InvalidArgument(
                        "a metric range needs a metric".into(),
                    ))
                } else if m.min.is_some_and(f64::is_nan) || m.max.is_some_and(f64::is_nan) {
                    Err(Error::InvalidArgument("a metric bound is NaN".into()))
                } else {
                    Ok(store::MetricRange {
                        metric: m.metric,
                        min: m.min,
                        max: m.max,
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (rows, next) = self
            .store
            .list_findings(&FindingQuery {
                study_id,
                order_by_metric: metric.clone(),
                descending: r.descending,
                limit,
                params: params_filter(&r.param_equals),
                ranges,
                after,
            })
            .await?;
        Ok(Response::new(pb::ListFindingsResponse {
            findings: self.with_agreeing(rows).await?,
            next_cursor: next
                .map(|c| encode_cursor(metric.as_deref(), r.descending, c))
                .unwrap_or_default(),
        }))
    }

    async fn get_finding(
        &self,
        request: Request<pb::GetFindingRequest>,
    ) -> Result<Response<pb::Finding>, Status> {
        self.caller(&request, Role::Reader, "GetFinding").await?;
        let id = request.into_inner().finding_id;
        let row = self.store.finding(id_of(id, "finding_id")?).await?;
        let row = row.ok_or_else(|| Error::NotFound(format!("no finding {id}")))?;
        let fid = row.id;
        let mut found = self.with_agreeing(vec![row]).await?.remove(0);
        found.parent_findings = self
            .store
            .parents_of(fid)
            .await?
            .into_iter()
            .map(|p| p as u64)
            .collect();
        found.evidence = self
            .store
            .evidence_of(fid)
            .await?
            .into_iter()
            .map(evidence_to_pb)
            .collect();
        Ok(Response::new(found))
    }

    async fn get_lineage(
        &self,
        request: Request<pb::FindingRelationRequest>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        self.caller(&request, Role::Reader, "GetLineage").await?;
        let id = self
            .existing_finding(request.into_inner().finding_id)
            .await?;
        self.finding_list(self.store.lineage(id).await?).await
    }

    async fn list_children(
        &self,
        request: Request<pb::FindingRelationRequest>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        self.caller(&request, Role::Reader, "ListChildren").await?;
        let id = self
            .existing_finding(request.into_inner().finding_id)
            .await?;
        self.finding_list(self.store.children(id).await?).await
    }

    async fn list_leaves(
        &self,
        request: Request<pb::ListLeavesRequest>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        self.caller(&request, Role::Reader, "ListLeaves").await?;
        let r = request.into_inner();
        let study = self.study_filter(r.study_id)?;
        if let Some(s) = study
            && !self.store.study_exists(s).await?
        {
            return Err(Error::NotFound(format!("no study {s}")).into());
        }
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) } as i64;
        self.finding_list(self.store.leaves(study, limit).await?)
            .await
    }

    async fn best_findings(
        &self,
        request: Request<pb::BestFindingsRequest>,
    ) -> Result<Response<pb::ListFindingsResponse>, Status> {
        self.caller(&request, Role::Reader, "BestFindings").await?;
        let r = request.into_inner();
        if r.metric.is_empty() {
            return Err(Error::InvalidArgument("name the metric to rank by".into()).into());
        }
        let study = self.study_filter(r.study_id)?;
        self.finding_list(self.store.best(&r.metric, r.descending, study).await?)
            .await
    }

    type ExportLedgerStream = EntryStream;

    async fn export_ledger(
        &self,
        request: Request<pb::ExportLedgerRequest>,
    ) -> Result<Response<EntryStream>, Status> {
        self.caller(&request, Role::Reader, "ExportLedger").await?;
        Ok(Response::new(
            self.entry_stream(request.into_inner().after_seq, false)?,
        ))
    }

    type WatchLedgerStream = EntryStream;

    async fn watch_ledger(
        &self,
        request: Request<pb::ExportLedgerRequest>,
    ) -> Result<Response<EntryStream>, Status> {
        self.caller(&request, Role::Reader, "WatchLedger").await?;
        Ok(Response::new(
            self.entry_stream(request.into_inner().after_seq, true)?,
        ))
    }

    async fn adopt(
        &self,
        request: Request<pb::AdoptRequest>,
    ) -> Result<Response<pb::AdoptResponse>, Status> {
        let caller = self.caller(&request, Role::Researcher, "Adopt").await?;
        let r = request.into_inner();
        let id = id_of(r.finding_id, "finding_id")?;
        let seeds = if r.seeds == 0 { 4 } else { r.seeds };
        if seeds > 64 {
            return Err(Error::InvalidArgument("at most 64 seeds".into()).into());
        }
        let metric = (!r.metric.is_empty()).then_some(r.metric.as_str());
        let opened = self
            .store
            .create_adoption(id, metric, r.descending, seeds, Some(caller.key_id))
            .await?
            .ok_or_else(|| Error::NotFound(format!("no finding {id}")))?;
        tracing::info!(
            finding = id,
            adoption = opened.id,
            study = opened.study_id,
            "adoption proposed"
        );
        Ok(Response::new(pb::AdoptResponse {
            adoption_id: opened.id as u64,
            study_id: opened.study_id as u64,
        }))
    }

    async fn get_adoption(
        &self,
        request: Request<pb::GetAdoptionRequest>,
    ) -> Result<Response<pb::Adoption>, Status> {
        self.caller(&request, Role::Reader, "GetAdoption").await?;
        let id = request.into_inner().adoption_id;
        let a = self
            .store
            .adoption(id_of(id, "adoption_id")?)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no adoption {id}")))?;
        let outcome = match a.evidence_id {
            Some(e) => self.store.evidence(e).await?.map(evidence_to_pb),
            None => None,
        };
        Ok(Response::new(pb::Adoption {
            id: a.id as u64,
            finding_id: a.finding_id as u64,
            study_id: a.study_id as u64,
            settled: a.settled,
            outcome,
        }))
    }

    async fn list_failures(
        &self,
        request: Request<pb::ListFailuresRequest>,
    ) -> Result<Response<pb::ListFailuresResponse>, Status> {
        self.caller(&request, Role::Reader, "ListFailures").await?;
        let r = request.into_inner();
        let study = id_of(r.study_id, "study_id")?;
        if !self.store.study_exists(study).await? {
            return Err(Error::NotFound(format!("no study {study}")).into());
        }
        let limit = if r.limit == 0 { 50 } else { r.limit.min(1000) } as i64;
        let failures = self
            .store
            .failures(study, limit)
            .await?
            .into_iter()
            .map(|f| pb::WorkUnitFailure {
                work_unit_id: f.wu_id as u64,
                reason: f.reason,
                params_json: f.params.map(|p| p.to_string()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListFailuresResponse { failures }))
    }
}

impl Limits {
    /// A study's bounds with server defaults for unset fields, refused above the server's caps.
    fn bounds(&self, b: pb::ResourceBounds) -> Result<Bounds, Error> {
        let pick = |v: u64, default: u64, cap: u64, what: &str| {
            let v = if v == 0 { default } else { v };
            if v > cap {
                Err(Error::InvalidArgument(format!(
                    "{what} {v} is over the server's cap of {cap}"
                )))
            } else {
                Ok(v as i64)
            }
        };
        Ok(Bounds {
            fuel: pick(b.fuel, self.default_fuel, self.max_fuel, "fuel")?,
            memory_bytes: pick(
                b.memory_bytes,
                self.default_memory_bytes,
                self.max_memory_bytes,
                "memory_bytes",
            )?,
            output_bytes: pick(
                b.output_bytes,
                self.default_output_bytes,
                self.max_output_bytes,
                "output_bytes",
            )?,
            wall_ms: pick(b.wall_ms, self.default_wall_ms, self.max_wall_ms, "wall_ms")?,
        })
    }
}
