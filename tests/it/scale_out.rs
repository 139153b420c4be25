//! Scale out: three real server processes on one database, simulated workers spread across
//! them. The claim's row locks and the compare-and-set transitions must hold across processes
//! as they do within one: no replica handed out twice, every work unit validated once with
//! exactly one finding, and the three sealers (one at a time, by advisory lock) chain one
//! ledger that verifies.

use std::collections::HashSet;
use std::path::Path;

use accrete::client::Client;
use accrete::ledger::verify_remote;
use accrete_server::Store;
use accrete_server::ledger::Verdict;
use accrete_sim::load::{Fleet, ServerProcesses, submit};
use accrete_tests::eventually;

use crate::{BINS, TIMEOUT};

async fn scalar(store: &Store, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_on_one_database_hand_out_each_replica_once() {
    const WUS: usize = 600;
    const WORKERS: usize = 24;
    let db = accrete_tests::test_db("test_scale_out").await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    let mut servers = ServerProcesses::start(Path::new(BINS.server), &db.url, 3, 4)
        .await
        .unwrap();
    let key = accrete_sim::load::mint_key(&store).await.unwrap();
    let study = submit(&servers.urls[0], &key, "scale-out", 0, WUS, 2, 60)
        .await
        .unwrap()
        .study_ids[0];
    // Worker i talks to server i mod 3; small batches, so claims interleave a lot.
    let fleet = Fleet::start(&servers.urls, WORKERS, 4, false, true, None)
        .await
        .unwrap();
    eventually(TIMEOUT, "every work unit settled", || async {
        scalar(
            &store,
            "SELECT count(*) FROM work_units WHERE state = 'pending'",
        )
        .await
            == 0
    })
    .await;
    // The sealers of all three processes chain the findings; wait for them, not for ours.
    eventually(TIMEOUT, "every finding sealed by the servers", || async {
        scalar(&store, "SELECT count(*) FROM unsealed_findings").await == 0
    })
    .await;
    let log = fleet.stop().await.unwrap();
    assert!(log.errors.is_empty(), "failed RPCs: {:?}", log.errors);
    assert_eq!(log.rejected, 0);

    // No replica handed out twice, and never two replicas of one unit to one worker.
    let mut replicas = HashSet::new();
    let mut pairs = HashSet::new();
    for h in &log.handed_out {
        assert!(
            replicas.insert(h.replica_id),
            "replica {} handed out twice",
            h.replica_id
        );
        assert!(
            pairs.insert((h.wu_id, h.worker)),
            "work unit {} given twice to worker {}",
            h.wu_id,
            h.worker
        );
    }
    // Every server handed work out (worker i talks to server i mod 3).
    let servers_used: HashSet<usize> = log.handed_out.iter().map(|h| h.worker % 3).collect();
    assert_eq!(servers_used.len(), 3);
    // The database agrees: each replica row was handed out once, and accepted once.
    let rows = scalar(&store, "SELECT count(*) FROM replicas").await;
    assert_eq!(rows as usize, log.handed_out.len());
    assert_eq!(log.completed, rows as u64);
    assert_eq!(
        rows,
        2 * WUS as i64,
        "honest quorum 2 needs two replicas a unit"
    );

    // Every work unit validated, exactly once, with exactly one finding.
    let outcomes = store.study_outcomes(study as i64).await.unwrap();
    assert_eq!(outcomes.len(), WUS);
    assert!(
        outcomes.iter().all(
            |o| o.state == accrete_server::store::WuState::Validated && o.output_hash.is_some()
        )
    );
    assert_eq!(
        scalar(&store, "SELECT count(*) FROM findings").await,
        WUS as i64
    );
    assert_eq!(
        scalar(
            &store,
            "SELECT count(*) FROM (SELECT wu_id FROM findings GROUP BY wu_id HAVING count(*) <> 1) x"
        )
        .await,
        0
    );
    assert_eq!(
        store
            .invariant_breaches(study as i64)
            .await
            .unwrap()
            .total(),
        0
    );

    // One ledger, one entry per finding, verified through a server other than the submitter.
    let mut c = Client::connect_with(&servers.urls[2], &Default::default(), Some(&key))
        .await
        .unwrap();
    match verify_remote(&mut c).await.unwrap() {
        Verdict::Intact { len, .. } => assert_eq!(len, WUS as u64),
        broken => panic!("the ledger must verify: {broken:?}"),
    }
    assert_eq!(
        scalar(
            &store,
            "SELECT count(DISTINCT l.seq) FROM findings f
             JOIN ledger l ON l.finding_id = f.id AND l.kind = 'finding'"
        )
        .await,
        WUS as i64
    );

    servers.stop();
    store.close().await;
    db.stop().await.unwrap();
}
