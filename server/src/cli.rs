//! The `accrete-server` command line: parses flags, starts tracing, connects to PostgreSQL and
//! calls `run` until ctrl-c or SIGTERM. A library function so tests can start the same binary.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::{Config, Limits, Store};

/// The accrete scheduler: hands sandboxed WebAssembly work units to volunteer workers,
/// cross-validates their results, and records validated findings in PostgreSQL.
///
/// The database is the single source of truth: several servers may share one database, and
/// any of them may be stopped or killed at any time without losing work.
///
/// Research, ledger and admin calls need an API key; make the first one with
/// `accrete-server keys create --role admin`.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
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
    /// Database connections in the pool.
    #[arg(long, env = "ACCRETE_DB_CONNECTIONS", default_value_t = 16)]
    db_connections: u32,
    /// Seconds between scans for replicas past their deadline.
    #[arg(long, default_value_t = 1.0)]
    rescue_interval_secs: f64,
    /// Fuel a work unit gets when its study does not say (about one unit per instruction).
    #[arg(long, default_value_t = Limits::default().default_fuel)]
    default_fuel: u64,
    /// Largest module accepted, in bytes.
    #[arg(long, default_value_t = Limits::default().max_module_bytes)]
    max_module_bytes: usize,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "ACCRETE_LOG_JSON")]
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
    let mut args = Args::parse();
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
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let store = Store::connect(&database_url, args.db_connections)
        .await
        .context("connecting to the database")?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "accrete-server listening");
    let config = Config {
        limits: Limits {
            default_fuel: args.default_fuel,
            max_module_bytes: args.max_module_bytes,
            ..Default::default()
        },
        rescue_interval: Duration::from_secs_f64(args.rescue_interval_secs.max(0.05)),
        auth_cache_ttl: Duration::from_secs_f64(args.auth_cache_ttl_secs.clamp(0.0, 3600.0)),
        ..Default::default()
    };
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
