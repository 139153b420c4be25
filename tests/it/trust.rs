//! The trust engine over the real worker API: volunteer accounts (joined by key, with a quota
//! shared across their machines), reputation and daily quotas, the statuses a blocked or
//! over-quota worker gets, cross-platform assignment, and adaptive
//! replication handing trusted workers work alone.

use accrete_tests::{TestApp, v1 as pb};
use uuid::Uuid;

use crate::{bounds, count, policy, success};

/// Any module will do: these tests play the workers by hand and never run it.
const MODULE: &[u8] = accrete_tasks::TINY_MODEL;
const OUTPUT: &[u8] = br#"{"metrics":{"x":1}}"#;

fn inputs(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{{\"i\":{i}}}").into_bytes())
        .collect()
}

async fn fetch(
    app: &TestApp,
    auth: &pb::WorkerAuth,
    max: u32,
) -> Result<Vec<pb::Assignment>, tonic::Status> {
    app.fetch_as(auth, max, false).await
}

fn failure(replica_id: u64) -> pb::ReplicaResult {
    pb::ReplicaResult {
        replica_id,
        outcome: Some(pb::replica_result::Outcome::Failure(pb::Failure {
            kind: pb::ErrorKind::Trap as i32,
            message: "boom".into(),
            fuel_used: 1,
        })),
        wall_micros: 1,
    }
}

async fn report(app: &TestApp, auth: &pb::WorkerAuth, results: Vec<pb::ReplicaResult>) {
    let acks = app.report_as(auth, results).await;
    assert!(
        acks.iter()
            .all(|a| a.status() == pb::ReportStatus::Accepted),
        "{acks:?}"
    );
}

fn id(auth: &pb::WorkerAuth) -> Uuid {
    Uuid::parse_str(&auth.worker_id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_of_one_account_never_share_a_work_unit() {
    let app = TestApp::spawn().await;
    app.submit(MODULE, inputs(1), policy(2), bounds()).await;
    let (alice, bob) = (
        app.create_account("alice").await,
        app.create_account("bob").await,
    );
    let a1 = app.register_as("a1", &alice, "x86_64").await;
    let a2 = app.register_as("a2", &alice, "x86_64").await;
    let b = app.register_as("b", &bob, "x86_64").await;
    assert_eq!(fetch(&app, &a1, 1).await.unwrap().len(), 1);
    // The unit still wants a replica, but not from alice's other worker.
    assert!(fetch(&app, &a2, 1).await.unwrap().is_empty());
    assert_eq!(fetch(&app, &b, 1).await.unwrap().len(), 1);
    // And it is a database fact, not only the claim's manners.
    let dup = sqlx::query(
        "INSERT INTO replicas (wu_id, worker_id, account, platform, deadline)
         SELECT wu_id, $1, 'alice', 'x', now() FROM replicas LIMIT 1",
    )
    .bind(id(&a2))
    .execute(app.store.pool())
    .await;
    assert!(
        dup.is_err(),
        "a second replica on alice's account was accepted"
    );
    let rep = app.store.reputation(id(&a1)).await.unwrap().unwrap();
    assert_eq!(rep.account.as_deref(), Some("alice"));
    // The account's reputation sums its two workers' (nothing reported yet: the prior).
    let (ra, rb) = (fetch(&app, &a1, 1).await, fetch(&app, &b, 1).await);
    assert!(
        ra.unwrap().is_empty() && rb.unwrap().is_empty(),
        "one unit, both replicas out"
    );
    let acct = app
        .store
        .account_reputation("alice")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (acct.workers, acct.valid_count, acct.invalid_count),
        (2, 0, 0)
    );
    assert!((acct.error_rate - 0.1).abs() < 1e-12, "the prior mean");
    assert!(
        app.store
            .account_reputation("nobody")
            .await
            .unwrap()
            .is_none()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_halve_the_quota_until_the_worker_is_told_to_come_back_tomorrow() {
    let app = TestApp::spawn().await;
    let p = pb::ReplicationPolicy {
        max_error_results: 20,
        max_total_results: 30,
        ..policy(2)
    };
    app.submit(MODULE, inputs(10), p, bounds()).await;
    let w = app.register("flaky").await;
    let got = fetch(&app, &w, 10).await.unwrap();
    assert_eq!(got.len(), 10);
    report(
        &app,
        &w,
        got.iter().map(|a| failure(a.replica_id)).collect(),
    )
    .await;
    let rep = app.store.reputation(id(&w)).await.unwrap().unwrap();
    // 1000 halved ten times, never below 1.
    assert_eq!(
        (rep.error_count, rep.consecutive_valid, rep.daily_quota),
        (10, 0, 1)
    );
    let err = fetch(&app, &w, 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("resets at"), "{}", err.message());

    // A valid result grows the quota back (and a new day would reset the count).
    let good = app.register("good").await;
    let a = fetch(&app, &good, 1).await.unwrap();
    // Claims start in a random lane of the queue: take every unit to be sure of a's.
    let b = app.register("good2").await;
    let bb = fetch(&app, &b, 10).await.unwrap();
    let same = bb
        .iter()
        .find(|x| x.work_unit_id == a[0].work_unit_id)
        .expect("the second worker gets the first one's unit too");
    report(&app, &good, vec![success(a[0].replica_id, OUTPUT)]).await;
    report(&app, &b, vec![success(same.replica_id, OUTPUT)]).await;
    let rep = app.store.reputation(id(&good)).await.unwrap().unwrap();
    assert_eq!(
        (rep.valid_count, rep.consecutive_valid, rep.daily_quota),
        (1, 1, 1000)
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_worker_is_told_so() {
    let app = TestApp::spawn().await;
    app.submit(MODULE, inputs(1), policy(2), bounds()).await;
    let w = app.register("bad").await;
    assert!(app.store.set_blocked(id(&w), true).await.unwrap());
    let err = fetch(&app, &w, 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("blocked"));
    assert_eq!(count(&app, "SELECT count(*) FROM replicas").await, 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_prefers_a_unit_not_yet_run_on_its_platform() {
    let app = TestApp::spawn().await;
    app.submit(MODULE, inputs(2), policy(2), bounds()).await;
    let x1 = app.register_as("x1", "", "x86_64").await;
    let x2 = app.register_as("x2", "", "x86_64").await;
    let arm = app.register_as("arm", "", "aarch64").await;
    let first = fetch(&app, &x1, 1).await.unwrap();
    // Another x86_64 worker skips the lower unit x86_64 already runs, for the untouched one.
    let second = fetch(&app, &x2, 1).await.unwrap();
    assert_ne!(first[0].work_unit_id, second[0].work_unit_id);
    // The arm worker is welcome on both.
    let arm_got = fetch(&app, &arm, 2).await.unwrap();
    assert_eq!(arm_got.len(), 2);
    let on_first = arm_got
        .iter()
        .find(|r| r.work_unit_id == first[0].work_unit_id)
        .unwrap();
    report(&app, &x1, vec![success(first[0].replica_id, OUTPUT)]).await;
    report(&app, &arm, vec![success(on_first.replica_id, OUTPUT)]).await;
    let f = &app.findings(1).await[0];
    assert_eq!(
        f.platforms,
        vec!["aarch64/linux".to_string(), "x86_64/linux".to_string()]
    );
    let new_x86 = accrete_server::scheduler::Voter {
        error_rate: 0.1,
        platform: "x86_64/linux".into(),
    };
    let same_platform = accrete_server::scheduler::confidence(&[new_x86.clone(), new_x86]);
    assert!(
        f.confidence > same_platform,
        "{} vs {same_platform}",
        f.confidence
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_replication_lets_trusted_workers_run_alone() {
    let app = TestApp::spawn().await;
    let adaptive = pb::ReplicationPolicy {
        adaptive: true,
        ..policy(2)
    };
    // Warm-up: two workers agree on 45 units, so both are trusted (45 clean results).
    app.submit(MODULE, inputs(45), adaptive, bounds()).await;
    let (a, b) = (app.register("a").await, app.register("b").await);
    let ra = fetch(&app, &a, 45).await.unwrap();
    let rb = fetch(&app, &b, 45).await.unwrap();
    assert_eq!(
        (ra.len(), rb.len()),
        (45, 45),
        "new workers always run replicated work"
    );
    report(
        &app,
        &a,
        ra.iter().map(|r| success(r.replica_id, OUTPUT)).collect(),
    )
    .await;
    report(
        &app,
        &b,
        rb.iter().map(|r| success(r.replica_id, OUTPUT)).collect(),
    )
    .await;
    let rep = app.store.reputation(id(&a)).await.unwrap().unwrap();
    assert_eq!(rep.consecutive_valid, 45);

    // Now most of a's new adaptive units are its alone (a spot check each 1/45 of the time).
    // New inputs: identical units already validated would be answered by their findings.
    let fresh: Vec<Vec<u8>> = (100..140)
        .map(|i| format!("{{\"i\":{i}}}").into_bytes())
        .collect();
    let study = app.submit(MODULE, fresh, adaptive, bounds()).await;
    let got = fetch(&app, &a, 40).await.unwrap();
    report(
        &app,
        &a,
        got.iter().map(|r| success(r.replica_id, OUTPUT)).collect(),
    )
    .await;
    let findings = app.findings(study.study_id).await;
    let solo: Vec<_> = findings.iter().filter(|f| f.unreplicated).collect();
    assert!(solo.len() >= 32, "only {} of 40 ran alone", solo.len());
    assert!(solo.len() < 40 || findings.len() == 40);
    for f in &solo {
        assert_eq!(f.agreeing.len(), 1);
        // One worker: confidence is its own reliability, below any replicated finding's.
        assert!(
            f.confidence < 0.99 && f.confidence > 0.97,
            "{}",
            f.confidence
        );
    }
    // Spot-checked units wait for a second replica, which must not be a's.
    let pending = count(
        &app,
        "SELECT count(*) FROM work_units WHERE state = 'pending'",
    )
    .await;
    assert_eq!(pending as usize, 40 - solo.len());
    // Unchecked results earn no credit.
    let rep = app.store.reputation(id(&a)).await.unwrap().unwrap();
    assert_eq!(rep.valid_count, 45);

    // A fresh worker never gets an adaptive unit alone.
    app.submit(MODULE, inputs(5), adaptive, bounds()).await;
    let c = app.register("c").await;
    let rc = fetch(&app, &c, 50).await.unwrap();
    report(
        &app,
        &c,
        rc.iter().map(|r| success(r.replica_id, OUTPUT)).collect(),
    )
    .await;
    assert_eq!(
        count(&app, "SELECT count(*) FROM replicas WHERE solo AND worker_id NOT IN (SELECT id FROM workers WHERE name = 'a')").await,
        0
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_tolerance_lets_close_metrics_agree_and_exact_is_the_default() {
    let app = TestApp::spawn().await;
    let mut c = app.client().await;
    let module_hash = c.put_module(MODULE.to_vec(), "m").await.unwrap();
    let request = |tolerance: Vec<pb::MetricTolerance>| pb::SubmitStudyRequest {
        name: "tolerant".into(),
        description: String::new(),
        module_hash: module_hash.clone(),
        // A third replica, to report late.
        policy: Some(pb::ReplicationPolicy {
            target_nresults: 3,
            ..policy(2)
        }),
        bounds: Some(bounds()),
        tolerance,
        work_units: vec![pb::WorkUnitSpec {
            input: b"{}".to_vec(),
        }],
        ..Default::default()
    };
    let bad = c
        .research
        .submit_study(request(vec![pb::MetricTolerance {
            metric: "loss".into(),
            abs: -1.0,
            rel: 0.0,
        }]))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let close = |loss: &str| format!(r#"{{"metrics":{{"loss":{loss},"steps":10}}}}"#).into_bytes();
    for (tolerance, validates) in [
        (
            vec![pb::MetricTolerance {
                metric: "loss".into(),
                abs: 0.0,
                rel: 1e-6,
            }],
            true,
        ),
        (vec![], false),
    ] {
        let study = c
            .research
            .submit_study(request(tolerance))
            .await
            .unwrap()
            .into_inner();
        let (a, b, late) = (
            app.register("a").await,
            app.register("b").await,
            app.register("late").await,
        );
        let ra = fetch(&app, &a, 1).await.unwrap();
        let rb = fetch(&app, &b, 1).await.unwrap();
        let rl = fetch(&app, &late, 1).await.unwrap();
        report(&app, &a, vec![success(ra[0].replica_id, &close("0.5"))]).await;
        report(
            &app,
            &b,
            vec![success(rb[0].replica_id, &close("0.5000000001"))],
        )
        .await;
        let findings = app.findings(study.study_id).await;
        assert_eq!(findings.len(), validates as usize, "tolerance: {validates}");
        if validates {
            // The canonical output is the first replica's.
            assert_eq!(findings[0].output, close("0.5"));
            assert_eq!(findings[0].agreeing.len(), 2);
            // A late result is compared with the canonical one under the same tolerance.
            report(
                &app,
                &late,
                vec![success(rl[0].replica_id, &close("0.49999999995"))],
            )
            .await;
            let rep = app.store.reputation(id(&late)).await.unwrap().unwrap();
            assert_eq!((rep.valid_count, rep.invalid_count), (1, 0));
        }
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_is_joined_by_its_key_and_never_by_its_name() {
    let app = TestApp::spawn().await;
    let mut w = app.worker_client().await;
    let created = w
        .create_account(pb::CreateAccountRequest {
            name: "dave".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "dave");
    assert!(created.account_key.starts_with("acc_"), "{created:?}");
    assert_eq!(created.daily_quota, 10_000, "the server's default");

    // The name is taken: nobody can make "dave" again and so learn a key for it.
    let again = w
        .create_account(pb::CreateAccountRequest {
            name: "dave".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::AlreadyExists, "{again:?}");
    for bad in ["", "a b", "x".repeat(65).as_str(), "dave\0", "caf\u{e9}"] {
        let err = w
            .create_account(pb::CreateAccountRequest { name: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err:?}");
    }

    // A wrong key (the real one with its last hex digit changed) registers nothing.
    let (stem, last) = created.account_key.split_at(created.account_key.len() - 1);
    let forged = format!("{stem}{}", if last == "0" { "1" } else { "0" });
    let workers_before = count(&app, "SELECT count(*) FROM workers").await;
    let forged = w
        .register(pb::RegisterRequest {
            platform: Some(pb::Platform {
                arch: "x86_64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            name: "mallory".into(),
            account_key: forged,
        })
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated, "{forged:?}");
    assert!(
        forged.message().contains("account key"),
        "{}",
        forged.message()
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM workers").await,
        workers_before
    );

    // The right key joins the account, and the server says which.
    let joined = w
        .register(pb::RegisterRequest {
            platform: Some(pb::Platform {
                arch: "x86_64".into(),
                os: "linux".into(),
                ..Default::default()
            }),
            name: "dave-laptop".into(),
            account_key: created.account_key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.account, "dave");
    let rep = app
        .store
        .reputation(Uuid::parse_str(&joined.worker_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rep.account.as_deref(), Some("dave"));
    // Only the key's hash is stored.
    let stored: Vec<u8> = sqlx::query_scalar("SELECT key_hash FROM accounts WHERE name = 'dave'")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(
        stored,
        blake3::hash(created.account_key.as_bytes()).as_bytes()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_daily_quota_holds_across_its_machines_even_when_they_claim_at_once() {
    let app = TestApp::spawn().await;
    app.submit(MODULE, inputs(200), policy(1), bounds()).await;
    let key = app.create_account("carol").await;
    let admin = app
        .mint_key(accrete_server::auth::Role::Admin, "operator")
        .await;
    let mut ops = app.client_with(Some(&admin)).await;
    ops.admin
        .set_account_quota(pb::SetAccountQuotaRequest {
            account: "carol".into(),
            daily_quota: 7,
        })
        .await
        .unwrap();
    let unknown = ops
        .admin
        .set_account_quota(pb::SetAccountQuotaRequest {
            account: "nobody".into(),
            daily_quota: 7,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    // Only an admin may.
    let denied = app
        .client()
        .await
        .admin
        .set_account_quota(pb::SetAccountQuotaRequest {
            account: "carol".into(),
            daily_quota: 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    // Four machines, each with plenty of its own quota, claiming at once and repeatedly.
    let mut machines = Vec::new();
    for i in 0..4 {
        machines.push(app.register_as(&format!("carol-{i}"), &key, "x86_64").await);
    }
    let mut claims = tokio::task::JoinSet::new();
    for m in &machines {
        for _ in 0..3 {
            let (app_url, m) = (app.server_url.clone(), m.clone());
            claims.spawn(async move {
                let mut c = pb::worker_service_client::WorkerServiceClient::connect(app_url)
                    .await
                    .unwrap();
                c.fetch_work(pb::FetchWorkRequest {
                    auth: Some(m),
                    max: 3,
                    resume: false,
                })
                .await
                .map(|r| r.into_inner().assignments.len())
            });
        }
    }
    let mut granted = 0;
    while let Some(r) = claims.join_next().await {
        match r.unwrap() {
            Ok(n) => granted += n,
            Err(s) => assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(granted, 7, "the account's quota, not 4 machines x 9");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM replicas WHERE account = 'carol'"
        )
        .await,
        7
    );
    let err = fetch(&app, &machines[3], 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("account \"carol\"") && err.message().contains("resets at"),
        "{}",
        err.message()
    );
    // A worker of no account is not held back by carol's.
    let other = app.register("solo").await;
    assert_eq!(fetch(&app, &other, 3).await.unwrap().len(), 3);

    // A new UTC day: the count starts again (the day is moved back rather than waiting).
    sqlx::query("UPDATE accounts SET quota_day = quota_day - 1 WHERE name = 'carol'")
        .execute(app.store.pool())
        .await
        .unwrap();
    assert_eq!(fetch(&app, &machines[0], 5).await.unwrap().len(), 5);
    assert_eq!(fetch(&app, &machines[1], 5).await.unwrap().len(), 2);
    // An admin's 0 stops the account's work at once.
    ops.admin
        .set_account_quota(pb::SetAccountQuotaRequest {
            account: "carol".into(),
            daily_quota: 0,
        })
        .await
        .unwrap();
    sqlx::query("UPDATE accounts SET quota_day = quota_day - 1 WHERE name = 'carol'")
        .execute(app.store.pool())
        .await
        .unwrap();
    let stopped = fetch(&app, &machines[2], 1).await.unwrap_err();
    assert_eq!(
        stopped.code(),
        tonic::Code::ResourceExhausted,
        "{stopped:?}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_binary_makes_an_account_its_machines_join_and_a_wrong_key_stops_it() {
    let mut app = TestApp::spawn().await;
    let create = |name: &str| {
        std::process::Command::new(crate::BINS.worker)
            .args(["--server", &app.server_url, "--create-account", name])
            .output()
            .unwrap()
    };
    let made = create("erin");
    assert!(made.status.success(), "{made:?}");
    let key = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("acc_"), "stdout is the key alone: {key:?}");
    let taken = create("erin");
    assert!(!taken.status.success());
    assert!(
        String::from_utf8_lossy(&taken.stderr).contains("already exists"),
        "{taken:?}"
    );

    // A mistyped key: the worker says so and exits, rather than retrying for ever.
    let wrong = std::process::Command::new(crate::BINS.worker)
        .args(["--server", &app.server_url, "--no-credential-file"])
        .env("ACCRETE_ACCOUNT_KEY", "acc_not-a-key")
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "{wrong:?}");
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("unknown account key"), "{said}");

    // Two machines of erin's and one of nobody's run a quorum-2 study to the end.
    let study = app
        .submit(
            accrete_tasks::TINY_MODEL,
            crate::tiny_model_inputs(6, 20),
            policy(2),
            bounds(),
        )
        .await;
    app.start_worker_command(crate::BINS.worker, &["--account-key", &key], "erin-1", 1);
    app.start_worker_command(crate::BINS.worker, &["--account-key", &key], "erin-2", 1);
    app.start_worker_process(&crate::BINS, "frank", 1);
    let status = app.wait_done(study.study_id, crate::TIMEOUT).await;
    assert_eq!(status.validated, 6, "{status:?}");
    let joined: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT name, account FROM workers ORDER BY name")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    assert_eq!(
        joined,
        [
            ("erin-1".to_string(), Some("erin".to_string())),
            ("erin-2".to_string(), Some("erin".to_string())),
            ("frank".to_string(), None),
        ]
    );
    // Every unit was validated by erin and frank, never by erin twice.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM (SELECT wu_id FROM replicas WHERE account = 'erin'
                                   GROUP BY wu_id HAVING count(*) > 1) x"
        )
        .await,
        0
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_claim_finds_every_unit_whichever_lane_of_the_queue_it_starts_in() {
    // Claims start in a random lane of the queue (`id % 16`) and wrap round to the lanes
    // before it; with three units in three lanes, every claim must still find all three.
    let app = TestApp::spawn().await;
    let p = pb::ReplicationPolicy {
        target_nresults: 12,
        max_total_results: 12,
        max_success_results: 12,
        ..policy(12)
    };
    app.submit(MODULE, inputs(3), p, bounds()).await;
    for i in 0..12 {
        let w = app.register(&format!("w{i}")).await;
        let got = fetch(&app, &w, 3).await.unwrap();
        assert_eq!(got.len(), 3, "claim {i} found {got:?}");
    }
    let w = app.register("one-too-many").await;
    assert!(fetch(&app, &w, 3).await.unwrap().is_empty());
    app.shutdown().await;
}
