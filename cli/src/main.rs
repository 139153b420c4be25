//! `accrete`: the researcher's and dashboard's command line. Parses flags and calls the library.

use std::path::PathBuf;
use std::time::Duration;

use accrete::client::{self, Client, status_error};
use accrete::demo::{self, DemoOptions};
use accrete::ledger;
use accrete::sweep::SweepSpec;
use accrete_proto::transport::ClientTls;
use accrete_proto::v1 as pb;
use anyhow::Context;
use clap::{Parser, Subcommand};

/// accrete: volunteer computing for research. Submit sandboxed WebAssembly experiments as
/// sweeps of work units, let volunteer workers run them redundantly, and query the validated
/// findings, each with a confidence score and the replicas that agreed on it.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// The accrete server's gRPC address: https://HOST:PORT for TLS, http://HOST:PORT for
    /// plaintext.
    #[arg(
        long,
        global = true,
        env = "ACCRETE_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// CA certificate (PEM) that signed the server's TLS certificate [default: the system's
    /// trust store]. Only with an https:// server.
    #[arg(long, global = true, env = "ACCRETE_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// API key sent with every call (`accrete-server keys create` makes one). Roles: reader
    /// (queries), researcher (also submit, adopt, cancel own studies), admin (everything).
    #[arg(long, global = true, env = "ACCRETE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print JSON (one document per command) instead of tables, for agents and scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the whole loop on this machine: a throwaway PostgreSQL (DATABASE_URL if set, else a
    /// fresh database on 127.0.0.1:5432, else a private cluster under target/), the scheduler,
    /// volunteer workers, a 120-unit tiny-model sweep with live progress, and a leaderboard.
    /// Removes everything it made before it exits.
    Demo {
        /// PostgreSQL to use instead of a throwaway one (its tables are created if missing).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Workers to start.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Slots (parallel runs) per worker.
        #[arg(long, default_value_t = 1)]
        slots: usize,
        /// Rows in the leaderboard.
        #[arg(long, default_value_t = 10)]
        top: u32,
    },
    /// Uploads a WebAssembly module (a wasm32-wasip1 command) and prints its BLAKE3 hash.
    PutModule { module: PathBuf },
    /// Uploads MODULE and submits a sweep over its parameters as one study.
    ///
    /// The sweep file (TOML, or JSON) names the parameters, the search (grid, or random with
    /// `samples` and `seed`), the replication policy and the resource bounds; see
    /// examples/tiny-model-sweep.toml. Each point of the sweep is one work unit whose input (the
    /// guest's stdin) is the JSON object of its parameters.
    Submit {
        /// The experiment: a wasm32-wasip1 command module (e.g. built with
        /// `cargo build --release --target wasm32-wasip1 -p tiny-model`).
        module: PathBuf,
        /// The sweep file (TOML or JSON).
        #[arg(long)]
        sweep: PathBuf,
        /// The study's name (default: the sweep's `name`, else the file name).
        #[arg(long)]
        name: Option<String>,
        /// Wait, showing progress, until no work unit is pending.
        #[arg(long)]
        wait: bool,
        /// Print the expanded work units and stop, without contacting the server.
        #[arg(long)]
        dry_run: bool,
        /// A finding this study builds on (repeatable): its lineage in the ledger.
        #[arg(long = "parent")]
        parents: Vec<u64>,
    },
    /// Shows the progress of one study, or of every study.
    Status { study: Option<u64> },
    /// Lists validated findings, best first when ordered by a metric.
    Findings {
        /// Only this study's findings (default: every study).
        #[arg(long)]
        study: Option<u64>,
        /// Order by this metric (e.g. val_loss); findings without it are left out.
        #[arg(long)]
        order_by: Option<String>,
        /// Largest first (default: smallest first).
        #[arg(long)]
        desc: bool,
        /// Most findings to list (at most 1000).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only findings whose parameter NAME equals VALUE (JSON, e.g. hidden=8, act='"relu"');
        /// repeatable.
        #[arg(long = "param", value_name = "NAME=VALUE")]
        params: Vec<String>,
        /// Only findings with METRIC in [MIN, MAX]; an empty bound is open (val_loss::0.3);
        /// repeatable.
        #[arg(long = "range", value_name = "METRIC:MIN:MAX")]
        ranges: Vec<String>,
        /// Continue after this cursor (printed after a full page), with the same order.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// A finding's ancestors: the findings its study builds on, theirs, and so on.
    Lineage { finding: u64 },
    /// Findings that build on this finding.
    Children { finding: u64 },
    /// The frontier: findings nothing builds on yet, of one study or of the whole ledger.
    Leaves {
        #[arg(long)]
        study: Option<u64>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The best finding by METRIC in each study (or in one).
    Best {
        metric: String,
        /// Largest is best (default: smallest).
        #[arg(long)]
        desc: bool,
        #[arg(long)]
        study: Option<u64>,
    },
    /// Proposes adopting a finding: accrete re-runs its work unit on workers that did not take
    /// part and, if its input has a seed (`init_seed` or `seed`), on other seeds; the outcome
    /// (reproduced or not, metric mean and spread over seeds) becomes a ledger entry.
    Adopt {
        finding: u64,
        /// The metric whose seed noise to measure (default: the finding's first metric).
        #[arg(long)]
        metric: Option<String>,
        /// Larger is better for that metric.
        #[arg(long)]
        desc: bool,
        /// Other seeds to run.
        #[arg(long, default_value_t = 4)]
        seeds: u32,
        /// Wait for the outcome and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Prints a study's Validated Findings Report in Markdown: the question, the best findings
    /// with provenance and confidence, improvement over the parent against seed noise, failures.
    Report {
        study: u64,
        #[arg(long, default_value = "val_loss")]
        metric: String,
        /// Larger is better for the metric.
        #[arg(long)]
        desc: bool,
        #[arg(long, default_value_t = 10)]
        top: u32,
    },
    /// Shows one finding with its provenance and canonical output.
    Finding { id: u64 },
    /// Lists the failed work units of a study and why they failed.
    Failures {
        /// The study's id.
        study: u64,
        /// Most failures to list (at most 1000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancels a study: its pending work units are no longer handed out.
    Cancel { study: u64 },
    /// The hash-chained ledger of findings and evidence: verify, export, watch.
    Ledger {
        #[command(subcommand)]
        action: LedgerCommand,
    },
    /// Operator commands (an admin key): API keys, worker blocks, account quotas.
    Admin {
        #[command(subcommand)]
        action: AdminCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// API keys: create (printed once), list, revoke.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
    /// Refuses a worker every call (within the servers' cache TTL, 5 s by default).
    BlockWorker { worker_id: String },
    /// Lifts a block.
    UnblockWorker { worker_id: String },
    /// Sets a volunteer account's daily quota: replicas per UTC day for all its workers
    /// together (0 stops the account's work; each worker keeps its own quota as well).
    AccountQuota { account: String, daily_quota: u32 },
}

#[derive(Subcommand, Debug)]
enum KeysCommand {
    /// Creates a key and prints it; it is never shown again.
    Create {
        /// reader, researcher or admin.
        #[arg(long, value_parser = ["reader", "researcher", "admin"])]
        role: String,
        /// Who or what the key is for.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Lists keys (never the keys themselves).
    List,
    /// Revokes a key by id.
    Revoke { id: u64 },
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Recomputes every entry's hash, from the server (any accrete server; no database access
    /// needed) or from an exported file, and prints the head hash and length, or the first entry
    /// that does not match. Exits with status 2 when the chain is broken.
    Verify {
        /// Verify this `accrete ledger export` file offline instead of asking the server.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Writes the whole ledger as JSON lines (one entry per line: seq, body, prev_hash, hash).
    Export {
        /// Output file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prints entries after `--after` as JSON lines, then each new entry as it is sealed.
    Watch {
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

/// Errors are printed as one line with their causes, not as a backtrace: they are for people.
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let tls = ClientTls::from_ca_file(cli.ca_file.as_deref())?;
    match cli.command {
        Command::Demo {
            database_url,
            workers,
            slots,
            top,
        } => {
            let scratch = std::env::current_dir()?.join("target");
            demo::run(DemoOptions {
                database_url,
                workers,
                slots,
                scratch,
                top,
            })
            .await
        }
        Command::PutModule { module } => {
            let wasm =
                std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
            let name = file_stem(&module);
            let hash = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref())
                .await?
                .put_module(wasm, &name)
                .await?;
            print_out(
                cli.json,
                serde_json::json!({ "hash": client::hex(&hash) }),
                || client::hex(&hash),
            );
            Ok(())
        }
        Command::Submit {
            module,
            sweep,
            name,
            wait,
            dry_run,
            parents,
        } => {
            let text = std::fs::read_to_string(&sweep)
                .with_context(|| format!("reading {}", sweep.display()))?;
            let spec = SweepSpec::parse(&text).map_err(anyhow::Error::msg)?;
            if dry_run {
                for unit in spec.expand().map_err(anyhow::Error::msg)? {
                    println!("{unit}");
                }
                return Ok(());
            }
            let wasm =
                std::fs::read(&module).with_context(|| format!("reading {}", module.display()))?;
            let name = name
                .or(spec.name.clone())
                .unwrap_or_else(|| file_stem(&sweep));
            let mut client =
                Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let r = client
                .submit_sweep(wasm, &file_stem(&module), &spec, &name, &parents)
                .await?;
            let known: Vec<u64> = r
                .existing_findings
                .iter()
                .copied()
                .filter(|&f| f != 0)
                .collect();
            let fresh = r.work_unit_ids.len() - known.len();
            print_out(
                cli.json,
                serde_json::json!({
                    "study_id": r.study_id, "work_units": fresh,
                    "work_unit_ids": r.work_unit_ids, "existing_findings": r.existing_findings,
                }),
                || {
                    let mut line = format!("study {}: {fresh} work units submitted", r.study_id);
                    if !known.is_empty() {
                        line.push_str(&format!(
                            "; {} already validated, answered by findings {known:?}",
                            known.len()
                        ));
                    }
                    line
                },
            );
            if wait {
                let json = cli.json;
                let s = client
                    .wait(r.study_id, None, |s, t| {
                        if !json {
                            println!("{}", client::progress_line(s, t));
                        }
                    })
                    .await?;
                print_out(json, client::status_json(&s), String::new);
            }
            Ok(())
        }
        Command::Status { study } => {
            let r = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref())
                .await?
                .status(study.unwrap_or(0))
                .await?;
            print_out(
                cli.json,
                serde_json::json!({
                    "studies": r.studies.iter().map(client::status_json).collect::<Vec<_>>(),
                    "workers_seen_recently": r.workers_seen_recently,
                }),
                || {
                    let mut out: Vec<String> = r
                        .studies
                        .iter()
                        .map(|s| {
                            format!(
                                "{} \"{}\"",
                                client::progress_line(s, Duration::ZERO),
                                s.name
                            )
                        })
                        .collect();
                    out.push(format!(
                        "workers seen in the last 2 minutes: {}",
                        r.workers_seen_recently
                    ));
                    out.join("\n")
                },
            );
            Ok(())
        }
        Command::Findings {
            study,
            order_by,
            desc,
            limit,
            params,
            ranges,
            cursor,
        } => {
            let r = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref())
                .await?
                .ledger
                .list_findings(pb::ListFindingsRequest {
                    study_id: study.unwrap_or(0),
                    order_by_metric: order_by.clone().unwrap_or_default(),
                    descending: desc,
                    limit,
                    param_equals: params
                        .iter()
                        .map(|p| client::parse_param(p))
                        .collect::<anyhow::Result<_>>()?,
                    metric_ranges: ranges
                        .iter()
                        .map(|r| client::parse_range(r))
                        .collect::<anyhow::Result<_>>()?,
                    cursor: cursor.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_out(
                cli.json,
                serde_json::Value::Array(r.findings.iter().map(client::finding_json).collect()),
                || client::findings_table(&r.findings, order_by.as_deref()),
            );
            // The JSON document stays the list; the cursor for the next page goes to stderr.
            if !r.next_cursor.is_empty() {
                eprintln!("next page: --cursor {}", r.next_cursor);
            }
            Ok(())
        }
        Command::Lineage { finding } | Command::Children { finding } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let req = pb::FindingRelationRequest {
                finding_id: finding,
            };
            let r = if matches!(cli.command, Command::Lineage { .. }) {
                c.ledger.get_lineage(req).await
            } else {
                c.ledger.list_children(req).await
            };
            print_findings(
                cli.json,
                &r.map_err(status_error)?.into_inner().findings,
                None,
            );
            Ok(())
        }
        Command::Leaves { study, limit } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let r = c
                .ledger
                .list_leaves(pb::ListLeavesRequest {
                    study_id: study.unwrap_or(0),
                    limit,
                })
                .await
                .map_err(status_error)?;
            print_findings(cli.json, &r.into_inner().findings, None);
            Ok(())
        }
        Command::Best {
            metric,
            desc,
            study,
        } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let r = c
                .ledger
                .best_findings(pb::BestFindingsRequest {
                    metric: metric.clone(),
                    descending: desc,
                    study_id: study.unwrap_or(0),
                })
                .await
                .map_err(status_error)?;
            print_findings(cli.json, &r.into_inner().findings, Some(&metric));
            Ok(())
        }
        Command::Adopt {
            finding,
            metric,
            desc,
            seeds,
            wait,
        } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let r = c
                .ledger
                .adopt(pb::AdoptRequest {
                    finding_id: finding,
                    metric: metric.unwrap_or_default(),
                    descending: desc,
                    seeds,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if !wait {
                print_out(
                    cli.json,
                    serde_json::json!({ "adoption_id": r.adoption_id, "study_id": r.study_id }),
                    || {
                        format!(
                            "adoption {} opened: re-runs in study {}",
                            r.adoption_id, r.study_id
                        )
                    },
                );
                return Ok(());
            }
            let a = client::wait_adoption(&mut c, r.adoption_id).await?;
            let json = client::adoption_json(&a);
            print_out(cli.json, json.clone(), || {
                serde_json::to_string_pretty(&json).unwrap_or_default()
            });
            Ok(())
        }
        Command::Report {
            study,
            metric,
            desc,
            top,
        } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let md = accrete::report::report(&mut c, study, &metric, desc, top).await?;
            print_out(cli.json, serde_json::json!({ "markdown": md }), || {
                md.clone()
            });
            Ok(())
        }
        Command::Finding { id } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let f = c
                .ledger
                .get_finding(pb::GetFindingRequest { finding_id: id })
                .await
                .map_err(status_error)?
                .into_inner();
            let json = client::finding_json(&f);
            print_out(cli.json, json.clone(), || {
                serde_json::to_string_pretty(&json).unwrap_or_default()
            });
            Ok(())
        }
        Command::Failures { study, limit } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let r = c
                .ledger
                .list_failures(pb::ListFailuresRequest {
                    study_id: study,
                    limit,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_out(
                cli.json,
                serde_json::Value::Array(
                    r.failures
                        .iter()
                        .map(|f| serde_json::json!({ "work_unit_id": f.work_unit_id, "reason": f.reason, "params": f.params_json }))
                        .collect(),
                ),
                || r.failures.iter().map(|f| format!("{}  {}  {}", f.work_unit_id, f.reason, f.params_json)).collect::<Vec<_>>().join("\n"),
            );
            Ok(())
        }
        Command::Cancel { study } => {
            let mut c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            let r = c
                .research
                .cancel_study(pb::CancelStudyRequest { study_id: study })
                .await
                .map_err(status_error)?
                .into_inner();
            print_out(
                cli.json,
                serde_json::json!({ "cancelled_units": r.cancelled_units }),
                || {
                    format!(
                        "study {study} cancelled; {} pending work units stopped",
                        r.cancelled_units
                    )
                },
            );
            Ok(())
        }
        Command::Ledger { action } => {
            run_ledger(&cli.server, &tls, cli.api_key.as_deref(), cli.json, action).await
        }
        Command::Admin { action } => {
            let c = Client::connect_with(&cli.server, &tls, cli.api_key.as_deref()).await?;
            run_admin(c, cli.json, action).await
        }
    }
}

async fn run_admin(mut c: Client, json: bool, action: AdminCommand) -> anyhow::Result<()> {
    match action {
        AdminCommand::Keys {
            action: KeysCommand::Create { role, name },
        } => {
            let r = c
                .admin
                .create_api_key(pb::CreateApiKeyRequest { role, name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_out(
                json,
                serde_json::json!({ "id": r.id, "key": r.key }),
                || {
                    eprintln!("API key {} created; it is shown only now:", r.id);
                    r.key.clone()
                },
            );
        }
        AdminCommand::Keys {
            action: KeysCommand::List,
        } => {
            let keys = c
                .admin
                .list_api_keys(pb::ListApiKeysRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .keys;
            let rows: Vec<serde_json::Value> = keys
                .iter()
                .map(|k| {
                    serde_json::json!({
                        "id": k.id, "name": k.name, "role": k.role, "prefix": k.prefix,
                        "created_unix": k.created_unix,
                        "revoked_unix": (k.revoked_unix != 0).then_some(k.revoked_unix),
                    })
                })
                .collect();
            print_out(json, serde_json::Value::Array(rows), || {
                let mut t = format!(
                    "{:>5}  {:<10}  {:<14}  {:<20}  revoked\n",
                    "id", "role", "prefix", "name"
                );
                for k in &keys {
                    t.push_str(&format!(
                        "{:>5}  {:<10}  {:<14}  {:<20}  {}\n",
                        k.id,
                        k.role,
                        k.prefix,
                        k.name,
                        if k.revoked_unix != 0 { "yes" } else { "-" }
                    ));
                }
                t
            });
        }
        AdminCommand::Keys {
            action: KeysCommand::Revoke { id },
        } => {
            c.admin
                .revoke_api_key(pb::RevokeApiKeyRequest { id })
                .await
                .map_err(status_error)?;
            print_out(json, serde_json::json!({ "revoked": id }), || {
                format!("API key {id} revoked")
            });
        }
        AdminCommand::BlockWorker { worker_id } => block(&mut c, json, worker_id, true).await?,
        AdminCommand::UnblockWorker { worker_id } => block(&mut c, json, worker_id, false).await?,
        AdminCommand::AccountQuota {
            account,
            daily_quota,
        } => {
            c.admin
                .set_account_quota(pb::SetAccountQuotaRequest {
                    account: account.clone(),
                    daily_quota,
                })
                .await
                .map_err(status_error)?;
            print_out(
                json,
                serde_json::json!({ "account": account, "daily_quota": daily_quota }),
                || format!("account {account:?}: daily quota {daily_quota}"),
            );
        }
    }
    Ok(())
}

async fn block(c: &mut Client, json: bool, worker_id: String, blocked: bool) -> anyhow::Result<()> {
    c.admin
        .set_worker_blocked(pb::SetWorkerBlockedRequest {
            worker_id: worker_id.clone(),
            blocked,
        })
        .await
        .map_err(status_error)?;
    print_out(
        json,
        serde_json::json!({ "worker": worker_id, "blocked": blocked }),
        || {
            format!(
                "worker {worker_id} {}",
                if blocked { "blocked" } else { "unblocked" }
            )
        },
    );
    Ok(())
}

async fn run_ledger(
    server: &str,
    tls: &ClientTls,
    api_key: Option<&str>,
    json: bool,
    action: LedgerCommand,
) -> anyhow::Result<()> {
    match action {
        LedgerCommand::Verify { file } => {
            let verdict = match file {
                Some(path) => ledger::verify_file(&path)?,
                None => {
                    ledger::verify_remote(&mut Client::connect_with(server, tls, api_key).await?)
                        .await?
                }
            };
            print_out(json, ledger::verdict_json(&verdict), || {
                ledger::verdict_text(&verdict)
            });
            if matches!(verdict, accrete_server::ledger::Verdict::Broken { .. }) {
                std::process::exit(2);
            }
            Ok(())
        }
        LedgerCommand::Export { out } => {
            let mut client = Client::connect_with(server, tls, api_key).await?;
            let n = match &out {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    ledger::export(&mut client, &mut std::io::BufWriter::new(file)).await?
                }
                None => ledger::export(&mut client, &mut std::io::stdout().lock()).await?,
            };
            if out.is_some() {
                print_out(json, serde_json::json!({ "entries": n }), || {
                    format!("{n} entries exported")
                });
            }
            Ok(())
        }
        LedgerCommand::Watch { after } => {
            let mut client = Client::connect_with(server, tls, api_key).await?;
            let mut stream = client
                .ledger
                .watch_ledger(pb::ExportLedgerRequest { after_seq: after })
                .await
                .map_err(status_error)?
                .into_inner();
            while let Some(e) = stream.message().await.map_err(status_error)? {
                let entry = accrete_server::ledger::Entry {
                    seq: e.seq,
                    body: e.body,
                    prev_hash: e.prev_hash.try_into().unwrap_or([0xff; 32]),
                    hash: e.hash.try_into().unwrap_or([0xff; 32]),
                };
                println!("{}", accrete_server::ledger::to_json_line(&entry));
            }
            Ok(())
        }
    }
}

fn print_findings(json: bool, findings: &[pb::Finding], metric: Option<&str>) {
    print_out(
        json,
        serde_json::Value::Array(findings.iter().map(client::finding_json).collect()),
        || client::findings_table(findings, metric),
    );
}

fn print_out(json: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        let t = text();
        if !t.is_empty() {
            println!("{}", t.trim_end());
        }
    }
}

fn file_stem(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
