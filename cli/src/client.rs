//! The researcher's and dashboard's side of the API: connecting, submitting sweeps, and printing
//! status and findings as tables for people or JSON for agents and scripts.

use std::time::{Duration, Instant};

use accrete_proto::MAX_MESSAGE_BYTES;
use accrete_proto::transport::ClientTls;
use accrete_proto::v1::{
    self as pb, admin_service_client::AdminServiceClient,
    ledger_service_client::LedgerServiceClient, research_service_client::ResearchServiceClient,
};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::sweep::SweepSpec;

/// Sends the API key with every call, as the gRPC metadata `authorization: Bearer <key>`.
#[derive(Clone)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for ApiKey {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the API key.
pub type Authed = InterceptedService<Channel, ApiKey>;

/// Clients of the research, ledger and admin services over one connection.
#[derive(Clone)]
pub struct Client {
    pub research: ResearchServiceClient<Authed>,
    pub ledger: LedgerServiceClient<Authed>,
    pub admin: AdminServiceClient<Authed>,
}

impl Client {
    /// A client without an API key (every call but the worker's needs one); an `https://` URL
    /// uses TLS with the system's trust store.
    pub async fn connect(server: &str) -> anyhow::Result<Client> {
        Client::connect_with(server, &ClientTls::default(), None).await
    }

    /// A client whose calls carry `api_key`, trusting `tls`'s CA for an `https://` URL.
    pub async fn connect_with(
        server: &str,
        tls: &ClientTls,
        api_key: Option<&str>,
    ) -> anyhow::Result<Client> {
        let key = api_key
            .map(|k| {
                MetadataValue::try_from(format!("Bearer {}", k.trim()))
                    .context("the API key has characters a gRPC header cannot carry")
            })
            .transpose()?;
        let channel = accrete_proto::transport::endpoint(server, tls)?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to {server}"))?;
        let authed = InterceptedService::new(channel, ApiKey(key));
        Ok(Client {
            research: ResearchServiceClient::new(authed.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            ledger: LedgerServiceClient::new(authed.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            admin: AdminServiceClient::new(authed),
        })
    }

    /// Uploads a module (a no-op when the server has it) and returns its hash.
    pub async fn put_module(&mut self, wasm: Vec<u8>, name: &str) -> anyhow::Result<Vec<u8>> {
        let r = self
            .research
            .put_module(pb::PutModuleRequest {
                wasm,
                name: name.to_string(),
            })
            .await
            .map_err(status_error)?;
        Ok(r.into_inner().hash)
    }

    /// Uploads the module, expands the sweep and submits it as one study.
    pub async fn submit_sweep(
        &mut self,
        wasm: Vec<u8>,
        module_name: &str,
        spec: &SweepSpec,
        name: &str,
        parents: &[u64],
    ) -> anyhow::Result<pb::SubmitStudyResponse> {
        let inputs = spec.expand().map_err(anyhow::Error::msg)?;
        let module_hash = self.put_module(wasm, module_name).await?;
        let r = self
            .research
            .submit_study(pb::SubmitStudyRequest {
                name: name.to_string(),
                description: spec.description.clone(),
                module_hash,
                policy: Some(spec.policy.to_pb()),
                bounds: Some(spec.bounds.to_pb()),
                tolerance: spec.tolerance_pb(),
                work_units: inputs
                    .iter()
                    .map(|p| pb::WorkUnitSpec {
                        input: p.to_string().into_bytes(),
                    })
                    .collect(),
                parent_findings: parents.to_vec(),
            })
            .await
            .map_err(status_error)?;
        Ok(r.into_inner())
    }

    pub async fn status(&mut self, study: u64) -> anyhow::Result<pb::GetStatusResponse> {
        Ok(self
            .research
            .get_status(pb::GetStatusRequest { study_id: study })
            .await
            .map_err(status_error)?
            .into_inner())
    }

    pub async fn findings(
        &mut self,
        req: pb::ListFindingsRequest,
    ) -> anyhow::Result<Vec<pb::Finding>> {
        Ok(self
            .ledger
            .list_findings(req)
            .await
            .map_err(status_error)?
            .into_inner()
            .findings)
    }

    /// Polls a study until no work unit is pending, calling `progress` on each poll.
    pub async fn wait(
        &mut self,
        study: u64,
        timeout: Option<Duration>,
        mut progress: impl FnMut(&pb::StudyStatus, Duration),
    ) -> anyhow::Result<pb::StudyStatus> {
        let start = Instant::now();
        loop {
            let s = self.status(study).await?.studies.remove(0);
            progress(&s, start.elapsed());
            if s.pending == 0 {
                return Ok(s);
            }
            if timeout.is_some_and(|t| start.elapsed() > t) {
                bail!(
                    "study {study} still has {} pending work units after {:?}",
                    s.pending,
                    start.elapsed()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `NAME=VALUE` of `--param`: the value as given (JSON text; the server reads non-JSON as a string).
pub fn parse_param(p: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = p
        .split_once('=')
        .with_context(|| format!("--param {p:?}: expected NAME=VALUE"))?;
    Ok((k.to_string(), v.to_string()))
}

/// `METRIC:MIN:MAX` of `--range`, empty bounds open.
pub fn parse_range(r: &str) -> anyhow::Result<pb::MetricRange> {
    let parts: Vec<&str> = r.rsplitn(3, ':').collect();
    let [max, min, metric] = parts[..] else {
        bail!("--range {r:?}: expected METRIC:MIN:MAX");
    };
    let bound = |s: &str| -> anyhow::Result<Option<f64>> {
        if s.is_empty() {
            Ok(None)
        } else {
            Ok(Some(s.parse().with_context(|| {
                format!("--range {r:?}: bad bound {s:?}")
            })?))
        }
    };
    Ok(pb::MetricRange {
        metric: metric.to_string(),
        min: bound(min)?,
        max: bound(max)?,
    })
}

/// Polls an adoption proposal until its outcome is recorded.
pub async fn wait_adoption(client: &mut Client, id: u64) -> anyhow::Result<pb::Adoption> {
    loop {
        let a = client
            .ledger
            .get_adoption(pb::GetAdoptionRequest { adoption_id: id })
            .await
            .map_err(status_error)?
            .into_inner();
        if a.settled {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub fn adoption_json(a: &pb::Adoption) -> Value {
    json!({
        "adoption_id": a.id, "finding_id": a.finding_id, "study_id": a.study_id,
        "settled": a.settled, "outcome": a.outcome.as_ref().map(evidence_json),
    })
}

pub fn evidence_json(e: &pb::Evidence) -> Value {
    json!({
        "id": e.id, "kind": e.kind,
        "detail": serde_json::from_str::<Value>(&e.detail_json).unwrap_or(Value::Null),
        "confidence_after": e.confidence_after, "created_unix": e.created_unix,
        "ledger_seq": e.ledger_seq,
    })
}

/// A gRPC status as an error a person can read.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("server said {:?}: {}", s.code(), s.message())
}

/// One line of progress.
pub fn progress_line(s: &pb::StudyStatus, elapsed: Duration) -> String {
    let done = s.validated + s.failed + s.cancelled_units;
    format!(
        "[{:6.1}s] study {}: {}/{} done ({} validated, {} failed) | replicas: {} running, {} ok, {} errors, {} timed out, {} invalid",
        elapsed.as_secs_f64(),
        s.study_id,
        done,
        s.work_units,
        s.validated,
        s.failed,
        s.replicas_in_progress,
        s.replicas_success,
        s.replicas_error,
        s.replicas_timed_out,
        s.replicas_invalid,
    )
}

pub fn status_json(s: &pb::StudyStatus) -> Value {
    json!({
        "study_id": s.study_id, "name": s.name, "module_hash": hex(&s.module_hash),
        "cancelled": s.cancelled, "work_units": s.work_units, "pending": s.pending,
        "validated": s.validated, "failed": s.failed, "cancelled_units": s.cancelled_units,
        "replicas": { "in_progress": s.replicas_in_progress, "success": s.replicas_success,
                      "error": s.replicas_error, "timed_out": s.replicas_timed_out,
                      "invalid": s.replicas_invalid },
        "created_unix": s.created_unix,
    })
}

pub fn finding_json(f: &pb::Finding) -> Value {
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    let mut v = json!({
        "id": f.id, "study_id": f.study_id, "work_unit_id": f.work_unit_id,
        "metrics": parse(&f.metrics_json), "params": parse(&f.params_json),
        "confidence": f.confidence, "unreplicated": f.unreplicated, "platforms": f.platforms,
        "module_hash": hex(&f.module_hash), "input_hash": hex(&f.input_hash),
        "output_hash": hex(&f.output_hash),
        "agreeing": f.agreeing.iter().map(|a| json!({
            "replica_id": a.replica_id, "worker_id": a.worker_id, "platform": a.platform,
            "fuel_used": a.fuel_used })).collect::<Vec<_>>(),
        "dissenting": f.dissenting, "created_unix": f.created_unix,
        "validated_confidence": f.validated_confidence,
        "ledger_seq": f.ledger_seq, "ledger_hash": hex(&f.ledger_hash),
        "parent_findings": f.parent_findings,
        "evidence": f.evidence.iter().map(evidence_json).collect::<Vec<_>>(),
    });
    if !f.output.is_empty() {
        v["output"] = serde_json::from_slice(&f.output)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&f.output).into_owned()));
    }
    v
}

/// A leaderboard: rank, metric, parameters, confidence and the replicas that agreed.
pub fn findings_table(findings: &[pb::Finding], metric: Option<&str>) -> String {
    let mut out = String::new();
    let metric_head = metric.unwrap_or("metrics");
    out.push_str(&format!(
        "{:>4}  {:>7}  {:>12}  {:>10}  {:<22}  {}\n",
        "rank", "finding", metric_head, "confidence", "agreed (platforms)", "parameters"
    ));
    for (i, f) in findings.iter().enumerate() {
        let metrics: Value = serde_json::from_str(&f.metrics_json).unwrap_or(Value::Null);
        let value = match metric {
            Some(m) => metrics
                .get(m)
                .and_then(Value::as_f64)
                .map_or("-".into(), |x| format!("{x:.6}")),
            None => f.metrics_json.clone(),
        };
        let mut platforms: Vec<&str> = f.agreeing.iter().map(|a| a.platform.as_str()).collect();
        platforms.sort_unstable();
        platforms.dedup();
        let solo = if f.unreplicated { " solo" } else { "" };
        let agreed = format!("{}{solo} ({})", f.agreeing.len(), platforms.join(","));
        out.push_str(&format!(
            "{:>4}  {:>7}  {:>12}  {:>10.4}  {:<22}  {}\n",
            i + 1,
            f.id,
            value,
            f.confidence,
            agreed,
            if f.params_json.is_empty() {
                "-"
            } else {
                &f.params_json
            },
        ));
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
