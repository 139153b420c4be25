//! The reporter: collects finished replicas and sends them in batches with `ReportResults`,
//! retrying through outages. A result is only dropped if the server refuses it outright or the
//! process is exiting and the final flush deadline has passed.

use std::time::Duration;

use accrete_proto::v1::{ReplicaResult, ReportResultsRequest, ReportStatus};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::session::{CallError, Rpc, Session, Stop, describe};

/// Results per `ReportResults` call at most.
const BATCH: usize = 256;

/// Approximate bytes per `ReportResults` call at most (at least one result is always sent),
/// well under the gRPC message limit, since outputs can be large.
const BATCH_BYTES: usize = accrete_proto::MAX_MESSAGE_BYTES / 4;

/// How long a result may wait for others to share its round trip.
const LINGER: Duration = Duration::from_millis(50);

/// What became of the results handed to the reporter.
#[derive(Debug, Default)]
pub(crate) struct ReportTally {
    pub(crate) reported: u64,
    /// Still unsent when `stop` fired, or refused by the server.
    pub(crate) unreported: u64,
}

/// Reports everything received on `results` until the channel closes and all is sent, or until
/// `stop` fires (the final deadline at shutdown; never during normal operation).
pub(crate) async fn run(
    session: &Session,
    mut results: mpsc::UnboundedReceiver<ReplicaResult>,
    stop: Stop,
) -> ReportTally {
    let mut tally = ReportTally::default();
    let mut pending: Vec<ReplicaResult> = Vec::new();
    let mut open = true;
    loop {
        if pending.is_empty() {
            if !open {
                break;
            }
            tokio::select! {
                next = results.recv() => match next {
                    Some(r) => pending.push(r),
                    None => break,
                },
                _ = stop.stopped() => break,
            }
        }
        let linger_until = Instant::now() + LINGER;
        while open && pending.len() < BATCH {
            tokio::select! {
                next = results.recv() => match next {
                    Some(r) => pending.push(r),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(linger_until) => break,
            }
        }
        let batch = take_batch(&mut pending);
        let sent = session
            .call(Rpc::ReportResults, &stop, |mut client, auth| {
                let request = ReportResultsRequest {
                    auth: Some(auth),
                    results: batch.clone(),
                    fetch: 0,
                };
                async move { client.report_results(request).await }
            })
            .await;
        match sent {
            Ok(response) => {
                tally.reported += batch.len() as u64;
                for ack in response.acks {
                    match ReportStatus::try_from(ack.status) {
                        Ok(ReportStatus::Accepted) => {}
                        Ok(ReportStatus::Duplicate) => {
                            tracing::debug!(
                                replica_id = ack.replica_id,
                                "result was already recorded"
                            )
                        }
                        _ => tracing::warn!(
                            replica_id = ack.replica_id,
                            message = %ack.message,
                            "the scheduler rejected a result"
                        ),
                    }
                }
            }
            Err(CallError::Failed(status)) => {
                tracing::error!(
                    code = ?status.code(),
                    error = %describe(&status),
                    results = batch.len(),
                    "the scheduler refused a report; its replicas will be reissued when they expire"
                );
                tally.unreported += batch.len() as u64;
            }
            Err(CallError::Stopped) => {
                pending.extend(batch);
                break;
            }
        }
    }
    results.close();
    while results.try_recv().is_ok() {
        tally.unreported += 1;
    }
    tally.unreported += pending.len() as u64;
    if tally.unreported > 0 {
        tracing::warn!(
            unreported = tally.unreported,
            "exiting with results not reported"
        );
    }
    tally
}

/// Removes the first results of `pending` that fit in one call.
fn take_batch(pending: &mut Vec<ReplicaResult>) -> Vec<ReplicaResult> {
    let mut bytes = 0;
    let mut n = 0;
    for r in pending.iter().take(BATCH) {
        bytes += approximate_size(r);
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    pending.drain(..n).collect()
}

fn approximate_size(r: &ReplicaResult) -> usize {
    use accrete_proto::v1::replica_result::Outcome;
    64 + match &r.outcome {
        Some(Outcome::Success(s)) => s.output.len() + s.output_hash.len(),
        Some(Outcome::Failure(f)) => f.message.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accrete_proto::v1::{Success, replica_result::Outcome};

    fn result(id: u64, output_bytes: usize) -> ReplicaResult {
        ReplicaResult {
            replica_id: id,
            wall_micros: 1,
            outcome: Some(Outcome::Success(Success {
                output: vec![b'x'; output_bytes],
                output_hash: vec![0; 32],
                fuel_used: 1,
            })),
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let mut pending: Vec<_> = (0..300).map(|i| result(i, 10)).collect();
        assert_eq!(take_batch(&mut pending).len(), BATCH);
        assert_eq!(take_batch(&mut pending).len(), 300 - BATCH);

        let big = BATCH_BYTES / 2;
        let mut pending: Vec<_> = (0..3).map(|i| result(i, big)).collect();
        assert_eq!(take_batch(&mut pending).len(), 1);
        // A result larger than a batch still goes, alone.
        let mut pending = vec![result(1, BATCH_BYTES * 2), result(2, 1)];
        assert_eq!(take_batch(&mut pending).len(), 1);
        assert_eq!(take_batch(&mut pending).len(), 1);
    }
}
