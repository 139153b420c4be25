//! The tower layer in front of every gRPC call: request ids and the call's tracing span, rate
//! limits, per-method message size caps, global load shedding, request timeouts, and the
//! per-method status and latency metrics. One layer, so the order of these checks is one
//! function to read (`Ops::call`).
//!
//! Order, cheapest refusal first: request id and span; the per-IP `Register` limit; the message
//! size cap (reads only the 5-byte gRPC frame header); the per-credential rate limit (the
//! worker id comes from those first bytes); the concurrency permit (held until the response
//! head, so a long `WatchLedger` stream does not hold one); the timeout around the handler. Health checks and reflection skip the rate and concurrency limits: load balancers
//! must see a busy server as busy, not as dead.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use accrete_proto::MAX_MESSAGE_BYTES;
use bytes::{Buf, Bytes, BytesMut};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderValue, Request, Response};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::Semaphore;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::Limits;
use crate::metrics::Metrics;

/// The metadata key of the request id: honoured when a caller sends one, generated otherwise,
/// and always echoed in the response.
pub const REQUEST_ID: &str = "x-request-id";

/// How much load the server accepts before it refuses calls. `None`/0 means no limit; the
/// library's default has no limits (tests and the demo run many workers from one address),
/// the `accrete-server` binary's flags turn them on.
#[derive(Debug, Clone, Default)]
pub struct CallLimits {
    /// Sustained calls per second per credential: the `authorization` metadata when present,
    /// else the worker id in a worker call's `auth` field, else the peer IP address.
    pub rate_per_sec: Option<NonZeroU32>,
    /// Calls a credential may make at once above its sustained rate.
    pub rate_burst: Option<NonZeroU32>,
    /// `Register` and `CreateAccount` calls per minute per peer IP (neither needs a credential),
    /// counted together.
    pub register_per_min: Option<NonZeroU32>,
    /// Calls in flight at once, server-wide; more are shed at once with `UNAVAILABLE`.
    pub max_concurrent: Option<usize>,
    /// Longest a call's handler may take before it fails with `DEADLINE_EXCEEDED`.
    pub request_timeout: Option<Duration>,
}

/// The largest message each method accepts, and what to call it in the refusal. Modules,
/// inputs and outputs each have their own cap in `Limits`; the message caps follow from them.
#[derive(Debug, Clone)]
struct SizeCaps {
    module: usize,
    report: usize,
    other: usize,
}

impl SizeCaps {
    fn new(limits: &Limits) -> SizeCaps {
        // Room for the other fields of a message around its payloads.
        const SLACK: usize = 64 << 10;
        SizeCaps {
            module: limits.max_module_bytes.saturating_add(SLACK),
            report: (limits.max_report_batch as usize)
                .saturating_mul(limits.max_output_bytes.saturating_add(1024) as usize)
                .saturating_add(SLACK)
                .min(MAX_MESSAGE_BYTES),
            other: limits.small_message_bytes,
        }
    }

    fn for_path(&self, path: &str) -> (usize, &'static str) {
        match path {
            "/accrete.v1.ResearchService/PutModule" => (self.module, "module upload"),
            // Each input is capped by max_input_bytes in the handler; the study as a whole by
            // the transport's cap.
            "/accrete.v1.ResearchService/SubmitStudy" => (MAX_MESSAGE_BYTES, "study"),
            "/accrete.v1.WorkerService/ReportResults" => (self.report, "report"),
            _ => (self.other, "request"),
        }
    }
}

struct Shared {
    limits: CallLimits,
    caps: SizeCaps,
    per_key: Option<DefaultKeyedRateLimiter<String>>,
    register: Option<DefaultKeyedRateLimiter<IpAddr>>,
    permits: Option<Arc<Semaphore>>,
    metrics: Metrics,
}

/// The layer; build it once per server with [`OpsLayer::new`].
#[derive(Clone)]
pub struct OpsLayer {
    shared: Arc<Shared>,
}

impl OpsLayer {
    pub fn new(calls: &CallLimits, limits: &Limits, metrics: Metrics) -> OpsLayer {
        let per_key = calls.rate_per_sec.map(|rate| {
            let burst = calls.rate_burst.unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let register = calls
            .register_per_min
            .map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        OpsLayer {
            shared: Arc::new(Shared {
                limits: calls.clone(),
                caps: SizeCaps::new(limits),
                per_key,
                register,
                permits: calls
                    .max_concurrent
                    .filter(|n| *n > 0)
                    .map(|n| Arc::new(Semaphore::new(n))),
                metrics,
            }),
        }
    }

    /// Forgets rate-limit state of callers not seen lately, so the maps stay small.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.shared.per_key {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.shared.register {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

impl<S> tower::Layer<S> for OpsLayer {
    type Service = Ops<S>;

    fn layer(&self, inner: S) -> Ops<S> {
        Ops {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service the layer wraps around tonic's router.
#[derive(Clone)]
pub struct Ops<S> {
    inner: S,
    shared: Arc<Shared>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<Request<Body>> for Ops<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // The clone that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();

        let request_id = request_id(&req);
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            req.headers_mut().insert(REQUEST_ID, v);
        }
        let path = req.uri().path().to_string();
        let peer = peer_ip(&req);
        let span = tracing::info_span!(
            "call",
            request_id = %request_id,
            method = %method_name(&path),
            peer = %peer.map_or_else(|| "-".to_string(), |p| p.to_string()),
        );
        let started = Instant::now();
        let fut = async move {
            let mut response = match admit(&shared, inner, req, &path, peer).await {
                Ok(r) => r?,
                Err(status) => status.into_http(),
            };
            let code = grpc_code(&response);
            let elapsed = started.elapsed();
            shared.metrics.observe_call(&path, code, elapsed);
            if code == Code::Ok {
                tracing::debug!(elapsed_ms = elapsed.as_millis() as u64, "call finished");
            } else {
                tracing::info!(
                    code = ?code,
                    elapsed_ms = elapsed.as_millis() as u64,
                    "call failed"
                );
            }
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                response.headers_mut().insert(REQUEST_ID, v);
            }
            Ok::<_, S::Error>(response)
        };
        Box::pin(fut.instrument(span))
    }
}

/// Runs every check, then the handler. `Err(status)` is a refusal by this layer.
async fn admit<S>(
    shared: &Shared,
    mut inner: S,
    req: Request<Body>,
    path: &str,
    peer: Option<IpAddr>,
) -> Result<Result<Response<Body>, S::Error>, Status>
where
    S: tower::Service<Request<Body>, Response = Response<Body>>,
{
    let exempt = path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.");
    if !exempt
        && (path == "/accrete.v1.WorkerService/Register"
            || path == "/accrete.v1.WorkerService/CreateAccount")
        && let (Some(limiter), Some(ip)) = (&shared.register, peer)
        && limiter.check_key(&ip).is_err()
    {
        shared.metrics.refused("register_rate");
        return Err(Status::resource_exhausted(
            "too many registrations from this address; try again in a minute",
        ));
    }

    let (parts, body) = req.into_parts();
    let (cap, what) = shared.caps.for_path(path);
    let (body, len, head) = peek_frame(body).await?;
    if let Some(len) = len
        && len > cap
    {
        shared.metrics.refused("message_size");
        return Err(Status::resource_exhausted(format!(
            "{what} message of {len} bytes is over the server's cap of {cap} bytes"
        )));
    }

    if !exempt
        && let Some(limiter) = &shared.per_key
        && limiter
            .check_key(&credential_key(&parts.headers, path, &head, peer))
            .is_err()
    {
        shared.metrics.refused("rate");
        return Err(Status::resource_exhausted(
            "rate limit exceeded for this credential; slow down and retry",
        ));
    }

    let _permit = match (&shared.permits, exempt) {
        (Some(sem), false) => match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                shared.metrics.refused("overload");
                return Err(Status::unavailable(
                    "server overloaded: too many calls in flight; retry with backoff",
                ));
            }
        },
        _ => None,
    };

    let call = inner.call(Request::from_parts(parts, body));
    match shared.limits.request_timeout {
        Some(t) => match tokio::time::timeout(t, call).await {
            Ok(r) => Ok(r),
            Err(_) => {
                shared.metrics.refused("timeout");
                Err(Status::deadline_exceeded(format!(
                    "the call took longer than the server's limit of {} ms",
                    t.as_millis()
                )))
            }
        },
        None => Ok(call.await),
    }
}

/// Reads the body until the gRPC frame header (1 flag byte, 4 length bytes) is in, and returns
/// a body that replays what was read, the message length, and the bytes read so far (enough,
/// usually, to find a worker call's `auth` field).
async fn peek_frame(mut body: Body) -> Result<(Body, Option<usize>, Bytes), Status> {
    let mut frames = VecDeque::new();
    let mut head = BytesMut::new();
    while head.len() < 5 {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    head.extend_from_slice(data);
                }
                let trailers = frame.is_trailers();
                frames.push_back(frame);
                if trailers {
                    break;
                }
            }
        }
    }
    let len = (head.len() >= 5)
        .then(|| u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize);
    Ok((
        Body::new(Replay {
            frames,
            inner: body,
        }),
        len,
        head.freeze(),
    ))
}

/// A body that first yields frames already read, then the rest.
struct Replay {
    frames: VecDeque<Frame<Bytes>>,
    inner: Body,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(f) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.remaining() as u64))
            .sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + buffered);
        if let Some(u) = inner.upper() {
            hint.set_upper(u + buffered);
        }
        hint
    }
}

/// What the rate limit counts a call against: the `authorization` metadata (API keys), else the
/// worker id of a worker call (read from the message's leading `auth` field), else the peer IP.
/// The worker id is not verified here, so a caller inventing ids escapes its per-worker limit;
/// the handler refuses such calls at once, and the concurrency limit still bounds them.
fn credential_key(
    headers: &http::HeaderMap,
    path: &str,
    head: &Bytes,
    peer: Option<IpAddr>,
) -> String {
    if let Some(auth) = headers.get("authorization") {
        return format!("key:{}", blake3::hash(auth.as_bytes()).to_hex());
    }
    if path.starts_with("/accrete.v1.WorkerService/")
        && path != "/accrete.v1.WorkerService/Register"
        && path != "/accrete.v1.WorkerService/CreateAccount"
        && let Some(id) = leading_worker_id(head)
    {
        return format!("worker:{id}");
    }
    match peer {
        Some(ip) => format!("ip:{ip}"),
        None => "ip:unknown".to_string(),
    }
}

/// The `auth.worker_id` of a worker request whose field 1 is its `WorkerAuth` (prost writes
/// fields in tag order), if the bytes read so far hold all of it.
fn leading_worker_id(head: &Bytes) -> Option<String> {
    let mut msg = head.get(5..)?;
    if msg.first() != Some(&0x0a) {
        return None;
    }
    msg = &msg[1..];
    let len = prost::encoding::decode_varint(&mut msg).ok()? as usize;
    let auth = accrete_proto::v1::WorkerAuth::decode(msg.get(..len)?).ok()?;
    (!auth.worker_id.is_empty()).then(|| auth.worker_id.chars().take(64).collect())
}

/// The caller's request id if it sent a sane one (visible ASCII, at most 128 bytes), else a
/// fresh UUID.
fn request_id(req: &Request<Body>) -> String {
    req.headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

fn peer_ip<B>(req: &Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

/// `Service/Method` of a gRPC path, for spans and metric labels.
pub fn method_name(path: &str) -> &str {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            let start = path.len() - method.len() - service.len() - 1;
            &path[start..]
        }
        None => path,
    }
}

/// The call's gRPC status: from the headers of a trailers-only response (how errors are sent),
/// else OK. A stream that fails after its first message is counted as OK.
fn grpc_code(response: &Response<Body>) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_service_and_method() {
        assert_eq!(
            method_name("/accrete.v1.WorkerService/FetchWork"),
            "WorkerService/FetchWork"
        );
        assert_eq!(method_name("/grpc.health.v1.Health/Check"), "Health/Check");
        assert_eq!(method_name("/nothing"), "nothing");
    }

    #[test]
    fn the_worker_id_is_read_from_the_leading_auth_field() {
        let req = accrete_proto::v1::FetchWorkRequest {
            auth: Some(accrete_proto::v1::WorkerAuth {
                worker_id: "w-1".into(),
                token: "secret".into(),
            }),
            max: 4,
            resume: false,
        };
        let body = req.encode_to_vec();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(&body);
        assert_eq!(
            leading_worker_id(&Bytes::from(framed.clone())).as_deref(),
            Some("w-1")
        );
        assert_eq!(leading_worker_id(&Bytes::from(framed[..8].to_vec())), None);
    }
}
