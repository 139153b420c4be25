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
    let got = app.fetch_as(auth, 1, false).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    got.into_iter().next().unwrap()
}

async fn report(app: &TestApp, auth: &pb::WorkerAuth, result: pb::ReplicaResult) -> pb::ReportAck {
    app.report_as(auth, vec![result])
        .await
        .into_iter()
        .next()
        .unwrap()
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
            fetch: 0,
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

/// Every replica a hand-driven worker can get, by work unit id.
async fn fetch_all(app: &TestApp, auth: &pb::WorkerAuth) -> std::collections::BTreeMap<u64, u64> {
    let mut client = app.worker_client().await;
    let mut got = std::collections::BTreeMap::new();
    loop {
        let r = client
            .fetch_work(pb::FetchWorkRequest {
                auth: Some(auth.clone()),
                max: 50,
                resume: false,
            })
            .await
            .unwrap()
            .into_inner();
        if r.assignments.is_empty() {
            return got;
        }
        for a in r.assignments {
            assert!(got.insert(a.work_unit_id, a.replica_id).is_none());
        }
    }
}

/// One large report mixing every kind of result (successes that complete a quorum, that wait,
/// that disagree; errors; hand-backs; duplicates and conflicting repeats; another worker's
/// replicas; an unknown id; late results on settled units, right and wrong) leaves exactly the
/// rows the rules say, whatever the batch holds: the store decides the whole batch in memory
/// and writes each table once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_mixed_report_batch_leaves_exactly_the_expected_rows() {
    use std::collections::BTreeMap;
    let app = TestApp::spawn().await;
    // Groups of work units by what happens to them, in submission order.
    const GROUPS: [(&str, usize); 11] = [
        ("validate", 40),  // A right, then B right in the big batch: validates there
        ("disagree", 4),   // A right, B different: waits for a tie-breaker
        ("wait", 10),      // only B reports: waits for A
        ("error", 2),      // A right, B errors
        ("hand_back", 3),  // A right, B hands back
        ("foreign", 3),    // A right; B reports A's replica: refused
        ("duplicate", 3),  // B right before, the same again: duplicate
        ("conflict", 2),   // B right before, something else now: refused
        ("error_dup", 1),  // B errored before, the same error again: duplicate
        ("late_valid", 4), // second study: A and C validate; B reports late, right
        ("late_wrong", 1), // the same; B reports late, wrong
    ];
    let mut group_of = Vec::new();
    for (g, n) in GROUPS {
        group_of.extend(std::iter::repeat_n(g, n));
    }
    let n_first = group_of.iter().filter(|g| !g.starts_with("late")).count();
    let input = |i: usize| format!(r#"{{"i":{i}}}"#).into_bytes();
    let right = |i: usize| format!(r#"{{"metrics":{{"v":{i}}}}}"#).into_bytes();
    let other = |i: usize| format!(r#"{{"metrics":{{"v":{i}.5}}}}"#).into_bytes();
    let first = app
        .submit(
            accrete_tasks::TINY_MODEL,
            (0..n_first).map(input).collect(),
            policy(2),
            bounds(),
        )
        .await;
    let three = pb::ReplicationPolicy {
        target_nresults: 3,
        ..policy(2)
    };
    let second = app
        .submit(
            accrete_tasks::TINY_MODEL,
            (n_first..group_of.len()).map(input).collect(),
            three,
            bounds(),
        )
        .await;
    let wu_ids: Vec<u64> = first
        .work_unit_ids
        .iter()
        .chain(&second.work_unit_ids)
        .copied()
        .collect();
    let (a, b, c) = (
        app.register("a").await,
        app.register("b").await,
        app.register("c").await,
    );
    let (ra, rb, rc) = (
        fetch_all(&app, &a).await,
        fetch_all(&app, &b).await,
        fetch_all(&app, &c).await,
    );
    assert_eq!(
        (ra.len(), rb.len(), rc.len()),
        (wu_ids.len(), wu_ids.len(), 5)
    );
    let fail = |replica_id| pb::ReplicaResult {
        replica_id,
        outcome: Some(pb::replica_result::Outcome::Failure(pb::Failure {
            kind: pb::ErrorKind::Trap as i32,
            message: "boom".into(),
            fuel_used: 7,
        })),
        wall_micros: 3,
    };
    let hand_back = |replica_id| pb::ReplicaResult {
        replica_id,
        outcome: Some(pb::replica_result::Outcome::HandBack(pb::HandBack {})),
        wall_micros: 0,
    };
    let units = || {
        wu_ids
            .iter()
            .copied()
            .enumerate()
            .map(|(i, wu)| (i, wu, group_of[i]))
    };

    // A reports where A's result is part of the story; C completes the second study.
    let a_results = units()
        .filter(|(_, _, g)| !matches!(*g, "wait" | "duplicate" | "conflict" | "error_dup"))
        .map(|(i, wu, _)| success(ra[&wu], &right(i)))
        .collect();
    assert!(
        app.report_as(&a, a_results)
            .await
            .iter()
            .all(|k| k.status() == pb::ReportStatus::Accepted)
    );
    let c_results = units()
        .filter(|(_, _, g)| g.starts_with("late"))
        .map(|(i, wu, _)| success(rc[&wu], &right(i)))
        .collect();
    app.report_as(&c, c_results).await;
    // B's earlier results.
    let b_before = units()
        .filter_map(|(i, wu, g)| match g {
            "duplicate" | "conflict" => Some(success(rb[&wu], &right(i))),
            "error_dup" => Some(fail(rb[&wu])),
            _ => None,
        })
        .collect();
    app.report_as(&b, b_before).await;

    // The big batch, interleaved (every third unit from the end first) so that no kind is
    // contiguous, with what each result should be acknowledged as.
    let mut order: Vec<usize> = (0..wu_ids.len()).collect();
    order.sort_by_key(|&i| (i % 3, std::cmp::Reverse(i)));
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    use pb::ReportStatus::{Accepted, Duplicate, Rejected};
    for i in order {
        let wu = wu_ids[i];
        let (result, status) = match group_of[i] {
            "validate" | "wait" | "late_valid" | "duplicate" => (
                success(rb[&wu], &right(i)),
                if group_of[i] == "duplicate" {
                    Duplicate
                } else {
                    Accepted
                },
            ),
            "disagree" => (success(rb[&wu], &other(i)), Accepted),
            "late_wrong" => (success(rb[&wu], &other(i)), Accepted),
            "error" => (fail(rb[&wu]), Accepted),
            "hand_back" => (hand_back(rb[&wu]), Accepted),
            "foreign" => (success(ra[&wu], &right(i)), Rejected),
            "conflict" => (success(rb[&wu], &other(i)), Rejected),
            "error_dup" => (fail(rb[&wu]), Duplicate),
            g => unreachable!("{g}"),
        };
        batch.push(result);
        expected.push((status, result_id(&batch)));
    }
    batch.push(success(9_000_000_000, &right(0)));
    expected.push((Rejected, 9_000_000_000));
    let acks = app.report_as(&b, batch).await;
    let got: Vec<(pb::ReportStatus, u64)> =
        acks.iter().map(|k| (k.status(), k.replica_id)).collect();
    assert_eq!(got, expected);
    let refused = expected.iter().filter(|e| e.0 == Rejected).count() as u32;

    // The rows, exactly.
    let pool = app.store.pool();
    type ReplicaRow = (
        i64,
        i64,
        String,
        String,
        bool,
        Option<Vec<u8>>,
        Option<String>,
        bool,
    );
    let replicas: BTreeMap<i64, ReplicaRow> = sqlx::query_as::<_, ReplicaRow>(
        "SELECT id, wu_id, state::text, validate_state::text, output IS NULL, output_hash,
                error_kind, reported_at IS NOT NULL
         FROM replicas",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.0, r))
    .collect();
    let wus: BTreeMap<i64, (String, i32, Option<i64>)> =
        sqlx::query_as::<_, (i64, String, i32, Option<i64>)>(
            "SELECT id, state::text, unsent, canonical_replica_id FROM work_units",
        )
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|w| (w.0, (w.1, w.2, w.3)))
        .collect();
    type FindingRow = (Vec<i64>, i32, Vec<u8>, Vec<String>, bool);
    let findings: BTreeMap<i64, FindingRow> =
        sqlx::query_as::<_, (i64, Vec<i64>, i32, Vec<u8>, Vec<String>, bool)>(
            "SELECT wu_id, agreeing_replicas, dissenting, output, platforms, unreplicated
             FROM findings",
        )
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.0, (f.1, f.2, f.3, f.4, f.5)))
        .collect();
    let hash = |o: &[u8]| Some(blake3::hash(o).as_bytes().to_vec());
    // (state, validate_state, output dropped, output hash, error kind, reported)
    let replica = |id: u64| {
        let r = &replicas[&(id as i64)];
        (
            r.2.as_str(),
            r.3.as_str(),
            r.4,
            r.5.clone(),
            r.6.as_deref(),
            r.7,
        )
    };
    let in_progress = ("in_progress", "init", true, None, None, false);
    let mut validated = 0;
    for (i, wu, g) in units() {
        let (ia, ib) = (ra[&wu], rb[&wu]);
        let unit = &wus[&(wu as i64)];
        let unit = (unit.0.as_str(), unit.1, unit.2);
        let kept = |o: Vec<u8>| ("success", "init", false, hash(&o), None, true);
        let settled = |o: Vec<u8>, v| ("success", v, true, hash(&o), None, true);
        let errored = ("error", "init", true, None, Some("trap"), true);
        match g {
            "validate" => {
                assert_eq!(unit, ("validated", 0, Some(ia as i64)), "{g} {i}");
                assert_eq!(replica(ia), settled(right(i), "valid"));
                assert_eq!(replica(ib), settled(right(i), "valid"));
                let f = &findings[&(wu as i64)];
                assert_eq!(
                    f,
                    &(
                        vec![ia as i64, ib as i64],
                        0,
                        right(i),
                        vec!["x86_64/linux".to_string()],
                        false
                    )
                );
                validated += 1;
            }
            "disagree" => {
                assert_eq!(unit, ("pending", 1, None), "{g} {i}");
                assert_eq!(replica(ia), kept(right(i)));
                assert_eq!(replica(ib), kept(other(i)));
            }
            "wait" => {
                assert_eq!(unit, ("pending", 0, None), "{g} {i}");
                assert_eq!(replica(ia), in_progress);
                assert_eq!(replica(ib), kept(right(i)));
            }
            "error" | "error_dup" => {
                assert_eq!(unit, ("pending", 1, None), "{g} {i}");
                let a_side = if g == "error" {
                    kept(right(i))
                } else {
                    in_progress.clone()
                };
                assert_eq!(replica(ia), a_side);
                assert_eq!(replica(ib), errored);
            }
            "hand_back" => {
                assert_eq!(unit, ("pending", 1, None), "{g} {i}");
                assert_eq!(replica(ia), kept(right(i)));
                assert_eq!(replica(ib), ("handed_back", "init", true, None, None, true));
            }
            "foreign" => {
                assert_eq!(unit, ("pending", 0, None), "{g} {i}");
                assert_eq!(replica(ia), kept(right(i)));
                assert_eq!(replica(ib), in_progress);
            }
            "duplicate" | "conflict" => {
                assert_eq!(unit, ("pending", 0, None), "{g} {i}");
                assert_eq!(replica(ia), in_progress);
                assert_eq!(replica(ib), kept(right(i)));
            }
            "late_valid" | "late_wrong" => {
                assert_eq!(unit, ("validated", 0, Some(ia as i64)), "{g} {i}");
                let ic = rc[&wu];
                assert_eq!(replica(ia), settled(right(i), "valid"));
                assert_eq!(replica(ic), settled(right(i), "valid"));
                let b_side = if g == "late_valid" {
                    settled(right(i), "valid")
                } else {
                    settled(other(i), "invalid")
                };
                assert_eq!(replica(ib), b_side);
                let f = &findings[&(wu as i64)];
                assert_eq!(
                    f.0,
                    vec![ia as i64, ic as i64],
                    "the late result joins no finding"
                );
                validated += 1;
            }
            g => unreachable!("{g}"),
        }
    }
    assert_eq!(findings.len(), validated);
    assert_eq!(replicas.len(), 2 * wu_ids.len() + 5);
    // One finding_metrics row per finding (the trigger fires for rows inserted together).
    assert_eq!(
        count(&app, "SELECT count(*) FROM finding_metrics").await,
        validated as i64
    );

    // Reputation: B's earlier error halved its quota to 500; in the big batch its 44 valid
    // results grew it to 940, then one invalid and two errors halved it three times (117), and
    // each refused report (foreign, conflicting, unknown) halves it again, never below 1.
    let reputation = |auth: &pb::WorkerAuth| {
        let id = uuid::Uuid::parse_str(&auth.worker_id).unwrap();
        async move {
            sqlx::query_as::<_, (i64, i64, i64, i64, i64, i32)>(
                "SELECT valid_count, invalid_count, error_count, timeout_count, consecutive_valid,
                        daily_quota FROM workers WHERE id = $1",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(reputation(&a).await, (45, 0, 0, 0, 45, 1000));
    assert_eq!(
        reputation(&b).await,
        (44, 1, 3, 0, 0, (117 >> refused.min(30)).max(1))
    );
    let rejected_reports: i64 =
        sqlx::query_scalar("SELECT rejected_reports FROM workers WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&b.worker_id).unwrap())
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rejected_reports, i64::from(refused));
    assert_eq!(reputation(&c).await, (5, 0, 0, 0, 5, 1000));
    app.shutdown().await;
}

fn result_id(batch: &[pb::ReplicaResult]) -> u64 {
    batch.last().unwrap().replica_id
}

/// `ReportResults` with `fetch`: the next replicas come back in the same call (from the same
/// transaction), never a second replica of a unit the worker holds; a claim that finds nothing
/// (here the daily quota is used) leaves the report accepted and says when to ask again, and a
/// plain FetchWork then says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_can_take_the_next_replicas_in_its_transaction() {
    let app = TestApp::spawn().await;
    let inputs = tiny_model_inputs(4, 40);
    app.submit(
        accrete_tasks::TINY_MODEL,
        inputs.clone(),
        policy(2),
        bounds(),
    )
    .await;
    let truth = |a: &pb::Assignment| {
        let i = inputs.iter().position(|x| *x == a.input).unwrap();
        native_tiny_model(&inputs[i])
    };
    let w = app.register("round-tripper").await;
    let first = fetch_one(&app, &w).await;

    let mut client = app.worker_client().await;
    let round = |results, fetch| pb::ReportResultsRequest {
        auth: Some(w.clone()),
        results,
        fetch,
    };
    let r = client
        .report_results(round(vec![success(first.replica_id, &truth(&first))], 2))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.acks.len(), 1);
    assert_eq!(r.acks[0].status(), pb::ReportStatus::Accepted);
    assert_eq!(r.assignments.len(), 2, "{:?}", r.assignments);
    assert_eq!(r.retry_after_ms, 0);
    let mut units: Vec<u64> = r.assignments.iter().map(|a| a.work_unit_id).collect();
    units.push(first.work_unit_id);
    units.sort_unstable();
    units.dedup();
    assert_eq!(units.len(), 3, "one replica per unit per worker: {units:?}");
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM replicas WHERE state = 'in_progress'"
        )
        .await,
        2
    );
    assert_eq!(
        count(&app, "SELECT quota_used::bigint FROM workers").await,
        3,
        "the claim in the report counts against the quota like a FetchWork"
    );

    // Quota used up: the report still counts, the claim hands out nothing.
    sqlx::query(
        "UPDATE workers SET quota_used = daily_quota,
                            quota_day = (now() AT TIME ZONE 'UTC')::date",
    )
    .execute(app.store.pool())
    .await
    .unwrap();
    let results = r
        .assignments
        .iter()
        .map(|a| success(a.replica_id, &truth(a)))
        .collect();
    let r = client
        .report_results(round(results, 4))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.acks
            .iter()
            .all(|a| a.status() == pb::ReportStatus::Accepted),
        "{:?}",
        r.acks
    );
    assert!(r.assignments.is_empty(), "{:?}", r.assignments);
    assert!(r.retry_after_ms > 0);
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM replicas WHERE state = 'success'"
        )
        .await,
        3
    );
    let refused = app.fetch_as(&w, 1, false).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
}
