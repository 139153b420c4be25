//! The throughput harness behind `accrete-load`: real `accrete-server` processes on a fresh
//! database, N simulated workers over real gRPC from this process, and the figures of the issue
//! on throughput (replicas, validations and findings per second, fetch and report latency,
//! server CPU and peak RSS, database bytes per work unit), beside the raw ceiling: the minimal
//! SQL a replica needs, driven directly with sqlx on the same database server in the same run.
//!
//! Layout: [`Args`] (the command line), [`run`] (dispatches on `--mode`), [`ServerProcesses`]
//! (start K servers on one database), [`Fleet`] (the simulated workers; also used by the
//! scale-out test), [`submit`], [`ceiling`], the `/proc` readers, and the two reports.
//!
//! Simulated workers never run WebAssembly: every input is `{"i": n}` and they answer with the
//! output `accrete-sim`'s honest workers compute, so every replica agrees and validates, and
//! the server (its SQL, hashing, validation) is what is measured.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accrete_proto::MAX_MESSAGE_BYTES;
use accrete_proto::v1::{
    self as pb, research_service_client::ResearchServiceClient,
    worker_service_client::WorkerServiceClient,
};
use accrete_server::Store;
use accrete_server::devdb::{DevDb, LOCAL_SERVER};
use accrete_server::scheduler::QUOTA_MAX;
use anyhow::{Context, bail};
use prost::Message;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::{input_n, module, output, truth};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// N workers fetch and report for --duration seconds after --warmup; then the raw ceiling.
    Throughput,
    /// Time one study of --wus units (default 1,000,000); compare server RSS and fetch latency
    /// with that queue to a small one.
    Submit,
}

/// Measures accrete's throughput against real server processes and PostgreSQL.
///
/// By default it makes a throwaway database on the local PostgreSQL, starts `accrete-server`
/// (found next to this executable, or --server-bin) --processes times on it, spreads --workers
/// simulated workers over them, submits --wus work units at min_quorum 2 as one study and
/// measures for --duration seconds after --warmup. Then it runs the raw ceiling (batched
/// `FOR UPDATE SKIP LOCKED` claims and batched completions of a job table, durable commits, the
/// servers' total connection count) on the same database server, and drops the database.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "accrete-load", version, about, long_about)]
pub struct Args {
    #[arg(long, value_enum, default_value = "throughput")]
    pub mode: Mode,
    /// Simulated workers, each with its own connection and volunteer account.
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Work units to submit (default: 200,000 in throughput mode, 1,000,000 in submit mode).
    #[arg(long)]
    pub wus: Option<usize>,
    /// Replicas each worker asks for per FetchWork (and reports per ReportResults). The server
    /// caps a fetch at 62 (what a response can carry with every input at its 1 MiB cap).
    #[arg(long, default_value_t = 16)]
    pub batch: u32,
    /// Replicas per second the whole fleet offers: each worker then "computes" for
    /// `batch * workers / rate` seconds a round (fetch, compute, report), with the fleet's rounds
    /// spread evenly, as a fleet of real volunteers would. 0: every worker fetches again as soon
    /// as its report is answered, which measures the most the servers can take, with latency
    /// that is queueing by construction (1,000 callers always waiting).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Report and fetch in two calls (ReportResults, then FetchWork) instead of one
    /// (ReportResults with `fetch`, a claim in the report's transaction), as a worker built
    /// before that option would.
    #[arg(long)]
    pub separate_fetch: bool,
    /// Seconds measured.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds of load before measuring (connections, caches and plans warm up).
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    /// Server processes started on the one database; worker i talks to process i mod K.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Target running servers instead (repeat for several; workers are spread over them).
    /// Nothing is started, and server CPU, RSS and database sizes are not reported.
    #[arg(long)]
    pub server: Vec<String>,
    /// The `accrete-server` binary (default: next to this executable).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// PostgreSQL server to make the throwaway database on (it is dropped at the end).
    #[arg(long, env = "ACCRETE_LOAD_DATABASE_URL", default_value = LOCAL_SERVER)]
    pub database_url: String,
    /// Database connections of each server process (its --db-connections; 8 is its default).
    #[arg(long, default_value_t = 8)]
    pub db_connections: u32,
    /// Seconds the raw ceiling runs (0: skip it).
    #[arg(long, default_value_t = 15.0)]
    pub ceiling_secs: f64,
    /// delay_bound_secs of the study: long, so no replica times out during a run.
    #[arg(long, default_value_t = 600)]
    pub delay_bound: u32,
    /// Submit mode: workers that probe fetch latency, before and after the big submission.
    #[arg(long, default_value_t = 50)]
    pub probe_workers: usize,
    /// Submit mode: replicas/s the probe's workers offer (paced, as with --rate), the same for
    /// both queues so that their latencies compare.
    #[arg(long, default_value_t = 1000.0)]
    pub probe_rate: f64,
    /// Submit mode: seconds each probe measures.
    #[arg(long, default_value_t = 10.0)]
    pub probe_secs: f64,
    /// Submit mode: work units queued for the small-queue probe.
    #[arg(long, default_value_t = 10_000)]
    pub small_queue: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// A researcher API key, for --server (with its own servers the harness mints one).
    #[arg(long, env = "ACCRETE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Args {
    fn key(&self) -> anyhow::Result<&str> {
        self.api_key
            .as_deref()
            .context("--api-key (or ACCRETE_API_KEY) is needed to submit to a running server")
    }

    fn wus(&self) -> usize {
        self.wus.unwrap_or(match self.mode {
            Mode::Throughput => 200_000,
            Mode::Submit => 1_000_000,
        })
    }
}

/// What a run printed.
pub enum Report {
    Throughput(Box<ThroughputReport>),
    Submit(Box<SubmitReport>),
}

impl Report {
    pub fn text(&self) -> String {
        match self {
            Report::Throughput(r) => r.text(),
            Report::Submit(r) => r.text(),
        }
    }
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Report::Throughput(r) => r.to_json(),
            Report::Submit(r) => r.to_json(),
        }
    }
}

/// Runs what `--mode` says.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.processes >= 1, "--processes must be at least 1");
    anyhow::ensure!(args.workers >= 1, "--workers must be at least 1");
    match args.mode {
        Mode::Throughput if !args.server.is_empty() => {
            let mut r = measure(args, &args.server, None, &[]).await?;
            if args.ceiling_secs > 0.0 {
                let db = throwaway(&args.database_url, "ceiling").await?;
                let c = ceiling(
                    &db.url,
                    args.db_connections as usize * args.server.len(),
                    args.batch as i64,
                    args.ceiling_secs,
                )
                .await;
                db.stop().await?;
                r.ceiling = Some(c?);
            }
            Ok(Report::Throughput(Box::new(r)))
        }
        Mode::Throughput => {
            let db = throwaway(&args.database_url, "load").await?;
            let r = throughput_local(args, &db.url).await;
            db.stop().await?;
            Ok(Report::Throughput(Box::new(r?)))
        }
        Mode::Submit => {
            anyhow::ensure!(
                args.server.is_empty(),
                "submit mode starts its own servers (it reads their RSS); drop --server"
            );
            let db = throwaway(&args.database_url, "submit").await?;
            let r = submit_local(args, &db.url).await;
            db.stop().await?;
            Ok(Report::Submit(Box::new(r?)))
        }
    }
}

async fn throwaway(admin: &str, what: &str) -> anyhow::Result<DevDb> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    DevDb::on_server(
        admin,
        &format!("accrete_{what}_{}_{nanos}", std::process::id()),
    )
    .await
    .context("creating the throwaway database (is PostgreSQL running?)")
}

/// The `accrete-server` binary: `--server-bin`, else the one beside this executable (cargo
/// puts both in `target/<profile>/`).
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .context("no directory for this executable")?
        .join("accrete-server");
    anyhow::ensure!(
        beside.exists(),
        "no accrete-server beside {} (build it: cargo build --release -p accrete-server \
         -p accrete-sim), or pass --server-bin",
        exe.display()
    );
    Ok(beside)
}

async fn throughput_local(args: &Args, url: &str) -> anyhow::Result<ThroughputReport> {
    // Migrate once here, so K processes do not all start by racing to migrate.
    let store = Store::connect(url, 4).await?;
    let args = &Args {
        api_key: Some(mint_key(&store).await?),
        ..args.clone()
    };
    let bin = server_bin(args.server_bin.as_deref())?;
    let mut servers =
        ServerProcesses::start(&bin, url, args.processes, args.db_connections).await?;
    let mut r = measure(args, &servers.urls, Some(store.pool()), &servers.pids()).await?;
    r.db = Some(db_sizes(store.pool()).await?);
    servers.stop();
    store.close().await;
    if args.ceiling_secs > 0.0 {
        r.ceiling = Some(
            ceiling(
                url,
                args.db_connections as usize * args.processes,
                args.batch as i64,
                args.ceiling_secs,
            )
            .await?,
        );
    }
    Ok(r)
}

// ---------------------------------------------------------------------------------------------
// Server processes

/// K `accrete-server` processes on one database, each on its own loopback port. Killed on stop
/// or drop.
pub struct ServerProcesses {
    children: Vec<Child>,
    pub urls: Vec<String>,
}

impl ServerProcesses {
    /// Starts `k` processes of `bin` on `db_url` and waits until each serves. The schema must
    /// already be migrated (a `Store::connect` does it).
    pub async fn start(
        bin: &Path,
        db_url: &str,
        k: usize,
        db_connections: u32,
    ) -> anyhow::Result<ServerProcesses> {
        let mut procs = ServerProcesses {
            children: Vec::new(),
            urls: Vec::new(),
        };
        for _ in 0..k {
            // A port the OS just handed out; the server binds it a moment later.
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let addr = format!("127.0.0.1:{port}");
            let child = Command::new(bin)
                .args(["--database-url", db_url, "--listen", &addr, "--plaintext"])
                // Every simulated worker calls from 127.0.0.1 (and registers before it has a
                // credential, so Register is keyed by address); a real fleet has an address per
                // volunteer, so the per-address registration and call rates are off here. The
                // concurrency limit, timeouts and size caps stay as deployed.
                .args(["--register-per-min", "0", "--rate-per-sec", "0"])
                .args(["--db-connections", &db_connections.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(if std::env::var_os("LOAD_SERVER_LOG").is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            procs.children.push(child);
            procs.urls.push(format!("http://{addr}"));
        }
        for i in 0..k {
            let start = Instant::now();
            loop {
                if let Some(status) = procs.children[i].try_wait()? {
                    bail!(
                        "server {} exited at start-up ({status}); LOAD_SERVER_LOG=1 shows why",
                        procs.urls[i]
                    );
                }
                if Channel::from_shared(procs.urls[i].clone())?
                    .connect()
                    .await
                    .is_ok()
                {
                    break;
                }
                anyhow::ensure!(
                    start.elapsed() < Duration::from_secs(60),
                    "server {} did not come up",
                    procs.urls[i]
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(procs)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }

    /// Kills the processes (SIGKILL: the database holds everything that matters).
    pub fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for ServerProcesses {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated workers

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    measuring: AtomicBool,
    /// Results the server accepted, all run long.
    completed: AtomicU64,
    quota_refusals: AtomicU64,
    empty_fetches: AtomicU64,
    rejected: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn error(&self, what: String) {
        *self.errors.lock().unwrap().entry(what).or_default() += 1;
    }
}

/// One replica as a fetch handed it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandedOut {
    pub replica_id: u64,
    pub wu_id: u64,
    pub worker: usize,
}

#[derive(Default)]
struct WorkerLog {
    fetch_us: Vec<u32>,
    report_us: Vec<u32>,
    handed_out: Vec<HandedOut>,
}

/// What the fleet saw, once stopped. Latencies are client-side, per RPC, in microseconds, for
/// the RPCs started while measuring.
#[derive(Debug, Default)]
pub struct FleetLog {
    pub fetch_us: Vec<u32>,
    pub report_us: Vec<u32>,
    /// Every replica handed out, when the fleet was started with `track`.
    pub handed_out: Vec<HandedOut>,
    pub completed: u64,
    pub quota_refusals: u64,
    pub empty_fetches: u64,
    pub rejected: u64,
    /// Failed RPCs by method and status code.
    pub errors: BTreeMap<String, u64>,
}

/// N simulated workers looping over real gRPC: report a batch and take the next (FetchWork only
/// when they hold none).
pub struct Fleet {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<anyhow::Result<WorkerLog>>>,
}

impl Fleet {
    /// Registers `n` workers (worker i on `urls[i % urls.len()]`, each on its own connection
    /// and volunteer account, platforms alternating x86_64/aarch64), then starts them all.
    /// Each reports its results and takes its next batch in one call (ReportResults with
    /// `fetch`), or with `separate` in two (ReportResults, then FetchWork).
    /// With `track`, every replica handed out is logged.
    /// With `round`, each worker starts a fetch-report round at most once per `round`, the
    /// workers' rounds staggered evenly across it (simulated compute time); without, as fast as
    /// the server answers.
    pub async fn start(
        urls: &[String],
        n: usize,
        batch: u32,
        separate: bool,
        track: bool,
        round: Option<Duration>,
    ) -> anyhow::Result<Fleet> {
        anyhow::ensure!(!urls.is_empty(), "no server to talk to");
        // Account names are unique per database: a run that starts several fleets (the
        // probes of `--mode submit`) numbers them.
        static FLEETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let fleet = FLEETS.fetch_add(1, Ordering::Relaxed);
        let mut registering = Vec::with_capacity(n);
        for i in 0..n {
            let url = urls[i % urls.len()].clone();
            registering.push(tokio::spawn(async move {
                let channel = Channel::from_shared(url)?.connect().await?;
                let client = WorkerServiceClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                let account_key = retry_shed(i, || {
                    let mut client = client.clone();
                    let name = format!("load-account-{fleet}-{i}");
                    async move {
                        client
                            .create_account(pb::CreateAccountRequest { name })
                            .await
                    }
                })
                .await?
                .account_key;
                let request = pb::RegisterRequest {
                    platform: Some(pb::Platform {
                        arch: ["x86_64", "aarch64"][i % 2].into(),
                        os: "linux".into(),
                        cores: 1,
                        memory_bytes: 1 << 30,
                        runtime: "accrete-load".into(),
                    }),
                    name: format!("load-{i}"),
                    account_key,
                };
                let reg = retry_shed(i, || {
                    let (mut client, request) = (client.clone(), request.clone());
                    async move { client.register(request).await }
                })
                .await?;
                anyhow::Ok((
                    client,
                    pb::WorkerAuth {
                        worker_id: reg.worker_id,
                        token: reg.token,
                    },
                ))
            }));
        }
        let mut ready = Vec::with_capacity(n);
        for r in registering {
            ready.push(r.await?.context("registering a simulated worker")?);
        }
        let shared = Arc::new(Shared::default());
        let tasks = ready
            .into_iter()
            .enumerate()
            .map(|(i, (client, auth))| {
                let pacing = round.map(|r| Pacing {
                    round: r,
                    offset: r.mul_f64(i as f64 / n as f64),
                });
                let how = How {
                    batch,
                    separate,
                    track,
                    pacing,
                };
                tokio::spawn(work(client, auth, i, how, shared.clone()))
            })
            .collect();
        Ok(Fleet { shared, tasks })
    }

    /// Latencies are recorded only while measuring.
    pub fn measure(&self, on: bool) {
        self.shared.measuring.store(on, Ordering::Relaxed);
    }

    /// Results accepted so far.
    pub fn completed(&self) -> u64 {
        self.shared.completed.load(Ordering::Relaxed)
    }

    /// Stops every worker after its current fetch-report round (nothing fetched is left
    /// unreported) and gathers the logs.
    pub async fn stop(self) -> anyhow::Result<FleetLog> {
        self.shared.stop.store(true, Ordering::Relaxed);
        let mut log = FleetLog::default();
        for t in self.tasks {
            let w = t.await??;
            log.fetch_us.extend(w.fetch_us);
            log.report_us.extend(w.report_us);
            log.handed_out.extend(w.handed_out);
        }
        let s = &self.shared;
        log.completed = s.completed.load(Ordering::Relaxed);
        log.quota_refusals = s.quota_refusals.load(Ordering::Relaxed);
        log.empty_fetches = s.empty_fetches.load(Ordering::Relaxed);
        log.rejected = s.rejected.load(Ordering::Relaxed);
        log.errors = std::mem::take(&mut *s.errors.lock().unwrap());
        Ok(log)
    }
}

/// Calls `call` until the server takes it: a whole fleet registering at once is shed past the
/// server's concurrency limit (`UNAVAILABLE`) or has a fresh connection dropped (`UNKNOWN`, a
/// transport error; the channel reconnects), and like real workers these try again after a
/// pause that grows.
async fn retry_shed<T, F, Fut>(i: usize, mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut attempt = 0u64;
    loop {
        match call().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
                    && attempt < 20 =>
            {
                attempt += 1;
                let ms = 50 * attempt + (i as u64 * 7919) % 100;
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// The correct result of an assignment, as an honest worker would report it.
fn result_for(a: &pb::Assignment) -> pb::ReplicaResult {
    let output = output(truth(input_n(&a.input)));
    pb::ReplicaResult {
        replica_id: a.replica_id,
        outcome: Some(pb::replica_result::Outcome::Success(pb::Success {
            output_hash: blake3::hash(&output).as_bytes().to_vec(),
            output,
            fuel_used: 1,
        })),
        wall_micros: 1,
    }
}

/// How one simulated worker runs (see [`Fleet::start`]).
#[derive(Clone, Copy)]
struct How {
    batch: u32,
    separate: bool,
    track: bool,
    pacing: Option<Pacing>,
}

/// A paced worker's round length and its place in the fleet's stagger.
#[derive(Clone, Copy)]
struct Pacing {
    round: Duration,
    offset: Duration,
}

async fn work(
    mut client: WorkerServiceClient<Channel>,
    auth: pb::WorkerAuth,
    index: usize,
    how: How,
    shared: Arc<Shared>,
) -> anyhow::Result<WorkerLog> {
    let How {
        batch,
        separate,
        track,
        pacing,
    } = how;
    let mut log = WorkerLog::default();
    let mut next_round = tokio::time::Instant::now() + pacing.map_or(Duration::ZERO, |p| p.offset);
    // What the last report's claim handed out: reported next round, without a FetchWork.
    let mut held: Vec<pb::Assignment> = Vec::new();
    loop {
        let stopping = shared.stop.load(Ordering::Relaxed);
        if stopping && held.is_empty() {
            break;
        }
        if !stopping && let Some(p) = pacing {
            tokio::time::sleep_until(next_round).await;
            // A round that overran starts the next at once, without trying to catch up.
            next_round = (next_round + p.round).max(tokio::time::Instant::now());
        }
        if held.is_empty() {
            let measuring = shared.measuring.load(Ordering::Relaxed);
            let started = Instant::now();
            let fetched = client
                .fetch_work(pb::FetchWorkRequest {
                    auth: Some(auth.clone()),
                    max: batch,
                    resume: false,
                })
                .await;
            let elapsed = started.elapsed();
            let response = match fetched {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    // The daily quota: wait, as the real worker does (it waits a minute).
                    shared.quota_refusals.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(s) => {
                    shared.error(format!("FetchWork {:?}", s.code()));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if measuring {
                log.fetch_us.push(micros(elapsed));
            }
            if response.assignments.is_empty() {
                shared.empty_fetches.fetch_add(1, Ordering::Relaxed);
                let wait = u64::from(response.retry_after_ms).clamp(20, 1000);
                tokio::time::sleep(Duration::from_millis(wait)).await;
                continue;
            }
            held = response.assignments;
            if track {
                log.handed_out
                    .extend(held.iter().map(|a| handed_out(a, index)));
            }
        }
        // Report, and (unless stopping) take the next batch in the same call, as a busy
        // worker does.
        let fetch = if separate || shared.stop.load(Ordering::Relaxed) {
            0
        } else {
            batch
        };
        let request = pb::ReportResultsRequest {
            auth: Some(auth.clone()),
            results: held.iter().map(result_for).collect(),
            fetch,
        };
        // A failed report is sent again: the server acknowledges a repeat as a duplicate.
        let mut next = Vec::new();
        for attempt in 1.. {
            let measuring = shared.measuring.load(Ordering::Relaxed);
            let started = Instant::now();
            match client.report_results(request.clone()).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if measuring {
                        log.report_us.push(micros(started.elapsed()));
                    }
                    for ack in &r.acks {
                        match ack.status() {
                            pb::ReportStatus::Accepted => {
                                shared.completed.fetch_add(1, Ordering::Relaxed);
                            }
                            pb::ReportStatus::Duplicate => {}
                            _ => {
                                shared.rejected.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    next = r.assignments;
                    break;
                }
                Err(s) => {
                    shared.error(format!("ReportResults {:?}", s.code()));
                    if attempt == 5 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if track {
            log.handed_out
                .extend(next.iter().map(|a| handed_out(a, index)));
        }
        held = next;
    }
    Ok(log)
}

fn handed_out(a: &pb::Assignment, worker: usize) -> HandedOut {
    HandedOut {
        replica_id: a.replica_id,
        wu_id: a.work_unit_id,
        worker,
    }
}

// ---------------------------------------------------------------------------------------------
// Submitting

/// One submission: the studies it took and how long.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub study_ids: Vec<u64>,
    pub work_units: usize,
    pub secs: f64,
    /// Encoded size of the SubmitStudy request(s).
    pub request_bytes: usize,
}

/// A research client on `url` whose calls carry `api_key`.
pub async fn research_client(url: &str, api_key: &str) -> anyhow::Result<crate::Research> {
    let channel = Channel::from_shared(url.to_string())?.connect().await?;
    let bearer = crate::Bearer(
        format!("Bearer {api_key}")
            .parse()
            .context("the API key has characters a gRPC header cannot carry")?,
    );
    Ok(ResearchServiceClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// A researcher key minted straight in the harness's throwaway database.
pub async fn mint_key(store: &Store) -> anyhow::Result<String> {
    let (_, key) =
        accrete_server::admin::create_key(store, accrete_server::auth::Role::Researcher, "load")
            .await?;
    Ok(key)
}

/// Uploads the tiny module and submits `n` work units `{"i": first..first+n}` at `min_quorum`.
/// One SubmitStudy call when the request fits in a gRPC message (1,000,000 such inputs take
/// about 15 MB of the 64 MiB cap); otherwise consecutive studies of the largest size that fits.
/// The time includes the module upload and building the request.
pub async fn submit(
    url: &str,
    api_key: &str,
    name: &str,
    first: u64,
    n: usize,
    min_quorum: u32,
    delay_bound_secs: u32,
) -> anyhow::Result<Submitted> {
    let started = Instant::now();
    let mut research = research_client(url, api_key).await?;
    let module_hash = research
        .put_module(pb::PutModuleRequest {
            wasm: module(),
            name: "load".into(),
        })
        .await?
        .into_inner()
        .hash;
    let request = |from: u64, count: usize| pb::SubmitStudyRequest {
        name: name.into(),
        description: "accrete-load".into(),
        module_hash: module_hash.clone(),
        policy: Some(pb::ReplicationPolicy {
            min_quorum,
            delay_bound_secs,
            ..Default::default()
        }),
        work_units: (from..from + count as u64)
            .map(|i| pb::WorkUnitSpec {
                input: format!("{{\"i\":{i}}}").into_bytes(),
            })
            .collect(),
        ..Default::default()
    };
    let whole = request(first, n);
    let size = whole.encoded_len();
    // Leave room for framing; the server decodes up to MAX_MESSAGE_BYTES.
    let fit = MAX_MESSAGE_BYTES - (1 << 20);
    let parts = size.div_ceil(fit).max(1);
    let mut study_ids = Vec::new();
    if parts == 1 {
        study_ids.push(research.submit_study(whole).await?.into_inner().study_id);
    } else {
        drop(whole);
        let per = n.div_ceil(parts);
        let mut from = first;
        let mut left = n;
        while left > 0 {
            let count = per.min(left);
            let r = research
                .submit_study(request(from, count))
                .await?
                .into_inner();
            study_ids.push(r.study_id);
            from += count as u64;
            left -= count;
        }
    }
    Ok(Submitted {
        study_ids,
        work_units: n,
        secs: started.elapsed().as_secs_f64(),
        request_bytes: size,
    })
}

// ---------------------------------------------------------------------------------------------
// /proc and the database

/// Linux reports CPU times in /proc in USER_HZ ticks, which is 100 on every architecture
/// Linux runs on today (`getconf CLK_TCK`).
const USER_HZ: f64 = 100.0;

/// utime + stime of a process, in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// A `kB` line of /proc/PID/status (VmRSS, VmHWM), in bytes.
pub fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_secs(p)).sum()
}

/// CPU seconds of each PostgreSQL backend serving this database now (the servers' pools and
/// the harness's).
async fn backend_cpu(pool: &PgPool) -> anyhow::Result<HashMap<u32, f64>> {
    let pids: Vec<i32> =
        sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            .fetch_all(pool)
            .await?;
    Ok(pids
        .into_iter()
        .filter_map(|p| Some((p as u32, cpu_secs(p as u32)?)))
        .collect())
}

/// CPU the backends used between two readings. A backend that started in between counts whole
/// (it began at most a window ago); one that ended in between is lost, so this is a floor.
fn backend_delta(a: &HashMap<u32, f64>, b: &HashMap<u32, f64>) -> f64 {
    b.iter()
        .map(|(pid, cpu)| (cpu - a.get(pid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// Database sizes (tables with their indexes and TOAST), in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct DbSizes {
    pub work_units: i64,
    pub replicas: i64,
    pub findings: i64,
    pub finding_metrics: i64,
    pub ledger: i64,
    pub wus: i64,
    pub validated: i64,
}

async fn db_sizes(pool: &PgPool) -> anyhow::Result<DbSizes> {
    let row: (i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT pg_total_relation_size('work_units'), pg_total_relation_size('replicas'),
                pg_total_relation_size('findings'), pg_total_relation_size('finding_metrics'),
                pg_total_relation_size('ledger'),
                (SELECT count(*) FROM work_units),
                (SELECT count(*) FROM work_units WHERE state = 'validated')",
    )
    .fetch_one(pool)
    .await?;
    Ok(DbSizes {
        work_units: row.0,
        replicas: row.1,
        findings: row.2,
        finding_metrics: row.3,
        ledger: row.4,
        wus: row.5,
        validated: row.6,
    })
}

/// (validated work units, findings) now.
async fn progress(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM work_units WHERE state = 'validated'),
                (SELECT count(*) FROM findings)",
    )
    .fetch_one(pool)
    .await?)
}

/// Validated work units of these studies, through the API (when the harness has no database).
async fn validated_via_api(url: &str, api_key: &str, studies: &[u64]) -> anyhow::Result<i64> {
    let mut research = research_client(url, api_key).await?;
    let mut n = 0;
    for &s in studies {
        let r = research
            .get_status(pb::GetStatusRequest { study_id: s })
            .await?
            .into_inner();
        n += r.studies.iter().map(|s| s.validated as i64).sum::<i64>();
    }
    Ok(n)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

/// p50 and p99 in milliseconds.
fn p50_p99(mut us: Vec<u32>) -> (f64, f64, usize) {
    us.sort_unstable();
    (percentile(&us, 0.5), percentile(&us, 0.99), us.len())
}

// ---------------------------------------------------------------------------------------------
// Throughput

/// Figures of a throughput run.
#[derive(Debug, Clone, Default)]
pub struct ThroughputReport {
    pub workers: usize,
    pub processes: usize,
    pub batch: u32,
    /// Workers fetched with FetchWork after each report, rather than in it.
    pub separate_fetch: bool,
    pub db_connections: u32,
    /// Replicas/s the fleet offered (`--rate`); 0: as fast as answered.
    pub offered_rate: f64,
    pub submitted: Option<Submitted>,
    pub secs: f64,
    pub replicas_per_sec: f64,
    pub validated_per_sec: f64,
    /// None when the harness has no database (findings = validations then).
    pub findings_per_sec: Option<f64>,
    pub fetch_ms: (f64, f64, usize),
    pub report_ms: (f64, f64, usize),
    /// Cores used over the measured window: servers, their PostgreSQL backends, this harness.
    pub server_cores: Option<f64>,
    pub postgres_cores: Option<f64>,
    pub harness_cores: f64,
    /// WAL the database server wrote per replica completed, over the measured window. Unlike
    /// CPU it does not swing with the machine's speed, so it compares two builds' write work
    /// on a noisy machine. Cluster-wide, and it includes the full-page images written after
    /// each checkpoint.
    pub wal_bytes_per_replica: Option<f64>,
    /// Largest VmHWM among the server processes, and each one's.
    pub server_peak_rss: Vec<u64>,
    pub quota_refusals: u64,
    pub empty_fetches: u64,
    pub rejected: u64,
    pub errors: BTreeMap<String, u64>,
    /// Work units not yet validated at the end (0: the queue ran dry, the rate is a floor).
    pub pending_at_end: Option<i64>,
    pub db: Option<DbSizes>,
    pub ceiling: Option<Ceiling>,
    /// What this database's busy backends were doing, sampled while measuring.
    pub waits: Option<Waits>,
}

/// Counters at one instant of a throughput run; CPU in seconds.
struct Snapshot {
    at: Instant,
    completed: u64,
    validated: i64,
    findings: Option<i64>,
    server_cpu: f64,
    postgres_cpu: HashMap<u32, f64>,
    harness_cpu: f64,
    /// The WAL's insert position, in bytes.
    wal: Option<i64>,
}

async fn measure(
    args: &Args,
    urls: &[String],
    pool: Option<&PgPool>,
    pids: &[u32],
) -> anyhow::Result<ThroughputReport> {
    let wus = args.wus();
    let submitted = submit(
        &urls[0],
        args.key()?,
        "accrete-load",
        0,
        wus,
        2,
        args.delay_bound,
    )
    .await?;
    eprintln!(
        "submitted {wus} work units in {:.1} s; registering {} workers",
        submitted.secs, args.workers
    );
    let round = (args.rate > 0.0)
        .then(|| Duration::from_secs_f64(f64::from(args.batch) * args.workers as f64 / args.rate));
    let fleet = Fleet::start(
        urls,
        args.workers,
        args.batch,
        args.separate_fetch,
        false,
        round,
    )
    .await?;
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    let snapshot = async || -> anyhow::Result<Snapshot> {
        let (validated, findings) = match pool {
            Some(p) => {
                let (v, f) = progress(p).await?;
                (v, Some(f))
            }
            None => (
                validated_via_api(&urls[0], args.key()?, &submitted.study_ids).await?,
                None,
            ),
        };
        Ok(Snapshot {
            at: Instant::now(),
            completed: fleet.completed(),
            validated,
            findings,
            server_cpu: cpu_of(pids),
            postgres_cpu: match pool {
                Some(p) => backend_cpu(p).await?,
                None => HashMap::new(),
            },
            harness_cpu: cpu_secs(std::process::id()).unwrap_or(0.0),
            wal: match pool {
                Some(p) => Some(
                    sqlx::query_scalar(
                        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint",
                    )
                    .fetch_one(p)
                    .await?,
                ),
                None => None,
            },
        })
    };
    let a = snapshot().await?;
    fleet.measure(true);
    eprintln!("measuring for {} s", args.duration);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = pool.map(|p| tokio::spawn(sample_waits(p.clone(), sampling.clone())));
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    fleet.measure(false);
    sampling.store(false, Ordering::Relaxed);
    let waits = match sampler {
        Some(t) => Some(t.await??),
        None => None,
    };
    let b = snapshot().await?;
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let server_peak_rss = pids
        .iter()
        .map(|&p| status_bytes(p, "VmHWM").unwrap_or(0))
        .collect();
    let log = fleet.stop().await?;
    let pending_at_end = match pool {
        Some(p) => Some(
            sqlx::query_scalar("SELECT count(*) FROM work_units WHERE state = 'pending'")
                .fetch_one(p)
                .await?,
        ),
        None => None,
    };
    Ok(ThroughputReport {
        workers: args.workers,
        offered_rate: args.rate,
        processes: urls.len(),
        batch: args.batch,
        separate_fetch: args.separate_fetch,
        db_connections: args.db_connections,
        submitted: Some(submitted),
        secs,
        replicas_per_sec: (b.completed - a.completed) as f64 / secs,
        validated_per_sec: (b.validated - a.validated) as f64 / secs,
        findings_per_sec: b
            .findings
            .zip(a.findings)
            .map(|(b, a)| (b - a) as f64 / secs),
        fetch_ms: p50_p99(log.fetch_us),
        report_ms: p50_p99(log.report_us),
        server_cores: (!pids.is_empty()).then(|| (b.server_cpu - a.server_cpu) / secs),
        postgres_cores: pool.map(|_| backend_delta(&a.postgres_cpu, &b.postgres_cpu) / secs),
        harness_cores: (b.harness_cpu - a.harness_cpu) / secs,
        wal_bytes_per_replica: b
            .wal
            .zip(a.wal)
            .map(|(wb, wa)| (wb - wa) as f64 / (b.completed - a.completed).max(1) as f64),
        server_peak_rss,
        quota_refusals: log.quota_refusals,
        empty_fetches: log.empty_fetches,
        rejected: log.rejected,
        errors: log.errors,
        pending_at_end,
        db: None,
        ceiling: None,
        waits,
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

impl ThroughputReport {
    /// Replicas per second the daily quota (QUOTA_MAX per worker and day) allows this fleet
    /// over one run of `secs`.
    fn quota_rate(&self, secs: f64) -> f64 {
        self.workers as f64 * QUOTA_MAX as f64 / secs
    }

    pub fn ratio(&self) -> Option<f64> {
        self.ceiling
            .as_ref()
            .map(|c| self.replicas_per_sec / c.replicas_per_sec.max(1e-9))
    }

    pub fn text(&self) -> String {
        let mut s = format!(
            "accrete-load: {} workers, {} server process(es) x {} db connections, batch {}, \
             min_quorum 2, offered {}\n",
            self.workers,
            self.processes,
            self.db_connections,
            self.batch,
            if self.offered_rate > 0.0 {
                format!("{:.0} replicas/s (paced workers)", self.offered_rate)
            } else {
                "as fast as answered (closed loop)".to_string()
            }
        );
        if let Some(sub) = &self.submitted {
            s += &format!(
                "submitted {} work units in {:.1} s ({} study call(s), {:.1} MB)\n",
                sub.work_units,
                sub.secs,
                sub.study_ids.len(),
                sub.request_bytes as f64 / 1e6
            );
        }
        s += &format!("measured {:.1} s:\n", self.secs);
        s += &format!("  replicas completed/s   {:>10.0}\n", self.replicas_per_sec);
        s += &format!(
            "  work units validated/s {:>10.0}\n",
            self.validated_per_sec
        );
        match self.findings_per_sec {
            Some(f) => s += &format!("  findings recorded/s    {f:>10.0}\n"),
            None => s += "  findings recorded/s    (no database access; one per validation)\n",
        }
        s += &format!(
            "  FetchWork     p50 {:>7.2} ms  p99 {:>7.2} ms  ({} calls)\n",
            self.fetch_ms.0, self.fetch_ms.1, self.fetch_ms.2
        );
        s += &format!(
            "  ReportResults p50 {:>7.2} ms  p99 {:>7.2} ms  ({} calls{})\n",
            self.report_ms.0,
            self.report_ms.1,
            self.report_ms.2,
            if self.separate_fetch {
                ""
            } else {
                ", each also claiming the next batch: FetchWork is called only by a worker holding none"
            }
        );
        if let Some(c) = self.server_cores {
            s += &format!("  CPU cores used: servers {c:.2}");
            if let Some(p) = self.postgres_cores {
                s += &format!(
                    ", their PostgreSQL backends {p:.2} (a floor: ended backends are lost)"
                );
            }
            s += &format!(", this harness {:.2}\n", self.harness_cores);
        } else {
            s += &format!("  CPU cores used: this harness {:.2}\n", self.harness_cores);
        }
        if let Some(w) = self.wal_bytes_per_replica {
            s += &format!(
                "  WAL written: {w:.0} bytes per replica (the whole cluster's, with the full-page \
                 images after checkpoints; steadier than CPU on a noisy machine)\n"
            );
        }
        if !self.server_peak_rss.is_empty() {
            s += &format!(
                "  server peak RSS (VmHWM): {}\n",
                self.server_peak_rss
                    .iter()
                    .map(|&b| format!("{:.1} MiB", mib(b)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(d) = &self.db {
            s += &format!(
                "  database: work_units {:.0} B per unit ({} units); replicas + findings + \
                 finding_metrics {:.0} B per validated unit ({} validated); ledger {:.0} B per \
                 validated unit\n",
                d.work_units as f64 / d.wus.max(1) as f64,
                d.wus,
                (d.replicas + d.findings + d.finding_metrics) as f64 / d.validated.max(1) as f64,
                d.validated,
                d.ledger as f64 / d.validated.max(1) as f64,
            );
            s += &format!(
                "  database bytes per validated work unit (work_units + replicas + findings + \
                 finding_metrics, with indexes): {:.0}\n",
                self.bytes_per_wu().unwrap_or(0.0)
            );
        }
        if let Some(w) = &self.waits {
            s += &w.text();
        }
        if let Some(c) = &self.ceiling {
            s += &format!(
                "raw ceiling (batched FOR UPDATE SKIP LOCKED claim + batched completion, {} \
                 connections, batch {}, synchronous_commit={}, fsync={}): {:.0} replicas/s{}\n",
                c.concurrency,
                c.batch,
                c.synchronous_commit,
                c.fsync,
                c.replicas_per_sec,
                if c.exhausted {
                    " (ran out of jobs: a floor)"
                } else {
                    ""
                }
            );
            s += &format!("accrete / ceiling: {:.3}\n", self.ratio().unwrap_or(0.0));
        }
        s += &format!(
            "quota refusals {}, empty fetches {}, rejected results {}, failed RPCs {:?}\n",
            self.quota_refusals, self.empty_fetches, self.rejected, self.errors
        );
        if !self.errors.is_empty() {
            s += "WARNING: RPCs failed; UNAVAILABLE is the server's answer when a request waits \
                  over 5 s for a database connection (the pool's acquire timeout): the server \
                  is overloaded, and the simulated workers retry\n";
        }
        if self.pending_at_end == Some(0) {
            s += "WARNING: the queue ran dry; raise --wus (the rates above are floors)\n";
        }
        if self.quota_refusals > 0 {
            s += &format!(
                "WARNING: daily quotas refused fetches ({} workers x {QUOTA_MAX} replicas a day \
                 is about {:.0} replicas/s over this run); add --workers\n",
                self.workers,
                self.quota_rate(self.secs + 10.0)
            );
        }
        s
    }

    /// Everything a validated unit leaves in the tables the issue names.
    pub fn bytes_per_wu(&self) -> Option<f64> {
        self.db.map(|d| {
            d.work_units as f64 / d.wus.max(1) as f64
                + (d.replicas + d.findings + d.finding_metrics) as f64 / d.validated.max(1) as f64
        })
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "mode": "throughput",
            "workers": self.workers, "offered_rate": self.offered_rate, "processes": self.processes, "batch": self.batch,
            "separate_fetch": self.separate_fetch,
            "db_connections_per_process": self.db_connections,
            "submitted_work_units": self.submitted.as_ref().map(|s| s.work_units),
            "submit_secs": self.submitted.as_ref().map(|s| s.secs),
            "measured_secs": self.secs,
            "replicas_per_sec": self.replicas_per_sec,
            "validated_per_sec": self.validated_per_sec,
            "findings_per_sec": self.findings_per_sec,
            "fetch_ms": { "p50": self.fetch_ms.0, "p99": self.fetch_ms.1, "calls": self.fetch_ms.2 },
            "report_ms": { "p50": self.report_ms.0, "p99": self.report_ms.1, "calls": self.report_ms.2 },
            "server_cores": self.server_cores,
            "postgres_cores": self.postgres_cores,
            "harness_cores": self.harness_cores,
            "wal_bytes_per_replica": self.wal_bytes_per_replica,
            "server_peak_rss_bytes": self.server_peak_rss,
            "db": self.db.map(|d| json!({
                "work_units_bytes": d.work_units, "replicas_bytes": d.replicas,
                "findings_bytes": d.findings, "finding_metrics_bytes": d.finding_metrics,
                "ledger_bytes": d.ledger, "work_units": d.wus, "validated": d.validated,
            })),
            "bytes_per_validated_wu": self.bytes_per_wu(),
            "ceiling": self.ceiling.as_ref().map(|c| json!({
                "replicas_per_sec": c.replicas_per_sec, "concurrency": c.concurrency,
                "batch": c.batch, "secs": c.secs, "exhausted": c.exhausted,
                "synchronous_commit": c.synchronous_commit, "fsync": c.fsync,
            })),
            "accrete_over_ceiling": self.ratio(),
            "quota_refusals": self.quota_refusals,
            "empty_fetches": self.empty_fetches,
            "rejected": self.rejected,
            "failed_rpcs": self.errors,
            "pending_at_end": self.pending_at_end,
            "backend_samples": self.waits.as_ref().map(|w| json!({
                "samples": w.samples, "busy_backends_mean": w.busy as f64 / w.samples.max(1) as f64,
                "top": w.top(12).iter().map(|(k, n)| json!({ "what": k, "count": n }))
                    .collect::<Vec<_>>(),
            })),
        })
    }
}

/// A profile from PostgreSQL's side: every 100 ms, what each busy backend of this database is
/// doing (running, or the wait event it is blocked on) and in which statement.
#[derive(Debug, Clone, Default)]
pub struct Waits {
    pub samples: u64,
    /// Busy backends summed over the samples.
    pub busy: u64,
    /// "what | statement" -> times seen.
    pub seen: BTreeMap<String, u64>,
}

impl Waits {
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.seen.iter().map(|(k, &n)| (k.clone(), n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    fn text(&self) -> String {
        let mut s = format!(
            "  PostgreSQL backends of this database, sampled every 100 ms ({} samples): {:.1} \
             busy on average; where they were:\n",
            self.samples,
            self.busy as f64 / self.samples.max(1) as f64
        );
        for (k, n) in self.top(8) {
            s += &format!(
                "    {:>5.1}%  {k}\n",
                100.0 * n as f64 / self.busy.max(1) as f64
            );
        }
        s
    }
}

async fn sample_waits(pool: PgPool, on: Arc<AtomicBool>) -> anyhow::Result<Waits> {
    let mut w = Waits::default();
    while on.load(Ordering::Relaxed) {
        // "idle in transaction": the transaction waits on its client, the accrete server.
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT CASE WHEN state = 'idle in transaction' THEN 'idle in transaction (server side)'
                         WHEN wait_event IS NULL THEN 'running'
                         ELSE wait_event_type || ':' || wait_event END,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 60)
             FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND state IN ('active', 'idle in transaction')",
        )
        .fetch_all(&pool)
        .await?;
        w.samples += 1;
        w.busy += rows.len() as u64;
        for (what, query) in rows {
            *w.seen
                .entry(format!("{what} | {}", query.trim()))
                .or_default() += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(w)
}

// ---------------------------------------------------------------------------------------------
// The raw ceiling

/// The raw ceiling: how many replicas a second the database server completes when a replica
/// costs only what it must (one claim and one completion, each batched and durably committed).
#[derive(Debug, Clone)]
pub struct Ceiling {
    pub replicas_per_sec: f64,
    pub concurrency: usize,
    pub batch: i64,
    pub secs: f64,
    pub exhausted: bool,
    pub synchronous_commit: String,
    pub fsync: String,
}

/// Runs the ceiling on the database at `url` (in a table of its own): `concurrency` loops,
/// each claiming `batch` jobs with `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`
/// and completing them with one `UPDATE ... FROM UNNEST`, each statement its own durable
/// transaction, for `secs` after a one-second warm-up.
pub async fn ceiling(
    url: &str,
    concurrency: usize,
    batch: i64,
    secs: f64,
) -> anyhow::Result<Ceiling> {
    let concurrency = concurrency.max(1);
    let pool = PgPoolOptions::new()
        .max_connections(concurrency as u32)
        .connect(url)
        .await?;
    let synchronous_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
    sqlx::query(
        "CREATE TABLE load_ceiling (id bigint PRIMARY KEY, state smallint NOT NULL DEFAULT 0,
                                    worker integer, input bytea NOT NULL, output bytea)",
    )
    .execute(&pool)
    .await?;
    // The same shape as work_units_dispatch: the claim walks pending ids in order.
    sqlx::query("CREATE INDEX load_ceiling_pending ON load_ceiling (id) WHERE state = 0")
        .execute(&pool)
        .await?;
    let jobs = ((secs + 1.0) * 60_000.0).max(100_000.0) as i64;
    sqlx::query(
        "INSERT INTO load_ceiling (id, input)
         SELECT g, convert_to('{\"i\":' || g || '}', 'UTF8') FROM generate_series(1, $1) g",
    )
    .bind(jobs)
    .execute(&pool)
    .await?;
    sqlx::query("VACUUM ANALYZE load_ceiling")
        .execute(&pool)
        .await?;

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let exhausted = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..concurrency as i32 {
        let (pool, measuring, stop, done, exhausted) = (
            pool.clone(),
            measuring.clone(),
            stop.clone(),
            done.clone(),
            exhausted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let claimed: Vec<(i64, Vec<u8>)> = sqlx::query_as(
                    "UPDATE load_ceiling SET state = 1, worker = $1
                     WHERE id IN (SELECT id FROM load_ceiling WHERE state = 0 ORDER BY id
                                  LIMIT $2 FOR UPDATE SKIP LOCKED)
                     RETURNING id, input",
                )
                .bind(w)
                .bind(batch)
                .fetch_all(&pool)
                .await?;
                if claimed.is_empty() {
                    exhausted.store(true, Ordering::Relaxed);
                    return anyhow::Ok(());
                }
                let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
                let outputs: Vec<Vec<u8>> = claimed
                    .iter()
                    .map(|c| output(truth(input_n(&c.1))))
                    .collect();
                let n = sqlx::query(
                    "UPDATE load_ceiling c SET state = 2, output = o.output
                     FROM UNNEST($1::bigint[], $2::bytea[]) AS o(id, output)
                     WHERE c.id = o.id AND c.state = 1 AND c.worker = $3",
                )
                .bind(&ids)
                .bind(&outputs)
                .bind(w)
                .execute(&pool)
                .await?
                .rows_affected();
                if measuring.load(Ordering::Relaxed) {
                    done.fetch_add(n, Ordering::Relaxed);
                }
            }
            Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    while Instant::now() < deadline && !exhausted.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    sqlx::query("DROP TABLE load_ceiling")
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(Ceiling {
        replicas_per_sec: done.load(Ordering::Relaxed) as f64 / elapsed,
        concurrency,
        batch,
        secs: elapsed,
        exhausted: exhausted.load(Ordering::Relaxed),
        synchronous_commit,
        fsync,
    })
}

// ---------------------------------------------------------------------------------------------
// Submit mode

/// One probe: a light fleet fetching and reporting while the queue is a given size.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    pub queued: usize,
    pub fetch_ms: (f64, f64, usize),
    pub report_ms: (f64, f64, usize),
    pub replicas_per_sec: f64,
    /// VmRSS of each server after the probe.
    pub server_rss: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct SubmitReport {
    pub processes: usize,
    pub small: Probe,
    pub submitted: Option<Submitted>,
    /// VmRSS and VmHWM of each server right after the big submission.
    pub rss_after_submit: Vec<u64>,
    pub hwm_after_submit: Vec<u64>,
    pub big: Probe,
    pub work_units_bytes_per_wu: f64,
}

async fn probe(args: &Args, urls: &[String], pids: &[u32], queued: usize) -> anyhow::Result<Probe> {
    let round = (args.probe_rate > 0.0).then(|| {
        Duration::from_secs_f64(f64::from(args.batch) * args.probe_workers as f64 / args.probe_rate)
    });
    // FetchWork apart from the report, so that the claim's own latency is what is compared
    // between the two queues.
    let fleet = Fleet::start(urls, args.probe_workers, args.batch, true, false, round).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = fleet.completed();
    fleet.measure(true);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.probe_secs)).await;
    fleet.measure(false);
    let secs = started.elapsed().as_secs_f64();
    let after = fleet.completed();
    let log = fleet.stop().await?;
    anyhow::ensure!(
        log.errors.is_empty(),
        "RPCs failed while probing: {:?}",
        log.errors
    );
    Ok(Probe {
        queued,
        fetch_ms: p50_p99(log.fetch_us),
        report_ms: p50_p99(log.report_us),
        replicas_per_sec: (after - before) as f64 / secs,
        server_rss: pids
            .iter()
            .map(|&p| status_bytes(p, "VmRSS").unwrap_or(0))
            .collect(),
    })
}

async fn submit_local(args: &Args, url: &str) -> anyhow::Result<SubmitReport> {
    let store = Store::connect(url, 4).await?;
    let args = &Args {
        api_key: Some(mint_key(&store).await?),
        ..args.clone()
    };
    let bin = server_bin(args.server_bin.as_deref())?;
    let mut servers =
        ServerProcesses::start(&bin, url, args.processes, args.db_connections).await?;
    let pids = servers.pids();
    let urls = servers.urls.clone();

    let small = submit(
        &urls[0],
        args.key()?,
        "small queue",
        0,
        args.small_queue,
        2,
        args.delay_bound,
    )
    .await?;
    eprintln!(
        "probing fetch latency with {} units queued",
        args.small_queue
    );
    let small_probe = probe(args, &urls, &pids, args.small_queue).await?;
    // Out of the way, so the second probe fetches from the big study.
    let mut research = research_client(&urls[0], args.key()?).await?;
    for &s in &small.study_ids {
        research
            .cancel_study(pb::CancelStudyRequest { study_id: s })
            .await?;
    }

    let wus = args.wus();
    eprintln!("submitting {wus} work units as one study");
    let big = submit(
        &urls[0],
        args.key()?,
        "one million",
        10_000_000,
        wus,
        2,
        args.delay_bound,
    )
    .await?;
    let rss_after_submit = pids
        .iter()
        .map(|&p| status_bytes(p, "VmRSS").unwrap_or(0))
        .collect();
    let hwm_after_submit = pids
        .iter()
        .map(|&p| status_bytes(p, "VmHWM").unwrap_or(0))
        .collect();
    eprintln!("submitted in {:.1} s; probing again", big.secs);
    let big_probe = probe(args, &urls, &pids, wus).await?;
    let sizes = db_sizes(store.pool()).await?;
    servers.stop();
    store.close().await;
    Ok(SubmitReport {
        processes: args.processes,
        small: small_probe,
        submitted: Some(big),
        rss_after_submit,
        hwm_after_submit,
        big: big_probe,
        work_units_bytes_per_wu: sizes.work_units as f64 / sizes.wus.max(1) as f64,
    })
}

fn mibs(v: &[u64]) -> String {
    v.iter()
        .map(|&b| format!("{:.1} MiB", mib(b)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl SubmitReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        if let Some(sub) = &self.submitted {
            s += &format!(
                "submitted {} work units (min_quorum 2) in {:.1} s ({:.0} units/s) in {} \
                 SubmitStudy call(s); request {:.1} MB of the {} MiB message cap\n",
                sub.work_units,
                sub.secs,
                sub.work_units as f64 / sub.secs,
                sub.study_ids.len(),
                sub.request_bytes as f64 / 1e6,
                MAX_MESSAGE_BYTES >> 20
            );
        }
        s += &format!(
            "server RSS right after: {} (peak so far, VmHWM: {})\n",
            mibs(&self.rss_after_submit),
            mibs(&self.hwm_after_submit)
        );
        s += &format!(
            "work_units on disk: {:.0} bytes per unit (with indexes)\n",
            self.work_units_bytes_per_wu
        );
        for p in [&self.small, &self.big] {
            s += &format!(
                "{:>9} units queued: FetchWork p50 {:.2} ms p99 {:.2} ms ({} calls), \
                 ReportResults p50 {:.2} ms p99 {:.2} ms, {:.0} replicas/s; server RSS {}\n",
                p.queued,
                p.fetch_ms.0,
                p.fetch_ms.1,
                p.fetch_ms.2,
                p.report_ms.0,
                p.report_ms.1,
                p.replicas_per_sec,
                mibs(&p.server_rss)
            );
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let probe = |p: &Probe| {
            json!({
                "queued": p.queued,
                "fetch_ms": { "p50": p.fetch_ms.0, "p99": p.fetch_ms.1, "calls": p.fetch_ms.2 },
                "report_ms": { "p50": p.report_ms.0, "p99": p.report_ms.1, "calls": p.report_ms.2 },
                "replicas_per_sec": p.replicas_per_sec,
                "server_rss_bytes": p.server_rss,
            })
        };
        json!({
            "mode": "submit",
            "processes": self.processes,
            "submitted_work_units": self.submitted.as_ref().map(|s| s.work_units),
            "submit_secs": self.submitted.as_ref().map(|s| s.secs),
            "submit_calls": self.submitted.as_ref().map(|s| s.study_ids.len()),
            "request_bytes": self.submitted.as_ref().map(|s| s.request_bytes),
            "rss_after_submit_bytes": self.rss_after_submit,
            "hwm_after_submit_bytes": self.hwm_after_submit,
            "work_units_bytes_per_wu": self.work_units_bytes_per_wu,
            "small_queue": probe(&self.small),
            "big_queue": probe(&self.big),
        })
    }
}
