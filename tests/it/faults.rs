//! Faults: a worker process killed mid-task, and a server killed mid-study. Nothing is lost,
//! nothing is recorded twice.

use crate::{BINS, TIMEOUT, bounds, count, policy, tiny_model_inputs};
use accrete_tests::{TestApp, eventually, v1 as pb};

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
    eventually(TIMEOUT, "some findings", || async {
        count(&app, "SELECT count(*) FROM findings").await >= 5
    })
    .await;
    // SIGKILL: no draining, connections cut mid-call.
    app.server_as_process(&BINS).await;
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.validated, status.failed), (40, 0), "{status:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 40);
    assert_eq!(
        count(&app, "SELECT count(DISTINCT wu_id) FROM findings").await,
        40
    );
    // Every agreeing replica is a success whose hash is the finding's.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM findings f JOIN replicas r ON r.id = ANY(f.agreeing_replicas)
             WHERE r.state <> 'success' OR r.output_hash <> f.output_hash",
        )
        .await,
        0
    );
    app.shutdown().await;
}
