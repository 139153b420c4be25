//! The adversarial simulation of the trust engine. It starts the real server on a fresh
//! PostgreSQL database, submits a study of synthetic work units, and runs simulated volunteers
//! in this process over real gRPC. They do not run WebAssembly: every input is `{"i": n}` and
//! its correct output is a rule the simulation knows (`truth(n)`), so each finding can be
//! checked against ground truth. A fraction of the workers misbehaves as the scenario says.
//!
//! Layout: [`Args`] (the command line), [`run`] (set-up, warm-up, the measured study, the
//! report), [`Behaviour`] and the worker loop, [`Report`] (figures and the calibration table).
//! [`load`] is the throughput harness (`accrete-load`), which shares the workers' arithmetic.

pub mod load;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use accrete_proto::v1::{
    self as pb, research_service_client::ResearchServiceClient,
    worker_service_client::WorkerServiceClient,
};
use accrete_server::devdb::{DevDb, LOCAL_SERVER};
use accrete_server::store::{InvariantBreaches, Store, WuState};
use anyhow::Context;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Every worker honest.
    Honest,
    /// Bad workers return a random wrong output with probability `--wrong-rate`.
    RandomWrong,
    /// Bad workers always return a random wrong output.
    AlwaysWrong,
    /// Bad workers (separate accounts) all return the same wrong output for a work unit.
    Colluding,
    /// Bad workers compute their first unit and return that output for every later one.
    Lazy,
    /// Bad workers report an error with probability `--wrong-rate`.
    Flaky,
    /// Bad workers claim work and never report it.
    Vanishing,
}

/// Runs one scenario and prints what got through.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "accrete-sim", version, about)]
pub struct Args {
    #[arg(long, value_enum, default_value = "random-wrong")]
    pub scenario: Scenario,
    /// Work units in the measured study.
    #[arg(long, default_value_t = 2000)]
    pub wus: usize,
    /// Work units of a warm-up study run first (workers earn reputation); not measured.
    #[arg(long, default_value_t = 1000)]
    pub warmup: usize,
    /// Simulated workers, each on its own volunteer account.
    #[arg(long, default_value_t = 40)]
    pub workers: usize,
    /// Fraction of workers with the scenario's behaviour; the rest are honest.
    #[arg(long, default_value_t = 0.2)]
    pub bad: f64,
    /// For random-wrong: chance a bad worker's result is wrong; for flaky: chance of an error.
    #[arg(long, default_value_t = 0.5)]
    pub wrong_rate: f64,
    /// The study's min_quorum.
    #[arg(long, default_value_t = 2)]
    pub quorum: u32,
    /// Adaptive replication on.
    #[arg(long)]
    pub adaptive: bool,
    /// Distinct platforms the workers are spread over (x86_64, aarch64, ...).
    #[arg(long, default_value_t = 2)]
    pub platforms: usize,
    /// Replicas per FetchWork.
    #[arg(long, default_value_t = 8)]
    pub batch: u32,
    /// delay_bound_secs of the studies (how soon vanished replicas are reissued).
    #[arg(long, default_value_t = 3)]
    pub delay_bound: u32,
    /// Seed of the workers' behaviour.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up waiting for a study after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub max_secs: u64,
    /// PostgreSQL server to make the throwaway database on.
    #[arg(long, env = "ACCRETE_SIM_DATABASE_URL", default_value = LOCAL_SERVER)]
    pub database_url: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How a simulated worker behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    RandomWrong(f64),
    Colluding,
    Lazy,
    Flaky(f64),
    Vanishing,
}

/// The correct metric for input `n`: a hash-like rule only the simulation knows.
pub fn truth(n: u64) -> f64 {
    (splitmix(n) % 1_000_000) as f64
}

pub(crate) fn output(v: f64) -> Vec<u8> {
    format!(r#"{{"metrics":{{"v":{v}}}}}"#).into_bytes()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A tiny deterministic generator per worker (splitmix64), so a run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix(self.0)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

pub(crate) fn input_n(input: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(input)
        .ok()
        .and_then(|v| v["i"].as_u64())
        .unwrap_or(0)
}

/// The smallest module the server accepts: the simulated workers never run it.
pub(crate) fn module() -> Vec<u8> {
    wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
        .expect("a valid module")
}

#[derive(Default)]
struct Counters {
    fetches: AtomicU64,
    quota_refusals: AtomicU64,
    blocked: AtomicU64,
}

/// One simulated volunteer: fetch, "compute", report, until told to stop.
async fn worker(
    channel: Channel,
    index: usize,
    behaviour: Behaviour,
    args: Args,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let mut client = WorkerServiceClient::new(channel);
    let account_key = client
        .create_account(pb::CreateAccountRequest {
            name: format!("account-{index}"),
        })
        .await?
        .into_inner()
        .account_key;
    let arch = ["x86_64", "aarch64", "riscv64", "s390x"][index % args.platforms.clamp(1, 4)];
    let reg = client
        .register(pb::RegisterRequest {
            platform: Some(pb::Platform {
                arch: arch.into(),
                os: "linux".into(),
                cores: 1,
                memory_bytes: 1 << 30,
                runtime: "accrete-sim".into(),
            }),
            name: format!("sim-{index}"),
            account_key,
        })
        .await?
        .into_inner();
    let auth = pb::WorkerAuth {
        worker_id: reg.worker_id,
        token: reg.token,
    };
    let mut rng = Rng(args.seed.wrapping_mul(1_000_003).wrapping_add(index as u64) << 20);
    let mut lazy_cache: Option<Vec<u8>> = None;
    while !stop.load(Ordering::Relaxed) {
        counters.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched = client
            .fetch_work(pb::FetchWorkRequest {
                auth: Some(auth.clone()),
                max: args.batch,
                resume: false,
            })
            .await;
        let assignments = match fetched {
            Ok(r) => r.into_inner().assignments,
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                // Out of quota for the (simulated) day: wait, as the real worker does.
                counters.quota_refusals.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                counters.blocked.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Err(s) => return Err(s).context("FetchWork"),
        };
        if assignments.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if behaviour == Behaviour::Vanishing {
            continue;
        }
        let mut results = Vec::with_capacity(assignments.len());
        for a in assignments {
            let n = input_n(&a.input);
            let right = output(truth(n));
            let wrong = || output(truth(n) + 1.0 + (splitmix(n ^ 0xdead) % 997) as f64);
            let out = match behaviour {
                Behaviour::Honest | Behaviour::Vanishing => Some(right),
                Behaviour::RandomWrong(p) => Some(if rng.chance(p) {
                    output(truth(n) + 1.0 + (rng.next() % 1_000_000) as f64)
                } else {
                    right
                }),
                // Every colluder returns the same wrong output for a unit.
                Behaviour::Colluding => Some(wrong()),
                Behaviour::Lazy => Some(lazy_cache.get_or_insert(right).clone()),
                Behaviour::Flaky(p) => (!rng.chance(p)).then_some(right),
            };
            results.push(pb::ReplicaResult {
                replica_id: a.replica_id,
                outcome: Some(match out {
                    Some(output) => pb::replica_result::Outcome::Success(pb::Success {
                        output_hash: blake3::hash(&output).as_bytes().to_vec(),
                        output,
                        fuel_used: 1,
                    }),
                    None => pb::replica_result::Outcome::Failure(pb::Failure {
                        kind: pb::ErrorKind::Trap as i32,
                        message: "simulated crash".into(),
                        fuel_used: 1,
                    }),
                }),
                wall_micros: 1,
            });
        }
        client
            .report_results(pb::ReportResultsRequest {
                auth: Some(auth.clone()),
                results,
                fetch: 0,
            })
            .await
            .context("ReportResults")?;
    }
    Ok(())
}

/// Figures of one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub args: Args,
    pub work_units: usize,
    pub validated: usize,
    pub failed: usize,
    pub pending: usize,
    pub wrong: usize,
    pub unreplicated: usize,
    pub replicas: i64,
    pub secs_p50: f64,
    pub secs_p95: f64,
    pub wall_secs: f64,
    pub quota_refusals: u64,
    /// (lower bound, upper bound, findings, wrong findings)
    pub calibration: Vec<(f64, f64, usize, usize)>,
    pub high: (usize, usize),
    /// Replication invariants breached in the measured and warm-up studies (all zero).
    pub breaches: InvariantBreaches,
}

const BUCKETS: &[(f64, f64)] = &[
    (0.0, 0.5),
    (0.5, 0.9),
    (0.9, 0.95),
    (0.95, 0.99),
    (0.99, 0.999),
    (0.999, 1.0),
];

impl Report {
    pub fn replicas_per_validated(&self) -> f64 {
        self.replicas as f64 / self.validated.max(1) as f64
    }

    /// Every bucket's observed wrong fraction at or under 1 - its lower bound.
    pub fn calibrated(&self) -> bool {
        self.calibration
            .iter()
            .all(|&(lo, _, n, w)| n == 0 || w as f64 / n as f64 <= 1.0 - lo + 1e-12)
    }

    pub fn text(&self) -> String {
        let a = &self.args;
        let mut s = format!(
            "scenario {:?}: {} workers ({:.0}% bad, wrong/error rate {}), {} platforms, quorum {}, \
             adaptive {}, warm-up {} units\n",
            a.scenario,
            a.workers,
            a.bad * 100.0,
            a.wrong_rate,
            a.platforms,
            a.quorum,
            if a.adaptive { "on" } else { "off" },
            a.warmup
        );
        s += &format!(
            "measured study: {} work units: {} validated, {} failed, {} still pending\n",
            self.work_units, self.validated, self.failed, self.pending
        );
        s += &format!(
            "wrong findings (ground truth): {} of {} ({:.3}%)\n",
            self.wrong,
            self.validated,
            100.0 * self.wrong as f64 / self.validated.max(1) as f64
        );
        s += &format!(
            "replicas per validated unit: {:.3} ({} replicas); unreplicated findings: {}\n",
            self.replicas_per_validated(),
            self.replicas,
            self.unreplicated
        );
        s += &format!(
            "time to validate (first replica to finding): p50 {:.3} s, p95 {:.3} s; wall {:.1} s; \
             quota refusals {}\n",
            self.secs_p50, self.secs_p95, self.wall_secs, self.quota_refusals
        );
        s += &format!(
            "findings with confidence >= 0.99: {}, wrong among them: {} ({:.3}%)\n",
            self.high.0,
            self.high.1,
            100.0 * self.high.1 as f64 / self.high.0.max(1) as f64
        );
        s += "calibration: confidence bucket -> findings, wrong, observed wrong fraction (allowed)\n";
        for &(lo, hi, n, w) in &self.calibration {
            let frac = if n == 0 { 0.0 } else { w as f64 / n as f64 };
            s += &format!(
                "  [{lo:<5}, {hi:<5}{}  {n:>6}  {w:>6}  {frac:.4} (<= {:.4}){}\n",
                if hi == 1.0 { "]" } else { ")" },
                1.0 - lo,
                if n > 0 && frac > 1.0 - lo + 1e-12 {
                    "  MISCALIBRATED"
                } else {
                    ""
                }
            );
        }
        s += &format!(
            "calibration honest: {}\n",
            if self.calibrated() { "yes" } else { "NO" }
        );
        s += &format!(
            "invariant breaches (both studies): {} {:?}\n",
            self.breaches.total(),
            self.breaches
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        let a = &self.args;
        json!({
            "scenario": format!("{:?}", a.scenario), "workers": a.workers, "bad": a.bad,
            "wrong_rate": a.wrong_rate, "quorum": a.quorum, "adaptive": a.adaptive,
            "platforms": a.platforms, "warmup": a.warmup,
            "work_units": self.work_units, "validated": self.validated, "failed": self.failed,
            "pending": self.pending, "wrong_findings": self.wrong,
            "unreplicated": self.unreplicated,
            "replicas_per_validated": self.replicas_per_validated(),
            "time_to_validate_p50_secs": self.secs_p50, "time_to_validate_p95_secs": self.secs_p95,
            "wall_secs": self.wall_secs, "quota_refusals": self.quota_refusals,
            "high_confidence": { "findings": self.high.0, "wrong": self.high.1 },
            "calibration": self.calibration.iter().map(|&(lo, hi, n, w)| json!({
                "lower": lo, "upper": hi, "findings": n, "wrong": w })).collect::<Vec<_>>(),
            "calibrated": self.calibrated(),
            "invariant_breaches": self.breaches.total(),
        })
    }
}

/// Sets everything up, runs the warm-up and the measured study, and reports on the latter.
pub async fn run(args: &Args) -> anyhow::Result<Report> {
    // Unique per run, also for several runs in one process (the tests).
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "accrete_sim_{}_{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    let db = DevDb::on_server(&args.database_url, &name)
        .await
        .context("creating the simulation database (is PostgreSQL running?)")?;
    let result = run_on(args, &db.url).await;
    db.stop().await?;
    result
}

async fn run_on(args: &Args, url: &str) -> anyhow::Result<Report> {
    let store = Store::connect(url, 8).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop_server, mut stopped) = tokio::sync::watch::channel(false);
    let config = accrete_server::Config {
        rescue_interval: Duration::from_millis(500),
        ..Default::default()
    };
    let server = tokio::spawn(accrete_server::run(
        store.clone(),
        config,
        listener,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    // The simulation submits as a researcher whose key it mints straight in its database.
    let (_, key) =
        accrete_server::admin::create_key(&store, accrete_server::auth::Role::Researcher, "sim")
            .await?;
    let mut research = ResearchServiceClient::with_interceptor(
        channel.clone(),
        Bearer(format!("Bearer {key}").parse()?),
    );
    let module_hash = research
        .put_module(pb::PutModuleRequest {
            wasm: module(),
            name: "sim".into(),
        })
        .await?
        .into_inner()
        .hash;

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let n_bad = (args.workers as f64 * args.bad).round() as usize;
    let mut workers = Vec::new();
    for i in 0..args.workers {
        // Spread bad workers over the fleet (and over platforms).
        let bad = n_bad > 0 && (i * n_bad) % args.workers < n_bad;
        let behaviour = match (bad, args.scenario) {
            (false, _) | (true, Scenario::Honest) => Behaviour::Honest,
            (true, Scenario::RandomWrong) => Behaviour::RandomWrong(args.wrong_rate),
            (true, Scenario::AlwaysWrong) => Behaviour::RandomWrong(1.0),
            (true, Scenario::Colluding) => Behaviour::Colluding,
            (true, Scenario::Lazy) => Behaviour::Lazy,
            (true, Scenario::Flaky) => Behaviour::Flaky(args.wrong_rate),
            (true, Scenario::Vanishing) => Behaviour::Vanishing,
        };
        workers.push(tokio::spawn(worker(
            channel.clone(),
            i,
            behaviour,
            args.clone(),
            stop.clone(),
            counters.clone(),
        )));
    }
    let bad_count = {
        let mut c = 0;
        for i in 0..args.workers {
            if n_bad > 0 && (i * n_bad) % args.workers < n_bad {
                c += 1;
            }
        }
        c
    };
    anyhow::ensure!(
        bad_count == n_bad,
        "bad worker spread is off ({bad_count} vs {n_bad})"
    );

    let policy = pb::ReplicationPolicy {
        min_quorum: args.quorum,
        delay_bound_secs: args.delay_bound,
        adaptive: args.adaptive,
        // Room for tie-breaks among many wrong results.
        max_error_results: 6,
        max_total_results: 4 * args.quorum + 4,
        max_success_results: 2 * args.quorum + 4,
        ..Default::default()
    };
    let submit = |first: usize, n: usize, name: &str| pb::SubmitStudyRequest {
        name: name.into(),
        description: String::new(),
        module_hash: module_hash.clone(),
        policy: Some(policy),
        bounds: None,
        tolerance: vec![],
        work_units: (first..first + n)
            .map(|i| pb::WorkUnitSpec {
                input: format!("{{\"i\":{i}}}").into_bytes(),
            })
            .collect(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let mut warm_id = None;
    if args.warmup > 0 {
        let warm = research
            .submit_study(submit(1_000_000_000, args.warmup, "warm-up"))
            .await?
            .into_inner();
        wait(&mut research, warm.study_id, deadline).await?;
        warm_id = Some(warm.study_id);
    }
    let started = Instant::now();
    let study = research
        .submit_study(submit(0, args.wus, "measured"))
        .await?
        .into_inner();
    wait(&mut research, study.study_id, deadline).await?;
    let wall_secs = started.elapsed().as_secs_f64();

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await??;
    }
    let outcomes = store.study_outcomes(study.study_id as i64).await?;
    let mut breaches = store.invariant_breaches(study.study_id as i64).await?;
    if let Some(w) = warm_id {
        let b = store.invariant_breaches(w as i64).await?;
        breaches.over_issued += b.over_issued;
        breaches.same_worker += b.same_worker;
        breaches.same_account += b.same_account;
        breaches.findings_not_one += b.findings_not_one;
        breaches.bad_canonical += b.bad_canonical;
        breaches.stray_findings += b.stray_findings;
        breaches.unchecked += b.unchecked;
    }
    let _ = stop_server.send(true);
    server.await??;

    let mut secs = Vec::new();
    let mut report = Report {
        args: args.clone(),
        work_units: outcomes.len(),
        validated: 0,
        failed: 0,
        pending: 0,
        wrong: 0,
        unreplicated: 0,
        replicas: 0,
        secs_p50: 0.0,
        secs_p95: 0.0,
        wall_secs,
        quota_refusals: counters.quota_refusals.load(Ordering::Relaxed),
        calibration: BUCKETS.iter().map(|&(lo, hi)| (lo, hi, 0, 0)).collect(),
        high: (0, 0),
        breaches,
    };
    let mut truth_hash: HashMap<u64, [u8; 32]> = HashMap::new();
    for o in &outcomes {
        report.replicas += o.replicas;
        match o.state {
            WuState::Validated => report.validated += 1,
            WuState::Failed => report.failed += 1,
            _ => report.pending += 1,
        }
        let (Some(hash), Some(conf)) = (&o.output_hash, o.confidence) else {
            continue;
        };
        let n = input_n(&o.input);
        let expected = *truth_hash
            .entry(n)
            .or_insert_with(|| *blake3::hash(&output(truth(n))).as_bytes());
        let wrong = hash.as_slice() != expected;
        report.wrong += wrong as usize;
        report.unreplicated += o.unreplicated.unwrap_or(false) as usize;
        if let Some(s) = o.secs {
            secs.push(s);
        }
        for b in report.calibration.iter_mut() {
            if conf >= b.0 && (conf < b.1 || b.1 == 1.0) {
                b.2 += 1;
                b.3 += wrong as usize;
            }
        }
        if conf >= 0.99 {
            report.high.0 += 1;
            report.high.1 += wrong as usize;
        }
    }
    secs.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        secs.get(((secs.len() as f64 * p) as usize).min(secs.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    report.secs_p50 = pct(0.5);
    report.secs_p95 = pct(0.95);
    Ok(report)
}

/// Sends the simulation's API key with every research call.
#[derive(Clone)]
pub struct Bearer(pub tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// A research client that sends an API key with every call.
pub type Research =
    ResearchServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// Waits until no work unit of `study` is pending, or the deadline passes.
async fn wait(research: &mut Research, study: u64, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let s = research
            .get_status(pb::GetStatusRequest { study_id: study })
            .await?
            .into_inner();
        if s.studies.first().is_some_and(|s| s.pending == 0) || Instant::now() > deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
