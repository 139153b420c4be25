//! The adversarial simulation at a small scale, as a test of the replication invariants over
//! the random event orders many concurrent workers produce: real server, real PostgreSQL.

use accrete_sim::{Args, Scenario};
use clap::Parser;

fn args(extra: &[&str]) -> Args {
    let admin = std::env::var("ACCRETE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| accrete_server::devdb::LOCAL_SERVER.into());
    let mut argv = vec![
        "accrete-sim",
        "--wus",
        "200",
        "--warmup",
        "100",
        "--workers",
        "12",
        "--delay-bound",
        "1",
        "--max-secs",
        "150",
        "--database-url",
    ];
    argv.push(&admin);
    argv.extend_from_slice(extra);
    Args::parse_from(argv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_wrong_workers_get_no_wrong_finding_past_a_quorum_of_two() {
    let a = args(&["--scenario", "random-wrong", "--bad", "0.25"]);
    assert_eq!(a.scenario, Scenario::RandomWrong);
    let r = accrete_sim::run(&a).await.unwrap();
    assert_eq!(r.breaches.total(), 0, "{:?}", r.breaches);
    assert_eq!((r.validated, r.pending), (200, 0));
    assert_eq!(r.wrong, 0);
    assert!(r.calibrated(), "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanishing_and_colluding_workers_break_no_invariant_under_adaptive_replication() {
    for scenario in ["vanishing", "colluding"] {
        let r = accrete_sim::run(&args(&["--scenario", scenario, "--adaptive"]))
            .await
            .unwrap();
        assert_eq!(r.breaches.total(), 0, "{scenario}: {:?}", r.breaches);
        assert_eq!(r.pending, 0, "{scenario}: {}", r.text());
        assert_eq!(r.validated + r.failed, 200);
        // Whatever colluders get through scores low: never at 0.99 or above.
        assert_eq!(r.high.1, 0, "{scenario}: {}", r.text());
    }
}
