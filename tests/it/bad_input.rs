//! Bad input: modules refused at upload with a clear status; runaway or misbehaving guests, and
//! workers that lie about their output, turned into error results; malformed sweep specs and
//! raw protobuf refused. Each time nothing is stored and the server keeps serving.

use crate::{TIMEOUT, bounds, count, policy, tiny_model_inputs};
use accrete::sweep::SweepSpec;
use accrete_tests::{TestApp, v1 as pb};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

/// The reasons of a study's failed work units.
async fn failure_reasons(app: &TestApp, study: u64) -> Vec<String> {
    app.client()
        .await
        .ledger
        .list_failures(pb::ListFailuresRequest {
            study_id: study,
            limit: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .failures
        .into_iter()
        .map(|f| f.reason)
        .collect()
}

/// Proof the server still serves: a module upload and a status query go through.
async fn still_serving(app: &TestApp) {
    let mut c = app.client().await;
    let hash = c
        .put_module(accrete_tasks::TINY_MODEL.to_vec(), "ok")
        .await
        .expect("the server keeps serving");
    assert_eq!(hash.len(), 32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_that_are_not_wasi_commands_are_refused_at_upload() {
    let app = TestApp::spawn().await;
    let mut c = app.client().await;
    let env_import = wat::parse_str(
        r#"(module (import "env" "f" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    // Valid WebAssembly and a WASI import, but one the sandbox does not allow.
    let socket_import = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32)))
             (memory (export "memory") 1) (func (export "_start")))"#,
    )
    .unwrap();
    for (bytes, says) in [
        (b"definitely not wasm".to_vec(), "not a WebAssembly module"),
        (b"\0asm\x01\0\0\0\x01\xff".to_vec(), "invalid WebAssembly"),
        (env_import, "env::f"),
        (socket_import, "sock_accept"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_over_the_size_cap_is_refused() {
    let mut app = TestApp::spawn().await;
    app.config.limits.max_module_bytes = 64 << 10;
    app.restart_server().await;
    let mut c = app.client().await;
    // Valid and allowed, only too big: a data segment pads it past the cap.
    let big = wat::parse_str(format!(
        r#"(module (memory (export "memory") 2) (data (i32.const 0) "{}") (func (export "_start")))"#,
        "x".repeat(65 << 10)
    ))
    .unwrap();
    let err = c
        .research
        .put_module(pb::PutModuleRequest {
            wasm: big,
            name: "big".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("65536"), "{:?}", err.message());
    assert_eq!(count(&app, "SELECT count(*) FROM modules").await, 0);
    // Under the cap is fine.
    let small = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
        .unwrap();
    assert!(c.put_module(small, "small").await.is_ok());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_that_grow_memory_or_output_without_bound_are_error_results() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 1);
    app.start_worker("b", 1);
    let p = pb::ReplicationPolicy {
        max_error_results: 2,
        ..policy(2)
    };
    // Grows until refused, then traps.
    let hungry = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_start")
               (loop (br_if 0 (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
               unreachable))"#,
    )
    .unwrap();
    let b = pb::ResourceBounds {
        memory_bytes: 8 << 20,
        ..bounds()
    };
    let study = app.submit(&hungry, vec![b"{}".to_vec()], p, b).await;
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.failed, status.validated), (1, 0));
    let reasons = failure_reasons(&app, study.study_id).await;
    assert!(reasons[0].contains("memory"), "{reasons:?}");

    // Writes 1000 bytes, 1000 times, to stdout: far over a 4 KiB output cap.
    let chatty = wat::parse_str(
        r#"(module
             (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "_start") (local $i i32)
               (i32.store (i32.const 0) (i32.const 64))
               (i32.store (i32.const 4) (i32.const 1000))
               (loop
                 (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
                 (local.set $i (i32.add (local.get $i) (i32.const 1)))
                 (br_if 0 (i32.lt_u (local.get $i) (i32.const 1000))))))"#,
    )
    .unwrap();
    let b = pb::ResourceBounds {
        output_bytes: 4096,
        ..bounds()
    };
    let study = app.submit(&chatty, vec![b"{}".to_vec()], p, b).await;
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.failed, status.validated), (1, 0));
    let reasons = failure_reasons(&app, study.study_id).await;
    assert!(reasons[0].contains("output"), "{reasons:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 0);

    // The same workers go on to validate real work.
    let good = app
        .submit(
            accrete_tasks::TINY_MODEL,
            tiny_model_inputs(2, 40),
            policy(2),
            bounds(),
        )
        .await;
    assert_eq!(app.wait_done(good.study_id, TIMEOUT).await.validated, 2);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_a_lying_worker_reports_are_checked_again_by_the_server() {
    let app = TestApp::spawn().await;
    let b = pb::ResourceBounds {
        output_bytes: 1024,
        ..bounds()
    };
    // Four units, one replica each: the worker plays by hand and claims success for each.
    let p = pb::ReplicationPolicy {
        max_error_results: 1,
        ..policy(1)
    };
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            (0..4)
                .map(|i| format!("{{\"i\":{i}}}").into_bytes())
                .collect(),
            p,
            b,
        )
        .await;
    let auth = app.register("liar").await;
    let mut w = app.worker_client().await;
    let assignments = w
        .fetch_work(pb::FetchWorkRequest {
            auth: Some(auth.clone()),
            max: 4,
            resume: false,
        })
        .await
        .unwrap()
        .into_inner()
        .assignments;
    assert_eq!(assignments.len(), 4);
    let over_cap = format!(r#"{{"metrics":{{"x":1}},"pad":"{}"}}"#, "y".repeat(2000));
    let outputs: [(&[u8], &str); 4] = [
        (b"\xff\xfe{\"metrics\":{}}", "bad_output"),
        (br#"{"metrics":{"x":"#, "bad_output"),
        (br#"{"metrics":{"x":"one"}}"#, "bad_output"),
        (over_cap.as_bytes(), "output_too_large"),
    ];
    let results = assignments
        .iter()
        .zip(&outputs)
        .map(|(a, (output, _))| pb::ReplicaResult {
            replica_id: a.replica_id,
            outcome: Some(pb::replica_result::Outcome::Success(pb::Success {
                output: output.to_vec(),
                output_hash: blake3::hash(output).as_bytes().to_vec(),
                fuel_used: 1,
            })),
            wall_micros: 1,
        })
        .collect();
    w.report_results(pb::ReportResultsRequest {
        auth: Some(auth.clone()),
        results,
        fetch: 0,
    })
    .await
    .unwrap();
    for (a, (_, kind)) in assignments.iter().zip(&outputs) {
        let (state, error_kind, stored): (String, Option<String>, bool) = sqlx::query_as(
            "SELECT state::text, error_kind, output IS NOT NULL FROM replicas WHERE id = $1",
        )
        .bind(a.replica_id as i64)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
        assert_eq!(
            (state.as_str(), error_kind.as_deref(), stored),
            ("error", Some(*kind), false)
        );
    }
    let status = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!((status.failed, status.validated), (4, 0), "{status:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM findings").await, 0);
    still_serving(&app).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_spec_with_a_type_error_submits_nothing() {
    let app = TestApp::spawn().await;
    for (text, says) in [
        ("[policy]\nmin_quorum = \"two\"\n", "min_quorum"),
        // JSON names the position rather than the field.
        (
            r#"{"sweep": {"kind": "random", "samples": -3}}"#,
            "expected u32 at line 1",
        ),
        ("[bounds]\nfuel = 1.5\n", "fuel"),
        (
            "[params]\nlr = [0.1]\n[tolerance.loss]\nabs = \"small\"\n",
            "abs",
        ),
        ("[sweep]\nkind = \"grid\"\nsamples = 4\n", "samples"),
    ] {
        let err = SweepSpec::parse(text).unwrap_err();
        assert!(err.contains(says), "{err:?} should name {says:?}");
    }
    // Well typed but not expandable: refused before anything is uploaded.
    let spec = SweepSpec::parse("[params]\nlr = { min = 0.1, max = 1.0 }\n").unwrap();
    let mut c = app.client().await;
    let err = c
        .submit_sweep(accrete_tasks::TINY_MODEL.to_vec(), "m", &spec, "s", &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("range"), "{err}");
    let spec = SweepSpec::parse(
        "[sweep]\nkind = \"random\"\nsamples = 3\n[params]\nlr = { min = 2.0, max = 1.0 }\n",
    )
    .unwrap();
    let err = c
        .submit_sweep(accrete_tasks::TINY_MODEL.to_vec(), "m", &spec, "s", &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("min <= max"), "{err}");
    assert_eq!(count(&app, "SELECT count(*) FROM modules").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM studies").await, 0);
    still_serving(&app).await;
    app.shutdown().await;
}

/// Sends and receives message bodies as they are, so a test can put any bytes on the wire of a
/// real gRPC call.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

async fn raw_call(app: &TestApp, method: &'static str, body: Vec<u8>) -> tonic::Status {
    let channel = Channel::from_shared(app.server_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        Raw,
    )
    .await
    .expect_err("malformed bytes must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_oversized_protobuf_is_refused_and_the_server_keeps_serving() {
    let app = TestApp::spawn().await;
    const PUT_MODULE: &str = "/accrete.v1.ResearchService/PutModule";
    const REPORT: &str = "/accrete.v1.WorkerService/ReportResults";
    for (method, body) in [
        // Field 1 (wasm) claims 2^35 bytes and carries 3.
        (
            PUT_MODULE,
            vec![0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 1, 2, 3],
        ),
        // A varint that never ends.
        (REPORT, vec![0xff; 16]),
        // Wire type 7 does not exist.
        (REPORT, vec![0x0f, 0x00]),
    ] {
        let err = raw_call(&app, method, body).await;
        // tonic answers a decode failure itself, before any handler runs.
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        assert!(err.message().contains("decode"), "{err:?}");
    }
    // One byte over the message cap: refused from the gRPC frame header by the limits layer
    // (a module upload's cap is the module cap plus framing), before the body is read.
    let err = raw_call(
        &app,
        PUT_MODULE,
        vec![0; accrete_proto::MAX_MESSAGE_BYTES + 1],
    )
    .await;
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("over the server's cap"), "{err:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM modules").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM workers").await, 0);
    still_serving(&app).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_studies_findings_and_replicas_are_not_found() {
    let app = TestApp::spawn().await;
    let mut c = app.client().await;
    let codes = [
        c.research
            .cancel_study(pb::CancelStudyRequest { study_id: 999 })
            .await
            .map(|_| ())
            .unwrap_err(),
        c.ledger
            .get_lineage(pb::FindingRelationRequest { finding_id: 999 })
            .await
            .map(|_| ())
            .unwrap_err(),
        c.ledger
            .adopt(pb::AdoptRequest {
                finding_id: 999,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        c.research
            .submit_study(pb::SubmitStudyRequest {
                name: "s".into(),
                module_hash: vec![7; 32],
                work_units: vec![pb::WorkUnitSpec {
                    input: b"{}".to_vec(),
                }],
                ..Default::default()
            })
            .await
            .map(|_| ())
            .unwrap_err(),
    ];
    for err in codes {
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    }
    // An unknown replica in a report is refused on its own, not the whole call.
    let auth = app.register("w").await;
    let acks = app
        .worker_client()
        .await
        .report_results(pb::ReportResultsRequest {
            auth: Some(auth),
            results: vec![pb::ReplicaResult {
                replica_id: 999,
                outcome: Some(pb::replica_result::Outcome::Failure(pb::Failure {
                    kind: pb::ErrorKind::Trap as i32,
                    message: "x".into(),
                    fuel_used: 0,
                })),
                wall_micros: 0,
            }],
            fetch: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .acks;
    assert_eq!(acks[0].status(), pb::ReportStatus::Rejected, "{acks:?}");
    assert_eq!(count(&app, "SELECT count(*) FROM studies").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM replicas").await, 0);
    still_serving(&app).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn studies_over_the_servers_caps_are_refused() {
    let app = TestApp::spawn().await;
    let mut c = app.client().await;
    let module_hash = c
        .put_module(accrete_tasks::TINY_MODEL.to_vec(), "m")
        .await
        .unwrap();
    let limits = accrete_server::Limits::default();
    let study = |work_units: Vec<Vec<u8>>, bounds: pb::ResourceBounds| pb::SubmitStudyRequest {
        name: "s".into(),
        module_hash: module_hash.clone(),
        policy: Some(policy(2)),
        bounds: Some(bounds),
        work_units: work_units
            .into_iter()
            .map(|input| pb::WorkUnitSpec { input })
            .collect(),
        ..Default::default()
    };
    for (request, says) in [
        (
            study(vec![vec![b' '; limits.max_input_bytes + 1]], bounds()),
            "over the cap",
        ),
        (study(vec![], bounds()), "at least one work unit"),
        (
            study(
                vec![b"{}".to_vec()],
                pb::ResourceBounds {
                    fuel: limits.max_fuel + 1,
                    ..bounds()
                },
            ),
            "fuel",
        ),
        (
            study(
                vec![b"{}".to_vec()],
                pb::ResourceBounds {
                    memory_bytes: limits.max_memory_bytes + 1,
                    ..bounds()
                },
            ),
            "memory",
        ),
    ] {
        let err = c.research.submit_study(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(says), "{err:?} should say {says:?}");
    }
    assert_eq!(count(&app, "SELECT count(*) FROM studies").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM work_units").await, 0);
    still_serving(&app).await;
    app.shutdown().await;
}
