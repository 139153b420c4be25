//! Validation against workers that disagree, forge, or repeat themselves, driven by hand over
//! the real worker API so the order of events is exact.

use std::time::Duration;

use crate::{TIMEOUT, bounds, count, native_tiny_model, policy, tiny_model_inputs};
use accrete_tests::{TestApp, v1 as pb};

fn success(replica_id: u64, output: &[u8]) -> pb::ReplicaResult {
    pb::ReplicaResult {
        replica_id,
        outcome: Some(pb::replica_result::Outcome::Success(pb::Success {
            output: output.to_vec(),
            output_hash: blake3::hash(output).as_bytes().to_vec(),
            fuel_used: 1000,
        })),
        wall_micros: 10,
    }
}

async fn fetch_one(app: &TestApp, auth: &pb::WorkerAuth) -> pb::Assignment {
    let r = app
        .worker_client()
        .await
        .fetch_work(pb::FetchWorkRequest {
            auth: Some(auth.clone()),
            max: 1,
            resume: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.assignments.len(), 1, "{r:?}");
    r.assignments.into_iter().next().unwrap()
}

async fn report(app: &TestApp, auth: &pb::WorkerAuth, result: pb::ReplicaResult) -> pb::ReportAck {
    let r = app
        .worker_client()
        .await
        .report_results(pb::ReportResultsRequest {
            auth: Some(auth.clone()),
            results: vec![result],
        })
        .await
        .unwrap()
        .into_inner();
    r.acks.into_iter().next().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreement_waits_for_a_tie_breaker_and_marks_the_odd_one_invalid() {
    let mut app = TestApp::spawn().await;
    let inputs = tiny_model_inputs(1, 40);
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            inputs.clone(),
            policy(2),
            bounds(),
        )
        .await;
    let truth = native_tiny_model(&inputs[0]);
    let lie = br#"{"metrics":{"val_loss":0.0001}}"#;

    let liar = app.register("liar").await;
    let honest = app.register("honest").await;
    let a = fetch_one(&app, &liar).await;
    let b = fetch_one(&app, &honest).await;
    assert_eq!(a.work_unit_id, b.work_unit_id);
    assert_ne!(a.replica_id, b.replica_id);

    // Neither may report the other's replica, nor a hash that is not of its output.
    let stolen = report(&app, &liar, success(b.replica_id, lie)).await;
    assert_eq!(stolen.status(), pb::ReportStatus::Rejected);
    let mut forged = success(a.replica_id, lie);
    if let Some(pb::replica_result::Outcome::Success(s)) = &mut forged.outcome {
        s.output_hash = blake3::hash(&truth).as_bytes().to_vec();
    }
    let forged_ack = report(&app, &liar, forged).await;
    assert_eq!(forged_ack.status(), pb::ReportStatus::Rejected);
    assert!(
        forged_ack.message.contains("BLAKE3"),
        "{}",
        forged_ack.message
    );
    let wrong_token = pb::WorkerAuth {
        token: "x".into(),
        ..liar.clone()
    };
    let err = app
        .worker_client()
        .await
        .report_results(pb::ReportResultsRequest {
            auth: Some(wrong_token),
            results: vec![success(a.replica_id, lie)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    assert_eq!(
        report(&app, &liar, success(a.replica_id, lie))
            .await
            .status(),
        pb::ReportStatus::Accepted
    );
    assert_eq!(
        report(&app, &honest, success(b.replica_id, &truth))
            .await
            .status(),
        pb::ReportStatus::Accepted
    );
    // A retried identical report changes nothing; a different second report is refused.
    assert_eq!(
        report(&app, &honest, success(b.replica_id, &truth))
            .await
            .status(),
        pb::ReportStatus::Duplicate
    );
    assert_eq!(
        report(&app, &liar, success(a.replica_id, &truth))
            .await
            .status(),
        pb::ReportStatus::Rejected
    );

    // One each way: no finding, and a third replica is wanted.
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 0);
    assert_eq!(
        count(&app, "SELECT sum(unsent)::bigint FROM work_units").await,
        1
    );
    let status = app
        .client()
        .await
        .status(study.study_id)
        .await
        .unwrap()
        .studies
        .remove(0);
    assert_eq!((status.pending, status.validated), (1, 0));

    // A real worker breaks the tie.
    app.start_worker("tie-breaker", 1);
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!(status.validated, 1);
    let findings = app.findings(study.study_id).await;
    assert_eq!(findings.len(), 1);
    let f = &findings[0];
    assert_eq!(f.output, truth);
    assert_eq!(f.dissenting, 1);
    assert_eq!(f.agreeing.len(), 2);
    assert!(f.agreeing.iter().any(|r| r.replica_id == b.replica_id));
    assert!(f.agreeing.iter().all(|r| r.worker_id != liar.worker_id));
    let invalid: String =
        sqlx::query_scalar("SELECT validate_state::text FROM replicas WHERE id = $1")
            .bind(a.replica_id as i64)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(invalid, "invalid");
    let (valid, invalid): (i64, i64) =
        sqlx::query_as("SELECT valid_count, invalid_count FROM workers WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&liar.worker_id).unwrap())
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!((valid, invalid), (0, 1));
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_result_after_validation_is_checked_against_the_canonical_one() {
    let app = TestApp::spawn().await;
    let inputs = tiny_model_inputs(1, 40);
    let truth = native_tiny_model(&inputs[0]);
    // Three replicas at first; two agreeing ones settle the unit, the third reports late.
    let p = pb::ReplicationPolicy {
        target_nresults: 3,
        ..policy(2)
    };
    let study = app
        .submit(accrete_tasks::TINY_MODEL, inputs, p, bounds())
        .await;
    let (w1, w2, late) = (
        app.register("a").await,
        app.register("b").await,
        app.register("late").await,
    );
    let (r1, r2, r3) = (
        fetch_one(&app, &w1).await,
        fetch_one(&app, &w2).await,
        fetch_one(&app, &late).await,
    );
    report(&app, &w1, success(r1.replica_id, &truth)).await;
    report(&app, &w2, success(r2.replica_id, &truth)).await;
    assert_eq!(
        app.wait_done(study.study_id, Duration::from_secs(10))
            .await
            .validated,
        1
    );
    let wrong = br#"{"metrics":{"val_loss":1}}"#;
    assert_eq!(
        report(&app, &late, success(r3.replica_id, wrong))
            .await
            .status(),
        pb::ReportStatus::Accepted
    );
    let invalid: i64 = sqlx::query_scalar("SELECT invalid_count FROM workers WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&late.worker_id).unwrap())
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(invalid, 1);
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_database_refuses_never_poisons_a_report() {
    let app = TestApp::spawn().await;
    let p = pb::ReplicationPolicy {
        max_error_results: 5,
        ..policy(2)
    };
    app.submit(
        accrete_tasks::TINY_MODEL,
        tiny_model_inputs(2, 40),
        p,
        bounds(),
    )
    .await;
    let w = app.register("nul\u{0}name").await;
    let first = fetch_one(&app, &w).await;
    let second = fetch_one(&app, &w).await;
    let failure = pb::ReplicaResult {
        replica_id: first.replica_id,
        outcome: Some(pb::replica_result::Outcome::Failure(pb::Failure {
            kind: pb::ErrorKind::Trap as i32,
            message: "stderr with a \u{0} NUL".into(),
            fuel_used: 1,
        })),
        wall_micros: 1,
    };
    assert_eq!(
        report(&app, &w, failure).await.status(),
        pb::ReportStatus::Accepted
    );
    // A metric name with NUL cannot be stored as jsonb: it is a bad output, not a stuck batch.
    let nul_metric = br#"{"metrics":{"a\u0000":1}}"#;
    assert_eq!(
        report(&app, &w, success(second.replica_id, nul_metric))
            .await
            .status(),
        pb::ReportStatus::Accepted
    );
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT error_kind FROM replicas WHERE state = 'error' ORDER BY id")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(kinds, ["trap", "bad_output"]);
    let message: String = sqlx::query_scalar("SELECT error_message FROM replicas WHERE id = $1")
        .bind(first.replica_id as i64)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(message, "stderr with a  NUL");
    app.shutdown().await;
}
