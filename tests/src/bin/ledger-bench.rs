//! The ledger benchmark harness (figures in BENCHMARKS.md): bulk-inserts N synthetic findings
//! (with their work units and two agreeing replicas each) into a fresh database, seals them into
//! the hash chain, times `verify` (straight from the database, and through the server's
//! ExportLedger stream as `accrete ledger verify` does), then times the dashboard query "top 20
//! by a metric, filtered by a parameter" through the real gRPC server, reporting p50/p99.
//!
//! `cargo run --release -p accrete-tests --bin ledger-bench -- [--findings N] [--queries Q] [--keep]`
//! Uses ACCRETE_TEST_DATABASE_URL (default the local PostgreSQL) to create its database.

use std::time::{Duration, Instant};

use accrete::client::Client;
use accrete_proto::v1 as pb;
use accrete_server::devdb::{DevDb, LOCAL_SERVER};
use accrete_server::ledger::{Verdict, Verifier};
use accrete_server::{Config, Store};

struct Args {
    findings: i64,
    queries: usize,
    keep: bool,
}

fn args() -> Args {
    let mut a = Args {
        findings: 1_000_000,
        queries: 1000,
        keep: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        match argv[i].as_str() {
            "--findings" => {
                i += 1;
                a.findings = argv[i].parse().expect("--findings N");
            }
            "--queries" => {
                i += 1;
                a.queries = argv[i].parse().expect("--queries N");
            }
            "--keep" => a.keep = true,
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    a
}

/// Synthetic rows, generated inside PostgreSQL: 100 studies; parameters lr (10 values), hidden
/// (8 values) and seed; metrics val_loss and accuracy; two replicas from two workers each.
const FILL: &[&str] = &[
    "SELECT setseed(0.42)",
    "INSERT INTO modules (hash, wasm, name, size_bytes)
     VALUES (decode(repeat('ab', 32), 'hex'), '\\x00'::bytea, 'bench', 1)",
    "INSERT INTO workers (id, token_hash, name, arch, os, cores, memory_bytes, runtime)
     VALUES ('00000000-0000-0000-0000-000000000001', decode(repeat('01', 32), 'hex'), 'w1',
             'x86_64', 'linux', 2, 1073741824, 'wasmtime 48.0.8'),
            ('00000000-0000-0000-0000-000000000002', decode(repeat('02', 32), 'hex'), 'w2',
             'aarch64', 'linux', 4, 1073741824, 'wasmtime 48.0.8')",
    "INSERT INTO studies (name, module_hash)
     SELECT 'bench study ' || s, decode(repeat('ab', 32), 'hex') FROM generate_series(1, 100) s",
];

async fn fill(store: &Store, n: i64) {
    let pool = store.pool();
    for sql in FILL {
        sqlx::query(*sql).execute(pool).await.unwrap();
    }
    let chunk = 100_000;
    let mut from = 1;
    while from <= n {
        let to = (from + chunk - 1).min(n);
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO work_units (id, study_id, module_hash, input, input_hash, params, state,
                 min_quorum, target_nresults, max_error_results, max_total_results,
                 max_success_results, delay_bound_secs, fuel, memory_bytes, output_bytes,
                 wall_ms, unsent, n_issued, canonical_replica_id, finished_at)
             SELECT i, 1 + i % 100, decode(repeat('ab', 32), 'hex'), convert_to(p::text, 'UTF8'),
                    decode(md5(p::text) || md5(i::text), 'hex'), p, 'validated',
                    2, 2, 3, 6, 5, 600, 1000000, 1048576, 65536, 60000, 0, 2, 2 * i - 1, now()
             FROM (SELECT i, jsonb_build_object('lr', (i % 10 + 1) * 0.01, 'hidden', (i / 10) % 8 * 4,
                                                 'seed', i % 1000) AS p
                   FROM generate_series($1::bigint, $2::bigint) i) t",
        )
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO replicas (id, wu_id, worker_id, state, validate_state, platform, deadline,
                                   reported_at, output_hash, fuel_used, wall_micros)
             SELECT 2 * i - 1 + k, i,
                    ('00000000-0000-0000-0000-00000000000' || (k + 1))::uuid, 'success', 'valid',
                    CASE k WHEN 0 THEN 'x86_64/linux' ELSE 'aarch64/linux' END, now(), now(),
                    decode(md5(i::text) || md5(i::text), 'hex'), 123456 + i, 1000
             FROM generate_series($1::bigint, $2::bigint) i, generate_series(0, 1) k",
        )
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO findings (wu_id, study_id, module_hash, input_hash, output_hash, output,
                                   metrics, params, confidence, agreeing_replicas, dissenting)
             SELECT w.id, w.study_id, w.module_hash, w.input_hash,
                    decode(md5(w.id::text) || md5(w.id::text), 'hex'), '\\x7b7d'::bytea,
                    jsonb_build_object('val_loss', round((0.05 + random())::numeric, 6),
                                       'accuracy', round(random()::numeric, 6)),
                    w.params, 0.99, ARRAY[2 * w.id - 1, 2 * w.id], 0
             FROM work_units w WHERE w.id BETWEEN $1 AND $2 ORDER BY w.id",
        )
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        from = to + 1;
    }
    for seq in ["work_units_id_seq", "replicas_id_seq"] {
        sqlx::query("SELECT setval($1::regclass, (SELECT max(id) FROM work_units) * 2)")
            .bind(seq)
            .execute(pool)
            .await
            .unwrap();
    }
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn time_queries(
    client: &mut Client,
    what: &str,
    n: usize,
    req: impl Fn(usize) -> pb::ListFindingsRequest,
) {
    let mut times = Vec::with_capacity(n);
    let mut rows = 0;
    for i in 0..n {
        let start = Instant::now();
        let r = client
            .ledger
            .list_findings(req(i))
            .await
            .unwrap()
            .into_inner();
        times.push(start.elapsed());
        rows += r.findings.len();
    }
    times.sort_unstable();
    println!(
        "{what}: {n} queries, {:.1} rows each, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        rows as f64 / n as f64,
        percentile(&times, 0.50).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args();
    let admin = std::env::var("ACCRETE_TEST_DATABASE_URL").unwrap_or_else(|_| LOCAL_SERVER.into());
    let name = format!("accrete_ledger_bench_{}", std::process::id());
    let db = DevDb::on_server(&admin, &name).await?;
    println!("database {name}; {} findings", a.findings);
    let store = Store::connect(&db.url, 8).await?;

    let start = Instant::now();
    fill(&store, a.findings).await;
    println!(
        "bulk insert (work units, replicas, findings, metric rows): {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    let sealed = store.seal_now().await?;
    let took = start.elapsed().as_secs_f64();
    println!(
        "seal: {sealed} entries in {took:.1} s ({:.0} entries/s)",
        sealed as f64 / took
    );
    // What autovacuum does on a live server: statistics and the visibility map (index-only scans).
    let start = Instant::now();
    sqlx::query("VACUUM ANALYZE").execute(store.pool()).await?;
    println!("vacuum analyze: {:.1} s", start.elapsed().as_secs_f64());

    // Verify straight from the database, in pages.
    let start = Instant::now();
    let mut v = Verifier::new();
    let mut after = 0;
    loop {
        let page = store.ledger_page(after, 20_000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for row in page {
            v.push(&row.entry());
        }
    }
    let verdict = v.finish();
    println!(
        "verify (database pages): {:.2} s, {verdict:?}",
        start.elapsed().as_secs_f64()
    );
    assert!(matches!(verdict, Verdict::Intact { len, .. } if len == sealed));

    // The rest goes through the real server over gRPC.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(accrete_server::run(
        store.clone(),
        Config::default(),
        listener,
        async move {
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    let (_, key) = accrete_server::admin::create_key(
        &store,
        accrete_server::auth::Role::Reader,
        "ledger-bench",
    )
    .await?;
    let mut client = Client::connect_with(&url, &Default::default(), Some(&key)).await?;
    let start = Instant::now();
    let verdict = accrete::ledger::verify_remote(&mut client).await?;
    println!(
        "verify (accrete ledger verify, gRPC stream): {:.2} s, {verdict:?}",
        start.elapsed().as_secs_f64()
    );

    let top20 = |lr: f64| pb::ListFindingsRequest {
        order_by_metric: "val_loss".into(),
        param_equals: [("lr".to_string(), format!("{lr}"))].into(),
        limit: 20,
        ..Default::default()
    };
    let lrs: Vec<f64> = (1..=10).map(|k| k as f64 * 0.01).collect();
    time_queries(
        &mut client,
        "top 20 by val_loss where lr = x (10% of rows)",
        a.queries,
        |i| top20(lrs[i % lrs.len()]),
    )
    .await;
    time_queries(
        &mut client,
        "top 20 by val_loss where lr = x and hidden = y (1.25%)",
        a.queries,
        |i| {
            let mut r = top20(lrs[i % lrs.len()]);
            r.param_equals
                .insert("hidden".into(), format!("{}", i % 8 * 4));
            r
        },
    )
    .await;
    time_queries(
        &mut client,
        "top 20 by val_loss where seed = x (0.1%: GIN fallback)",
        a.queries,
        |i| {
            let mut r = top20(0.01);
            r.param_equals.clear();
            r.param_equals
                .insert("seed".into(), format!("{}", i % 1000));
            r
        },
    )
    .await;
    time_queries(
        &mut client,
        "top 20 by accuracy desc in one study",
        a.queries,
        |i| pb::ListFindingsRequest {
            study_id: 1 + (i % 100) as u64,
            order_by_metric: "accuracy".into(),
            descending: true,
            limit: 20,
            ..Default::default()
        },
    )
    .await;
    // A deep page: the cursor after 10,000 rows.
    let mut cursor = String::new();
    for _ in 0..10 {
        let r = client
            .ledger
            .list_findings(pb::ListFindingsRequest {
                order_by_metric: "val_loss".into(),
                limit: 1000,
                cursor,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        cursor = r.next_cursor;
    }
    time_queries(
        &mut client,
        "next 20 by val_loss after 10,000 rows (cursor)",
        a.queries,
        |_| pb::ListFindingsRequest {
            order_by_metric: "val_loss".into(),
            limit: 20,
            cursor: cursor.clone(),
            ..Default::default()
        },
    )
    .await;

    let _ = stop.send(true);
    server.await??;
    store.close().await;
    if a.keep {
        println!("kept database {name}");
        std::mem::forget(db);
    } else {
        db.stop().await?;
    }
    Ok(())
}
