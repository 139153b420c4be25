//! The whole loop: both guest tasks, three workers, every work unit validated once, and every
//! finding's output equal to what the same task code computes natively.

use std::collections::HashSet;

use crate::{
    TIMEOUT, bounds, count, native_signal_search, native_tiny_model, policy, tiny_model_inputs,
};
use accrete_tests::TestApp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_tasks_validate_once_and_match_native_output() {
    let mut app = TestApp::spawn().await;
    for i in 0..3 {
        app.start_worker(&format!("w{i}"), 2);
    }
    let signal_inputs: Vec<Vec<u8>> = (0..50)
        .map(|i| {
            let tone = if i % 2 == 0 {
                serde_json::json!(50.0 + i as f64 * 7.0)
            } else {
                serde_json::Value::Null
            };
            serde_json::json!({ "seed": i, "n": 2048, "tone_hz": tone, "amplitude": 0.5 })
                .to_string()
                .into_bytes()
        })
        .collect();
    let model_inputs = tiny_model_inputs(50, 60);
    let signal = app
        .submit(
            accrete_tasks::SIGNAL_SEARCH,
            signal_inputs.clone(),
            policy(2),
            bounds(),
        )
        .await;
    let model = app
        .submit(
            accrete_tasks::TINY_MODEL,
            model_inputs.clone(),
            policy(2),
            bounds(),
        )
        .await;

    for (study, inputs, native) in [
        (
            &signal,
            &signal_inputs,
            native_signal_search as fn(&[u8]) -> Vec<u8>,
        ),
        (&model, &model_inputs, native_tiny_model),
    ] {
        let status = app.wait_done(study.study_id, TIMEOUT).await;
        assert_eq!((status.validated, status.failed), (50, 0), "{status:?}");
        let findings = app.findings(study.study_id).await;
        assert_eq!(findings.len(), 50);
        let units: HashSet<u64> = findings.iter().map(|f| f.work_unit_id).collect();
        assert_eq!(units.len(), 50, "one finding per work unit");
        for f in &findings {
            let idx = study
                .work_unit_ids
                .iter()
                .position(|&id| id == f.work_unit_id)
                .unwrap();
            let expected = native(&inputs[idx]);
            assert_eq!(
                f.output, expected,
                "finding {} differs from the native run",
                f.id
            );
            assert_eq!(f.output_hash, blake3::hash(&expected).as_bytes());
            let workers: HashSet<&str> = f.agreeing.iter().map(|a| a.worker_id.as_str()).collect();
            assert!(workers.len() >= 2, "a quorum of distinct workers");
            // Honest workers only gain reputation, so a finding scores at least what the same
            // number of brand-new workers on one platform would earn.
            let new = accrete_server::scheduler::Voter {
                error_rate: accrete_server::scheduler::error_rate(0, 0),
                platform: f.agreeing[0].platform.clone(),
            };
            let floor = accrete_server::scheduler::confidence(&vec![new; f.agreeing.len()]);
            assert!(
                f.confidence >= floor - 1e-12 && f.confidence < 1.0,
                "{}",
                f.confidence
            );
            assert_eq!(f.platforms, vec![f.agreeing[0].platform.clone()]);
            assert!(!f.unreplicated);
            assert!(
                f.agreeing
                    .iter()
                    .all(|a| a.fuel_used > 0 && a.platform.contains('/'))
            );
        }
    }
    // The signal search found the injected tones: even inputs carry one.
    let tones = app.findings(signal.study_id).await;
    let detected = tones
        .iter()
        .filter(|f| {
            serde_json::from_str::<serde_json::Value>(&f.metrics_json).unwrap()["detected"] == 1.0
        })
        .count();
    assert!(detected >= 25, "{detected} tones detected");
    assert_eq!(
        count(&app, "SELECT count(*) FROM (SELECT wu_id FROM replicas GROUP BY wu_id, worker_id HAVING count(*) > 1) d").await,
        0
    );
    app.shutdown().await;
}
