//! The reporter: collects finished replicas and sends them in batches with `ReportResults`,
//! retrying through outages, and claims the next replicas in the same call for the claims the
//! finished ones free (the dispatcher runs them). A result is only dropped if the server
//! refuses it outright or the process is exiting and the final flush deadline has passed.

use std::time::Duration;

use accrete_proto::v1::{ReplicaResult, ReportResultsRequest, ReportStatus};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use crate::dispatch::{Claimed, Finished, hand_back};
use crate::session::{CallError, Rpc, Session, Stop, describe};

/// Results per `ReportResults` call at most.
const BATCH: usize = 256;

/// Approximate bytes per `ReportResults` call at most (at least one result is always sent),
/// well under the gRPC message limit, since outputs can be large.
const BATCH_BYTES: usize = accrete_proto::MAX_MESSAGE_BYTES / 4;

/// How long a result that frees no claim may wait for others to share its round trip. One that
/// frees a claim goes at once: a slot is waiting for the replicas its call claims.
const LINGER: Duration = Duration::from_millis(50);

/// How the reporter claims: until `stop` (the dispatcher's), at most `max_batch` replicas a
/// call, handed to the dispatcher through `claimed`.
pub(crate) struct Claiming {
    pub(crate) stop: Stop,
    pub(crate) max_batch: usize,
    pub(crate) claimed: mpsc::UnboundedSender<Claimed>,
}

/// What became of the results handed to the reporter.
#[derive(Debug, Default)]
pub(crate) struct ReportTally {
    pub(crate) reported: u64,
    /// Still unsent when `stop` fired, or refused by the server.
    pub(crate) unreported: u64,
    /// Replicas a report claimed after the dispatcher had stopped, given back with the next.
    pub(crate) handed_back: u64,
}

/// Reports everything received on `results` until the channel closes and all is sent, or until
/// `stop` fires (the final deadline at shutdown; never during normal operation).
pub(crate) async fn run(
    session: &Session,
    mut results: mpsc::UnboundedReceiver<Finished>,
    claiming: Claiming,
    stop: Stop,
) -> ReportTally {
    let mut tally = ReportTally::default();
    let mut pending: Vec<Finished> = Vec::new();
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
        // Whatever has arrived meanwhile shares the call; unless a claim is waiting for it, so
        // does whatever arrives within the linger.
        let claim_waiting =
            !claiming.stop.is_stopped() && pending.iter().any(|f| f.claim.is_some());
        let linger = if claim_waiting {
            Duration::ZERO
        } else {
            LINGER
        };
        let linger_until = Instant::now() + linger;
        while open && pending.len() < BATCH {
            tokio::select! {
                biased;
                next = results.recv() => match next {
                    Some(r) => pending.push(r),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(linger_until) => break,
            }
        }
        let (batch, mut claims) = take_batch(&mut pending);
        let fetch = match &claims {
            Some(c) if !claiming.stop.is_stopped() => c.num_permits().min(claiming.max_batch),
            _ => 0,
        } as u32;
        let sent = session
            .call(Rpc::ReportResults, &stop, |mut client, auth| {
                let request = ReportResultsRequest {
                    auth: Some(auth),
                    results: batch.clone(),
                    fetch,
                };
                async move { client.report_results(request).await }
            })
            .await;
        match sent {
            Ok(response) => {
                tally.reported += batch.len() as u64;
                if !response.assignments.is_empty() {
                    tracing::debug!(
                        count = response.assignments.len(),
                        "claimed replicas with a report"
                    );
                    let used = claims
                        .as_mut()
                        .and_then(|c| c.split(response.assignments.len().min(c.num_permits())));
                    let c = Claimed {
                        assignments: response.assignments,
                        claims: used,
                    };
                    // The dispatcher has stopped: hand them back with the next report.
                    if let Err(mpsc::error::SendError(c)) = claiming.claimed.send(c) {
                        tally.handed_back += c.assignments.len() as u64;
                        pending.extend(c.assignments.iter().map(|a| Finished {
                            result: hand_back(a.replica_id),
                            claim: None,
                        }));
                    }
                }
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
                pending.extend(batch.into_iter().map(|result| Finished {
                    result,
                    claim: None,
                }));
                break;
            }
        }
        // Claims the call did not use go back to the dispatcher, for `FetchWork`.
        drop(claims);
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

/// Removes the first results of `pending` that fit in one call, and their claims, merged.
fn take_batch(pending: &mut Vec<Finished>) -> (Vec<ReplicaResult>, Option<OwnedSemaphorePermit>) {
    let mut bytes = 0;
    let mut n = 0;
    for f in pending.iter().take(BATCH) {
        bytes += approximate_size(&f.result);
        if n > 0 && bytes > BATCH_BYTES {
            break;
        }
        n += 1;
    }
    let mut claims: Option<OwnedSemaphorePermit> = None;
    let mut batch = Vec::with_capacity(n);
    for Finished { result, claim } in pending.drain(..n) {
        batch.push(result);
        if let Some(one) = claim {
            match &mut claims {
                Some(all) => all.merge(one),
                None => claims = Some(one),
            }
        }
    }
    (batch, claims)
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
    use std::sync::Arc;

    use super::*;
    use accrete_proto::v1::{Success, replica_result::Outcome};
    use tokio::sync::Semaphore;

    fn result(id: u64, output_bytes: usize) -> Finished {
        Finished {
            result: ReplicaResult {
                replica_id: id,
                wall_micros: 1,
                outcome: Some(Outcome::Success(Success {
                    output: vec![b'x'; output_bytes],
                    output_hash: vec![0; 32],
                    fuel_used: 1,
                })),
            },
            claim: None,
        }
    }

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let len = |pending: &mut Vec<Finished>| take_batch(pending).0.len();
        let mut pending: Vec<_> = (0..300).map(|i| result(i, 10)).collect();
        assert_eq!(len(&mut pending), BATCH);
        assert_eq!(len(&mut pending), 300 - BATCH);

        let big = BATCH_BYTES / 2;
        let mut pending: Vec<_> = (0..3).map(|i| result(i, big)).collect();
        assert_eq!(len(&mut pending), 1);
        // A result larger than a batch still goes, alone.
        let mut pending = vec![result(1, BATCH_BYTES * 2), result(2, 1)];
        assert_eq!(len(&mut pending), 1);
        assert_eq!(len(&mut pending), 1);
    }

    #[test]
    fn a_batch_carries_the_claims_of_its_results() {
        let claims = Arc::new(Semaphore::new(5));
        let mut pending: Vec<_> = (0..4)
            .map(|i| Finished {
                // The second result holds no claim (a replica the server sent beyond the ask).
                claim: (i != 1).then(|| claims.clone().try_acquire_owned().unwrap()),
                ..result(i, 10)
            })
            .collect();
        let (batch, held) = take_batch(&mut pending);
        assert_eq!(batch.len(), 4);
        assert_eq!(held.map(|c| c.num_permits()), Some(3));
        assert_eq!(
            claims.available_permits(),
            5,
            "dropped, the claims are free again"
        );
    }
}
