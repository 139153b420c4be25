//! Bad modules and runaway guests: refused at upload with a clear status, or turned into error
//! results while the worker keeps serving.

use crate::{TIMEOUT, bounds, count, policy, tiny_model_inputs};
use accrete_tests::{TestApp, v1 as pb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_that_are_not_wasi_commands_are_refused_at_upload() {
    let app = TestApp::spawn().await;
    let mut c = app.client().await;
    let env_import = wat::parse_str(
        r#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    for (bytes, says) in [
        (b"definitely not wasm".to_vec(), "not a WebAssembly module"),
        (b"\0asm\x01\0\0\0\x01\xff".to_vec(), "invalid WebAssembly"),
        (env_import, "env::f"),
    ] {
        let err = c
            .research
            .put_module(pb::PutModuleRequest {
                wasm: bytes,
                name: "bad".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains(says),
            "{:?} should say {says:?}",
            err.message()
        );
    }
    assert_eq!(count(&app, "SELECT count(*) FROM modules").await, 0);
    // The server keeps serving.
    assert!(
        c.put_module(accrete_tasks::TINY_MODEL.to_vec(), "ok")
            .await
            .is_ok()
    );
    // Unknown ids are NotFound, not silence.
    let err = c
        .research
        .get_status(pb::GetStatusRequest { study_id: 999 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .ledger
        .get_finding(pb::GetFindingRequest { finding_id: 999 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_runs_out_of_fuel_and_the_workers_keep_serving() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    let spin = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_start") (loop (br 0))))"#,
    )
    .unwrap();
    let p = pb::ReplicationPolicy {
        max_error_results: 2,
        ..policy(2)
    };
    let b = pb::ResourceBounds {
        fuel: 50_000_000,
        ..bounds()
    };
    let study = app.submit(&spin, vec![b"{}".to_vec()], p, b).await;
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.failed, status.validated), (1, 0));
    let failures = app
        .client()
        .await
        .ledger
        .list_failures(pb::ListFailuresRequest {
            study_id: study.study_id,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .failures;
    assert!(
        failures[0].reason.contains("out_of_fuel"),
        "{:?}",
        failures[0].reason
    );
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 0);

    // The same workers go on to validate real work.
    let good = app
        .submit(
            accrete_tasks::TINY_MODEL,
            tiny_model_inputs(4, 40),
            policy(2),
            bounds(),
        )
        .await;
    assert_eq!(app.wait_done(good.study_id, TIMEOUT).await.validated, 4);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_breaks_the_metrics_contract_is_an_error_result() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    // Writes "hello" to stdout: not the JSON object with metrics a guest must write.
    let hello = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (data (i32.const 16) "hello")
             (func (export "_start")
               (i32.store (i32.const 0) (i32.const 16))
               (i32.store (i32.const 4) (i32.const 5))
               (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#,
    )
    .unwrap();
    let p = pb::ReplicationPolicy {
        max_error_results: 2,
        ..policy(2)
    };
    let study = app.submit(&hello, vec![b"{}".to_vec()], p, bounds()).await;
    assert_eq!(app.wait_done(study.study_id, TIMEOUT).await.failed, 1);
    let reason = app
        .client()
        .await
        .ledger
        .list_failures(pb::ListFailuresRequest {
            study_id: study.study_id,
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .failures
        .remove(0)
        .reason;
    assert!(reason.contains("bad_output"), "{reason}");
    app.shutdown().await;
}
