//! The `accrete-worker` command line: parses flags, starts logging, and runs [`crate::run`]
//! until Ctrl-C or SIGTERM. A library function so tests can start the same binary.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Donate CPU time to accrete research.
///
/// The worker asks an accrete scheduler for work, runs each work unit (a WebAssembly module and
/// its input) and reports the result. Work units run in a sandbox: no filesystem, no network,
/// no environment variables, no real clock (time is virtual) and no threads. Each one is
/// limited in fuel (instructions), memory and output size, and stopped by a wall-clock backstop,
/// so a faulty or hostile module cannot harm this machine or hang the worker; its results are
/// deterministic, so replicas from different volunteers can be compared bit for bit.
///
/// Ctrl-C or SIGTERM stops the worker gracefully: it claims no more work, lets running work
/// units finish for up to --drain-timeout-secs, and hands the rest back to the scheduler.
/// Logging level is set with RUST_LOG (default: info).
///
/// Every setting can be given as a flag, as the environment variable named with it, or as a
/// key of the TOML file named by --config (the flag's long name, e.g. `slots = 4`); flags win
/// over the environment, which wins over the file, which wins over the defaults.
#[derive(Debug, Parser)]
#[command(name = "accrete-worker", version, about, long_about)]
struct Args {
    /// A TOML file of settings (keys are the long flag names).
    #[arg(long, env = "ACCRETE_WORKER_CONFIG", value_name = "FILE")]
    config: Option<std::path::PathBuf>,

    /// URL of the accrete scheduler: https://HOST:PORT for TLS, http://HOST:PORT for plaintext.
    #[arg(long, env = "ACCRETE_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,

    /// CA certificate (PEM) that signed the scheduler's TLS certificate [default: the system's
    /// trust store]. Only with an https:// server.
    #[arg(long, env = "ACCRETE_CA_FILE", value_name = "FILE")]
    ca_file: Option<std::path::PathBuf>,

    /// Work units run at once [default: number of CPU cores].
    #[arg(long, env = "ACCRETE_SLOTS")]
    slots: Option<usize>,

    /// Name shown to the scheduler's operators [default: host name].
    #[arg(long, env = "ACCRETE_WORKER_NAME")]
    name: Option<String>,

    /// Key of the volunteer account this worker joins (from --create-account). The account's
    /// workers, on any machines, share its daily quota, and the scheduler never gives two of
    /// them replicas of the same work unit. Prefer the environment variable or the config file
    /// to the flag: other users of this host can read a process's flags.
    #[arg(
        long,
        env = "ACCRETE_ACCOUNT_KEY",
        default_value = "",
        hide_env_values = true
    )]
    account_key: String,

    /// Create the volunteer account NAME on the scheduler, print its key (shown only once),
    /// and exit. Give the key to each of your workers with --account-key.
    #[arg(long, value_name = "NAME")]
    create_account: Option<String>,

    /// File keeping this worker's credential, so a restarted worker keeps its identity, its
    /// reputation and the work units it held [default: worker-NAME.credential in
    /// $ACCRETE_STATE_DIR, $XDG_STATE_HOME/accrete or ~/.local/state/accrete]. Run two workers
    /// on one host with different --name or --credential-file.
    #[arg(long, env = "ACCRETE_CREDENTIAL_FILE")]
    credential_file: Option<std::path::PathBuf>,

    /// Keep the credential in memory only: every start registers a new worker.
    #[arg(long, conflicts_with = "credential_file")]
    no_credential_file: bool,

    /// Most work units claimed in one request.
    #[arg(long, env = "ACCRETE_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,

    /// Work units claimed ahead of free slots [default: --slots].
    #[arg(long, env = "ACCRETE_PREFETCH")]
    prefetch: Option<usize>,

    /// On shutdown, seconds running work units may take to finish before they are handed back.
    #[arg(long, env = "ACCRETE_DRAIN_TIMEOUT_SECS", default_value_t = 10)]
    drain_timeout_secs: u64,

    /// Log format: `text` or `json` (one JSON object per line).
    #[arg(long, env = "ACCRETE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// Same as --log-format json.
    #[arg(long, hide = true)]
    log_json: bool,
}

/// Runs the worker with the process's arguments; what `main` of `accrete-worker` calls.
pub fn main() -> anyhow::Result<()> {
    let args: Args = accrete_proto::config_file::parse()?;
    tokio::runtime::Runtime::new()?.block_on(work(args))
}

async fn work(args: Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json || args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt()
            .compact()
            .with_env_filter(filter)
            .init();
    }

    let tls = accrete_proto::transport::ClientTls::from_ca_file(args.ca_file.as_deref())?;
    if let Some(name) = &args.create_account {
        let created = crate::create_account(&args.server, &tls, name)
            .await
            .context("creating the account")?;
        eprintln!(
            "account {:?} created (daily quota {} replicas for all its workers together); its \
             key is shown only now. Start each of your workers with ACCRETE_ACCOUNT_KEY set to it \
             (or --account-key):",
            created.name, created.daily_quota
        );
        println!("{}", created.account_key);
        return Ok(());
    }
    let mut config = crate::WorkerConfig::new(args.server);
    config.tls = tls;
    if let Some(slots) = args.slots {
        config.slots = slots;
        config.prefetch = slots;
    }
    if let Some(prefetch) = args.prefetch {
        config.prefetch = prefetch;
    }
    let name = args.name.unwrap_or_else(crate::session::hostname);
    config.credential_file = if args.no_credential_file {
        None
    } else {
        args.credential_file
            .or_else(|| default_credential_file(&name))
    };
    config.name = Some(name);
    config.account_key = args.account_key;
    config.max_batch = args.max_batch;
    config.drain_timeout = Duration::from_secs(args.drain_timeout_secs);

    let summary = crate::run(config, shutdown_signal())
        .await
        .context("worker failed")?;
    println!(
        "completed {}, failed {}, handed back {}, unreported {}",
        summary.completed, summary.failed, summary.handed_back, summary.unreported
    );
    Ok(())
}

/// `worker-NAME.credential` in the state directory, if there is one.
fn default_credential_file(name: &str) -> Option<std::path::PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let dir = env("ACCRETE_STATE_DIR")
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("accrete")))
        .or_else(|| env("HOME").map(|d| d.join(".local/state/accrete")))?;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Some(dir.join(format!("worker-{safe}.credential")))
}

/// Resolves on Ctrl-C or (on Unix) SIGTERM, the signal service managers stop processes with.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
