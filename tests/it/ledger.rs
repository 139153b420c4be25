//! The research ledger on real parts: the hash chain and its immutability, verify and export
//! (with a row altered behind the server's back), the finding queries (filters, metric order,
//! cursors, lineage, children, leaves, best), identical-work-unit dedup, and adoption
//! round-trips (one finding that holds up, one whose improvement was seed luck).

use accrete::ledger::{verify_file, verify_remote};
use accrete_server::ledger::{Broken, Verdict};
use accrete_tests::{TestApp, eventually, v1 as pb};

use crate::{TIMEOUT, bounds, policy, tiny_model_inputs};

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
    let study = submit(&app, tiny_model_inputs(6, 30), vec![]).await;
    app.wait_done(study.study_id, TIMEOUT).await;
    // The servers' sealer chains the findings in the background.
    eventually(TIMEOUT, "6 sealed entries", || async {
        ledger_len(&app).await == 6
    })
    .await;

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
