//! The demo's fallback database: a private PostgreSQL cluster made with initdb under a scratch
//! directory, usable, and gone after `stop`.

use accrete_server::devdb::DevDb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_cluster_serves_the_schema_and_is_removed_on_stop() {
    let scratch = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("devdb-test");
    let name = format!("t{}", std::process::id());
    let db = DevDb::cluster(&scratch, &name)
        .await
        .expect("making a private cluster");
    assert_eq!(db.origin, "private cluster");
    let store = accrete_server::Store::connect(&db.url, 2)
        .await
        .expect("migrating the private cluster");
    let modules: i64 = sqlx::query_scalar("SELECT count(*) FROM modules")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(modules, 0);
    store.close().await;
    let dir = db.cluster_dir().expect("a private cluster").to_path_buf();
    assert!(dir.exists());
    db.stop().await.expect("stopping the private cluster");
    assert!(!dir.exists(), "the cluster's directory is removed");
}
