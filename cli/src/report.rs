//! `accrete report STUDY`: a study's Validated Findings Report in Markdown. The question, the
//! best findings with their provenance and confidence, whether each improvement over its parent
//! exceeds the seed noise (measured by adoption proposals), and what failed.

use std::fmt::Write;

use accrete_proto::v1 as pb;
use accrete_server::adoption::NOISE_SIGMAS;
use serde_json::Value;

use crate::client::{Client, hex, status_error};

fn metric_of(f: &pb::Finding, name: &str) -> Option<f64> {
    serde_json::from_str::<Value>(&f.metrics_json)
        .ok()?
        .get(name)?
        .as_f64()
}

fn short(bytes: &[u8]) -> String {
    let h = hex(bytes);
    h.get(..12).unwrap_or(&h).to_string()
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The seed-noise verdict of a finding against its parent, from its latest adoption evidence.
fn noise_verdict(f: &pb::Finding, metric: &str) -> (String, String) {
    let adoption = f.evidence.iter().rev().find_map(|e| {
        let d: Value = serde_json::from_str(&e.detail_json).ok()?;
        (d.get("metric")?.as_str()? == metric && d.get("seeds").is_some()).then_some((e, d))
    });
    match adoption {
        None => (
            "not measured".into(),
            format!("unknown (run `accrete adopt {}`)", f.id),
        ),
        Some((e, d)) => {
            let n = d["values"].as_array().map_or(0, Vec::len);
            let spread = match (d["mean"].as_f64(), d["sd"].as_f64()) {
                (Some(m), Some(s)) => format!("{m:.6} ± {s:.6} (n={n})"),
                _ => "-".into(),
            };
            let verdict = match d["holds_over_seeds"].as_bool() {
                Some(true) => "**yes**".to_string(),
                Some(false) => "**no**: seed luck".to_string(),
                None if d["output_reproduced"] == false => "output not reproduced".into(),
                None => "no parent or no seeds to compare".into(),
            };
            (spread, format!("{verdict} ({})", e.kind))
        }
    }
}

/// Builds the report from the server's answers.
pub async fn report(
    client: &mut Client,
    study: u64,
    metric: &str,
    descending: bool,
    top: u32,
) -> anyhow::Result<String> {
    let status = client.status(study).await?.studies.remove(0);
    let best = client
        .findings(pb::ListFindingsRequest {
            study_id: study,
            order_by_metric: metric.to_string(),
            descending,
            limit: top,
            ..Default::default()
        })
        .await?;
    let mut full = Vec::new();
    for f in &best {
        full.push(
            client
                .ledger
                .get_finding(pb::GetFindingRequest { finding_id: f.id })
                .await
                .map_err(status_error)?
                .into_inner(),
        );
    }
    let failures = client
        .ledger
        .list_failures(pb::ListFailuresRequest {
            study_id: study,
            limit: 50,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .failures;

    let mut out = String::new();
    let better = if descending { "higher" } else { "lower" };
    writeln!(
        out,
        "# Validated Findings Report: study {study}, \"{}\"\n",
        status.name
    )?;
    let question = if status.description.trim().is_empty() {
        "(no description given)".to_string()
    } else {
        status.description.clone()
    };
    writeln!(out, "**Question.** {question}\n")?;
    writeln!(
        out,
        "**Progress.** {} work units: {} validated, {} failed, {} cancelled, {} pending. Module `{}`.\n",
        status.work_units,
        status.validated,
        status.failed,
        status.cancelled_units,
        status.pending,
        hex(&status.module_hash)
    )?;
    if let Some(f) = full.first()
        && !f.parent_findings.is_empty()
    {
        writeln!(out, "**Builds on** findings {:?}.\n", f.parent_findings)?;
    }

    writeln!(out, "## Best findings by `{metric}` ({better} is better)\n")?;
    if full.is_empty() {
        writeln!(out, "No validated finding reports `{metric}` yet.\n")?;
    } else {
        writeln!(
            out,
            "| rank | finding | {metric} | parameters | confidence | agreed (platforms) | ledger entry |"
        )?;
        writeln!(out, "|---:|---:|---:|---|---:|---|---|")?;
        for (i, f) in full.iter().enumerate() {
            let mut platforms: Vec<&str> = f.agreeing.iter().map(|a| a.platform.as_str()).collect();
            platforms.sort_unstable();
            platforms.dedup();
            writeln!(
                out,
                "| {} | {} | {} | `{}` | {:.4} | {} ({}) | {} |",
                i + 1,
                f.id,
                metric_of(f, metric).map_or("-".into(), |v| format!("{v:.6}")),
                cell(&f.params_json),
                f.confidence,
                f.agreeing.len(),
                platforms.join(", "),
                if f.ledger_seq == 0 {
                    "not yet sealed".to_string()
                } else {
                    format!("#{} `{}`", f.ledger_seq, short(&f.ledger_hash))
                }
            )?;
        }
        writeln!(out)?;

        writeln!(out, "## Improvement over the parent, against seed noise\n")?;
        writeln!(
            out,
            "Test: the mean of `{metric}` over seeds (the finding's own and those its adoption \
             re-ran) must beat the parent's value by more than {NOISE_SIGMAS} sample standard \
             deviations of those seed values. The parent is one run with about the same noise, \
             so this is roughly a one-sided test at the 2.5 % level.\n"
        )?;
        writeln!(
            out,
            "| finding | {metric} | parent | parent {metric} | improvement | seed mean ± sd | beyond seed noise? |"
        )?;
        writeln!(out, "|---:|---:|---:|---:|---:|---|---|")?;
        for f in &full {
            let value = metric_of(f, metric);
            let mut parent: Option<(u64, f64)> = None;
            for &p in &f.parent_findings {
                let pf = client
                    .ledger
                    .get_finding(pb::GetFindingRequest { finding_id: p })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                if let Some(v) = metric_of(&pf, metric) {
                    let better_than = |a: f64, b: f64| if descending { a > b } else { a < b };
                    if parent.is_none_or(|(_, pv)| better_than(v, pv)) {
                        parent = Some((p, v));
                    }
                }
            }
            let improvement = match (value, parent) {
                (Some(v), Some((_, pv))) => {
                    format!("{:.6}", if descending { v - pv } else { pv - v })
                }
                _ => "-".into(),
            };
            let (spread, verdict) = noise_verdict(f, metric);
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.id,
                value.map_or("-".into(), |v| format!("{v:.6}")),
                parent.map_or("none".into(), |(p, _)| p.to_string()),
                parent.map_or("-".into(), |(_, v)| format!("{v:.6}")),
                improvement,
                spread,
                verdict
            )?;
        }
        writeln!(out)?;

        writeln!(out, "## Provenance\n")?;
        for f in &full {
            writeln!(
                out,
                "- **Finding {}** (work unit {}): input `{}`, output `{}`; confidence {:.4} \
                 (at validation {:.4}), {} dissenting.",
                f.id,
                f.work_unit_id,
                short(&f.input_hash),
                short(&f.output_hash),
                f.confidence,
                f.validated_confidence,
                f.dissenting
            )?;
            for a in &f.agreeing {
                writeln!(
                    out,
                    "  - agreed: worker `{}` on {}, {} fuel",
                    a.worker_id, a.platform, a.fuel_used
                )?;
            }
            for e in &f.evidence {
                writeln!(
                    out,
                    "  - evidence {}: **{}**, confidence after {:.4}{}",
                    e.id,
                    e.kind,
                    e.confidence_after,
                    if e.ledger_seq == 0 {
                        String::new()
                    } else {
                        format!(", ledger entry #{}", e.ledger_seq)
                    }
                )?;
            }
        }
        writeln!(out)?;
    }

    writeln!(out, "## What failed\n")?;
    if failures.is_empty() {
        writeln!(out, "No work unit failed.")?;
    } else {
        writeln!(out, "| work unit | reason | parameters |")?;
        writeln!(out, "|---:|---|---|")?;
        for f in &failures {
            writeln!(
                out,
                "| {} | {} | `{}` |",
                f.work_unit_id,
                cell(&f.reason),
                cell(&f.params_json)
            )?;
        }
    }
    Ok(out)
}
