//! Prometheus metrics: per-method call counts by status code and latency histograms (fed by
//! the `limits` layer), refusals by reason, and gauges read from PostgreSQL when scraped (queue
//! depth per study, replicas in flight, validations, results by verdict, workers by platform),
//! served as text over plain HTTP (`--metrics-listen`).
//!
//! Database gauges are computed at scrape time from indexed queries rather than counted in the
//! handlers: any number of servers share one database, so each reports the same truth, and a
//! restarted server loses nothing.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;

use crate::Store;
use crate::limits::method_name;

/// The server's metrics; cheap to clone (every handle shares one registry).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    latency: HistogramVec,
    refused: IntCounterVec,
    queue_depth: IntGaugeVec,
    in_flight: IntGauge,
    validations: IntGauge,
    results: IntGaugeVec,
    workers: IntGaugeVec,
    active_workers: IntGaugeVec,
    database_up: IntGauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new(
                "accrete_grpc_calls_total",
                "gRPC calls finished, by method and status code",
            ),
            &["method", "code"],
        )
        .unwrap();
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "accrete_grpc_call_seconds",
                "gRPC call latency until the response head, by method",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["method"],
        )
        .unwrap();
        let refused = IntCounterVec::new(
            Opts::new(
                "accrete_refused_calls_total",
                "calls refused before their handler ran (rate, register_rate, message_size, \
                 overload) or stopped by the request timeout (timeout)",
            ),
            &["reason"],
        )
        .unwrap();
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "accrete_queue_depth",
                "replicas waiting to be handed out, per study",
            ),
            &["study"],
        )
        .unwrap();
        let in_flight = IntGauge::new(
            "accrete_replicas_in_flight",
            "replicas handed out and not yet reported",
        )
        .unwrap();
        let validations =
            IntGauge::new("accrete_validations", "work units validated (findings)").unwrap();
        let results = IntGaugeVec::new(
            Opts::new(
                "accrete_results",
                "checked results by verdict (valid, invalid, error, timeout), summed over workers",
            ),
            &["verdict"],
        )
        .unwrap();
        let workers = IntGaugeVec::new(
            Opts::new(
                "accrete_workers",
                "registered workers by platform (arch/os)",
            ),
            &["platform"],
        )
        .unwrap();
        let active_workers = IntGaugeVec::new(
            Opts::new(
                "accrete_workers_active",
                "workers seen in the last 5 minutes, by platform (arch/os)",
            ),
            &["platform"],
        )
        .unwrap();
        let database_up = IntGauge::new(
            "accrete_database_up",
            "1 if the scrape's queries reached PostgreSQL",
        )
        .unwrap();
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(refused.clone()),
            Box::new(queue_depth.clone()),
            Box::new(in_flight.clone()),
            Box::new(validations.clone()),
            Box::new(results.clone()),
            Box::new(workers.clone()),
            Box::new(active_workers.clone()),
            Box::new(database_up.clone()),
        ] {
            registry.register(c).unwrap();
        }
        Metrics {
            registry,
            calls,
            latency,
            refused,
            queue_depth,
            in_flight,
            validations,
            results,
            workers,
            active_workers,
            database_up,
        }
    }

    /// Counts a finished call. Unknown methods share one label, so a caller cannot grow the
    /// label set by inventing paths.
    pub fn observe_call(&self, path: &str, code: Code, elapsed: Duration) {
        let method = if code == Code::Unimplemented {
            "unknown"
        } else {
            method_name(path)
        };
        self.calls
            .with_label_values(&[method, code_name(code)])
            .inc();
        self.latency
            .with_label_values(&[method])
            .observe(elapsed.as_secs_f64());
    }

    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Reads the database gauges and renders everything in the text exposition format.
    pub async fn render(&self, store: &Store) -> String {
        match store.gauges().await {
            Ok(g) => {
                self.database_up.set(1);
                self.queue_depth.reset();
                for (study, depth) in g.queue_depth {
                    self.queue_depth
                        .with_label_values(&[study.to_string().as_str()])
                        .set(depth);
                }
                self.in_flight.set(g.in_flight);
                self.validations.set(g.validations);
                for (verdict, n) in [
                    ("valid", g.valid),
                    ("invalid", g.invalid),
                    ("error", g.errors),
                    ("timeout", g.timeouts),
                ] {
                    self.results.with_label_values(&[verdict]).set(n);
                }
                self.workers.reset();
                self.active_workers.reset();
                for (platform, total, active) in g.platforms {
                    self.workers
                        .with_label_values(&[platform.as_str()])
                        .set(total);
                    self.active_workers
                        .with_label_values(&[platform.as_str()])
                        .set(active);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: database gauges unavailable");
                self.database_up.set(0);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding metrics");
        String::from_utf8(out).unwrap_or_default()
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` (any other path: 404) on `listener` until `stop` changes. A minimal
/// HTTP/1.1 responder: Prometheus sends one small GET per scrape and needs nothing more.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    store: Store,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (mut socket, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let metrics = metrics.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 << 10 {
                    let n = socket.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if target == "/metrics" || target.starts_with("/metrics?") {
                ("200 OK", metrics.render(&store).await)
            } else {
                ("404 Not Found", "see /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
