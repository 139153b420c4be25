//! The hot path's plans: the claim, the report and the credential check run generic plans,
//! made once per connection on whatever statistics the tables have at that moment (the hot
//! pool's `HOT_SETTINGS`). On a fresh
//! database those statistics say "empty", where a full scan costs no more than a probe; a plan
//! made then would stay until the next ANALYZE while the tables grow to millions of rows. So
//! every table these statements read must be reached by its key, whatever the statistics say.

use accrete_server::Store;
use accrete_server::store::HOT_STATEMENTS;
use serde_json::Value;
use sqlx::AssertSqlSafe;

/// Every scan of a table in `plan` that is not an index scan by a key condition, as "node on
/// table".
fn unkeyed_scans(plan: &Value, out: &mut Vec<String>) {
    if let Some(table) = plan.get("Relation Name").and_then(Value::as_str) {
        let node = plan["Node Type"].as_str().unwrap_or_default();
        let keyed = match node {
            "Index Scan" | "Index Only Scan" => plan.get("Index Cond").is_some(),
            // Unordered, so a range (the claim's lanes) is read whole before any LIMIT.
            "Bitmap Heap Scan" => false,
            // The table a statement writes; how it finds the rows is a scan below it.
            "ModifyTable" => true,
            _ => false,
        };
        if !keyed {
            out.push(format!("{node} on {table}"));
        }
    }
    for child in plan
        .get("Plans")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        unkeyed_scans(child, out);
    }
}

/// The highest `$n` in a statement: how many parameters it takes.
fn params(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|s| {
            let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

/// The generic plan of each hot statement as the server makes it (on a connection of the hot
/// pool), and what it scans unkeyed.
async fn check_plans(store: &Store) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, sql) in HOT_STATEMENTS {
        let mut conn = store.hot_pool().acquire().await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("PREPARE hot AS {sql}")))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("preparing {name}: {e}"));
        let nulls = vec!["NULL"; params(sql)].join(", ");
        // EXECUTE with NULLs: under force_generic_plan the plan does not depend on them, and
        // EXPLAIN without ANALYZE runs nothing.
        let (plan,): (Value,) = sqlx::query_as(AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON) EXECUTE hot({nulls})"
        )))
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("explaining {name}: {e}"));
        sqlx::raw_sql("DEALLOCATE hot")
            .execute(&mut *conn)
            .await
            .unwrap();
        let mut found = Vec::new();
        unkeyed_scans(&plan[0]["Plan"], &mut found);
        problems.extend(found.into_iter().map(|f| format!("{name}: {f}")));
    }
    problems
}

#[tokio::test]
async fn hot_statements_reach_every_table_by_key_even_on_an_empty_database() {
    let db = accrete_tests::test_db("test_plans").await;
    let store = Store::connect(&db.url, 2).await.unwrap();

    // Fresh from the migrations: empty tables, one of them (replicas) analyzed as empty.
    let problems = check_plans(&store).await;
    assert!(problems.is_empty(), "on an empty database: {problems:#?}");

    // A young database: statistics taken on a few rows, which say nothing of a large table.
    sqlx::raw_sql(
        "INSERT INTO modules (hash, wasm, size_bytes) VALUES (decode(repeat('ab', 32), 'hex'), '\\x00', 1);
         INSERT INTO studies (name, module_hash) VALUES ('young', decode(repeat('ab', 32), 'hex'));
         INSERT INTO work_units (study_id, module_hash, input, input_hash, min_quorum,
             target_nresults, max_error_results, max_total_results, max_success_results,
             delay_bound_secs, fuel, memory_bytes, output_bytes, wall_ms, unsent)
         SELECT 1, decode(repeat('ab', 32), 'hex'), '\\x00', sha256(g::text::bytea), 2, 2, 3, 6, 5,
                600, 1000, 65536, 1024, 1000, 2
         FROM generate_series(1, 20) g;
         INSERT INTO workers (id, token_hash, arch, os, cores, memory_bytes, runtime)
         SELECT gen_random_uuid(), sha256(g::text::bytea), 'x86_64', 'linux', 1, 1, 'sim'
         FROM generate_series(1, 3) g;
         INSERT INTO replicas (wu_id, worker_id, platform, deadline)
         SELECT w.id, k.id, 'x86_64/linux', now() FROM work_units w CROSS JOIN workers k;
         ANALYZE",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let problems = check_plans(&store).await;
    assert!(problems.is_empty(), "on a young database: {problems:#?}");
    store.close().await;
    db.stop().await.unwrap();
}
