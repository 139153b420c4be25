//! The operator's side, on real processes and sockets: TLS with a CA made in the test, rate
//! limits, load shedding, timeouts and message size caps, health checking and reflection,
//! Prometheus metrics, request ids, configuration precedence, and graceful shutdown on SIGTERM.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use accrete::client::Client;
use accrete_proto::transport::ClientTls;
use accrete_server::{CallLimits, Config, Limits, TlsIdentity};
use accrete_tests::{TestApp, test_config, v1 as pb};
use tonic::Code;

use crate::{BINS, TIMEOUT, policy, tiny_model_inputs};

/// A CA and a server certificate for `localhost` signed by it, as PEM: (ca, cert, key).
fn make_ca_and_cert() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "accrete test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// A scratch directory under the target dir, removed by the caller's test at its end.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("accrete-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn log_stdio() -> Stdio {
    if std::env::var_os("TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

fn code_of<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Polls a study through `client` until nothing is pending.
async fn wait_done(client: &mut Client, study: u64) -> pb::StudyStatus {
    client
        .wait(study, Some(TIMEOUT), |_, _| {})
        .await
        .expect("waiting for the study")
}

async fn submit_with(client: &mut Client, inputs: Vec<Vec<u8>>, bounds: pb::ResourceBounds) -> u64 {
    let module_hash = client
        .put_module(accrete_tasks::TINY_MODEL.to_vec(), "tiny-model")
        .await
        .unwrap();
    client
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "ops study".into(),
            module_hash,
            policy: Some(policy(2)),
            bounds: Some(bounds),
            work_units: inputs
                .into_iter()
                .map(|input| pb::WorkUnitSpec { input })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .study_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_workers_and_clients_that_trust_the_ca_and_refuses_the_rest() {
    let (ca, cert, key) = make_ca_and_cert();
    let dir = scratch("tls");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let app = TestApp::spawn_with(Config {
        tls: Some(TlsIdentity {
            cert_pem: cert.into_bytes(),
            key_pem: key.into_bytes(),
        }),
        ..test_config()
    })
    .await;
    assert!(app.server_url.starts_with("https://"));

    // The CLI's client with --ca-file connects and submits.
    let tls = ClientTls::from_ca_file(Some(&ca_file)).unwrap();
    let mut client = Client::connect_with(&app.server_url, &tls, Some(&app.api_key))
        .await
        .unwrap();
    let study = submit_with(&mut client, tiny_model_inputs(4, 10), Default::default()).await;

    // Real worker processes run the study over TLS: one names the CA in its config file, the
    // other in the environment.
    let worker_toml = dir.join("worker.toml");
    std::fs::write(
        &worker_toml,
        format!(
            "server = \"{}\"\nca-file = \"{}\"\nname = \"tls-a\"\nslots = 1\n",
            app.server_url,
            ca_file.display()
        ),
    )
    .unwrap();
    let workers = [
        Command::new(BINS.worker)
            .arg("--config")
            .arg(&worker_toml)
            .env_remove("ACCRETE_SERVER")
            .env_remove("ACCRETE_CA_FILE")
            .stdout(Stdio::null())
            .stderr(log_stdio())
            .spawn()
            .unwrap(),
        Command::new(BINS.worker)
            .args([
                "--server",
                &app.server_url,
                "--name",
                "tls-b",
                "--slots",
                "1",
            ])
            .env("ACCRETE_CA_FILE", &ca_file)
            .stdout(Stdio::null())
            .stderr(log_stdio())
            .spawn()
            .unwrap(),
    ]
    .map(Kill);
    let status = wait_done(&mut client, study).await;
    assert_eq!((status.validated, status.failed), (4, 0), "{status:?}");

    // Without the CA (the system's roots), the handshake fails and says why.
    let err = Client::connect(&app.server_url)
        .await
        .err()
        .expect("must fail");
    let text = format!("{err:#}");
    assert!(
        text.contains("invalid peer certificate") && text.contains("UnknownIssuer"),
        "unclear TLS error: {text}"
    );
    // Plaintext to a TLS listener fails too.
    let plain = app.server_url.replace("https://", "http://");
    let refused = match Client::connect(&plain).await {
        Err(_) => true,
        Ok(mut c) => c.status(study).await.is_err(),
    };
    assert!(refused, "a plaintext client must not get through");
    // A CA file with an http:// URL is a mistake, said so.
    let err = Client::connect_with(&plain, &tls, Some(&app.api_key))
        .await
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("plaintext"), "{err:#}");

    drop(workers);
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A process killed when the test ends, however it ends.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn limited(calls: CallLimits, limits: Limits) -> Config {
    Config {
        calls,
        limits,
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_rate_limit_is_refused_and_the_server_keeps_serving() {
    let app = TestApp::spawn_with(limited(
        CallLimits {
            rate_per_sec: NonZeroU32::new(5),
            rate_burst: NonZeroU32::new(5),
            register_per_min: NonZeroU32::new(3),
            ..Default::default()
        },
        Limits::default(),
    ))
    .await;
    // Registrations: per peer address, three a minute. They also count against the address's
    // call budget (5), leaving two calls in it.
    let mut codes = Vec::new();
    let mut registered = Vec::new();
    for i in 0..4 {
        let r = app
            .worker_client()
            .await
            .register(pb::RegisterRequest {
                name: format!("r{i}"),
                platform: Some(pb::Platform {
                    arch: "x86_64".into(),
                    os: "linux".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                registered.push(pb::WorkerAuth {
                    worker_id: r.worker_id,
                    token: r.token,
                });
                codes.push(Code::Ok);
            }
            Err(s) => {
                assert!(s.message().contains("registrations"), "{s:?}");
                codes.push(s.code());
            }
        }
    }
    assert_eq!(
        codes,
        [Code::Ok, Code::Ok, Code::Ok, Code::ResourceExhausted],
        "the fourth registration in a minute is refused"
    );
    // Making accounts shares the budget: it needs no credential either.
    let account = app
        .worker_client()
        .await
        .create_account(pb::CreateAccountRequest {
            name: "flood".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(account.code(), Code::ResourceExhausted, "{account:?}");
    assert!(account.message().contains("registrations"), "{account:?}");

    // Research calls without credentials count against the peer address: a burst of 20 gets
    // RESOURCE_EXHAUSTED for most of it (the rest reach the handler, which wants a key).
    let mut client = app.client_with(None).await;
    let mut exhausted = 0;
    for _ in 0..20 {
        match client
            .research
            .get_status(pb::GetStatusRequest { study_id: 0 })
            .await
        {
            Err(s) if s.code() == Code::Unauthenticated => {}
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(s.message().contains("rate limit"), "{}", s.message());
                exhausted += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(exhausted >= 14, "only {exhausted} of 20 refused");

    // A call carrying an `authorization` credential counts against that credential, not the
    // address (whatever the handler then makes of the key, the rate limit let it through).
    let mut keyed = tonic::Request::new(pb::GetStatusRequest { study_id: 0 });
    keyed
        .metadata_mut()
        .insert("authorization", "Bearer ops-test-key".parse().unwrap());
    let code = code_of(client.research.get_status(keyed).await);
    assert_ne!(code, Code::ResourceExhausted, "a key has its own budget");

    // A worker's calls count against its own id, not the address, which is out of budget now:
    // the worker gets its own burst of 5, then is refused too.
    let mut w = app.worker_client().await;
    let mut worker_codes = Vec::new();
    for _ in 0..8 {
        let r = w
            .heartbeat(pb::HeartbeatRequest {
                auth: Some(registered[0].clone()),
                ..Default::default()
            })
            .await;
        worker_codes.push(code_of(r));
    }
    let ok = worker_codes.iter().filter(|c| **c == Code::Ok).count();
    assert!(
        (5..=6).contains(&ok),
        "a worker gets its burst of 5: {worker_codes:?}"
    );
    assert_eq!(worker_codes[7], Code::ResourceExhausted, "{worker_codes:?}");

    // The budget refills: the server keeps serving (the address's call reaches the handler,
    // which asks for a key, instead of being refused by the rate limit).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let code = code_of(
        client
            .research
            .get_status(pb::GetStatusRequest { study_id: 0 })
            .await,
    );
    assert_eq!(code, Code::Unauthenticated, "served again after the burst");
    app.shutdown().await;
}

/// Holds an exclusive lock on `studies` so every call that reads it blocks until dropped.
async fn lock_studies(app: &TestApp) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = app.store.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE studies IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_concurrency_limit_are_shed_at_once_and_slow_calls_time_out() {
    let app = TestApp::spawn_with(limited(
        CallLimits {
            max_concurrent: Some(2),
            request_timeout: Some(Duration::from_secs(3)),
            ..Default::default()
        },
        Limits::default(),
    ))
    .await;
    let client = app.client().await;
    let lock = lock_studies(&app).await;
    // Two calls block on the lock and hold both permits.
    let blocked: Vec<_> = (0..2)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = c
                    .research
                    .get_status(pb::GetStatusRequest { study_id: 0 })
                    .await;
                (code_of(r), started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The third is shed promptly, not queued.
    let started = Instant::now();
    let r = client
        .clone()
        .research
        .get_status(pb::GetStatusRequest { study_id: 0 })
        .await;
    let shed_after = started.elapsed();
    let status = r.expect_err("must be shed");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("overloaded"), "{status:?}");
    assert!(
        shed_after < Duration::from_secs(1),
        "shedding took {shed_after:?}"
    );
    // The blocked calls end at the request timeout with DEADLINE_EXCEEDED.
    for b in blocked {
        let (code, took) = b.await.unwrap();
        assert_eq!(code, Code::DeadlineExceeded);
        assert!(took < Duration::from_secs(6), "timed out after {took:?}");
    }
    drop(lock);
    // Permits were released: the server serves again.
    client
        .clone()
        .research
        .get_status(pb::GetStatusRequest { study_id: 0 })
        .await
        .expect("served after the lock is gone");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_modules_inputs_outputs_and_requests_are_refused_each_by_its_cap() {
    let limits = Limits {
        max_module_bytes: 100_000,
        max_input_bytes: 1000,
        max_output_bytes: 4096,
        max_report_batch: 2,
        small_message_bytes: 64 << 10,
        ..Limits::default()
    };
    let app = TestApp::spawn_with(limited(CallLimits::default(), limits)).await;
    let mut client = app.client().await;

    // Modules: far over the cap, refused from the message header; just over, by the handler.
    for (size, code, says) in [
        (300_000, Code::ResourceExhausted, "module upload message"),
        (100_001, Code::InvalidArgument, "over the cap of 100000"),
    ] {
        let err = client
            .research
            .put_module(pb::PutModuleRequest {
                wasm: vec![0u8; size],
                name: "big".into(),
            })
            .await
            .expect_err("oversized module");
        assert_eq!(err.code(), code, "{err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }

    // Inputs: each capped (a small valid module is enough, nothing runs).
    let wasm = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
        .unwrap();
    let module_hash = client.put_module(wasm, "tiny").await.unwrap();
    let err = client
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "big input".into(),
            module_hash: module_hash.clone(),
            work_units: vec![pb::WorkUnitSpec {
                input: vec![b'x'; 2000],
            }],
            ..Default::default()
        })
        .await
        .expect_err("oversized input");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("input of 2000 bytes"),
        "{}",
        err.message()
    );

    // Outputs: a study's output cap is refused above the server's cap, and a reported output
    // over the study's cap is rejected for that replica.
    let err = client
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "big outputs".into(),
            module_hash: module_hash.clone(),
            bounds: Some(pb::ResourceBounds {
                output_bytes: 5000,
                ..Default::default()
            }),
            work_units: vec![pb::WorkUnitSpec {
                input: b"{}".to_vec(),
            }],
            ..Default::default()
        })
        .await
        .expect_err("output cap over the server's");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("output_bytes"), "{}", err.message());
    let study = client
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "small outputs".into(),
            module_hash,
            policy: Some(policy(1)),
            bounds: Some(pb::ResourceBounds {
                output_bytes: 1000,
                ..Default::default()
            }),
            work_units: vec![pb::WorkUnitSpec {
                input: b"{}".to_vec(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let auth = app.register("big-output").await;
    let mut w = app.worker_client().await;
    let fetched = w
        .fetch_work(pb::FetchWorkRequest {
            auth: Some(auth.clone()),
            max: 1,
            resume: false,
        })
        .await
        .unwrap()
        .into_inner();
    let replica = fetched.assignments[0].replica_id;
    let success = |output: Vec<u8>| pb::ReplicaResult {
        replica_id: replica,
        wall_micros: 1,
        outcome: Some(pb::replica_result::Outcome::Success(pb::Success {
            output_hash: blake3::hash(&output).as_bytes().to_vec(),
            output,
            fuel_used: 1,
        })),
    };
    let ack = w
        .report_results(pb::ReportResultsRequest {
            auth: Some(auth.clone()),
            results: vec![success(vec![b' '; 2000])],
            fetch: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .acks
        .remove(0);
    // Acknowledged, and recorded as the error it is: the output itself is not kept.
    assert_eq!(ack.status(), pb::ReportStatus::Accepted, "{ack:?}");
    let (state, kind): (String, Option<String>) =
        sqlx::query_as("SELECT state::text, error_kind FROM replicas WHERE id = $1")
            .bind(replica as i64)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), kind.as_deref()),
        ("error", Some("output_too_large"))
    );
    // A report message beyond what its batch of capped outputs can be is refused whole.
    let err = w
        .report_results(pb::ReportResultsRequest {
            auth: Some(auth.clone()),
            results: vec![success(vec![b' '; 200_000])],
            fetch: 0,
        })
        .await
        .expect_err("oversized report");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("report message"),
        "{}",
        err.message()
    );

    // Any other request: the small-message cap.
    let err = w
        .register(pb::RegisterRequest {
            name: "n".repeat(100_000),
            platform: Some(pb::Platform {
                arch: "x86_64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("oversized request");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("request message"),
        "{}",
        err.message()
    );

    // Nothing was stored, and the server keeps serving.
    let s = client.status(study.study_id).await.unwrap();
    assert_eq!(s.studies[0].validated, 0, "{s:?}");
    assert_eq!(crate::count(&app, "SELECT count(*) FROM studies").await, 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_and_reflection_lists_the_services() {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = TestApp::spawn_with(Config {
        health_interval: Duration::from_millis(200),
        ..test_config()
    })
    .await;
    let channel = tonic::transport::Channel::from_shared(app.server_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = HealthClient::new(channel.clone());
    for service in ["", "accrete.v1.WorkerService", "accrete.v1.LedgerService"] {
        wait_health(&health, service, ServingStatus::Serving).await;
    }

    // Reflection: the services and the descriptor of one of them.
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let requests = tokio_stream::iter(vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "accrete.v1.WorkerService".into(),
            )),
        },
    ]);
    let mut responses = reflection
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("{first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "accrete.v1.WorkerService",
        "accrete.v1.ResearchService",
        "accrete.v1.LedgerService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let second = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("{second:?}");
    };
    assert!(
        files
            .file_descriptor_proto
            .iter()
            .any(|f| f.windows(b"FetchWork".len()).any(|w| w == b"FetchWork")),
        "the descriptor names the worker service's methods"
    );

    // The database goes away: NOT_SERVING; it comes back: SERVING again.
    let admin = sqlx::PgPool::connect(accrete_server::devdb::LOCAL_SERVER)
        .await
        .unwrap();
    let db = app.db_url.rsplit('/').next().unwrap().to_string();
    let set_allow = |allow: bool| {
        let admin = admin.clone();
        let db = db.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS {allow}"
            )))
            .execute(&admin)
            .await
            .unwrap();
            if !allow {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                )
                .bind(&db)
                .execute(&admin)
                .await
                .unwrap();
            }
        }
    };
    set_allow(false).await;
    wait_health(&health, "", ServingStatus::NotServing).await;
    wait_health(
        &health,
        "accrete.v1.WorkerService",
        ServingStatus::NotServing,
    )
    .await;
    set_allow(true).await;
    wait_health(&health, "", ServingStatus::Serving).await;
    admin.close().await;
    app.shutdown().await;
}

/// Polls the health service until `service` reports `want` (15 s at most).
async fn wait_health(
    health: &tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
    service: &str,
    want: tonic_health::pb::health_check_response::ServingStatus,
) {
    let start = Instant::now();
    loop {
        let got = health
            .clone()
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map(|r| r.into_inner().status());
        if got.as_ref().is_ok_and(|s| *s == want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{service:?} is {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One `GET /metrics` over a plain socket.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the first sample line starting with `series` (name and labels).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_queue_work_calls_and_workers() {
    let metrics = free_port();
    let mut app = TestApp::spawn_with(Config {
        metrics_listen: Some(metrics),
        ..test_config()
    })
    .await;
    let mut client = app.client().await;
    let study = submit_with(&mut client, tiny_model_inputs(6, 10), Default::default()).await;
    let before = scrape(metrics).await;
    assert_eq!(
        sample(
            &before,
            &format!("accrete_queue_depth{{study=\"{study}\"}}")
        ),
        Some(12.0),
        "6 units x quorum 2 waiting:\n{before}"
    );
    assert_eq!(sample(&before, "accrete_validations"), Some(0.0));
    assert_eq!(sample(&before, "accrete_database_up"), Some(1.0));

    app.start_worker("m1", 2);
    app.start_worker("m2", 2);
    let status = wait_done(&mut client, study).await;
    assert_eq!(status.validated, 6);
    // A refused call, counted by its code.
    let _ = client.status(9999).await;

    let after = scrape(metrics).await;
    assert_eq!(sample(&after, "accrete_validations"), Some(6.0), "{after}");
    assert_eq!(sample(&after, "accrete_replicas_in_flight"), Some(0.0));
    assert_eq!(
        sample(&after, &format!("accrete_queue_depth{{study=\"{study}\"}}")),
        None,
        "a drained study leaves the queue gauge"
    );
    assert!(sample(&after, "accrete_results{verdict=\"valid\"}").unwrap() >= 12.0);
    assert_eq!(
        sample(&after, "accrete_results{verdict=\"invalid\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&after, "accrete_workers{platform=\"x86_64/linux\"}"),
        Some(2.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "accrete_grpc_calls_total{code=\"OK\",method=\"WorkerService/FetchWork\"}"
        )
        .unwrap()
            >= 1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "accrete_grpc_calls_total{code=\"NOT_FOUND\",method=\"ResearchService/GetStatus\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{after}"
    );
    assert!(
        sample(
            &after,
            "accrete_grpc_call_seconds_count{method=\"WorkerService/ReportResults\"}"
        )
        .unwrap()
            >= 1.0,
        "{after}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_carries_a_request_id_back() {
    let app = TestApp::spawn().await;
    let mut client = app.client().await;
    let mut req = tonic::Request::new(pb::GetStatusRequest { study_id: 0 });
    req.metadata_mut()
        .insert("x-request-id", "test-req-42".parse().unwrap());
    let r = client.research.get_status(req).await.unwrap();
    assert_eq!(
        r.metadata().get("x-request-id").unwrap().to_str().unwrap(),
        "test-req-42"
    );
    // Generated when absent, on errors too.
    let err = client
        .research
        .get_status(pb::GetStatusRequest { study_id: 777 })
        .await
        .unwrap_err();
    let id = err.metadata().get("x-request-id").expect("an id on errors");
    assert_eq!(id.to_str().unwrap().len(), 36, "a UUID: {id:?}");
    app.shutdown().await;
}

/// A server process on `db_url` with `args`, logging to `log` (its stdout).
fn server_process(db_url: &str, args: &[&str], log: &Path) -> Child {
    Command::new(BINS.server)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "info,accrete_server=debug,sqlx=warn")
        .env_remove("ACCRETE_LISTEN")
        .args(args)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(log_stdio())
        .spawn()
        .expect("starting it-server")
}

async fn wait_up(url: &str) {
    let start = Instant::now();
    while Client::connect(url).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{url} did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Waits for a process to exit, at most `limit`; returns its exit status and when it exited.
async fn wait_exit(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process still running after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_calls_and_exits_within_the_shutdown_timeout() {
    let app = TestApp::spawn().await;
    let dir = scratch("sigterm");
    let addr = free_port();
    let url = format!("http://{addr}");
    let mut server = server_process(
        &app.db_url,
        &[
            "--listen",
            &addr.to_string(),
            "--plaintext",
            "--shutdown-timeout",
            "3",
            "--log-format",
            "json",
        ],
        &dir.join("server.log"),
    );
    wait_up(&url).await;
    let client = Client::connect_with(&url, &Default::default(), Some(&app.api_key))
        .await
        .unwrap();

    // A call in flight (blocked on a lock), and a stream that never ends by itself.
    let lock = lock_studies(&app).await;
    let mut c = client.clone();
    let in_flight = tokio::spawn(async move {
        let mut req = tonic::Request::new(pb::GetStatusRequest { study_id: 0 });
        req.metadata_mut()
            .insert("x-request-id", "drained-call".parse().unwrap());
        code_of(c.research.get_status(req).await)
    });
    let mut c = client.clone();
    let mut watch = c
        .ledger
        .watch_ledger(pb::ExportLedgerRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;

    sigterm(&server);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections once shutting down.
    assert!(
        Client::connect(&url).await.is_err(),
        "the listener must be closed after SIGTERM"
    );
    // The in-flight call finishes normally once its lock is released: drained, not cut.
    drop(lock);
    assert_eq!(in_flight.await.unwrap(), Code::Ok);
    // The endless stream holds the drain open until the shutdown timeout; then the process
    // exits cleanly anyway.
    let (status, after) = wait_exit(&mut server, Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        after >= Duration::from_secs(2) && after < Duration::from_secs(8),
        "exited {after:?} after the drain began (timeout 3 s)"
    );
    let _ = watch.message().await;

    // Logs are JSON lines, and the drained call's line carries its request id.
    let log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    assert!(
        log.lines()
            .all(|l| l.trim().is_empty() || l.starts_with('{')),
        "{log}"
    );
    assert!(log.contains("shutting down"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("drained-call") && l.contains("call finished")),
        "the drained call is logged with its request id:\n{log}"
    );

    // With nothing in flight, SIGTERM exits at once.
    let addr = free_port();
    let url = format!("http://{addr}");
    let mut server = server_process(
        &app.db_url,
        &["--listen", &addr.to_string(), "--plaintext"],
        &dir.join("server2.log"),
    );
    wait_up(&url).await;
    sigterm(&server);
    let (status, after) = wait_exit(&mut server, Duration::from_secs(10)).await;
    assert!(status.success());
    assert!(
        after < Duration::from_secs(3),
        "idle shutdown took {after:?}"
    );

    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_then_environment_then_file_and_plaintext_is_explicit() {
    let app = TestApp::spawn().await;
    let dir = scratch("config");
    // Without TLS files or --plaintext the server refuses to start, saying why.
    let out = Command::new(BINS.server)
        .env("DATABASE_URL", &app.db_url)
        .env_remove("ACCRETE_PLAINTEXT")
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--plaintext"), "{err}");

    // The file sets the listen address, plaintext and a metrics address; the environment
    // overrides the metrics address; a flag overrides the environment's request timeout.
    let grpc = free_port();
    let file_metrics = free_port();
    let env_metrics = free_port();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{grpc}\"\nplaintext = true\nmetrics-listen = \"{file_metrics}\"\n\
             request_timeout_secs = 1\nshutdown-timeout = 1\n"
        ),
    )
    .unwrap();
    let mut server = Command::new(BINS.server)
        .env("DATABASE_URL", &app.db_url)
        .env("ACCRETE_METRICS_LISTEN", env_metrics.to_string())
        .env("ACCRETE_REQUEST_TIMEOUT_SECS", "2")
        .args(["--request-timeout-secs", "30", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log_stdio())
        .spawn()
        .unwrap();
    wait_up(&format!("http://{grpc}")).await;
    // The gRPC socket accepts as soon as it is bound, before the server binds its metrics
    // listener: wait for the one that should be there before asking about the one that should not.
    let start = Instant::now();
    while tokio::net::TcpStream::connect(env_metrics).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no metrics at {env_metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokio::net::TcpStream::connect(file_metrics).await.is_err(),
        "the environment's metrics address wins over the file's"
    );
    let text = scrape(env_metrics).await;
    assert!(text.contains("accrete_database_up 1"), "{text}");
    // The flag's 30 s timeout (not the environment's 2 s nor the file's 1 s): a call blocked for
    // 2.5 s still succeeds.
    let lock = lock_studies(&app).await;
    let mut c = Client::connect_with(
        &format!("http://{grpc}"),
        &Default::default(),
        Some(&app.api_key),
    )
    .await
    .unwrap();
    let call = tokio::spawn(async move {
        code_of(
            c.research
                .get_status(pb::GetStatusRequest { study_id: 0 })
                .await,
        )
    });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    drop(lock);
    assert_eq!(call.await.unwrap(), Code::Ok);

    // --help documents the file and the environment variables.
    let help = Command::new(BINS.server).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for want in [
        "--config",
        "ACCRETE_TLS_CERT",
        "--plaintext",
        "--metrics-listen",
        "--shutdown-timeout",
    ] {
        assert!(help.contains(want), "--help lacks {want}");
    }

    sigterm(&server);
    wait_exit(&mut server, Duration::from_secs(10)).await;
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
