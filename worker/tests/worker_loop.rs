//! The worker loop where no server is needed: an unreachable scheduler and a malformed URL.
//! Everything that needs a scheduler runs against the real server in tests/it/worker_loop.rs.

use std::time::{Duration, Instant};

use accrete_worker::{WorkerConfig, WorkerSummary, run};

fn config(url: &str) -> WorkerConfig {
    let mut config = WorkerConfig::new(url);
    config.slots = 1;
    config.prefetch = 1;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_retrying_an_unreachable_server_and_stops_promptly() {
    // Port 1 on localhost: nothing listens there.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run(config("http://127.0.0.1:1"), async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!worker.is_finished(), "the worker must keep retrying");
    let stopping = Instant::now();
    tx.send(()).unwrap();
    let summary = worker.await.unwrap().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(summary, WorkerSummary::default());
}

#[tokio::test]
async fn a_bad_url_is_an_error() {
    let err = run(config("not a url"), async {}).await.unwrap_err();
    assert!(err.to_string().contains("invalid server URL"), "{err:#}");
}
