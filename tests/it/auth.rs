//! Identities and roles over real gRPC: API keys per role on representative calls, worker
//! credentials and API keys kept to their own services, revocation and blocks within the cache
//! TTL, study ownership, a worker credential saved across restarts, and refused reports counted
//! against their sender.

use std::time::{Duration, Instant};

use accrete_server::auth::Role;
use accrete_tests::{TestApp, eventually, v1 as pb};
use tonic::Code;
use uuid::Uuid;

use crate::{TIMEOUT, bounds, policy, success};

const MODULE: &[u8] = accrete_tasks::TINY_MODEL;
const OUTPUT: &[u8] = br#"{"metrics":{"x":1}}"#;

fn inputs(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{{\"i\":{i}}}").into_bytes())
        .collect()
}

fn id(auth: &pb::WorkerAuth) -> Uuid {
    Uuid::parse_str(&auth.worker_id).unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn fetch(
    app: &TestApp,
    auth: &pb::WorkerAuth,
    max: u32,
    resume: bool,
) -> Result<Vec<pb::Assignment>, tonic::Status> {
    app.fetch_as(auth, max, resume).await
}

async fn report(
    app: &TestApp,
    auth: &pb::WorkerAuth,
    results: Vec<pb::ReplicaResult>,
) -> Vec<pb::ReportStatus> {
    app.report_as(auth, results)
        .await
        .iter()
        .map(|a| a.status())
        .collect()
}

fn study(module_hash: Vec<u8>) -> pb::SubmitStudyRequest {
    pb::SubmitStudyRequest {
        name: "owned".into(),
        module_hash,
        policy: Some(policy(2)),
        work_units: vec![pb::WorkUnitSpec {
            input: b"{\"i\":1}".to_vec(),
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_is_for_and_no_more() {
    let app = TestApp::spawn().await;
    let reader = app
        .client_with(Some(&app.mint_key(Role::Reader, "dash").await))
        .await;
    let researcher = app.client().await;
    let admin = app
        .client_with(Some(&app.mint_key(Role::Admin, "ops").await))
        .await;
    let nobody = app.client_with(None).await;
    let forged = app.client_with(Some("acc_0123456789")).await;
    let status = pb::GetStatusRequest { study_id: 0 };
    let findings = pb::ListFindingsRequest::default();

    // No key, or a key nobody issued: UNAUTHENTICATED, with a message that says what to send.
    let err = nobody
        .research
        .clone()
        .get_status(status)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("authorization: Bearer"), "{err:?}");
    for c in [&nobody, &forged] {
        assert_eq!(
            code(c.ledger.clone().list_findings(findings.clone()).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(
                c.research
                    .clone()
                    .put_module(pb::PutModuleRequest {
                        wasm: MODULE.to_vec(),
                        name: "m".into(),
                    })
                    .await
            ),
            Code::Unauthenticated
        );
    }

    // A reader queries and nothing else.
    assert_eq!(
        code(reader.research.clone().get_status(status).await),
        Code::Ok
    );
    assert_eq!(
        code(reader.ledger.clone().list_findings(findings.clone()).await),
        Code::Ok
    );
    let err = reader
        .research
        .clone()
        .put_module(pb::PutModuleRequest {
            wasm: MODULE.to_vec(),
            name: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("researcher role"), "{err:?}");
    assert_eq!(
        code(
            reader
                .ledger
                .clone()
                .adopt(pb::AdoptRequest {
                    finding_id: 1,
                    ..Default::default()
                })
                .await
        ),
        Code::PermissionDenied
    );

    // A researcher uploads and submits, but manages no keys.
    let hash = researcher
        .research
        .clone()
        .put_module(pb::PutModuleRequest {
            wasm: MODULE.to_vec(),
            name: "m".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .hash;
    assert_eq!(
        code(
            reader
                .research
                .clone()
                .submit_study(study(hash.clone()))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(researcher.research.clone().submit_study(study(hash)).await),
        Code::Ok
    );
    assert_eq!(
        code(
            researcher
                .admin
                .clone()
                .list_api_keys(pb::ListApiKeysRequest {})
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            reader
                .admin
                .clone()
                .list_api_keys(pb::ListApiKeysRequest {})
                .await
        ),
        Code::PermissionDenied
    );

    // An admin does everything, including keys; a key it makes works at once and is listed
    // without its secret.
    assert_eq!(
        code(admin.research.clone().get_status(status).await),
        Code::Ok
    );
    let made = admin
        .admin
        .clone()
        .create_api_key(pb::CreateApiKeyRequest {
            role: "reader".into(),
            name: "new".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let fresh = app.client_with(Some(&made.key)).await;
    assert_eq!(
        code(fresh.research.clone().get_status(status).await),
        Code::Ok
    );
    let listed = admin
        .admin
        .clone()
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.len(), 4, "harness, dash, ops, new: {listed:?}");
    assert!(
        !format!("{listed:?}").contains(&made.key),
        "a listing never shows a key"
    );
    assert_eq!(
        code(
            admin
                .admin
                .clone()
                .create_api_key(pb::CreateApiKeyRequest {
                    role: "root".into(),
                    name: String::new()
                })
                .await
        ),
        Code::InvalidArgument
    );
    // Only hashes are stored.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys WHERE key_hash = $1")
        .bind(&blake3::hash(made.key.as_bytes()).as_bytes()[..])
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(stored, 1);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_credentials_and_api_keys_each_open_only_their_own_door() {
    let app = TestApp::spawn().await;
    let worker = app.register("w").await;
    // A worker's token as a bearer key: refused, and told why.
    for bearer in [
        worker.token.clone(),
        format!("{}:{}", worker.worker_id, worker.token),
    ] {
        let c = app.client_with(Some(&bearer)).await;
        let err = c
            .research
            .clone()
            .get_status(pb::GetStatusRequest { study_id: 0 })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("worker credential"), "{err:?}");
        assert_eq!(
            code(
                c.ledger
                    .clone()
                    .list_findings(pb::ListFindingsRequest::default())
                    .await
            ),
            Code::Unauthenticated
        );
    }

    // An admin key on the worker service: no worker call, with it or in place of a credential.
    let key = app.mint_key(Role::Admin, "ops").await;
    let mut request = tonic::Request::new(pb::FetchWorkRequest {
        auth: None,
        max: 1,
        resume: false,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let err = app
        .worker_client()
        .await
        .fetch_work(request)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("API keys cannot make worker calls"),
        "{err:?}"
    );
    let as_token = pb::WorkerAuth {
        worker_id: worker.worker_id.clone(),
        token: key.clone(),
    };
    assert_eq!(
        code(fetch(&app, &as_token, 1, false).await),
        Code::Unauthenticated
    );
    let err = app
        .worker_client()
        .await
        .heartbeat(pb::HeartbeatRequest {
            auth: None,
            busy_slots: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // The worker's own credential still works.
    assert_eq!(code(fetch(&app, &worker, 1, false).await), Code::Ok);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_within_the_cache_ttl() {
    let app = TestApp::spawn().await;
    let ttl = app.config.auth_cache_ttl;
    let key = app.mint_key(Role::Reader, "soon gone").await;
    let c = app.client_with(Some(&key)).await;
    let status = pb::GetStatusRequest { study_id: 0 };
    assert_eq!(code(c.research.clone().get_status(status).await), Code::Ok);
    // Revoked in the database, as `accrete-server keys revoke` or another server does: this
    // server has the key cached and must notice within its TTL.
    let key_id: i64 = sqlx::query_scalar("SELECT id FROM api_keys WHERE name = 'soon gone'")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert!(app.store.revoke_api_key(key_id).await.unwrap());
    let revoked = Instant::now();
    eventually(
        ttl + Duration::from_secs(2),
        "the revoked key to be refused",
        || {
            let mut r = c.research.clone();
            async move { code(r.get_status(status).await) == Code::Unauthenticated }
        },
    )
    .await;
    assert!(
        revoked.elapsed() <= ttl + Duration::from_millis(1500),
        "{:?}",
        revoked.elapsed()
    );

    // Revoked through the admin service of this server: refused at once.
    let admin = app
        .client_with(Some(&app.mint_key(Role::Admin, "ops").await))
        .await;
    let doomed = app.mint_key(Role::Researcher, "doomed").await;
    let d = app.client_with(Some(&doomed)).await;
    assert_eq!(code(d.research.clone().get_status(status).await), Code::Ok);
    let doomed_id = admin
        .admin
        .clone()
        .list_api_keys(pb::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .find(|k| k.name == "doomed")
        .unwrap()
        .id;
    admin
        .admin
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest { id: doomed_id })
        .await
        .unwrap();
    let err = d.research.clone().get_status(status).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("revoked"), "{err:?}");
    // Revoking twice says so.
    assert_eq!(
        code(
            admin
                .admin
                .clone()
                .revoke_api_key(pb::RevokeApiKeyRequest { id: doomed_id })
                .await
        ),
        Code::NotFound
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_worker_is_refused_every_call_until_unblocked() {
    let app = TestApp::spawn().await;
    app.submit(MODULE, inputs(2), policy(2), bounds()).await;
    let admin = app
        .client_with(Some(&app.mint_key(Role::Admin, "ops").await))
        .await;
    let w = app.register("w").await;
    let held = fetch(&app, &w, 1, false).await.unwrap();
    assert_eq!(held.len(), 1);

    // Blocked through the admin service: refused at once, on every worker call.
    admin
        .admin
        .clone()
        .set_worker_blocked(pb::SetWorkerBlockedRequest {
            worker_id: w.worker_id.clone(),
            blocked: true,
        })
        .await
        .unwrap();
    let err = fetch(&app, &w, 1, false).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("blocked"), "{err:?}");
    let err = app
        .worker_client()
        .await
        .report_results(pb::ReportResultsRequest {
            auth: Some(w.clone()),
            results: vec![success(held[0].replica_id, OUTPUT)],
            fetch: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let beat = app
        .worker_client()
        .await
        .heartbeat(pb::HeartbeatRequest {
            auth: Some(w.clone()),
            busy_slots: 0,
        })
        .await;
    assert_eq!(code(beat), Code::PermissionDenied);
    // Its result was not recorded.
    let state: String = sqlx::query_scalar("SELECT state::text FROM replicas WHERE id = $1")
        .bind(held[0].replica_id as i64)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(state, "in_progress");

    // Unblocked in the database (as another server would): works again within the TTL.
    assert!(app.store.set_blocked(id(&w), false).await.unwrap());
    eventually(
        app.config.auth_cache_ttl + Duration::from_secs(2),
        "the unblock to apply",
        || async { code(fetch(&app, &w, 1, false).await) == Code::Ok },
    )
    .await;
    // A researcher key cannot block anyone; an unknown worker is NOT_FOUND.
    let err = app
        .client()
        .await
        .admin
        .set_worker_blocked(pb::SetWorkerBlockedRequest {
            worker_id: w.worker_id.clone(),
            blocked: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        code(
            admin
                .admin
                .clone()
                .set_worker_blocked(pb::SetWorkerBlockedRequest {
                    worker_id: Uuid::new_v4().to_string(),
                    blocked: true,
                })
                .await
        ),
        Code::NotFound
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn researchers_cancel_only_their_own_studies_and_admins_any() {
    let app = TestApp::spawn().await;
    let alice = app.client().await;
    let bob = app
        .client_with(Some(&app.mint_key(Role::Researcher, "bob").await))
        .await;
    let admin = app
        .client_with(Some(&app.mint_key(Role::Admin, "ops").await))
        .await;
    let hash = alice
        .clone()
        .put_module(MODULE.to_vec(), "m")
        .await
        .unwrap();
    let submit = |c: &accrete::client::Client, i: u32| {
        let mut r = c.research.clone();
        let mut s = study(hash.clone());
        s.work_units[0].input = format!("{{\"i\":{i}}}").into_bytes();
        async move { r.submit_study(s).await.unwrap().into_inner().study_id }
    };
    let alices = submit(&alice, 1).await;
    let bobs = submit(&bob, 2).await;
    let owner: Option<i64> = sqlx::query_scalar("SELECT owner_key FROM studies WHERE id = $1")
        .bind(alices as i64)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert!(owner.is_some(), "a study records the key that submitted it");

    let cancel = |c: &accrete::client::Client, study_id: u64| {
        let mut r = c.research.clone();
        async move { r.cancel_study(pb::CancelStudyRequest { study_id }).await }
    };
    let err = cancel(&bob, alices).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("another API key"), "{err:?}");
    assert_eq!(
        cancel(&alice, alices)
            .await
            .unwrap()
            .into_inner()
            .cancelled_units,
        1
    );
    assert_eq!(
        cancel(&admin, bobs)
            .await
            .unwrap()
            .into_inner()
            .cancelled_units,
        1
    );
    assert_eq!(code(cancel(&alice, 999).await), Code::NotFound);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_keeps_its_identity_and_finishes_what_it_held() {
    let app = TestApp::spawn().await;
    // Long deadlines: a held replica could only finish early if its worker came back for it.
    let mut p = policy(1);
    p.delay_bound_secs = 3600;
    let study = app.submit(MODULE, tiny_inputs(3), p, bounds()).await;
    // A worker that claimed everything and then "crashed": its credential is in the file a
    // worker process would have written.
    let w = app.register("crashed").await;
    let held = fetch(&app, &w, 10, false).await.unwrap();
    assert_eq!(held.len(), 3);
    // Resume hands back what it holds (and only within `max`), new claims come after.
    let again = fetch(&app, &w, 2, true).await.unwrap();
    assert_eq!(
        again.iter().map(|a| a.replica_id).collect::<Vec<_>>(),
        held[..2].iter().map(|a| a.replica_id).collect::<Vec<_>>()
    );
    let file = app.credential_file("restarted");
    std::fs::write(
        &file,
        format!(
            "server={}\nworker_id={}\ntoken={}\n",
            app.server_url, w.worker_id, w.token
        ),
    )
    .unwrap();

    let mut app = app;
    let mut config = accrete_worker::WorkerConfig::new(app.server_url.clone());
    config.slots = 2;
    config.credential_file = Some(file.clone());
    let i = app.start_worker_with(config);
    let done = app.wait_done(study.study_id, TIMEOUT).await;
    assert_eq!(done.validated, 3, "{done:?}");
    let summary = app.stop_worker(i).await;
    assert_eq!(summary.worker_id.as_deref(), Some(w.worker_id.as_str()));
    let (workers, issued): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM workers), (SELECT count(*) FROM replicas)")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (workers, issued),
        (1, 3),
        "same worker, same replicas, nothing reissued"
    );

    // A worker process saves the credential it registers with, and a restart reuses it.
    let _ = std::fs::remove_file(&file);
    let bins = &crate::BINS;
    let first = app.start_worker_process(bins, "restarted", 1);
    let path = file.clone();
    eventually(TIMEOUT, "the credential file", || {
        let path = path.clone();
        async move { std::fs::read_to_string(&path).is_ok_and(|t| t.contains("token=")) }
    })
    .await;
    let saved = std::fs::read_to_string(&file).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the credential is readable by its owner only"
        );
    }
    app.kill_worker_process(first);
    app.start_worker_process(bins, "restarted", 1);
    let more = app
        .submit(MODULE, tiny_inputs_from(3, 2), policy(1), bounds())
        .await;
    app.wait_done(more.study_id, TIMEOUT).await;
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        saved,
        "not re-registered"
    );
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM workers")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(
        workers, 2,
        "the hand-made worker and one process worker across its restart"
    );
    let _ = std::fs::remove_file(&file);
    app.shutdown().await;
}

fn tiny_inputs(n: usize) -> Vec<Vec<u8>> {
    tiny_inputs_from(0, n)
}

fn tiny_inputs_from(from: usize, n: usize) -> Vec<Vec<u8>> {
    (from..from + n)
        .map(|i| {
            serde_json::json!({ "seed": i as u64, "lr": 0.1, "hidden": 4, "steps": 20 })
                .to_string()
                .into_bytes()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reports_are_counted_against_their_sender() {
    let app = TestApp::spawn().await;
    app.submit(MODULE, inputs(1), policy(2), bounds()).await;
    let owner = app.register("owner").await;
    let thief = app.register("thief").await;
    let mine = fetch(&app, &owner, 1, false)
        .await
        .unwrap()
        .remove(0)
        .replica_id;
    let rep = |w: pb::WorkerAuth| {
        let store = app.store.clone();
        async move { store.reputation(id(&w)).await.unwrap().unwrap() }
    };

    // Another worker's replica, an unknown one, a forged hash: refused and counted.
    let mut forged = success(987_655, OUTPUT);
    if let Some(pb::replica_result::Outcome::Success(s)) = &mut forged.outcome {
        s.output_hash = vec![0; 32];
    }
    let acks = report(
        &app,
        &thief,
        vec![success(mine, OUTPUT), success(987_654, OUTPUT), forged],
    )
    .await;
    assert!(
        acks.iter().all(|a| *a == pb::ReportStatus::Rejected),
        "{acks:?}"
    );
    let t = rep(thief.clone()).await;
    assert_eq!(
        (t.rejected_reports, t.daily_quota),
        (3, 125),
        "three refusals, three halvings"
    );

    // The owner's own report counts; an identical repeat is a harmless duplicate; a second,
    // different result is refused and counted.
    assert_eq!(
        report(&app, &owner, vec![success(mine, OUTPUT)]).await,
        [pb::ReportStatus::Accepted]
    );
    assert_eq!(
        report(&app, &owner, vec![success(mine, OUTPUT)]).await,
        [pb::ReportStatus::Duplicate]
    );
    assert_eq!(rep(owner.clone()).await.rejected_reports, 0);
    let other = br#"{"metrics":{"x":2}}"#;
    assert_eq!(
        report(&app, &owner, vec![success(mine, other)]).await,
        [pb::ReportStatus::Rejected]
    );
    let o = rep(owner.clone()).await;
    assert_eq!((o.rejected_reports, o.daily_quota), (1, 500));
    // Dashboards see it too.
    let shown: i64 =
        sqlx::query_scalar("SELECT rejected_reports FROM v_worker_stats WHERE worker_id = $1")
            .bind(id(&thief))
            .fetch_one(app.store.pool())
            .await
            .unwrap();
    assert_eq!(shown, 3);
    app.shutdown().await;
}
