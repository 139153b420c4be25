//! `accrete demo`: the whole loop on one machine. A throwaway PostgreSQL, the scheduler on a
//! loopback port, volunteer workers over real gRPC, the tiny-model sweep, live progress, and a
//! leaderboard of validated findings. Everything it starts, it stops.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use accrete_proto::v1 as pb;
use accrete_server::devdb::DevDb;
use anyhow::Context;
use tokio::sync::watch;

use crate::client::{self, Client};
use crate::sweep::SweepSpec;

/// The sweep the demo submits; also shipped as `examples/tiny-model-sweep.toml`.
pub const SWEEP: &str = include_str!("../../examples/tiny-model-sweep.toml");

pub struct DemoOptions {
    pub database_url: Option<String>,
    pub workers: usize,
    pub slots: usize,
    /// Where a private PostgreSQL cluster may be made if no server is running.
    pub scratch: PathBuf,
    pub top: u32,
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let db = DevDb::start(opts.database_url.clone(), &opts.scratch)
        .await
        .context("finding a PostgreSQL for the demo")?;
    println!("database: {} ({})", redact(&db.url), db.origin);
    let result = with_database(&opts, &db.url, started).await;
    db.stop().await.context("removing the demo database")?;
    result
}

async fn with_database(opts: &DemoOptions, url: &str, started: Instant) -> anyhow::Result<()> {
    let store = accrete_server::Store::connect(url, 16).await?;
    // The demo is its own researcher: a key minted straight in the (throwaway) database.
    let (_, key) =
        accrete_server::admin::create_key(&store, accrete_server::auth::Role::Researcher, "demo")
            .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(accrete_server::run(
        store,
        accrete_server::Config::default(),
        listener,
        stopped(stop_rx.clone()),
    ));
    println!("scheduler: {server_url}");
    let workers: Vec<_> = (0..opts.workers)
        .map(|i| {
            let mut config = accrete_worker::WorkerConfig::new(server_url.clone());
            config.slots = opts.slots;
            config.name = Some(format!("demo-worker-{}", i + 1));
            tokio::spawn(accrete_worker::run(config, stopped(stop_rx.clone())))
        })
        .collect();
    println!("workers: {} x {} slot(s)", opts.workers, opts.slots);

    let outcome = sweep_and_report(&server_url, &key, opts.top, started).await;

    let _ = stop_tx.send(true);
    for w in workers {
        w.await??;
    }
    server.await??;
    outcome
}

async fn sweep_and_report(
    server: &str,
    key: &str,
    top: u32,
    started: Instant,
) -> anyhow::Result<()> {
    let mut client = Client::connect_with(server, &Default::default(), Some(key)).await?;
    let spec = SweepSpec::parse(SWEEP).map_err(anyhow::Error::msg)?;
    let name = spec.name.clone().unwrap_or_else(|| "demo".into());
    let submitted = client
        .submit_sweep(
            accrete_tasks::TINY_MODEL.to_vec(),
            "tiny-model",
            &spec,
            &name,
            &[],
        )
        .await?;
    println!(
        "submitted study {} \"{name}\": {} work units, min_quorum {}",
        submitted.study_id,
        submitted.work_unit_ids.len(),
        spec.policy.min_quorum.unwrap_or(2)
    );
    let tty = std::io::stdout().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    let status = client
        .wait(
            submitted.study_id,
            Some(Duration::from_secs(600)),
            |s, elapsed| {
                // A terminal gets one line redrawn; a log gets a line every two seconds.
                if tty {
                    print!("\r{}", client::progress_line(s, elapsed));
                    let _ = std::io::stdout().flush();
                } else if last_print.elapsed() >= Duration::from_secs(2) || s.pending == 0 {
                    println!("{}", client::progress_line(s, elapsed));
                    last_print = Instant::now();
                }
            },
        )
        .await?;
    if tty {
        println!();
    }
    let findings = client
        .findings(pb::ListFindingsRequest {
            study_id: submitted.study_id,
            order_by_metric: "val_loss".into(),
            descending: false,
            limit: top,
            ..Default::default()
        })
        .await?;
    println!(
        "\nLeaderboard: the {} lowest validation losses among validated findings\n",
        findings.len()
    );
    print!("{}", client::findings_table(&findings, Some("val_loss")));
    println!(
        "\n{} of {} work units validated, {} failed; {} replicas agreed, {} disagreed. {:.1}s in all.",
        status.validated,
        status.work_units,
        status.failed,
        status.replicas_success - status.replicas_invalid,
        status.replicas_invalid,
        started.elapsed().as_secs_f64()
    );
    if status.validated == 0 {
        anyhow::bail!("no work unit validated");
    }
    Ok(())
}

/// The URL without its password, for printing.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if url[s + 3..at].contains(':') => {
            let user_end = s + 3 + url[s + 3..at].find(':').unwrap();
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_string(),
    }
}
