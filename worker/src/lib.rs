//! accrete-worker: the volunteer's side of accrete. It registers with a scheduler, claims
//! replicas of work units, runs each WebAssembly module in a deterministic sandbox and reports
//! the results. A library, so the `accrete-worker` binary, the CLI demo and integration tests
//! all run the same [`run`].
//!
//! # Layout
//! - [`sandbox`]: the wasmtime engine, module cache and `run` (deterministic, bounded, no I/O
//!   beyond stdin/stdout/stderr). Knows nothing of gRPC.
//! - `cli`: the `accrete-worker` command line.
//! - `session`: the gRPC channel, registration and the retry/backoff policy of every call.
//! - `dispatch`: claims replicas as slots free up, runs them on blocking threads, drains at
//!   shutdown.
//! - `report`: batches results into `ReportResults`, retrying through outages.
//!
//! **Invariants**: the worker never touches PostgreSQL; guest code only runs inside
//! [`sandbox::Sandbox`], on blocking threads, never on async runtime threads; proto types stop
//! at `dispatch` and `report`, the sandbox has its own.

pub mod cli;
pub mod sandbox;

mod dispatch;
mod report;
mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use accrete_proto::v1::HeartbeatRequest;
use accrete_proto::v1::worker_service_client::WorkerServiceClient;
use anyhow::Context as _;
use tokio::sync::{Semaphore, mpsc};

use crate::sandbox::{Cancel, Sandbox, SandboxConfig};
use crate::session::{CallError, Rpc, Session, Stop, stop_pair};

pub use crate::sandbox::RUNTIME;

/// How long the reporter may keep trying to deliver the last results after the drain.
const FINAL_REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Scheduler URL, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// Replicas run at once (default: the number of cores).
    pub slots: usize,
    /// Name shown to operators (default: the host name).
    pub name: Option<String>,
    /// The key of the volunteer account this worker joins (empty: none); see
    /// [`create_account`].
    pub account_key: String,
    /// Most replicas claimed by one `FetchWork` (default 64).
    pub max_batch: usize,
    /// Replicas claimed beyond the free slots, so a slot that frees up has work without a round
    /// trip (default: `slots`). Prefetched replicas that have not started are handed back at
    /// shutdown.
    pub prefetch: usize,
    /// At shutdown, how long running replicas may take to finish before they are stopped and
    /// handed back (default 10 s).
    pub drain_timeout: Duration,
    /// Interval between heartbeats (default 15 s).
    pub heartbeat_interval: Duration,
    /// The CA to trust for an `https://` server (default: the system's roots).
    pub tls: accrete_proto::transport::ClientTls,
    /// Where to keep the credential `Register` returns (default: nowhere). With a file, a
    /// restarted worker keeps its identity, its reputation and the replicas it held.
    pub credential_file: Option<std::path::PathBuf>,
}

impl WorkerConfig {
    /// The defaults, for the scheduler at `server`.
    pub fn new(server: impl Into<String>) -> Self {
        let slots = session::cores();
        Self {
            server: server.into(),
            slots,
            name: None,
            account_key: String::new(),
            max_batch: 64,
            prefetch: slots,
            drain_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(15),
            tls: Default::default(),
            credential_file: None,
        }
    }
}

/// What a worker did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerSummary {
    /// The id the scheduler knew this worker by last (`None` if it never registered).
    pub worker_id: Option<String>,
    /// Replicas that ran to a successful result.
    pub completed: u64,
    /// Replicas that ran to an error result (trap, out of fuel, bad output, ...).
    pub failed: u64,
    /// Replicas given back unfinished at shutdown (`HandBack`), for the server to reissue: those
    /// claimed but not run, and those a report in flight claimed as the worker stopped.
    pub handed_back: u64,
    /// Results that could not be delivered before exiting (server unreachable at shutdown, or
    /// refused); the server reissues those replicas when their deadline passes.
    pub unreported: u64,
}

/// Creates the volunteer account `name` on the scheduler at `server` and returns it with its
/// key, which the scheduler shows only this once. Workers started with the key
/// ([`WorkerConfig::account_key`]) share the account's daily quota, and no two of them get
/// replicas of the same work unit.
pub async fn create_account(
    server: &str,
    tls: &accrete_proto::transport::ClientTls,
    name: &str,
) -> anyhow::Result<accrete_proto::v1::CreateAccountResponse> {
    let channel = accrete_proto::transport::endpoint(server, tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("connecting to {server}"))?;
    let created = WorkerServiceClient::new(channel)
        .create_account(accrete_proto::v1::CreateAccountRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
    Ok(created.into_inner())
}

/// Runs a worker until `shutdown` resolves, then drains (see [`WorkerConfig::drain_timeout`])
/// and returns what it did. Keeps retrying while the scheduler is unreachable; fails only on a
/// bad configuration or if the sandbox cannot be created.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<WorkerSummary> {
    anyhow::ensure!(config.slots > 0, "slots must be at least 1");
    anyhow::ensure!(config.max_batch > 0, "max_batch must be at least 1");
    let sandbox = Arc::new(
        Sandbox::new(&SandboxConfig {
            max_concurrent_runs: u32::try_from(config.slots).unwrap_or(u32::MAX),
            pooling: true,
        })
        .context("creating the sandbox")?,
    );
    let channel = accrete_proto::transport::endpoint(&config.server, &config.tls)?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect_lazy();
    let client = WorkerServiceClient::new(channel)
        .max_decoding_message_size(accrete_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(accrete_proto::MAX_MESSAGE_BYTES);
    let name = config.name.clone().unwrap_or_else(session::hostname);
    let session = Arc::new(Session::new(
        client,
        name,
        config.account_key.clone(),
        &config.server,
        config.credential_file.clone(),
    ));
    tracing::info!(
        server = %config.server,
        slots = config.slots,
        runtime = RUNTIME,
        pooling = sandbox.is_pooling(),
        "worker starting"
    );

    let (shutdown_handle, stop) = stop_pair();
    tokio::pin!(shutdown);
    // Register before anything else: a refusal (a mistyped account key, say) is a mistake to
    // report and exit on, not to retry for ever. An unreachable server is waited for.
    tokio::select! {
        registered = session.credentials(&stop) => {
            if let Err(CallError::Failed(status)) = registered {
                anyhow::bail!(
                    "the scheduler refused to register this worker ({:?}): {}",
                    status.code(),
                    status.message()
                );
            }
        }
        _ = &mut shutdown => {
            tracing::info!("stopped before registering");
            return Ok(WorkerSummary::default());
        }
    }
    let (final_handle, final_stop) = stop_pair();
    let (reports, results) = mpsc::unbounded_channel();
    let (claimed, claimed_by_reports) = mpsc::unbounded_channel();
    let claiming = report::Claiming {
        stop: stop.clone(),
        max_batch: config.max_batch,
        claimed,
    };
    let reporter = tokio::spawn({
        let session = session.clone();
        async move { report::run(&session, results, claiming, final_stop).await }
    });
    let slots = Arc::new(Semaphore::new(config.slots));
    let heartbeat = tokio::spawn(heartbeat(
        session.clone(),
        slots.clone(),
        config.slots,
        config.heartbeat_interval,
        stop.clone(),
    ));
    let ctx = Arc::new(dispatch::Ctx {
        session: session.clone(),
        sandbox,
        slots,
        reports,
        cancel: Cancel::new(),
        modules: Default::default(),
    });
    let mut dispatcher = tokio::spawn(dispatch::run(
        ctx,
        stop,
        Arc::new(Semaphore::new(config.slots + config.prefetch)),
        claimed_by_reports,
        config.max_batch,
        config.drain_timeout,
    ));

    tokio::select! {
        _ = &mut shutdown => {}
        ended = &mut dispatcher => {
            // The dispatcher only returns after a stop; anything else is a bug worth surfacing.
            shutdown_handle.fire();
            final_handle.fire();
            ended.context("the dispatcher failed")?;
            anyhow::bail!("the dispatcher stopped unexpectedly");
        }
    }
    tracing::info!("shutting down: claiming no more work");
    shutdown_handle.fire();
    let tally = dispatcher.await.context("the dispatcher failed")?;
    let _ = heartbeat.await;

    // Every result sender is gone now, so the reporter ends once it has delivered the rest.
    let mut reporter = reporter;
    let reports = tokio::select! {
        done = &mut reporter => done,
        _ = tokio::time::sleep(FINAL_REPORT_TIMEOUT) => {
            final_handle.fire();
            reporter.await
        }
    }
    .context("the reporter failed")?;

    let summary = WorkerSummary {
        worker_id: session.worker_id(),
        completed: tally.completed,
        failed: tally.failed,
        handed_back: tally.handed_back + reports.handed_back,
        unreported: reports.unreported,
    };
    tracing::info!(?summary, "worker stopped");
    Ok(summary)
}

/// Tells the scheduler every `interval` that this worker is alive and how busy it is.
async fn heartbeat(
    session: Arc<Session>,
    slots: Arc<Semaphore>,
    total: usize,
    interval: Duration,
    stop: Stop,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.stopped() => return,
            _ = ticks.tick() => {}
        }
        let busy_slots = total.saturating_sub(slots.available_permits()) as u32;
        let beat = session
            .call(Rpc::Heartbeat, &stop, |mut client, auth| async move {
                client
                    .heartbeat(HeartbeatRequest {
                        auth: Some(auth),
                        busy_slots,
                    })
                    .await
            })
            .await;
        if let Err(CallError::Failed(status)) = beat {
            tracing::debug!(code = ?status.code(), error = %session::describe(&status), "heartbeat failed");
        }
    }
}
