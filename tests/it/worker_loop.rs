//! The volunteer loop against the real server: a busy worker's round in one call, hand-back at
//! shutdown (also of what a report in flight claims), and registering again when the server no
//! longer knows the worker's credentials.

use std::time::{Duration, Instant};

use crate::ops::{free_port, sample, scrape};
use crate::{TIMEOUT, bounds, count, policy, tiny_model_inputs};
use accrete_server::Config;
use accrete_tests::{TestApp, eventually, test_config, v1 as pb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_claims_its_next_replicas_with_its_reports() {
    // One slot and one replica queued behind it: each finished replica frees one claim, and
    // the report of its result claims the next replica in the same call.
    let metrics = free_port();
    let mut app = TestApp::spawn_with(Config {
        metrics_listen: Some(metrics),
        ..test_config()
    })
    .await;
    let units = 40;
    let inputs = (0..units)
        .map(|seed| format!(r#"{{"seed": {seed}, "n": 256}}"#).into_bytes())
        .collect();
    let study = app
        .submit(accrete_tasks::SIGNAL_SEARCH, inputs, policy(1), bounds())
        .await;
    let mut config = accrete_worker::WorkerConfig::new(app.server_url.clone());
    config.slots = 1;
    config.prefetch = 1;
    let busy = app.start_worker_with(config);
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    let summary = app.stop_worker(busy).await;
    assert_eq!(status.validated, units);
    assert_eq!((summary.completed, summary.failed), (units, 0));

    let calls = |method: &str| {
        let series =
            format!("accrete_grpc_call_seconds_count{{method=\"WorkerService/{method}\"}}");
        move |text: &str| sample(text, &series).unwrap_or(0.0)
    };
    let text = scrape(metrics).await;
    let (fetches, reports) = (calls("FetchWork")(&text), calls("ReportResults")(&text));
    // FetchWork: the first claim, then only when a report's claim found nothing (the queue
    // ran dry at the end) or a call failed. Two calls per replica before reports claimed.
    assert!(
        fetches < 10.0 && reports >= 10.0,
        "{fetches} FetchWork and {reports} ReportResults calls for {units} replicas:\n{text}"
    );
    app.shutdown().await;
}

/// How many replicas are in `state`.
async fn replicas_in(app: &TestApp, state: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM replicas WHERE state::text = $1")
        .bind(state)
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}

/// A guest that never ends: only fuel, the wall-clock backstop or a shutdown stops it.
const SPIN: &str = r#"(module
    (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
    (memory (export "memory") 1)
    (func (export "_start") (loop (br 0))))"#;

/// Submits three units of [`SPIN`], each stopped by its `wall_ms` bound. Their deadline is an
/// hour away: only a hand-back can bring their replicas back soon.
async fn submit_spin(app: &TestApp, min_quorum: u32, wall_ms: u64) {
    let p = pb::ReplicationPolicy {
        delay_bound_secs: 3600,
        ..policy(min_quorum)
    };
    let b = pb::ResourceBounds {
        fuel: 1_000_000_000_000,
        wall_ms,
        ..bounds()
    };
    let inputs = (0..3)
        .map(|i| format!("{{\"i\":{i}}}").into_bytes())
        .collect();
    app.submit(&wat::parse_str(SPIN).unwrap(), inputs, p, b)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_unfinished_work_for_immediate_reissue() {
    let mut app = TestApp::spawn().await;
    let mut config = accrete_worker::WorkerConfig::new(app.server_url.clone());
    config.slots = 1;
    config.prefetch = 2;
    config.drain_timeout = Duration::from_millis(100);
    config.name = Some("leaving".into());
    let leaving = app.start_worker_with(config);
    submit_spin(&app, 2, 3_600_000).await;
    eventually(TIMEOUT, "three replicas claimed", || async {
        replicas_in(&app, "in_progress").await == 3
    })
    .await;

    let stopping = Instant::now();
    let summary = app.stop_worker(leaving).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(
        (summary.completed, summary.failed, summary.handed_back),
        (0, 0, 3)
    );
    assert_eq!(replicas_in(&app, "handed_back").await, 3);
    // Each unit wants its second replica plus a replacement for the one handed back.
    assert_eq!(
        count(&app, "SELECT sum(unsent)::bigint FROM work_units").await,
        6
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_a_report_claims_as_the_worker_stops_are_handed_back() {
    // A report carries its result's claim; if the worker stops while that call is in flight,
    // the replicas it brings back have no dispatcher left to run them and must go back to the
    // server at once, not sit in progress until their deadline an hour away.
    let mut app = TestApp::spawn().await;
    let mut config = accrete_worker::WorkerConfig::new(app.server_url.clone());
    config.slots = 1;
    config.prefetch = 0;
    config.drain_timeout = Duration::from_millis(100);
    let leaving = app.start_worker_with(config);
    // Each run ends at its wall-clock bound, in an error result that frees its claim.
    submit_spin(&app, 1, 1_000).await;
    eventually(TIMEOUT, "the first replica claimed", || async {
        replicas_in(&app, "in_progress").await == 1
    })
    .await;

    // Hold the worker's row: the report of that run's result locks it before its claim, so
    // the call waits here with the claim still to come.
    let mut hold = app.store.pool().begin().await.unwrap();
    sqlx::query("SELECT 1 FROM workers FOR NO KEY UPDATE")
        .execute(&mut *hold)
        .await
        .unwrap();
    eventually(
        TIMEOUT,
        "the report waiting for the worker's row",
        || async {
            count(
                &app,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
             AND wait_event_type = 'Lock' AND query LIKE '%WITH rep AS%'",
            )
            .await
                == 1
        },
    )
    .await;
    app.signal_worker_stop(leaving);
    // Nothing runs, so the dispatcher ends at once; give it the time to, so that the claim
    // returns to a reporter with nowhere to send it. (Had the dispatcher still been there, it
    // would have handed the replica back itself: the outcome checked below is the same.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    hold.rollback().await.unwrap();
    let summary = app.stop_worker(leaving).await;

    assert_eq!(
        (summary.failed, summary.handed_back, summary.unreported),
        (1, 1, 0)
    );
    assert_eq!(replicas_in(&app, "in_progress").await, 0);
    assert_eq!(replicas_in(&app, "handed_back").await, 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_again_when_their_credentials_are_gone() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    eventually(TIMEOUT, "two registrations", || async {
        count(&app, "SELECT count(*) FROM workers").await == 2
    })
    .await;
    // As if the operator had revoked every credential: the server stops knowing them.
    sqlx::query("UPDATE workers SET token_hash = sha256('revoked'::bytea)")
        .execute(app.store.pool())
        .await
        .unwrap();
    app.restart_server().await;
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            tiny_model_inputs(4, 40),
            policy(2),
            bounds(),
        )
        .await;
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!(status.validated, 4);
    assert_eq!(
        count(&app, "SELECT count(*) FROM workers").await,
        4,
        "each worker registered anew"
    );
    assert_eq!(
        count(&app, "SELECT count(DISTINCT worker_id) FROM replicas").await,
        2,
        "only the new identities got work"
    );
    app.shutdown().await;
}
