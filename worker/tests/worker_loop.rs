//! The worker loop against a scripted in-process scheduler (a fake `WorkerService`, not the real
//! server): claiming and reporting, failure results, hand-back at shutdown, re-registration,
//! report retries, and an unreachable server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accrete_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use accrete_proto::v1::*;
use accrete_worker::{WorkerConfig, WorkerSummary, run};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// Reads up to 1 KiB of stdin and writes it to stdout.
const ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

const LOOP: &str = r#"(module (func (export "_start") (loop $l (br $l))))"#;

#[derive(Default)]
struct Fake {
    queue: Mutex<VecDeque<Assignment>>,
    modules: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    results: Mutex<Vec<ReplicaResult>>,
    registrations: AtomicU32,
    heartbeats: AtomicU32,
    /// FetchWork calls still to answer with Unauthenticated.
    unauthenticated_fetches: AtomicU32,
    /// ReportResults calls still to answer with Unavailable.
    unavailable_reports: AtomicU32,
}

impl Fake {
    fn add_module(&self, wat: &str) -> Vec<u8> {
        let wasm = wat::parse_str(wat).unwrap();
        let hash = blake3::hash(&wasm).as_bytes().to_vec();
        self.modules.lock().unwrap().insert(hash.clone(), wasm);
        hash
    }

    fn assign(&self, replica_id: u64, module_hash: &[u8], input: &[u8], bounds: ResourceBounds) {
        self.queue.lock().unwrap().push_back(Assignment {
            replica_id,
            work_unit_id: replica_id,
            module_hash: module_hash.to_vec(),
            input: input.to_vec(),
            bounds: Some(bounds),
            deadline_unix: 0,
            random_seed: replica_id,
        });
    }

    fn results(&self) -> Vec<ReplicaResult> {
        self.results.lock().unwrap().clone()
    }

    fn result(&self, replica_id: u64) -> replica_result::Outcome {
        let results = self.results();
        let r = results.iter().find(|r| r.replica_id == replica_id);
        r.and_then(|r| r.outcome.clone())
            .unwrap_or_else(|| panic!("no result for replica {replica_id}"))
    }
}

fn check_auth(auth: &Option<WorkerAuth>) -> Result<(), Status> {
    match auth {
        Some(a) if a.worker_id.starts_with("worker-") && a.token == "secret" => Ok(()),
        _ => Err(Status::unauthenticated("unknown worker")),
    }
}

struct Svc(Arc<Fake>);

#[tonic::async_trait]
impl WorkerService for Svc {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let platform = request.into_inner().platform.expect("platform");
        assert!(platform.runtime.starts_with("wasmtime 48."), "{platform:?}");
        assert!(platform.cores > 0);
        let n = self.0.registrations.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Response::new(RegisterResponse {
            worker_id: format!("worker-{n}"),
            token: "secret".into(),
        }))
    }

    async fn fetch_work(
        &self,
        request: Request<FetchWorkRequest>,
    ) -> Result<Response<FetchWorkResponse>, Status> {
        let request = request.into_inner();
        check_auth(&request.auth)?;
        let refuse = &self.0.unauthenticated_fetches;
        if refuse.load(Ordering::SeqCst) > 0 {
            refuse.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::unauthenticated("database was reset"));
        }
        let mut queue = self.0.queue.lock().unwrap();
        let n = (request.max as usize).min(queue.len());
        let assignments: Vec<_> = queue.drain(..n).collect();
        Ok(Response::new(FetchWorkResponse {
            retry_after_ms: if assignments.is_empty() { 20 } else { 0 },
            assignments,
        }))
    }

    async fn report_results(
        &self,
        request: Request<ReportResultsRequest>,
    ) -> Result<Response<ReportResultsResponse>, Status> {
        let request = request.into_inner();
        check_auth(&request.auth)?;
        let down = &self.0.unavailable_reports;
        if down.load(Ordering::SeqCst) > 0 {
            down.fetch_sub(1, Ordering::SeqCst);
            return Err(Status::unavailable("restarting"));
        }
        let acks = request
            .results
            .iter()
            .map(|r| ReportAck {
                replica_id: r.replica_id,
                status: ReportStatus::Accepted as i32,
                message: String::new(),
            })
            .collect();
        self.0.results.lock().unwrap().extend(request.results);
        Ok(Response::new(ReportResultsResponse { acks }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        check_auth(&request.into_inner().auth)?;
        self.0.heartbeats.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(HeartbeatResponse {
            server_time_unix: 0,
        }))
    }

    async fn get_module(
        &self,
        request: Request<GetModuleRequest>,
    ) -> Result<Response<GetModuleResponse>, Status> {
        let request = request.into_inner();
        check_auth(&request.auth)?;
        let modules = self.0.modules.lock().unwrap();
        let wasm = modules
            .get(&request.hash)
            .cloned()
            .ok_or_else(|| Status::not_found("no such module"))?;
        Ok(Response::new(GetModuleResponse { wasm }))
    }
}

/// Serves `fake` on a free port; returns its URL. The server lives until the test ends.
async fn serve(fake: Arc<Fake>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Svc(fake)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Logs to stderr when `TEST_LOG` is set (e.g. `TEST_LOG=debug`); silent otherwise.
fn init_tracing() {
    if let Ok(filter) = std::env::var("TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Starts a worker; returns the trigger for its shutdown and its eventual summary.
fn start(
    config: WorkerConfig,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<WorkerSummary>>,
) {
    init_tracing();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(run(config, async move {
        let _ = rx.await;
    }));
    (tx, handle)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn config(url: String, slots: usize) -> WorkerConfig {
    let mut config = WorkerConfig::new(url);
    config.slots = slots;
    config.prefetch = slots;
    config.heartbeat_interval = Duration::from_millis(50);
    config
}

fn bounds(fuel: u64) -> ResourceBounds {
    ResourceBounds {
        fuel,
        memory_bytes: 1 << 20,
        output_bytes: 4096,
        wall_ms: 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_replicas_and_reports_results() {
    let fake = Arc::new(Fake::default());
    let echo = fake.add_module(ECHO);
    let looping = fake.add_module(LOOP);
    for i in 1..=20u64 {
        let input = format!(r#"{{"metrics":{{"i":{i}}}}}"#);
        fake.assign(i, &echo, input.as_bytes(), bounds(1_000_000));
    }
    fake.assign(21, &looping, b"", bounds(10_000));
    fake.assign(22, &echo, b"not json", bounds(1_000_000));
    // The server's bytes for this hash are wrong: the worker must refuse to run them.
    let forged = blake3::hash(b"forged").as_bytes().to_vec();
    let echo_wasm = fake.modules.lock().unwrap()[&echo].clone();
    fake.modules
        .lock()
        .unwrap()
        .insert(forged.clone(), echo_wasm);
    fake.assign(23, &forged, b"{}", bounds(1_000_000));
    fake.assign(24, &[1, 2, 3], b"{}", bounds(1_000_000));

    let url = serve(fake.clone()).await;
    let (shutdown, worker) = start(config(url, 2));
    wait_for("all results", || fake.results().len() >= 24).await;
    wait_for("a heartbeat", || fake.heartbeats.load(Ordering::SeqCst) > 0).await;
    shutdown.send(()).unwrap();
    let summary = worker.await.unwrap().unwrap();

    assert_eq!(summary.worker_id.as_deref(), Some("worker-1"));
    assert_eq!(
        (summary.completed, summary.failed, summary.handed_back),
        (20, 4, 0)
    );
    assert_eq!(summary.unreported, 0);
    assert_eq!(fake.registrations.load(Ordering::SeqCst), 1);
    assert_eq!(fake.results().len(), 24, "each replica reported once");
    for i in 1..=20u64 {
        let replica_result::Outcome::Success(s) = fake.result(i) else {
            panic!("replica {i}: {:?}", fake.result(i));
        };
        assert_eq!(
            s.output,
            format!(r#"{{"metrics":{{"i":{i}}}}}"#).into_bytes()
        );
        assert_eq!(s.output_hash, blake3::hash(&s.output).as_bytes().to_vec());
        assert!(s.fuel_used > 0);
    }
    let kind = |id| match fake.result(id) {
        replica_result::Outcome::Failure(f) => f.kind(),
        other => panic!("replica {id}: {other:?}"),
    };
    assert_eq!(kind(21), ErrorKind::OutOfFuel);
    assert_eq!(kind(22), ErrorKind::BadOutput);
    assert_eq!(kind(23), ErrorKind::Module);
    assert_eq!(kind(24), ErrorKind::Module);
    assert!(fake.results().iter().any(|r| r.wall_micros > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hands_back_unfinished_replicas_at_shutdown() {
    let fake = Arc::new(Fake::default());
    let looping = fake.add_module(LOOP);
    for i in 1..=3 {
        fake.assign(i, &looping, b"", bounds(u64::MAX / 2));
    }
    let url = serve(fake.clone()).await;
    let mut config = config(url, 1);
    config.prefetch = 2;
    config.drain_timeout = Duration::from_millis(100);
    let (shutdown, worker) = start(config);
    wait_for("all claimed", || fake.queue.lock().unwrap().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let stopping = Instant::now();
    shutdown.send(()).unwrap();
    let summary = worker.await.unwrap().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(
        (summary.completed, summary.failed, summary.handed_back),
        (0, 0, 3)
    );
    for i in 1..=3 {
        assert!(matches!(
            fake.result(i),
            replica_result::Outcome::HandBack(_)
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_again_and_retries_failed_reports() {
    let fake = Arc::new(Fake::default());
    let echo = fake.add_module(ECHO);
    for i in 1..=5 {
        fake.assign(i, &echo, br#"{"metrics":{"x":1}}"#, bounds(1_000_000));
    }
    fake.unauthenticated_fetches.store(2, Ordering::SeqCst);
    fake.unavailable_reports.store(2, Ordering::SeqCst);
    let url = serve(fake.clone()).await;
    let (shutdown, worker) = start(config(url, 2));
    wait_for("all results", || fake.results().len() >= 5).await;
    shutdown.send(()).unwrap();
    let summary = worker.await.unwrap().unwrap();
    assert_eq!(summary.completed, 5);
    assert_eq!(summary.unreported, 0);
    assert!(fake.registrations.load(Ordering::SeqCst) >= 3);
    assert_eq!(fake.unavailable_reports.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_retrying_an_unreachable_server_and_stops_promptly() {
    // Port 1 on localhost: nothing listens there.
    let (shutdown, worker) = start(config("http://127.0.0.1:1".into(), 1));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!worker.is_finished(), "the worker must keep retrying");
    let stopping = Instant::now();
    shutdown.send(()).unwrap();
    let summary = worker.await.unwrap().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(summary, WorkerSummary::default());
}

#[tokio::test]
async fn a_bad_url_is_an_error() {
    let err = run(config("not a url".into(), 1), async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid server URL"), "{err:#}");
}
