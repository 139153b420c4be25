//! `accrete-sim`: runs one adversarial scenario against the real server and prints its report.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIM_LOG")
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let args = accrete_sim::Args::parse();
    let report = accrete_sim::run(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}
