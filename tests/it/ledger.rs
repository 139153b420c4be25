//! The research ledger on real parts: the hash chain and its immutability, verify and export
//! (with a row altered behind the server's back), the finding queries (filters, metric order,
//! cursors, lineage, children, leaves, best), identical-work-unit dedup, and adoption
//! round-trips (one finding that holds up, one whose improvement was seed luck).

use std::collections::HashSet;

use accrete::ledger::{verify_file, verify_remote};
use accrete_server::ledger::{Broken, Verdict};
use accrete_tests::{TestApp, eventually, v1 as pb};

use crate::{TIMEOUT, bounds, count, policy, tiny_model_inputs};

/// Submits `inputs` of tiny-model as a study with these parents, returning the response.
async fn submit(app: &TestApp, inputs: Vec<Vec<u8>>, parents: Vec<u64>) -> pb::SubmitStudyResponse {
    let mut c = app.client().await;
    let module_hash = c
        .put_module(accrete_tasks::TINY_MODEL.to_vec(), "tiny-model")
        .await
        .unwrap();
    c.research
        .submit_study(pb::SubmitStudyRequest {
            name: "ledger study".into(),
            module_hash,
            policy: Some(policy(2)),
            bounds: Some(bounds()),
            work_units: inputs
                .into_iter()
                .map(|input| pb::WorkUnitSpec { input })
                .collect(),
            parent_findings: parents,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn ledger_len(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_chains_findings_refuses_changes_and_verify_names_an_altered_entry() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 2);
    app.start_worker("b", 2);
    // A watcher subscribed before anything exists sees each entry as it is sealed.
    let mut watch = app
        .client()
        .await
        .ledger
        .watch_ledger(pb::ExportLedgerRequest { after_seq: 0 })
        .await
        .unwrap()
        .into_inner();
    let study = submit(&app, tiny_model_inputs(6, 30), vec![]).await;
    app.wait_done(study.study_id, TIMEOUT).await;
    // The servers' sealer chains the findings in the background.
    eventually(TIMEOUT, "6 sealed entries", || async {
        ledger_len(&app).await == 6
    })
    .await;
    let mut watched = Vec::new();
    while watched.len() < 6 {
        let e = tokio::time::timeout(TIMEOUT, watch.message())
            .await
            .expect("watch delivers sealed entries")
            .unwrap()
            .unwrap();
        watched.push(e);
    }
    assert_eq!(
        watched.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert!(watched.windows(2).all(|w| w[1].prev_hash == w[0].hash));
    drop(watch);

    let mut c = app.client().await;
    let Verdict::Intact { len, head } = verify_remote(&mut c).await.unwrap() else {
        panic!("a fresh ledger must verify");
    };
    assert_eq!(len, 6);
    let stored_head: Vec<u8> = sqlx::query_scalar("SELECT hash FROM ledger WHERE seq = 6")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(head.to_vec(), stored_head);
    assert_eq!(watched[5].hash, stored_head);

    // Each finding entry carries its provenance, and the finding names its entry.
    let findings = app.findings(study.study_id).await;
    let f = &findings[0];
    assert!(f.ledger_seq >= 1 && f.ledger_hash.len() == 32);
    let body: String = sqlx::query_scalar("SELECT body FROM ledger WHERE seq = $1")
        .bind(f.ledger_seq as i64)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["type"], "finding");
    assert_eq!(body["finding"], f.id);
    assert_eq!(body["output_hash"], accrete::client::hex(&f.output_hash));
    assert_eq!(body["module_hash"], accrete::client::hex(&f.module_hash));
    assert_eq!(body["input_hash"], accrete::client::hex(&f.input_hash));
    assert_eq!(body["study"], study.study_id);
    let agreeing = body["agreeing"].as_array().unwrap();
    assert_eq!(agreeing.len(), f.agreeing.len());
    for a in agreeing {
        assert!(a["fuel_used"].as_u64().unwrap() > 0);
        assert!(a["platform"].as_str().unwrap().contains('/'));
        assert!(!a["runtime"].as_str().unwrap().is_empty());
        assert!(a["worker"].as_str().unwrap().len() == 36);
    }
    assert!((body["confidence"].as_f64().unwrap() - f.confidence).abs() < 1e-12);
    assert!(body["validated_at_us"].as_i64().unwrap() > 0);

    // PostgreSQL refuses to change or remove entries, whoever asks.
    for sql in [
        "UPDATE ledger SET body = '{}' WHERE seq = 2",
        "DELETE FROM ledger WHERE seq = 6",
        "TRUNCATE ledger",
    ] {
        let err = sqlx::query(sql)
            .execute(app.store.pool())
            .await
            .expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(ledger_len(&app).await, 6);

    // Export, verify offline: the same head.
    let dir = std::env::temp_dir().join(format!("accrete-ledger-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("export.jsonl");
    let mut file = std::fs::File::create(&path).unwrap();
    assert_eq!(accrete::ledger::export(&mut c, &mut file).await.unwrap(), 6);
    drop(file);
    assert_eq!(
        verify_file(&path).unwrap(),
        Verdict::Intact { len: 6, head }
    );

    // Alter entry 3 behind the server's back: verify names it, online and offline.
    sqlx::raw_sql(
        "ALTER TABLE ledger DISABLE TRIGGER ledger_no_update_delete;
         UPDATE ledger SET body = replace(body, '\"dissenting\":0', '\"dissenting\":1') WHERE seq = 3;
         ALTER TABLE ledger ENABLE TRIGGER ledger_no_update_delete;",
    )
    .execute(app.store.pool())
    .await
    .unwrap();
    let verdict = verify_remote(&mut c).await.unwrap();
    assert_eq!(
        verdict,
        Verdict::Broken {
            intact_len: 2,
            broken: Broken::HashMismatch { seq: 3 }
        }
    );
    // An altered file is caught the same way.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines[4] = lines[4].replacen("\\\"dissenting\\\":0", "\\\"dissenting\\\":2", 1);
    std::fs::write(&path, lines.join("\n")).unwrap();
    assert!(matches!(
        verify_file(&path).unwrap(),
        Verdict::Broken {
            broken: Broken::HashMismatch { seq: 5 },
            ..
        }
    ));
    std::fs::remove_dir_all(&dir).unwrap();
    app.shutdown().await;
}

fn metric(f: &pb::Finding, name: &str) -> f64 {
    serde_json::from_str::<serde_json::Value>(&f.metrics_json).unwrap()[name]
        .as_f64()
        .unwrap()
}

/// Sealing appends to the ledger and empties the queue of unsealed findings, but never writes
/// the finding again (a new row version, with an entry in each of its indexes): each finding's
/// row is still the one its validating transaction wrote, the one that settled its unit. And the
/// ledger holds at most one entry per finding, whoever appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealing_empties_the_queue_and_leaves_each_finding_as_validated() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 2);
    app.start_worker("b", 2);
    let study = submit(&app, tiny_model_inputs(8, 30), vec![]).await;
    app.wait_done(study.study_id, TIMEOUT).await;
    eventually(TIMEOUT, "8 sealed entries", || async {
        ledger_len(&app).await == 8
    })
    .await;
    let pool = app.store.pool();
    assert_eq!(
        count(&app, "SELECT count(*) FROM unsealed_findings").await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM findings f JOIN work_units w ON w.id = f.wu_id
             WHERE f.xmin = w.xmin"
        )
        .await,
        8,
        "a finding row was rewritten after the transaction that validated its unit"
    );
    // Every finding has its entry, and the API names it.
    for f in app.findings(study.study_id).await {
        let seq: i64 =
            sqlx::query_scalar("SELECT seq FROM ledger WHERE finding_id = $1 AND kind = 'finding'")
                .bind(f.id as i64)
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(f.ledger_seq as i64, seq);
    }
    let err = sqlx::query(
        "INSERT INTO ledger (seq, hash, prev_hash, kind, finding_id, body)
         SELECT 9, sha256('x'), hash, 'finding', finding_id, body FROM ledger WHERE seq = 8",
    )
    .execute(pool)
    .await
    .expect_err("a second entry for one finding");
    assert!(err.to_string().contains("ledger_one_per_finding"), "{err}");
}

fn param(f: &pb::Finding, name: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&f.params_json).unwrap()[name].clone()
}

fn ids(fs: &[pb::Finding]) -> Vec<u64> {
    fs.iter().map(|f| f.id).collect()
}

async fn list(app: &TestApp, req: pb::ListFindingsRequest) -> pb::ListFindingsResponse {
    app.client()
        .await
        .ledger
        .list_findings(req)
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_filter_order_page_and_follow_lineage() {
    let mut app = TestApp::spawn().await;
    app.start_worker("a", 2);
    app.start_worker("b", 2);
    let a_inputs = tiny_model_inputs(8, 30);
    let a = submit(&app, a_inputs.clone(), vec![]).await;
    app.wait_done(a.study_id, TIMEOUT).await;
    let a_findings = app.findings(a.study_id).await;
    assert_eq!(a_findings.len(), 8);

    // Order by a metric, both ways, against a sort done here.
    let mut by_loss = a_findings.clone();
    by_loss.sort_by(|x, y| {
        metric(x, "val_loss")
            .total_cmp(&metric(y, "val_loss"))
            .then(x.id.cmp(&y.id))
    });
    let asc = list(
        &app,
        pb::ListFindingsRequest {
            study_id: a.study_id,
            order_by_metric: "val_loss".into(),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&asc.findings), ids(&by_loss));
    assert!(asc.next_cursor.is_empty(), "one page holds them all");
    let desc = list(
        &app,
        pb::ListFindingsRequest {
            order_by_metric: "val_loss".into(),
            descending: true,
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    let mut rev = ids(&by_loss);
    rev.reverse();
    // Ties (equal losses) keep id order in both directions' keyset; compare values instead.
    let desc_values: Vec<f64> = desc
        .findings
        .iter()
        .map(|f| metric(f, "val_loss"))
        .collect();
    assert!(desc_values.windows(2).all(|w| w[0] >= w[1]));
    assert_eq!(desc.findings.len(), 8);

    // Parameter filter and metric range.
    let hidden4 = list(
        &app,
        pb::ListFindingsRequest {
            order_by_metric: "val_loss".into(),
            param_equals: [("hidden".to_string(), "4".to_string())].into(),
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    let expected: Vec<u64> = by_loss
        .iter()
        .filter(|f| param(f, "hidden") == 4)
        .map(|f| f.id)
        .collect();
    assert_eq!(expected.len(), 3);
    assert_eq!(ids(&hidden4.findings), expected);
    // A page filled by the walk along the metric index, then the rest after its cursor.
    let filtered_page = |cursor: String| pb::ListFindingsRequest {
        order_by_metric: "val_loss".into(),
        param_equals: [("hidden".to_string(), "4".to_string())].into(),
        limit: 2,
        cursor,
        ..Default::default()
    };
    let p1 = list(&app, filtered_page(String::new())).await;
    assert_eq!(ids(&p1.findings), expected[..2]);
    let p2 = list(&app, filtered_page(p1.next_cursor)).await;
    assert_eq!(ids(&p2.findings), expected[2..]);
    assert!(p2.next_cursor.is_empty());
    let cut = metric(&by_loss[3], "val_loss");
    let ranged = list(
        &app,
        pb::ListFindingsRequest {
            metric_ranges: vec![pb::MetricRange {
                metric: "val_loss".into(),
                min: None,
                max: Some(cut),
            }],
            limit: 100,
            ..Default::default()
        },
    )
    .await;
    let mut expected: Vec<u64> = by_loss
        .iter()
        .filter(|f| metric(f, "val_loss") <= cut)
        .map(|f| f.id)
        .collect();
    expected.sort_unstable();
    assert_eq!(
        ids(&ranged.findings),
        expected,
        "by id when no metric order"
    );
    let none = list(
        &app,
        pb::ListFindingsRequest {
            param_equals: [("hidden".to_string(), "99".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.findings.is_empty());

    // Lineage: B builds on A's best, C on B's best.
    let best_a = by_loss[0].id;
    let b = submit(&app, tiny_model_inputs(11, 31)[8..].to_vec(), vec![best_a]).await;
    app.wait_done(b.study_id, TIMEOUT).await;
    let b_findings = app.findings(b.study_id).await;
    assert_eq!(b_findings.len(), 3);
    assert!(b_findings.iter().all(|f| f.parent_findings == vec![best_a]));
    let best_b = b_findings
        .iter()
        .min_by(|x, y| metric(x, "val_loss").total_cmp(&metric(y, "val_loss")))
        .unwrap()
        .id;
    let c = submit(&app, tiny_model_inputs(13, 32)[11..].to_vec(), vec![best_b]).await;
    app.wait_done(c.study_id, TIMEOUT).await;
    let c_findings = app.findings(c.study_id).await;
    let mut ledger = app.client().await.ledger;
    let rel = |id| pb::FindingRelationRequest { finding_id: id };
    let lineage = ledger
        .get_lineage(rel(c_findings[0].id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&lineage.findings), vec![best_a, best_b]);
    let children = ledger
        .list_children(rel(best_a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&children.findings), ids(&b_findings));
    assert!(
        ledger
            .list_children(rel(c_findings[0].id))
            .await
            .unwrap()
            .into_inner()
            .findings
            .is_empty()
    );
    let leaves = ledger
        .list_leaves(pb::ListLeavesRequest {
            study_id: 0,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let mut all: Vec<u64> = [&a_findings, &b_findings, &c_findings]
        .iter()
        .flat_map(|fs| ids(fs))
        .filter(|&id| id != best_a && id != best_b)
        .collect();
    all.sort_unstable();
    assert_eq!(ids(&leaves.findings), all);
    let a_leaves = ledger
        .list_leaves(pb::ListLeavesRequest {
            study_id: a.study_id,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a_leaves.findings.len(), 7);
    assert!(!ids(&a_leaves.findings).contains(&best_a));

    // The best finding per study, lowest loss and highest loss.
    let best = ledger
        .best_findings(pb::BestFindingsRequest {
            metric: "val_loss".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ids(&best.findings),
        vec![best_a, best_b, {
            c_findings
                .iter()
                .min_by(|x, y| {
                    metric(x, "val_loss")
                        .total_cmp(&metric(y, "val_loss"))
                        .then(x.id.cmp(&y.id))
                })
                .unwrap()
                .id
        }]
    );
    let worst_a = ledger
        .best_findings(pb::BestFindingsRequest {
            metric: "val_loss".into(),
            descending: true,
            study_id: a.study_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&worst_a.findings), vec![by_loss.last().unwrap().id]);

    // Cursor pagination in metric order, stable while findings are added between pages.
    let page = |cursor: String| pb::ListFindingsRequest {
        order_by_metric: "val_loss".into(),
        limit: 4,
        cursor,
        ..Default::default()
    };
    let first = list(&app, page(String::new())).await;
    assert_eq!(first.findings.len(), 4);
    assert!(!first.next_cursor.is_empty());
    let before: Vec<pb::Finding> = list(
        &app,
        pb::ListFindingsRequest {
            order_by_metric: "val_loss".into(),
            limit: 1000,
            ..Default::default()
        },
    )
    .await
    .findings;
    let d = submit(&app, tiny_model_inputs(16, 33)[13..].to_vec(), vec![]).await;
    app.wait_done(d.study_id, TIMEOUT).await;
    let mut seen = ids(&first.findings);
    let mut cursor = first.next_cursor;
    let last_first = metric(first.findings.last().unwrap(), "val_loss");
    while !cursor.is_empty() {
        let p = list(&app, page(cursor)).await;
        for f in &p.findings {
            assert!(
                metric(f, "val_loss") >= last_first,
                "a page never goes back"
            );
        }
        seen.extend(ids(&p.findings));
        cursor = p.next_cursor;
    }
    let unique: HashSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no finding twice across pages");
    for f in &before {
        assert!(
            unique.contains(&f.id),
            "every finding present before paging is seen"
        );
    }
    // Findings added meanwhile appear on later pages unless they sort before the pages read.
    for f in app.findings(d.study_id).await {
        assert_eq!(
            unique.contains(&f.id),
            metric(&f, "val_loss") >= last_first,
            "finding {} added between pages",
            f.id
        );
    }
    // A cursor from another ordering, or garbage, is refused.
    let err = ledger
        .list_findings(pb::ListFindingsRequest {
            order_by_metric: "val_loss".into(),
            descending: true,
            limit: 4,
            cursor: list(&app, page(String::new())).await.next_cursor,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = ledger
        .list_findings(pb::ListFindingsRequest {
            cursor: "zz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Submitting what was already validated returns the finding instead of computing it again.
    let mut c2 = app.client().await;
    let module_hash = c2
        .put_module(accrete_tasks::TINY_MODEL.to_vec(), "tiny-model")
        .await
        .unwrap();
    let again = c2
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "again".into(),
            module_hash: module_hash.clone(),
            policy: Some(policy(2)),
            bounds: Some(bounds()),
            work_units: vec![
                pb::WorkUnitSpec {
                    input: a_inputs[0].clone(),
                },
                pb::WorkUnitSpec {
                    input: tiny_model_inputs(1, 34)[0].clone(),
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let twin = a_findings
        .iter()
        .find(|f| f.work_unit_id == a.work_unit_ids[0])
        .unwrap();
    assert_eq!(again.existing_findings, vec![twin.id, 0]);
    assert_eq!(again.work_unit_ids[0], 0);
    assert_ne!(again.work_unit_ids[1], 0);
    // Another replication policy is another computation: no dedup.
    let stricter = c2
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "stricter".into(),
            module_hash,
            policy: Some(policy(3)),
            bounds: Some(bounds()),
            work_units: vec![pb::WorkUnitSpec {
                input: a_inputs[0].clone(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stricter.existing_findings, vec![0]);
    c2.research
        .cancel_study(pb::CancelStudyRequest {
            study_id: stricter.study_id,
        })
        .await
        .unwrap();
    // Parents must exist.
    let module_hash = c2
        .put_module(accrete_tasks::TINY_MODEL.to_vec(), "tiny-model")
        .await
        .unwrap();
    let err = c2
        .research
        .submit_study(pb::SubmitStudyRequest {
            name: "orphan".into(),
            module_hash,
            work_units: vec![pb::WorkUnitSpec {
                input: b"{}".to_vec(),
            }],
            parent_findings: vec![999_999],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // The dashboard views answer.
    app.wait_done(again.study_id, TIMEOUT).await;
    app.store.seal_now().await.unwrap();
    let pool = app.store.pool();
    let (n, sealed): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(ledger_hash) FROM v_findings")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((n, sealed), (17, 17));
    let metrics: i64 =
        sqlx::query_scalar("SELECT count(*) FROM v_finding_metrics WHERE metric = 'val_loss'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(metrics, 17);
    let validated: i64 =
        sqlx::query_scalar("SELECT validated FROM v_study_progress WHERE study_id = $1")
            .bind(a.study_id as i64)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(validated, 8);
    let valid: i64 = sqlx::query_scalar("SELECT sum(valid_count)::bigint FROM v_worker_stats")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(valid >= 34, "{valid}");
    app.shutdown().await;
}

/// Tiny-model on fixed data (data_seed 7) whose init seed moves only the initialisation.
fn tiny(hidden: u32, lr: f64, steps: u32, init_seed: u64) -> Vec<u8> {
    serde_json::json!({
        "data_seed": 7, "init_seed": init_seed, "hidden": hidden, "lr": lr, "steps": steps,
        "train_size": 128, "val_size": 256, "batch": 16,
    })
    .to_string()
    .into_bytes()
}

async fn adopt(app: &TestApp, finding: u64) -> pb::Adoption {
    let mut c = app.client().await;
    let opened = c
        .ledger
        .adopt(pb::AdoptRequest {
            finding_id: finding,
            metric: "val_loss".into(),
            descending: false,
            seeds: 4,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(
        TIMEOUT,
        accrete::client::wait_adoption(&mut c, opened.adoption_id),
    )
    .await
    .expect("the adoption settles")
    .unwrap()
}

/// The workers that computed replicas of a work unit.
async fn workers_of(app: &TestApp, wu: u64) -> HashSet<String> {
    sqlx::query_scalar::<_, uuid::Uuid>("SELECT worker_id FROM replicas WHERE wu_id = $1")
        .bind(wu as i64)
        .fetch_all(app.store.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adoption_reproduces_a_real_improvement_and_exposes_seed_luck() {
    let mut app = TestApp::spawn().await;
    for i in 0..4 {
        app.start_worker(&format!("w{i}"), 1);
    }
    // Parents: a weak model (logistic regression) and a small noisy MLP at a typical seed.
    let parents = submit(
        &app,
        vec![tiny(0, 0.05, 60, 0), tiny(4, 0.05, 60, 2)],
        vec![],
    )
    .await;
    app.wait_done(parents.study_id, TIMEOUT).await;
    let pf = app.findings(parents.study_id).await;
    let by_wu =
        |fs: &[pb::Finding], wu: u64| fs.iter().find(|f| f.work_unit_id == wu).unwrap().clone();
    let weak = by_wu(&pf, parents.work_unit_ids[0]);
    let typical = by_wu(&pf, parents.work_unit_ids[1]);
    // A real improvement on the weak parent: a wider, longer-trained MLP.
    let better = submit(&app, vec![tiny(16, 0.1, 200, 0)], vec![weak.id]).await;
    // Seed luck on the typical parent: the same model, at the init seed that happened to be best.
    let lucky = submit(&app, vec![tiny(4, 0.05, 60, 27)], vec![typical.id]).await;
    app.wait_done(better.study_id, TIMEOUT).await;
    app.wait_done(lucky.study_id, TIMEOUT).await;
    let good = app.findings(better.study_id).await.remove(0);
    let luck = app.findings(lucky.study_id).await.remove(0);
    assert!(metric(&good, "val_loss") < metric(&weak, "val_loss"));
    assert!(
        metric(&luck, "val_loss") < metric(&typical, "val_loss"),
        "the lucky seed looks like an improvement"
    );

    // Adopting the real improvement: reproduced on other workers, holds over other seeds.
    let a = adopt(&app, good.id).await;
    let outcome = a.outcome.clone().unwrap();
    assert_eq!(outcome.kind, "adopted");
    let d: serde_json::Value = serde_json::from_str(&outcome.detail_json).unwrap();
    assert_eq!(d["output_reproduced"], true);
    assert_eq!(d["holds_over_seeds"], true);
    assert_eq!(d["seed_field"], "init_seed");
    assert_eq!(d["seeds"], serde_json::json!([0, 1, 2, 3, 4]));
    assert_eq!(d["values"].as_array().unwrap().len(), 5);
    assert!(d["sd"].as_f64().unwrap() > 0.0);
    assert_eq!(d["parent_finding"], weak.id);
    // The re-run ran on workers that did not take part in the original.
    let rerun_wu = d["rerun_work_unit"].as_u64().unwrap();
    let original: HashSet<String> = workers_of(&app, good.work_unit_id).await;
    let rerun = workers_of(&app, rerun_wu).await;
    assert!(
        rerun.len() >= 2 && original.is_disjoint(&rerun),
        "{original:?} {rerun:?}"
    );
    // The finding's confidence reflects the evidence; the parent is marked superseded.
    let after = app.findings(better.study_id).await.remove(0);
    assert!(after.confidence > after.validated_confidence);
    assert!((after.confidence - outcome.confidence_after).abs() < 1e-12);
    assert_eq!(after.evidence.len(), 1);
    let weak_after = by_wu(&app.findings(parents.study_id).await, weak.work_unit_id);
    assert_eq!(weak_after.evidence[0].kind, "superseded");

    // Adopting the lucky one: the bytes reproduce, but over other seeds the improvement vanishes.
    let b = adopt(&app, luck.id).await;
    let outcome = b.outcome.clone().unwrap();
    assert_eq!(outcome.kind, "failed_to_reproduce");
    let d: serde_json::Value = serde_json::from_str(&outcome.detail_json).unwrap();
    assert_eq!(d["output_reproduced"], true);
    assert_eq!(d["holds_over_seeds"], false);
    assert!(d["improvement"].as_f64().unwrap() < 2.0 * d["sd"].as_f64().unwrap());
    let luck_after = app.findings(lucky.study_id).await.remove(0);
    assert!(luck_after.confidence < luck_after.validated_confidence);

    // Both outcomes are chained after their findings, and the chain verifies.
    app.store.seal_now().await.unwrap();
    let mut c = app.client().await;
    for (f, e) in [(&after, &a), (&luck_after, &b)] {
        let f = c
            .ledger
            .get_finding(pb::GetFindingRequest { finding_id: f.id })
            .await
            .unwrap()
            .into_inner();
        let ev = f
            .evidence
            .iter()
            .find(|x| x.id == e.outcome.as_ref().unwrap().id)
            .unwrap();
        assert!(ev.ledger_seq > f.ledger_seq);
        let body: String = sqlx::query_scalar("SELECT body FROM ledger WHERE seq = $1")
            .bind(ev.ledger_seq as i64)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["type"], "evidence");
        assert_eq!(body["finding_entry"], accrete::client::hex(&f.ledger_hash));
        assert_eq!(body["kind"], ev.kind);
    }
    assert!(matches!(
        verify_remote(&mut c).await.unwrap(),
        Verdict::Intact { .. }
    ));

    // The study reports say which improvement exceeds the seed noise.
    let report = accrete::report::report(&mut c, better.study_id, "val_loss", false, 5)
        .await
        .unwrap();
    assert!(report.contains("# Validated Findings Report"), "{report}");
    assert!(report.contains("**yes**"), "{report}");
    assert!(report.contains(&format!("| {} |", good.id)), "{report}");
    let report = accrete::report::report(&mut c, lucky.study_id, "val_loss", false, 5)
        .await
        .unwrap();
    assert!(report.contains("**no**: seed luck"), "{report}");
    let report = accrete::report::report(&mut c, parents.study_id, "val_loss", false, 5)
        .await
        .unwrap();
    assert!(report.contains("not measured"), "{report}");
    assert!(report.contains("No work unit failed."), "{report}");
    app.shutdown().await;
}
