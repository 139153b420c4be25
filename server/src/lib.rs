//! The accrete server: scheduler, validator and findings store behind one gRPC listener.
//!
//! Layout:
//! - `service`: the gRPC edge (worker, research and ledger services); `admin`: the admin
//!   service; `auth`: API keys, roles and worker credentials, with their short-lived caches.
//! - `scheduler`: the transitioner's rules (validate, fail, or ask for more replicas), pure.
//! - `store`: every SQL statement; claims, reports and the rescuer as compare-and-set;
//!   `store::ledger` seals the hash chain and answers the ledger queries.
//! - `ledger`: the ledger's format (canonical JSON, entry hashes, verification), no database.
//! - `adoption`: adoption proposals as pure rules (seed variants, the seed-noise test).
//! - `module_check`: what an uploaded module must be.
//! - `cli`: the `accrete-server` command line.
//! - `limits`: the tower layer in front of every call (request ids, rate and size limits, load
//!   shedding, timeouts, call metrics).
//! - `metrics`: Prometheus metrics and their HTTP endpoint.
//! - `devdb`: a throwaway PostgreSQL for the demo and for newcomers.
//!
//! The server keeps no state of its own beyond caches: any number of processes may serve one
//! database, and any of them may be killed at any time.

pub mod admin;
pub mod adoption;
pub mod auth;
pub mod cli;
pub mod devdb;
pub mod error;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod module_check;
pub mod scheduler;
pub mod service;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use accrete_proto::MAX_MESSAGE_BYTES;
use accrete_proto::v1::admin_service_server::AdminServiceServer;
use accrete_proto::v1::ledger_service_server::LedgerServiceServer;
use accrete_proto::v1::research_service_server::ResearchServiceServer;
use accrete_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::{Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

pub use limits::CallLimits;
pub use metrics::Metrics;

pub use error::Error;
pub use store::Store;

/// Caps and defaults the server applies to what callers send.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_module_bytes: usize,
    pub max_input_bytes: usize,
    pub max_units_per_study: usize,
    pub max_fetch_batch: u32,
    pub max_report_batch: u32,
    pub idle_retry_ms: u32,
    pub default_fuel: u64,
    pub max_fuel: u64,
    pub default_memory_bytes: u64,
    pub max_memory_bytes: u64,
    pub default_output_bytes: u64,
    pub max_output_bytes: u64,
    pub default_wall_ms: u64,
    pub max_wall_ms: u64,
    /// Largest message of any call other than PutModule, SubmitStudy and ReportResults (whose
    /// caps follow from the module, input and output caps).
    pub small_message_bytes: usize,
    /// Daily quota of a new volunteer account: replicas per UTC day for all its workers
    /// together (each worker also has its own).
    pub account_daily_quota: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_module_bytes: 32 << 20,
            max_input_bytes: 1 << 20,
            max_units_per_study: 1_000_000,
            max_fetch_batch: 256,
            max_report_batch: 1024,
            idle_retry_ms: 500,
            default_fuel: 10_000_000_000,
            max_fuel: 1_000_000_000_000,
            default_memory_bytes: 64 << 20,
            max_memory_bytes: 1 << 30,
            default_output_bytes: 64 << 10,
            max_output_bytes: 1 << 20,
            default_wall_ms: 60_000,
            max_wall_ms: 3_600_000,
            small_message_bytes: 1 << 20,
            account_daily_quota: 10_000,
        }
    }
}

impl Limits {
    /// Most replicas one fetch may claim: the requested batch, but never more than a response
    /// can carry with every input at its cap (the claim commits before the response is sent, so
    /// a response too large to send would strand what it claimed).
    pub fn fetch_batch_cap(&self) -> u32 {
        let per_replica = self.max_input_bytes + 1024;
        let fits = (MAX_MESSAGE_BYTES - (1 << 20)) / per_replica;
        self.max_fetch_batch.min(fits.max(1) as u32)
    }
}

/// How the server runs, beyond where it listens and which database it uses.
#[derive(Debug, Clone)]
pub struct Config {
    pub limits: Limits,
    /// How often the rescuer looks for replicas past their deadline.
    pub rescue_interval: Duration,
    /// How often the sealer chains new findings and evidence into the ledger (and settles
    /// finished adoption proposals).
    pub seal_interval: Duration,
    /// Serve TLS with this certificate chain and key (PEM); `None` serves plaintext.
    pub tls: Option<TlsIdentity>,
    /// Rate limits, load shedding and timeouts (none by default; the binary's flags set them).
    pub calls: CallLimits,
    /// Where to serve Prometheus metrics over HTTP (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// After the shutdown signal, how long in-flight calls may take to finish before the
    /// server stops anyway.
    pub shutdown_timeout: Duration,
    /// How often the health service checks that PostgreSQL answers.
    pub health_interval: Duration,
    /// How long API keys and worker credentials read from the database are trusted: a revoked
    /// key or a blocked worker is refused by every server within this.
    pub auth_cache_ttl: Duration,
}

/// A server certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsIdentity").finish_non_exhaustive()
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            limits: Limits::default(),
            rescue_interval: Duration::from_secs(1),
            seal_interval: Duration::from_millis(500),
            tls: None,
            calls: CallLimits::default(),
            metrics_listen: None,
            shutdown_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            auth_cache_ttl: auth::DEFAULT_CACHE_TTL,
        }
    }
}

/// Serves the three services, health checking and reflection on `listener` until `shutdown`
/// resolves, then stops accepting, drains in-flight calls for at most
/// `config.shutdown_timeout`, and returns. The rescuer, the sealer, the health checker and the
/// metrics endpoint run alongside.
pub async fn run(
    store: Store,
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = service::Api::new(store.clone(), config.limits.clone(), config.auth_cache_ttl);
    let metrics = Metrics::new();
    let ops = limits::OpsLayer::new(&config.calls, &config.limits, metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = vec![
        tokio::spawn(seal_loop(
            store.clone(),
            config.seal_interval,
            stop_rx.clone(),
        )),
        tokio::spawn(rescue_loop(
            store.clone(),
            config.rescue_interval,
            stop_rx.clone(),
        )),
    ];
    if let Some(addr) = config.metrics_listen {
        let metrics_listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding the metrics listener {addr}: {e}"))?;
        tracing::info!(addr = %metrics_listener.local_addr()?, "metrics at /metrics");
        tasks.push(tokio::spawn(metrics::serve(
            metrics_listener,
            metrics,
            store.clone(),
            stop_rx.clone(),
        )));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    tasks.push(tokio::spawn(health_loop(
        store,
        health.clone(),
        ops.clone(),
        config.health_interval,
        stop_rx.clone(),
    )));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(accrete_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(accrete_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder
            .tls_config(
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
            )
            .map_err(|e| anyhow::anyhow!("TLS certificate or key: {e}"))?;
    }
    // Tell load balancers first, then stop accepting and drain; `fired` starts the drain clock.
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let reporter = health.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutting down: refusing new connections, draining calls");
        set_health(&reporter, ServingStatus::NotServing).await;
        let _ = fired_tx.send(());
    };
    let serve = builder
        .layer(ops)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            WorkerServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ResearchServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(AdminServiceServer::new(api.clone()))
        .add_service(
            LedgerServiceServer::new(api)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY a small response waits on the client's delayed ACK (~40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        );
    let drain_timeout = config.shutdown_timeout;
    let result = tokio::select! {
        r = serve => r.map_err(anyhow::Error::from),
        _ = async {
            if fired_rx.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(
                timeout_ms = drain_timeout.as_millis() as u64,
                "calls still in flight after the shutdown timeout; stopping anyway"
            );
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    result
}

/// The names the health service answers for: the whole server ("") and each service.
fn health_names() -> [&'static str; 4] {
    [
        "",
        <WorkerServiceServer<service::Api> as NamedService>::NAME,
        <ResearchServiceServer<service::Api> as NamedService>::NAME,
        <LedgerServiceServer<service::Api> as NamedService>::NAME,
    ]
}

async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for name in health_names() {
        reporter.set_service_status(name, status).await;
    }
}

/// Reports SERVING while PostgreSQL answers within a second and NOT_SERVING otherwise, checked
/// every `period`; also forgets idle rate-limit state now and then.
async fn health_loop(
    store: Store,
    reporter: tonic_health::server::HealthReporter,
    ops: limits::OpsLayer,
    period: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut stop = stop;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    for n in 1u64.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if n % 30 == 0 {
            ops.forget_idle();
        }
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(1), store.ping()).await,
            Ok(Ok(()))
        );
        if last != Some(up) {
            let status = if up {
                tracing::info!("health: database reachable, SERVING");
                ServingStatus::Serving
            } else {
                tracing::warn!("health: database unreachable, NOT_SERVING");
                ServingStatus::NotServing
            };
            set_health(&reporter, status).await;
            last = Some(up);
        }
    }
}

/// Runs `work` every `period` until `stop` changes. Maintenance loops log their failures and
/// try again at the next tick: volunteers vanish, and so do databases for a while.
async fn every<F, Fut>(period: Duration, mut stop: tokio::sync::watch::Receiver<bool>, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        work().await;
    }
}

/// Chains new findings and evidence into the ledger, then settles adoptions whose re-runs are
/// done, on an interval. Every server runs it; an advisory lock lets one seal at a time, so
/// validations never wait on the chain's head.
async fn seal_loop(store: Store, period: Duration, stop: tokio::sync::watch::Receiver<bool>) {
    const BATCH: i64 = 5000;
    every(period, stop, || async {
        loop {
            match store.seal(BATCH).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(entries = n, "ledger entries sealed");
                    }
                    // Only a full batch means a backlog. Under load findings arrive all the
                    // time, and sealing again whenever the last round found any made rounds of
                    // a few findings each, back to back, each paying its statements, plans and
                    // commit.
                    if (n as i64) < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sealer failed; retrying next tick");
                    break;
                }
            }
        }
        match store.settle_adoptions().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(adoptions = n, "adoption proposals settled"),
            Err(e) => tracing::warn!(error = %e, "settling adoptions failed; retrying next tick"),
        }
    })
    .await
}

/// Returns replicas past their deadline to the queue, on an interval.
async fn rescue_loop(store: Store, period: Duration, stop: tokio::sync::watch::Receiver<bool>) {
    every(period, stop, || async {
        loop {
            match store.rescue_expired(1000).await {
                Ok(0) => break,
                Ok(n) => tracing::info!(replicas = n, "timed out replicas reissued"),
                Err(e) => {
                    tracing::warn!(error = %e, "rescuer failed; retrying next tick");
                    break;
                }
            }
        }
    })
    .await
}
