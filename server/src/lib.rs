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
pub mod module_check;
pub mod scheduler;
pub mod service;
pub mod store;

use std::future::Future;
use std::time::Duration;

use accrete_proto::MAX_MESSAGE_BYTES;
use accrete_proto::v1::admin_service_server::AdminServiceServer;
use accrete_proto::v1::ledger_service_server::LedgerServiceServer;
use accrete_proto::v1::research_service_server::ResearchServiceServer;
use accrete_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;

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
    /// How long API keys and worker credentials read from the database are trusted: a revoked
    /// key or a blocked worker is refused by every server within this.
    pub auth_cache_ttl: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            limits: Limits::default(),
            rescue_interval: Duration::from_secs(1),
            seal_interval: Duration::from_millis(500),
            auth_cache_ttl: auth::DEFAULT_CACHE_TTL,
        }
    }
}

/// Serves the three services on `listener` until `shutdown` resolves, then drains in-flight
/// calls and returns. The rescuer runs alongside.
pub async fn run(
    store: Store,
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let api = service::Api::new(store.clone(), config.limits.clone(), config.auth_cache_ttl);
    let (stop_rescuer, rescuer_stopped) = tokio::sync::watch::channel(false);
    let sealer = tokio::spawn(seal_loop(
        store.clone(),
        config.seal_interval,
        rescuer_stopped.clone(),
    ));
    let rescuer = tokio::spawn(rescue_loop(store, config.rescue_interval, rescuer_stopped));

    let result = tonic::transport::Server::builder()
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
        )
        .await;
    let _ = stop_rescuer.send(true);
    let _ = rescuer.await;
    let _ = sealer.await;
    result.map_err(Into::into)
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
    every(period, stop, || async {
        loop {
            match store.seal(5000).await {
                Ok(0) => break,
                Ok(n) => tracing::debug!(entries = n, "ledger entries sealed"),
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
