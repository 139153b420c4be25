//! Faults: a worker process killed mid-task, a server killed mid-study, PostgreSQL restarted
//! under load, a report whose response is lost after the server committed it, and a claim
//! stuck behind a lock. Nothing is lost, nothing is recorded twice, and the ledger still
//! verifies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{BINS, TIMEOUT, bounds, count, policy, success, tiny_model_inputs};
use accrete_server::devdb::DevDb;
use accrete_server::ledger::Verdict;
use accrete_tests::{TestApp, eventually, v1 as pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Every work unit of the app is validated exactly once: one finding each, every agreeing
/// replica a success with the finding's hash, every finding chained once, and the ledger
/// verifies end to end as `accrete ledger verify` would.
async fn assert_each_validated_once(app: &TestApp, units: i64) {
    assert_eq!(
        count(
            app,
            "SELECT count(*) FROM work_units WHERE state = 'validated'"
        )
        .await,
        units
    );
    assert_eq!(count(app, "SELECT count(*) FROM findings").await, units);
    assert_eq!(
        count(app, "SELECT count(DISTINCT wu_id) FROM findings").await,
        units
    );
    assert_eq!(
        count(
            app,
            "SELECT count(*) FROM findings f JOIN replicas r ON r.id = ANY(f.agreeing_replicas)
             WHERE r.state <> 'success' OR r.output_hash <> f.output_hash OR r.wu_id <> f.wu_id",
        )
        .await,
        0
    );
    // A worker's reputation counts each of its results, and each of its timeouts, at most
    // once (a late result after a timeout counts both, by design).
    assert_eq!(
        count(
            app,
            "SELECT count(*) FROM workers w
             WHERE w.valid_count + w.invalid_count + w.error_count >
                   (SELECT count(*) FROM replicas r
                    WHERE r.worker_id = w.id AND r.state IN ('success', 'error'))
                OR w.timeout_count >
                   (SELECT count(*) FROM replicas r WHERE r.worker_id = w.id)",
        )
        .await,
        0
    );
    eventually(TIMEOUT, "every finding sealed into the ledger", || async {
        count(app, "SELECT count(*) FROM unsealed_findings").await == 0
    })
    .await;
    assert_eq!(
        count(
            app,
            "SELECT count(DISTINCT l.seq) FROM findings f
             JOIN ledger l ON l.finding_id = f.id AND l.kind = 'finding'"
        )
        .await,
        units
    );
    let ledger_len = count(app, "SELECT count(*) FROM ledger").await;
    let verdict = accrete::ledger::verify_remote(&mut app.client().await)
        .await
        .unwrap();
    assert!(
        matches!(verdict, Verdict::Intact { len, .. } if len as i64 == ledger_len),
        "{verdict:?}, {ledger_len} entries stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_replicas_are_reissued_after_their_deadline() {
    let mut app = TestApp::spawn().await;
    let victim = app.start_worker_process(&BINS, "victim", 2);
    // Long enough runs that the victim is surely mid-task when killed; a short deadline.
    let p = pb::ReplicationPolicy {
        delay_bound_secs: 3,
        ..policy(2)
    };
    let slow: Vec<Vec<u8>> = (0..6)
        .map(|seed| {
            format!(r#"{{"seed":{seed},"hidden":16,"batch":32,"steps":20000}}"#).into_bytes()
        })
        .collect();
    let study = app
        .submit(accrete_tasks::TINY_MODEL, slow, p, bounds())
        .await;
    eventually(TIMEOUT, "the victim to hold replicas", || async {
        count(
            &app,
            "SELECT count(*) FROM replicas r JOIN workers w ON w.id = r.worker_id
             WHERE w.name = 'victim' AND r.state = 'in_progress'",
        )
        .await
            >= 2
    })
    .await;
    app.kill_worker_process(victim);
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.validated, status.failed), (6, 0), "{status:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 6);
    let timed_out = count(
        &app,
        "SELECT count(*) FROM replicas r JOIN workers w ON w.id = r.worker_id
         WHERE w.name = 'victim' AND r.state = 'timed_out'",
    )
    .await;
    assert!(
        timed_out >= 1,
        "{timed_out} of the victim's replicas timed out"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_study_loses_nothing_and_duplicates_nothing() {
    let mut app = TestApp::spawn().await;
    app.server_as_process(&BINS).await;
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    app.start_worker("c", 1);
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            tiny_model_inputs(40, 300),
            policy(2),
            bounds(),
        )
        .await;
    eventually(TIMEOUT, "some findings, and replicas in flight", || async {
        count(&app, "SELECT count(*) FROM findings").await >= 5
            && count(
                &app,
                "SELECT count(*) FROM replicas WHERE state = 'in_progress'",
            )
            .await
                >= 2
    })
    .await;
    // SIGKILL: no draining, connections cut mid-call.
    app.server_as_process(&BINS).await;
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.validated, status.failed), (40, 0), "{status:?}");
    assert_each_validated_once(&app, 40).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_is_unavailable_meanwhile_and_the_run_completes() {
    // A private cluster: the shared one at 127.0.0.1:5432 serves other tests.
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-pg");
    let db = DevDb::cluster(&scratch, &format!("restart{}", std::process::id()))
        .await
        .expect("making a private cluster");
    let mut app = TestApp::spawn_on(db).await;
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    app.start_worker("c", 1);
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            tiny_model_inputs(30, 300),
            policy(2),
            bounds(),
        )
        .await;
    eventually(TIMEOUT, "some findings, and replicas in flight", || async {
        count(&app, "SELECT count(*) FROM findings").await >= 5
            && count(
                &app,
                "SELECT count(*) FROM replicas WHERE state = 'in_progress'",
            )
            .await
                >= 2
    })
    .await;
    app.db().stop_cluster().unwrap();
    // Meanwhile every call that needs the database fails fast and says to retry.
    let mut c = app.client().await;
    for _ in 0..3 {
        let start = Instant::now();
        let err = c
            .research
            .get_status(pb::GetStatusRequest {
                study_id: study.study_id,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a call took {:?} to fail",
            start.elapsed()
        );
    }
    // Long enough that the workers' fetches and reports meet the outage too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.db().start_cluster().unwrap();
    // Reconnected by itself: the same server, the same pool.
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.validated, status.failed), (30, 0), "{status:?}");
    assert_each_validated_once(&app, 30).await;
    app.shutdown().await;
}

/// A TCP proxy in front of the server that can swallow responses (`hold`) and then cut every
/// connection (`cut`): the client's request arrives and commits, but its answer never comes.
struct CutProxy {
    addr: SocketAddr,
    hold: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (hold, connections) = (hold.clone(), connections.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let server = TcpStream::connect(upstream).await.unwrap();
                    let task = tokio::spawn(relay(client, server, hold.clone()));
                    connections.lock().unwrap().push(task);
                }
            }
        });
        CutProxy {
            addr,
            hold,
            connections,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While held, what the server sends is read and dropped.
    fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    /// Closes every connection made so far, both ways.
    fn cut(&self) {
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, hold: Arc<AtomicBool>) {
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) if !hold.load(Ordering::SeqCst) => {
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
            }
        }
    };
    // Either direction closing ends the connection, as a dropped network path would.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// What a retried report must leave alone: replicas, findings and every reputation counter.
async fn tallies(app: &TestApp) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT x FROM (
           SELECT 0 AS k, count(*) AS x FROM replicas
           UNION ALL SELECT 1, count(*) FROM replicas WHERE state = 'success'
           UNION ALL SELECT 2, count(*) FROM findings
           UNION ALL SELECT 3, coalesce(sum(valid_count + 10 * invalid_count
                      + 100 * error_count + 1000 * timeout_count), 0)::bigint FROM workers
           UNION ALL SELECT 4, count(*) FROM replicas WHERE validate_state = 'valid'
         ) t ORDER BY k",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_cut_off_after_commit_is_a_duplicate_when_retried() {
    let app = TestApp::spawn().await;
    let output = br#"{"metrics":{"x":1}}"#;
    app.submit(
        accrete_tasks::TINY_MODEL,
        vec![b"{}".to_vec()],
        policy(2),
        bounds(),
    )
    .await;
    let (a, b) = (app.register("a").await, app.register("b").await);
    let mut direct = app.worker_client().await;
    let mut replicas = Vec::new();
    for auth in [&a, &b] {
        let got = direct
            .fetch_work(pb::FetchWorkRequest {
                auth: Some(auth.clone()),
                max: 1,
                resume: false,
            })
            .await
            .unwrap()
            .into_inner()
            .assignments;
        assert_eq!(got.len(), 1);
        replicas.push(got[0].replica_id);
    }
    direct
        .report_results(pb::ReportResultsRequest {
            auth: Some(a.clone()),
            results: vec![success(replicas[0], output)],
            fetch: 0,
        })
        .await
        .unwrap();

    // b reports through the proxy; its report commits (and validates the unit), but the
    // response is swallowed and the connection then dropped.
    let proxy = CutProxy::start(app.addr).await;
    let channel = tonic::transport::Channel::from_shared(proxy.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut via_proxy = pb::worker_service_client::WorkerServiceClient::new(channel);
    via_proxy
        .heartbeat(pb::HeartbeatRequest {
            auth: Some(b.clone()),
            busy_slots: 1,
        })
        .await
        .unwrap();
    proxy.hold(true);
    let request = pb::ReportResultsRequest {
        auth: Some(b.clone()),
        results: vec![success(replicas[1], output)],
        fetch: 0,
    };
    let cut_off = tokio::spawn({
        let request = request.clone();
        async move { via_proxy.report_results(request).await }
    });
    eventually(TIMEOUT, "b's report committed", || async {
        count(&app, "SELECT count(*) FROM findings").await == 1
    })
    .await;
    let before = tallies(&app).await;
    assert_eq!(before[..3], [2, 2, 1], "{before:?}");
    proxy.cut();
    let lost = tokio::time::timeout(TIMEOUT, cut_off)
        .await
        .unwrap()
        .unwrap();
    assert!(
        lost.is_err(),
        "the response should have been lost: {lost:?}"
    );

    // The worker retries the same report, over a new connection (the old channel may still
    // hold the dead one: a worker treats that error as transient too): a duplicate, changing
    // nothing.
    let acks = app
        .worker_client()
        .await
        .report_results(request)
        .await
        .unwrap()
        .into_inner()
        .acks;
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].status(), pb::ReportStatus::Duplicate, "{acks:?}");
    assert_eq!(tallies(&app).await, before);
    assert_each_validated_once(&app, 1).await;
    drop(proxy);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_worker_cut_off_mid_report_retries_and_nothing_counts_twice() {
    let mut app = TestApp::spawn().await;
    let proxy = CutProxy::start(app.addr).await;
    let mut config = accrete_worker::WorkerConfig::new(proxy.url());
    config.name = Some("cut".into());
    config.slots = 1;
    config.prefetch = 1;
    // A short deadline: a fetch whose answer is swallowed strands its replicas until then.
    let p = pb::ReplicationPolicy {
        delay_bound_secs: 5,
        ..policy(2)
    };
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            tiny_model_inputs(6, 3000),
            p,
            bounds(),
        )
        .await;
    app.start_worker_with(config);
    eventually(TIMEOUT, "the cut worker mid-task", || async {
        count(
            &app,
            "SELECT count(*) FROM replicas r JOIN workers w ON w.id = r.worker_id
             WHERE w.name = 'cut' AND r.state = 'in_progress'",
        )
        .await
            >= 1
    })
    .await;
    // Two more, only now: started with the cut worker, they could run all twelve replicas
    // before it took one, and the wait above would never end. They are needed because a
    // replica stranded by a swallowed fetch is reissued to a worker that has none of its
    // unit, and the cut worker already has one.
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    // Held first, so any report that commits after the count below is one whose answer is lost.
    proxy.hold(true);
    let reported = count(
        &app,
        "SELECT count(*) FROM replicas r JOIN workers w ON w.id = r.worker_id
         WHERE w.name = 'cut' AND r.state <> 'in_progress'",
    )
    .await;
    eventually(TIMEOUT, "a report of the cut worker committed", || async {
        count(
            &app,
            "SELECT count(*) FROM replicas r JOIN workers w ON w.id = r.worker_id
             WHERE w.name = 'cut' AND r.state <> 'in_progress'",
        )
        .await
            > reported
    })
    .await;
    proxy.cut();
    proxy.hold(false);
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.validated, status.failed), (6, 0), "{status:?}");
    assert_each_validated_once(&app, 6).await;
    app.shutdown().await;
    drop(proxy);
}

/// A hot-path statement stuck behind a lock (or on a plan gone wrong) is cancelled at the hot
/// pool's statement timeout: the call fails with UNAVAILABLE, which workers retry, rather than
/// holding its connection for as long as the lock lasts; once the lock is gone the same worker
/// is served, and the cancelled claim left nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_stuck_behind_a_lock_gives_up_as_unavailable() {
    let app = TestApp::spawn().await;
    app.submit(
        accrete_tasks::TINY_MODEL,
        tiny_model_inputs(2, 10),
        policy(2),
        bounds(),
    )
    .await;
    let w = app.register("held").await;
    let worker: uuid::Uuid = w.worker_id.parse().unwrap();
    // Another session holds the worker's row, as a stuck transaction would.
    let mut holder = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM workers WHERE id = $1 FOR UPDATE")
        .bind(worker)
        .execute(&mut *holder)
        .await
        .unwrap();
    let started = Instant::now();
    let err = app.fetch_as(&w, 1, false).await.unwrap_err();
    let waited = started.elapsed();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(60),
        "gave up after {waited:?}, not at the statement timeout"
    );
    assert_eq!(count(&app, "SELECT count(*) FROM replicas").await, 0);
    holder.rollback().await.unwrap();
    let got = app.fetch_as(&w, 1, false).await.unwrap();
    assert_eq!(got.len(), 1);
    app.shutdown().await;
}
