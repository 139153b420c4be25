//! The ledger from the client's side: verifying the hash chain as served by any accrete server
//! or from an exported JSON-lines file, exporting it, and printing verdicts.

use std::io::{BufRead, Write};
use std::path::Path;

use accrete_proto::v1 as pb;
use accrete_server::ledger::{self, Entry, Verdict, Verifier};
use anyhow::Context;
use serde_json::{Value, json};

use crate::client::{Client, status_error};

fn entry_of(e: pb::LedgerEntry) -> Entry {
    let h = |v: &[u8]| <[u8; 32]>::try_from(v).unwrap_or([0xff; 32]);
    Entry {
        seq: e.seq,
        prev_hash: h(&e.prev_hash),
        hash: h(&e.hash),
        body: e.body,
    }
}

/// Streams every entry from the server (ExportLedger) into `each`, in order.
pub async fn for_each_entry(
    client: &mut Client,
    mut each: impl FnMut(Entry) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stream = client
        .ledger
        .export_ledger(pb::ExportLedgerRequest { after_seq: 0 })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(status_error)? {
        each(entry_of(e))?;
    }
    Ok(())
}

/// Recomputes every hash of the ledger the server holds.
pub async fn verify_remote(client: &mut Client) -> anyhow::Result<Verdict> {
    let mut v = Verifier::new();
    for_each_entry(client, |e| {
        v.push(&e);
        Ok(())
    })
    .await?;
    Ok(v.finish())
}

/// Recomputes every hash of an exported ledger (`accrete ledger export`), without a server.
pub fn verify_file(path: &Path) -> anyhow::Result<Verdict> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut v = Verifier::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let e = ledger::from_json_line(&line)
            .map_err(|m| anyhow::anyhow!("{}:{}: {m}", path.display(), i + 1))?;
        if !v.push(&e) {
            break;
        }
    }
    Ok(v.finish())
}

/// Writes the ledger as JSON lines; returns how many entries.
pub async fn export(client: &mut Client, out: &mut dyn Write) -> anyhow::Result<u64> {
    let mut n = 0;
    for_each_entry(client, |e| {
        writeln!(out, "{}", ledger::to_json_line(&e))?;
        n += 1;
        Ok(())
    })
    .await?;
    out.flush()?;
    Ok(n)
}

pub fn verdict_json(v: &Verdict) -> Value {
    match v {
        Verdict::Intact { len, head } => {
            json!({ "intact": true, "length": len, "head": ledger::hex(head) })
        }
        Verdict::Broken { intact_len, broken } => json!({
            "intact": false, "first_bad_entry": broken.seq(), "intact_prefix": intact_len,
            "reason": broken.to_string(),
        }),
    }
}

pub fn verdict_text(v: &Verdict) -> String {
    match v {
        Verdict::Intact { len, head } => {
            format!("ledger intact: {len} entries, head {}", ledger::hex(head))
        }
        Verdict::Broken { intact_len, broken } => format!(
            "ledger BROKEN at entry {}: {broken} (entries 1..={intact_len} are intact)",
            broken.seq()
        ),
    }
}
