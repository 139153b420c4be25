//! Test harness for the integration tests in `tests/it`: `TestApp::spawn()` makes a fresh,
//! uniquely named database on the local PostgreSQL, starts the real server on a loopback port,
//! and starts workers in-process or as real processes (the `it-server`/`it-worker` binaries).
//!
//! Every research and ledger call needs an API key: `spawn` mints a researcher key straight in
//! the database (`TestApp::api_key`), and `client()` sends it. Logs are silent unless
//! `TEST_LOG` is set. The admin URL of the PostgreSQL server comes from
//! `ACCRETE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use accrete::client::Client;
use accrete_proto::MAX_MESSAGE_BYTES;
use accrete_proto::v1::{self as pb, worker_service_client::WorkerServiceClient};
use accrete_server::devdb::{DevDb, LOCAL_SERVER};
use accrete_server::{Config, Store};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub use accrete_proto::v1;

/// Paths of the wrapper binaries, set by cargo for this package's integration tests.
pub struct Binaries {
    pub server: &'static str,
    pub worker: &'static str,
}

fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

enum Server {
    InProcess {
        stop: watch::Sender<bool>,
        task: JoinHandle<anyhow::Result<()>>,
    },
    Process(Child),
}

/// A running server on a fresh database, with helpers to drive it.
pub struct TestApp {
    pub db_url: String,
    pub store: Store,
    pub addr: SocketAddr,
    pub server_url: String,
    pub config: Config,
    /// A researcher key, sent by `client()`.
    pub api_key: String,
    server: Option<Server>,
    workers: Vec<(
        watch::Sender<bool>,
        JoinHandle<anyhow::Result<accrete_worker::WorkerSummary>>,
    )>,
    processes: Vec<Child>,
    db: Option<DevDb>,
}

/// The config tests run the server with: a quick rescuer so deadlines are noticed at once.
pub fn test_config() -> Config {
    Config {
        rescue_interval: Duration::from_millis(200),
        seal_interval: Duration::from_millis(100),
        auth_cache_ttl: Duration::from_secs(1),
        ..Config::default()
    }
}

/// A fresh database named `accrete_{what}_...` on the test server (`ACCRETE_TEST_DATABASE_URL`),
/// dropped when the returned handle is.
pub async fn test_db(what: &str) -> DevDb {
    let admin = std::env::var("ACCRETE_TEST_DATABASE_URL").unwrap_or_else(|_| LOCAL_SERVER.into());
    let name = format!("accrete_{what}_{}_{}", std::process::id(), rand_suffix());
    DevDb::on_server(&admin, &name)
        .await
        .expect("creating a test database (is PostgreSQL running at 127.0.0.1:5432?)")
}

impl TestApp {
    /// A fresh database and a server on it, in this process.
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(test_config()).await
    }

    /// A fresh database and a server on it with `config`, in this process. With TLS the URL is
    /// `https://localhost:PORT` (the test certificate names `localhost`).
    pub async fn spawn_with(config: Config) -> TestApp {
        init_tracing();
        Self::start(test_db("test").await, config).await
    }

    /// A server on a database of the test's, e.g. a private cluster it can stop and start.
    pub async fn spawn_on(db: DevDb) -> TestApp {
        init_tracing();
        Self::start(db, test_config()).await
    }

    async fn start(db: DevDb, config: Config) -> TestApp {
        let store = Store::connect(&db.url, 10)
            .await
            .expect("connecting and migrating");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_url = match config.tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://{addr}"),
        };
        let (_, api_key) = accrete_server::admin::create_key(
            &store,
            accrete_server::auth::Role::Researcher,
            "test harness",
        )
        .await
        .expect("minting the harness's API key");
        let mut app = TestApp {
            db_url: db.url.clone(),
            store,
            addr,
            server_url,
            config,
            api_key,
            server: None,
            workers: Vec::new(),
            processes: Vec::new(),
            db: Some(db),
        };
        app.serve_on(listener);
        app
    }

    fn serve_on(&mut self, listener: tokio::net::TcpListener) {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(accrete_server::run(
            self.store.clone(),
            self.config.clone(),
            listener,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
        self.server = Some(Server::InProcess { stop, task });
    }

    /// Stops the server: gracefully if in-process, with SIGKILL if it is a process.
    pub async fn stop_server(&mut self) {
        match self.server.take() {
            Some(Server::InProcess { stop, task }) => {
                let _ = stop.send(true);
                task.await.unwrap().unwrap();
            }
            Some(Server::Process(mut child)) => {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            None => {}
        }
    }

    /// Starts the server again on the same address, in this process.
    pub async fn restart_server(&mut self) {
        self.stop_server().await;
        let listener = bind_retrying(self.addr).await;
        self.serve_on(listener);
    }

    /// Replaces the server with the real binary in its own process, on the same address.
    pub async fn server_as_process(&mut self, bins: &Binaries) {
        self.stop_server().await;
        let child = Command::new(bins.server)
            .args([
                "--database-url",
                &self.db_url,
                "--listen",
                &self.addr.to_string(),
            ])
            .args([
                "--rescue-interval-secs",
                "0.2",
                "--auth-cache-ttl-secs",
                "1",
                "--plaintext",
            ])
            .stdout(Stdio::null())
            .stderr(log_stdio())
            .spawn()
            .expect("starting it-server");
        self.server = Some(Server::Process(child));
        self.wait_serving().await;
    }

    async fn wait_serving(&self) {
        let start = Instant::now();
        while Client::connect(&self.server_url).await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "server did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The database the app runs on.
    pub fn db(&self) -> &DevDb {
        self.db.as_ref().expect("the app's database")
    }

    /// Starts an in-process worker with `slots` slots, returning its index.
    pub fn start_worker(&mut self, name: &str, slots: usize) -> usize {
        let mut config = accrete_worker::WorkerConfig::new(self.server_url.clone());
        config.slots = slots;
        config.prefetch = slots;
        config.name = Some(name.to_string());
        self.start_worker_with(config)
    }

    /// Starts an in-process worker with a config of the test's, returning its index.
    pub fn start_worker_with(&mut self, config: accrete_worker::WorkerConfig) -> usize {
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(accrete_worker::run(config, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        self.workers.push((stop, task));
        self.workers.len() - 1
    }

    /// Shuts an in-process worker down (as ctrl-c would) and returns its summary.
    pub async fn stop_worker(&mut self, index: usize) -> accrete_worker::WorkerSummary {
        self.signal_worker_stop(index);
        (&mut self.workers[index].1).await.unwrap().unwrap()
    }

    /// Tells an in-process worker to shut down (as ctrl-c would) without waiting for it: the
    /// test can act while it stops, then collect its summary with `stop_worker`.
    pub fn signal_worker_stop(&self, index: usize) {
        let _ = self.workers[index].0.send(true);
    }

    /// Starts a worker as a real process (the `accrete-worker` command line), returning its index.
    pub fn start_worker_process(&mut self, bins: &Binaries, name: &str, slots: usize) -> usize {
        self.start_worker_command(bins.worker, &[], name, slots)
    }

    /// Starts a worker as a process from any command that ends in the `accrete-worker` command
    /// line, e.g. a cross-built binary behind an emulator (`qemu-aarch64 -L SYSROOT BINARY`);
    /// the worker flags are appended to `args`. Returns its index, as `start_worker_process`.
    pub fn start_worker_command(
        &mut self,
        program: &str,
        args: &[&str],
        name: &str,
        slots: usize,
    ) -> usize {
        let child = Command::new(program)
            .args(args)
            .args([
                "--server",
                &self.server_url,
                "--name",
                name,
                "--slots",
                &slots.to_string(),
                "--credential-file",
            ])
            .arg(self.credential_file(name))
            .stdout(Stdio::null())
            .stderr(log_stdio())
            .spawn()
            .unwrap_or_else(|e| panic!("starting worker {name} with {program} {args:?}: {e}"));
        self.processes.push(child);
        self.processes.len() - 1
    }

    /// Where process worker `name` of this test keeps its credential (a restarted worker with
    /// the same name resumes as the same worker).
    pub fn credential_file(&self, name: &str) -> std::path::PathBuf {
        let db = self.db_url.rsplit('/').next().unwrap_or("db");
        std::env::temp_dir().join(format!("accrete-it-{db}-{name}.credential"))
    }

    /// Kills a worker process with SIGKILL: no chance to report or hand anything back.
    pub fn kill_worker_process(&mut self, index: usize) {
        let child = &mut self.processes[index];
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A research and ledger client sending the harness's researcher key.
    pub async fn client(&self) -> Client {
        self.client_with(Some(&self.api_key)).await
    }

    /// A client sending `key` (or none).
    pub async fn client_with(&self, key: Option<&str>) -> Client {
        Client::connect_with(&self.server_url, &Default::default(), key)
            .await
            .expect("connecting")
    }

    /// Mints an API key of `role` straight in the database, as `accrete-server keys create`.
    pub async fn mint_key(&self, role: accrete_server::auth::Role, name: &str) -> String {
        accrete_server::admin::create_key(&self.store, role, name)
            .await
            .expect("minting an API key")
            .1
    }

    /// A raw worker-service client, for tests that play a (mis)behaving worker by hand.
    pub async fn worker_client(&self) -> WorkerServiceClient<Channel> {
        let channel = Channel::from_shared(self.server_url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        WorkerServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// A hand-driven worker's FetchWork: what it was handed, or the refusal.
    pub async fn fetch_as(
        &self,
        auth: &pb::WorkerAuth,
        max: u32,
        resume: bool,
    ) -> Result<Vec<pb::Assignment>, tonic::Status> {
        self.worker_client()
            .await
            .fetch_work(pb::FetchWorkRequest {
                auth: Some(auth.clone()),
                max,
                resume,
            })
            .await
            .map(|r| r.into_inner().assignments)
    }

    /// A hand-driven worker's ReportResults: one ack per result, in order.
    pub async fn report_as(
        &self,
        auth: &pb::WorkerAuth,
        results: Vec<pb::ReplicaResult>,
    ) -> Vec<pb::ReportAck> {
        self.worker_client()
            .await
            .report_results(pb::ReportResultsRequest {
                auth: Some(auth.clone()),
                results,
                fetch: 0,
            })
            .await
            .expect("ReportResults")
            .into_inner()
            .acks
    }

    /// Registers a hand-driven worker and returns its credentials.
    pub async fn register(&self, name: &str) -> pb::WorkerAuth {
        self.register_as(name, "", "x86_64").await
    }

    /// Creates a volunteer account; returns its key.
    pub async fn create_account(&self, name: &str) -> String {
        self.worker_client()
            .await
            .create_account(pb::CreateAccountRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner()
            .account_key
    }

    /// Registers a hand-driven worker on `arch`/linux, joining the volunteer account whose key
    /// is `account_key` (empty: none).
    pub async fn register_as(&self, name: &str, account_key: &str, arch: &str) -> pb::WorkerAuth {
        let r = self
            .worker_client()
            .await
            .register(pb::RegisterRequest {
                name: name.into(),
                account_key: account_key.into(),
                platform: Some(pb::Platform {
                    arch: arch.into(),
                    os: "linux".into(),
                    cores: 1,
                    memory_bytes: 1 << 30,
                    runtime: "hand-driven".into(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        pb::WorkerAuth {
            worker_id: r.worker_id,
            token: r.token,
        }
    }

    /// Uploads a module and submits one study over `inputs`.
    pub async fn submit(
        &self,
        wasm: &[u8],
        inputs: Vec<Vec<u8>>,
        policy: pb::ReplicationPolicy,
        bounds: pb::ResourceBounds,
    ) -> pb::SubmitStudyResponse {
        let mut c = self.client().await;
        let module_hash = c.put_module(wasm.to_vec(), "test").await.unwrap();
        c.research
            .submit_study(pb::SubmitStudyRequest {
                name: "test study".into(),
                description: String::new(),
                module_hash,
                policy: Some(policy),
                bounds: Some(bounds),
                tolerance: vec![],
                work_units: inputs
                    .into_iter()
                    .map(|input| pb::WorkUnitSpec { input })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits until no work unit of `study` is pending.
    pub async fn wait_done(&self, study: u64, timeout: Duration) -> pb::StudyStatus {
        self.client()
            .await
            .wait(study, Some(timeout), |_, _| {})
            .await
            .unwrap()
    }

    /// Every finding of a study, with outputs.
    pub async fn findings(&self, study: u64) -> Vec<pb::Finding> {
        let mut c = self.client().await;
        let list = c
            .findings(pb::ListFindingsRequest {
                study_id: study,
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        for f in list {
            let full = c
                .ledger
                .get_finding(pb::GetFindingRequest { finding_id: f.id })
                .await
                .unwrap();
            out.push(full.into_inner());
        }
        out
    }

    /// Stops everything and drops the database.
    pub async fn shutdown(mut self) {
        for (stop, _) in &self.workers {
            let _ = stop.send(true);
        }
        for (_, task) in std::mem::take(&mut self.workers) {
            if !task.is_finished() {
                task.await.unwrap().unwrap();
            }
        }
        for mut p in std::mem::take(&mut self.processes) {
            let _ = p.kill();
            let _ = p.wait();
        }
        self.stop_server().await;
        let creds = self.credential_file("");
        if let (Some(dir), Some(prefix)) = (creds.parent(), creds.file_name()) {
            let prefix = prefix.to_string_lossy().replace(".credential", "");
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        self.store.close().await;
        if let Some(db) = self.db.take() {
            db.stop().await.unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        // A failed test still kills the processes it started; the database is dropped by DevDb.
        for p in &mut self.processes {
            let _ = p.kill();
        }
        if let Some(Server::Process(p)) = &mut self.server {
            let _ = p.kill();
        }
    }
}

async fn bind_retrying(addr: SocketAddr) -> tokio::net::TcpListener {
    let start = Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("rebinding {addr}: {e}"),
        }
    }
}

fn log_stdio() -> Stdio {
    if std::env::var_os("TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

/// Polls `check` until it returns true, or panics after `timeout` with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
