//! The `accrete-server` command line: parses flags, starts tracing, connects to PostgreSQL and
//! calls `run` until ctrl-c or SIGTERM. A library function so tests can start the same binary.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::{CallLimits, Config, Limits, Store, TlsIdentity};

/// The accrete scheduler: hands sandboxed WebAssembly work units to volunteer workers,
/// cross-validates their results, and records validated findings in PostgreSQL.
///
/// The database is the single source of truth: several servers may share one database, and
/// any of them may be stopped or killed at any time without losing work.
///
/// Every setting can be given as a flag, as the environment variable named with it, or as a
/// key of the TOML file named by --config (the flag's long name, e.g. `max-module-bytes = 1000`);
/// flags win over the environment, which wins over the file, which wins over the defaults.
/// The gRPC listener serves TLS with --tls-cert and --tls-key; plaintext needs --plaintext.
/// SIGTERM or ctrl-c stops accepting connections, drains in-flight calls for at most
/// --shutdown-timeout seconds, and exits.
/// Research, ledger and admin calls need an API key; make the first one with
/// `accrete-server keys create --role admin`.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// A TOML file of settings (keys are the long flag names).
    #[arg(long, env = "ACCRETE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// PostgreSQL URL, e.g. postgres://postgres@127.0.0.1:5432/accrete. The schema is created
    /// or migrated at start-up.
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
    /// Seconds an API key's or worker credential's state read from the database is trusted: a
    /// revoked key or a blocked worker is refused by every server within this.
    #[arg(long, env = "ACCRETE_AUTH_CACHE_TTL_SECS", default_value_t = 5.0)]
    auth_cache_ttl_secs: f64,
    /// Address to serve gRPC on (workers, researchers and dashboards all use it).
    #[arg(long, env = "ACCRETE_LISTEN", default_value = "127.0.0.1:7070")]
    listen: String,
    /// Certificate chain (PEM) for TLS on the gRPC listener; needs --tls-key.
    #[arg(
        long,
        env = "ACCRETE_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "ACCRETE_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Serve gRPC without TLS (anyone on the path can read and alter traffic). Required when no
    /// certificate is given, so plaintext is always a choice someone wrote down.
    #[arg(long, env = "ACCRETE_PLAINTEXT", conflicts_with = "tls_cert")]
    plaintext: bool,
    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics.
    #[arg(long, env = "ACCRETE_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Database connections for the hot path (claims, reports, credential checks); everything
    /// else shares a quarter as many more (at least two). About four per core of the database
    /// is enough: with PostgreSQL on 2 cores, 16 made calls slower than 8 (BENCHMARKS.md).
    #[arg(long, env = "ACCRETE_DB_CONNECTIONS", default_value_t = 8)]
    db_connections: u32,
    /// Seconds between scans for replicas past their deadline.
    #[arg(long, env = "ACCRETE_RESCUE_INTERVAL_SECS", default_value_t = 1.0)]
    rescue_interval_secs: f64,
    /// Seconds between rounds of the sealer, which chains new findings and evidence into the
    /// ledger: how long a finding may wait for its ledger entry. Longer rounds seal more at once.
    #[arg(long, env = "ACCRETE_SEAL_INTERVAL_SECS", default_value_t = 0.5)]
    seal_interval_secs: f64,
    /// Fuel a work unit gets when its study does not say (about one unit per instruction).
    #[arg(long, env = "ACCRETE_DEFAULT_FUEL", default_value_t = Limits::default().default_fuel)]
    default_fuel: u64,
    /// Largest module accepted, in bytes (PutModule messages are capped just above it).
    #[arg(long, env = "ACCRETE_MAX_MODULE_BYTES", default_value_t = Limits::default().max_module_bytes)]
    max_module_bytes: usize,
    /// Largest work unit input accepted, in bytes.
    #[arg(long, env = "ACCRETE_MAX_INPUT_BYTES", default_value_t = Limits::default().max_input_bytes)]
    max_input_bytes: usize,
    /// Largest output a study may allow its work units, in bytes (ReportResults messages are
    /// capped by it times the report batch).
    #[arg(long, env = "ACCRETE_MAX_OUTPUT_BYTES", default_value_t = Limits::default().max_output_bytes)]
    max_output_bytes: u64,
    /// Daily quota of a volunteer account made from now on: replicas per UTC day for all its
    /// workers together (each worker also has its own, which starts at 1,000). `accrete admin
    /// account-quota` changes one account's.
    #[arg(long, env = "ACCRETE_ACCOUNT_DAILY_QUOTA", default_value_t = Limits::default().account_daily_quota)]
    account_daily_quota: u32,
    /// Largest message of every other call, in bytes.
    #[arg(long, env = "ACCRETE_MAX_MESSAGE_BYTES", default_value_t = Limits::default().small_message_bytes)]
    max_message_bytes: usize,
    /// Sustained calls per second per credential (the `authorization` metadata, else the
    /// worker id of a worker call, else the peer IP address); 0: no limit. Calls over it fail
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ACCRETE_RATE_PER_SEC", default_value_t = 50)]
    rate_per_sec: u32,
    /// Calls a credential may make in a burst above --rate-per-sec.
    #[arg(long, env = "ACCRETE_RATE_BURST", default_value_t = 100)]
    rate_burst: u32,
    /// Register and CreateAccount calls per minute per peer IP address (neither needs a
    /// credential); 0: no limit.
    #[arg(long, env = "ACCRETE_REGISTER_PER_MIN", default_value_t = 60)]
    register_per_min: u32,
    /// Calls in flight at once; more are refused at once with UNAVAILABLE (load shedding)
    /// rather than queued. 0: no limit.
    #[arg(long, env = "ACCRETE_MAX_CONCURRENT", default_value_t = 512)]
    max_concurrent: usize,
    /// Seconds a call's handler may run before it fails with DEADLINE_EXCEEDED; 0: no limit.
    #[arg(long, env = "ACCRETE_REQUEST_TIMEOUT_SECS", default_value_t = 120.0)]
    request_timeout_secs: f64,
    /// On SIGTERM or ctrl-c, seconds in-flight calls may take to finish before the server
    /// exits anyway.
    #[arg(long, env = "ACCRETE_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    shutdown_timeout: f64,
    /// Log format: `text` or `json` (one JSON object per line, with the call's request id and
    /// method in its span). The level is set with RUST_LOG (default info).
    #[arg(long, env = "ACCRETE_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Same as --log-format json (kept for existing scripts).
    #[arg(long, env = "ACCRETE_LOG_JSON", hide = true)]
    log_json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// API keys, straight on the database (no server needed): create the first admin key here.
    Keys {
        #[command(subcommand)]
        action: crate::admin::KeysCommand,
    },
}

/// Runs the server with the process's arguments; what `main` of `accrete-server` calls.
pub fn main() -> anyhow::Result<()> {
    let mut args: Args = accrete_proto::config_file::parse()?;
    let url = args
        .database_url
        .take()
        .context("--database-url (or DATABASE_URL) is required")?;
    let runtime = tokio::runtime::Runtime::new()?;
    match args.command.take() {
        Some(Command::Keys { action }) => {
            runtime.block_on(crate::admin::keys_command(&url, action))
        }
        None => runtime.block_on(serve(args, url)),
    }
}

async fn serve(args: Args, database_url: String) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn".into());
    if args.log_json || args.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity {
            cert_pem: std::fs::read(cert)
                .with_context(|| format!("reading --tls-cert {}", cert.display()))?,
            key_pem: std::fs::read(key)
                .with_context(|| format!("reading --tls-key {}", key.display()))?,
        }),
        _ if args.plaintext => None,
        _ => anyhow::bail!(
            "give --tls-cert and --tls-key to serve TLS, or --plaintext to serve without it"
        ),
    };
    let secs = |s: f64| (s > 0.0).then(|| Duration::from_secs_f64(s));
    let config = Config {
        limits: Limits {
            default_fuel: args.default_fuel,
            max_module_bytes: args.max_module_bytes,
            max_input_bytes: args.max_input_bytes,
            max_output_bytes: args.max_output_bytes,
            small_message_bytes: args.max_message_bytes,
            account_daily_quota: args.account_daily_quota,
            ..Default::default()
        },
        rescue_interval: Duration::from_secs_f64(args.rescue_interval_secs.max(0.05)),
        seal_interval: Duration::from_secs_f64(args.seal_interval_secs.max(0.05)),
        tls,
        calls: CallLimits {
            rate_per_sec: NonZeroU32::new(args.rate_per_sec),
            rate_burst: NonZeroU32::new(args.rate_burst.max(args.rate_per_sec)),
            register_per_min: NonZeroU32::new(args.register_per_min),
            max_concurrent: (args.max_concurrent > 0).then_some(args.max_concurrent),
            request_timeout: secs(args.request_timeout_secs),
        },
        metrics_listen: args.metrics_listen,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        auth_cache_ttl: Duration::from_secs_f64(args.auth_cache_ttl_secs.clamp(0.0, 3600.0)),
        ..Default::default()
    };
    let store = Store::connect(&database_url, args.db_connections)
        .await
        .context("connecting to the database")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        tls = config.tls.is_some(),
        "accrete-server listening"
    );
    crate::run(store, config, listener, shutdown_signal()).await?;
    tracing::info!("accrete-server stopped");
    Ok(())
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
