//! The dispatcher: runs the replicas the reporter claims with its reports, claims more with
//! `FetchWork` whenever claims are free (at the start, and when a report's claim came back
//! short), fetches and compiles their modules once, runs each in the sandbox on a blocking
//! thread, and hands finished results to the reporter together with their claims. At shutdown
//! it stops claiming, lets running replicas finish until the drain deadline, and hands back
//! everything else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accrete_proto::v1::{
    Assignment, ErrorKind, FetchWorkRequest, GetModuleRequest, HandBack, ReplicaResult,
    replica_result,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::sandbox::{
    Bounds, Cancel, CompiledModule, FailureKind, ModuleError, ModuleHash, Outcome, Sandbox,
};
use crate::session::{Backoff, CallError, Rpc, Session, Stop, describe};

/// Longest pause when the scheduler has no work, whatever `retry_after_ms` says.
const MAX_IDLE_WAIT: Duration = Duration::from_secs(10);
/// Largest output the worker lets a guest produce, whatever its bounds say: a result must fit
/// in one gRPC message to be reported at all.
const MAX_OUTPUT_BYTES: u64 = (accrete_proto::MAX_MESSAGE_BYTES / 2) as u64;

/// Pause when the scheduler has no work and gives no hint.
const DEFAULT_IDLE_WAIT: Duration = Duration::from_secs(1);

/// Everything a replica task needs.
pub(crate) struct Ctx {
    pub(crate) session: Arc<Session>,
    pub(crate) sandbox: Arc<Sandbox>,
    /// One permit per slot: held while a replica executes.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) reports: mpsc::UnboundedSender<Finished>,
    /// Fired when the drain deadline passes: stops the runs still going.
    pub(crate) cancel: Cancel,
    pub(crate) modules: ModuleFetches,
}

/// A finished replica on its way to the reporter, with the claim it held: the reporter's
/// `ReportResults` claims as many new replicas in the same call and transaction (one round trip
/// and one commit per round of a busy worker, not two), and frees the claims it does not use
/// for `FetchWork`.
pub(crate) struct Finished {
    pub(crate) result: ReplicaResult,
    pub(crate) claim: Option<OwnedSemaphorePermit>,
}

/// Replicas a report claimed, with their claims, for the dispatcher to run.
pub(crate) struct Claimed {
    pub(crate) assignments: Vec<Assignment>,
    pub(crate) claims: Option<OwnedSemaphorePermit>,
}

/// How a replica ended, for the summary.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ended {
    Completed,
    Failed,
    HandedBack,
}

#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    pub(crate) handed_back: u64,
}

impl Tally {
    fn add(&mut self, ended: Result<Ended, tokio::task::JoinError>) {
        match ended {
            Ok(Ended::Completed) => self.completed += 1,
            Ok(Ended::Failed) => self.failed += 1,
            Ok(Ended::HandedBack) => self.handed_back += 1,
            Err(e) => tracing::error!(error = %e, "a replica task failed"),
        }
    }
}

/// Claims and runs replicas until `stop`, then drains. `claims` (slots plus prefetch) bounds
/// replicas held at once, those running, queued, and finished but not yet reported; `claimed`
/// brings the replicas the reporter claimed; `max_batch` bounds one `FetchWork`.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    stop: Stop,
    claims: Arc<Semaphore>,
    mut claimed: mpsc::UnboundedReceiver<Claimed>,
    max_batch: usize,
    drain_timeout: Duration,
) -> Tally {
    let mut tasks: JoinSet<Ended> = JoinSet::new();
    let mut tally = Tally::default();
    let mut backoff = Backoff::new();
    loop {
        let mut held = tokio::select! {
            biased;
            _ = stop.stopped() => break,
            Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                tally.add(ended);
                continue;
            }
            Some(c) = claimed.recv() => {
                spawn_replicas(&mut tasks, &ctx, &stop, c);
                continue;
            }
            permit = claims.clone().acquire_owned() => permit.expect("the claim semaphore is never closed"),
        };
        // Take every other free claim too: one round trip for all of them.
        while held.num_permits() < max_batch {
            match claims.clone().try_acquire_owned() {
                Ok(more) => held.merge(more),
                Err(_) => break,
            }
        }
        let max = held.num_permits() as u32;
        let resume = ctx.session.resuming();
        let fetched = ctx
            .session
            .call(Rpc::FetchWork, &stop, |mut client, auth| async move {
                client
                    .fetch_work(FetchWorkRequest {
                        auth: Some(auth),
                        max,
                        resume,
                    })
                    .await
            })
            .await;
        let response = match fetched {
            Ok(response) => {
                backoff = Backoff::new();
                ctx.session.resumed();
                response
            }
            Err(CallError::Stopped) => break,
            Err(CallError::Failed(status)) => {
                let delay = backoff.next_delay();
                tracing::error!(code = ?status.code(), error = %describe(&status), "FetchWork refused");
                drop(held);
                if !stop.sleep(delay).await {
                    break;
                }
                continue;
            }
        };
        if response.assignments.is_empty() {
            drop(held);
            let wait = match response.retry_after_ms {
                0 => DEFAULT_IDLE_WAIT,
                ms => Duration::from_millis(ms.into()).min(MAX_IDLE_WAIT),
            };
            if !stop.sleep(wait).await {
                break;
            }
            continue;
        }
        tracing::debug!(count = response.assignments.len(), "claimed replicas");
        let c = Claimed {
            assignments: response.assignments,
            claims: Some(held),
        };
        spawn_replicas(&mut tasks, &ctx, &stop, c);
    }

    // A report's claim that arrives from now on finds nobody to run it: its replicas join the
    // drain below and hand themselves back, or the reporter hands them back itself once this
    // channel is closed.
    claimed.close();
    while let Ok(c) = claimed.try_recv() {
        spawn_replicas(&mut tasks, &ctx, &stop, c);
    }
    // Draining: queued replicas hand themselves back as soon as they see `stop`; running ones
    // get until the deadline, then are cancelled (and hand themselves back).
    while let Some(ended) = tasks.try_join_next() {
        tally.add(ended);
    }
    if !tasks.is_empty() {
        tracing::info!(replicas = tasks.len(), "draining");
    }
    let deadline = tokio::time::Instant::now() + drain_timeout;
    let mut cancelled = false;
    loop {
        tokio::select! {
            ended = tasks.join_next() => match ended {
                Some(ended) => tally.add(ended),
                None => break,
            },
            _ = tokio::time::sleep_until(deadline), if !cancelled => {
                tracing::warn!(replicas = tasks.len(), "drain timeout: handing back unfinished replicas");
                ctx.cancel.cancel();
                cancelled = true;
            }
        }
    }
    tally
}

/// Starts a task for each replica, each holding one of the claims.
fn spawn_replicas(tasks: &mut JoinSet<Ended>, ctx: &Arc<Ctx>, stop: &Stop, c: Claimed) {
    let Claimed {
        assignments,
        mut claims,
    } = c;
    for assignment in assignments {
        // A server handing out more than asked still gets them run; they just hold no claim.
        let claim = claims.as_mut().and_then(|c| c.split(1));
        tasks.spawn(replica(ctx.clone(), stop.clone(), assignment, claim));
    }
}

/// Runs one replica and queues its result, with its claim, for reporting.
async fn replica(
    ctx: Arc<Ctx>,
    stop: Stop,
    assignment: Assignment,
    claim: Option<OwnedSemaphorePermit>,
) -> Ended {
    let replica_id = assignment.replica_id;
    let (outcome, wall) = execute(&ctx, &stop, assignment).await;
    let (ended, outcome) = to_proto(outcome);
    let result = ReplicaResult {
        replica_id,
        wall_micros: wall.as_micros().try_into().unwrap_or(u64::MAX),
        outcome: Some(outcome),
    };
    if ctx.reports.send(Finished { result, claim }).is_err() {
        tracing::error!(replica_id, "reporter is gone; result lost");
    }
    ended
}

/// What to report for a replica claimed too late to run: the server reissues it at once.
pub(crate) fn hand_back(replica_id: u64) -> ReplicaResult {
    ReplicaResult {
        replica_id,
        wall_micros: 0,
        outcome: Some(replica_result::Outcome::HandBack(HandBack {})),
    }
}

/// What to report for a replica.
enum Verdict {
    Ran(Outcome),
    /// Not finished here; the server should reissue it now.
    HandBack,
}

/// Fetches the module, waits for a slot, runs. Returns the verdict and the time spent running.
async fn execute(ctx: &Ctx, stop: &Stop, a: Assignment) -> (Verdict, Duration) {
    let zero = Duration::ZERO;
    let module_failure = |message: String| {
        Verdict::Ran(Outcome::Failure {
            kind: FailureKind::Module,
            message,
            fuel_used: 0,
        })
    };
    let Ok(hash) = ModuleHash::try_from(a.module_hash.as_slice()) else {
        let message = format!("module hash has {} bytes, not 32", a.module_hash.len());
        return (module_failure(message), zero);
    };
    let module = match ctx.modules.get(ctx, stop, hash).await {
        Ok(Ok(module)) => module,
        Ok(Err(e)) => return (module_failure(e.to_string()), zero),
        Err(CallError::Stopped) => return (Verdict::HandBack, zero),
        Err(CallError::Failed(status)) => {
            let message = format!("cannot fetch the module: {}", describe(&status));
            return (module_failure(message), zero);
        }
    };
    let slot = tokio::select! {
        biased;
        _ = stop.stopped() => return (Verdict::HandBack, zero),
        slot = ctx.slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
    };
    if stop.is_stopped() {
        return (Verdict::HandBack, zero);
    }
    let sandbox = ctx.sandbox.clone();
    let cancel = ctx.cancel.clone();
    let bounds = bounds(&a);
    let run = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let started = Instant::now();
        let outcome = sandbox.run_cancellable(&module, &a.input, &bounds, a.random_seed, &cancel);
        (outcome, started.elapsed())
    });
    match run.await {
        Ok((Outcome::Cancelled, wall)) => (Verdict::HandBack, wall),
        Ok((outcome, wall)) => (Verdict::Ran(outcome), wall),
        Err(e) => {
            // A bug in the worker, not the guest's fault: let another worker have it.
            tracing::error!(error = %e, "the sandbox panicked");
            (Verdict::HandBack, zero)
        }
    }
}

fn bounds(a: &Assignment) -> Bounds {
    let b = a.bounds.unwrap_or_default();
    let bounds = Bounds {
        fuel: b.fuel,
        memory_bytes: b.memory_bytes,
        output_bytes: b.output_bytes,
        wall_ms: b.wall_ms,
    }
    .or_default();
    Bounds {
        output_bytes: bounds.output_bytes.min(MAX_OUTPUT_BYTES),
        ..bounds
    }
}

fn to_proto(verdict: Verdict) -> (Ended, replica_result::Outcome) {
    use replica_result::Outcome as P;
    match verdict {
        Verdict::HandBack => (Ended::HandedBack, P::HandBack(HandBack {})),
        Verdict::Ran(Outcome::Cancelled) => (Ended::HandedBack, P::HandBack(HandBack {})),
        Verdict::Ran(Outcome::Success { output, fuel_used }) => (
            Ended::Completed,
            P::Success(accrete_proto::v1::Success {
                output_hash: blake3::hash(&output).as_bytes().to_vec(),
                output,
                fuel_used,
            }),
        ),
        Verdict::Ran(Outcome::Failure {
            kind,
            message,
            fuel_used,
        }) => (
            Ended::Failed,
            P::Failure(accrete_proto::v1::Failure {
                kind: error_kind(kind) as i32,
                message,
                fuel_used,
            }),
        ),
    }
}

fn error_kind(kind: FailureKind) -> ErrorKind {
    match kind {
        FailureKind::Trap => ErrorKind::Trap,
        FailureKind::OutOfFuel => ErrorKind::OutOfFuel,
        FailureKind::OutOfMemory => ErrorKind::OutOfMemory,
        FailureKind::OutputTooLarge => ErrorKind::OutputTooLarge,
        FailureKind::BadOutput => ErrorKind::BadOutput,
        FailureKind::WallTimeout => ErrorKind::WallTimeout,
        FailureKind::Module => ErrorKind::Module,
    }
}

/// Module downloads in progress, so replicas of one module fetch and compile it once.
#[derive(Default)]
pub(crate) struct ModuleFetches(Mutex<HashMap<ModuleHash, Arc<tokio::sync::Mutex<()>>>>);

impl ModuleFetches {
    /// The compiled module (or why it cannot be used), from the sandbox's cache or the server.
    async fn get(
        &self,
        ctx: &Ctx,
        stop: &Stop,
        hash: ModuleHash,
    ) -> Result<Result<CompiledModule, ModuleError>, CallError> {
        if let Some(cached) = ctx.sandbox.module(&hash) {
            return Ok(cached);
        }
        let lock = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(hash)
            .or_default()
            .clone();
        let _only_fetch = tokio::select! {
            guard = lock.lock() => guard,
            _ = stop.stopped() => return Err(CallError::Stopped),
        };
        if let Some(cached) = ctx.sandbox.module(&hash) {
            return Ok(cached);
        }
        let response = ctx
            .session
            .call(Rpc::GetModule, stop, |mut client, auth| async move {
                client
                    .get_module(GetModuleRequest {
                        auth: Some(auth),
                        hash: hash.to_vec(),
                    })
                    .await
            })
            .await?;
        let sandbox = ctx.sandbox.clone();
        let started = Instant::now();
        let compiled = tokio::task::spawn_blocking(move || sandbox.compile(hash, &response.wasm))
            .await
            .unwrap_or_else(|e| Err(ModuleError::Compile(format!("the compiler panicked: {e}"))));
        let module = blake3::Hash::from(hash).to_hex();
        match &compiled {
            Ok(_) => {
                tracing::info!(%module, ms = started.elapsed().as_millis() as u64, "compiled module")
            }
            Err(e) => tracing::warn!(%module, error = %e, "unusable module"),
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&hash);
        Ok(compiled)
    }
}
