//! The worker's session with the scheduler: one lazily connected gRPC channel, the credentials
//! from `Register` (saved to a file when asked, so a restart keeps the worker's identity and
//! its replicas), and the retry policy every call goes through (exponential backoff on
//! transport errors, registering again when the server no longer knows this worker).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use accrete_proto::v1::worker_service_client::WorkerServiceClient;
use accrete_proto::v1::{Platform, RegisterRequest, WorkerAuth};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::sandbox::RUNTIME;

/// Client to the worker service.
pub(crate) type Client = WorkerServiceClient<Channel>;

/// First retry delay after a failed call; doubles up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Retry delay when the scheduler says the daily quota is used up (RESOURCE_EXHAUSTED).
const QUOTA_RETRY: Duration = Duration::from_secs(60);

/// A one-way signal (shutdown, or the end of the final report flush) that tasks can wait on.
#[derive(Clone)]
pub(crate) struct Stop(watch::Receiver<bool>);

/// Fires a [`Stop`].
pub(crate) struct StopHandle(watch::Sender<bool>);

pub(crate) fn stop_pair() -> (StopHandle, Stop) {
    let (tx, rx) = watch::channel(false);
    (StopHandle(tx), Stop(rx))
}

impl StopHandle {
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Stop {
    pub(crate) fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once fired (or once the handle is gone, which also means nobody will run on).
    pub(crate) async fn stopped(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stopped| *stopped).await;
    }

    /// Sleeps for `d`, returning false if stopped first.
    pub(crate) async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stopped() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Exponential backoff with jitter, so a fleet of workers does not reconnect in lockstep.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(BACKOFF_START)
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }
}

/// The calls a worker makes; decides retry policy and how to read `NotFound`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Rpc {
    FetchWork,
    ReportResults,
    GetModule,
    Heartbeat,
}

impl Rpc {
    fn name(self) -> &'static str {
        match self {
            Rpc::FetchWork => "FetchWork",
            Rpc::ReportResults => "ReportResults",
            Rpc::GetModule => "GetModule",
            Rpc::Heartbeat => "Heartbeat",
        }
    }

    /// A missed heartbeat is not worth retrying: the next one comes soon enough.
    fn retries(self) -> bool {
        !matches!(self, Rpc::Heartbeat)
    }
}

/// Why a call gave up.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The stop signal fired before the call succeeded.
    Stopped,
    /// The server refused the call (or, for a call that is not retried, it failed).
    Failed(Status),
}

/// What a failed call's status means for the worker.
enum Verdict {
    /// Transport failure, overload, server restart: try again later.
    Transient,
    /// The server does not know this worker (e.g. its database was reset): register again.
    Reregister,
    /// The server understood and said no; repeating will not help.
    Refused,
}

fn verdict(rpc: Rpc, status: &Status) -> Verdict {
    match status.code() {
        Code::Unauthenticated => Verdict::Reregister,
        // For GetModule, NotFound is about the module, not the worker.
        Code::NotFound if !matches!(rpc, Rpc::GetModule) => Verdict::Reregister,
        Code::NotFound
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::AlreadyExists => Verdict::Refused,
        _ => Verdict::Transient,
    }
}

/// The connection, identity and credentials of one worker process.
pub(crate) struct Session {
    client: Client,
    hello: RegisterRequest,
    auth: Mutex<Option<WorkerAuth>>,
    registering: tokio::sync::Mutex<()>,
    /// Where the credential is saved, and for which server.
    saved: Option<(PathBuf, String)>,
    /// The credential came from the file: the first fetch asks for the replicas still held.
    resume: AtomicBool,
}

impl Session {
    /// `credential_file`: load the credential from it if it was saved for `server`, and save
    /// every new one there.
    pub(crate) fn new(
        client: Client,
        name: String,
        account_key: String,
        server: &str,
        credential_file: Option<PathBuf>,
    ) -> Self {
        let loaded = credential_file
            .as_deref()
            .and_then(|path| load_credential(path, server));
        if let Some(auth) = &loaded {
            tracing::info!(worker_id = %auth.worker_id, "using the saved worker credential");
        }
        Self {
            client,
            hello: RegisterRequest {
                platform: Some(platform()),
                name,
                account_key,
            },
            resume: AtomicBool::new(loaded.is_some()),
            auth: Mutex::new(loaded),
            registering: tokio::sync::Mutex::new(()),
            saved: credential_file.map(|p| (p, server.to_string())),
        }
    }

    /// Whether the next fetch should ask for replicas this worker held before a restart.
    pub(crate) fn resuming(&self) -> bool {
        self.resume.load(Ordering::Relaxed)
    }

    /// The first fetch after a restart went through: later ones claim new work only.
    pub(crate) fn resumed(&self) {
        self.resume.store(false, Ordering::Relaxed);
    }

    /// The id the server gave this worker, once registered.
    pub(crate) fn worker_id(&self) -> Option<String> {
        self.current().map(|a| a.worker_id)
    }

    fn current(&self) -> Option<WorkerAuth> {
        self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets `stale` credentials (unless another task already replaced them).
    fn forget(&self, stale: &WorkerAuth) {
        let mut auth = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        if auth.as_ref() == Some(stale) {
            *auth = None;
        }
    }

    /// Current credentials, registering first if there are none. Retries until registered.
    pub(crate) async fn credentials(&self, stop: &Stop) -> Result<WorkerAuth, CallError> {
        if let Some(auth) = self.current() {
            return Ok(auth);
        }
        let _one_at_a_time = tokio::select! {
            guard = self.registering.lock() => guard,
            _ = stop.stopped() => return Err(CallError::Stopped),
        };
        if let Some(auth) = self.current() {
            return Ok(auth);
        }
        let mut backoff = Backoff::new();
        loop {
            if stop.is_stopped() {
                return Err(CallError::Stopped);
            }
            match self.client.clone().register(self.hello.clone()).await {
                Ok(response) => {
                    let r = response.into_inner();
                    tracing::info!(worker_id = %r.worker_id, account = %r.account, "registered with the scheduler");
                    let auth = WorkerAuth {
                        worker_id: r.worker_id,
                        token: r.token,
                    };
                    *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = Some(auth.clone());
                    if let Some((path, server)) = &self.saved
                        && let Err(e) = save_credential(path, server, &auth)
                    {
                        tracing::warn!(path = %path.display(), error = %e, "cannot save the worker credential; a restart will register anew");
                    }
                    return Ok(auth);
                }
                // UNAUTHENTICATED here is about the account key, which retrying will not fix.
                Err(status)
                    if status.code() == Code::Unauthenticated
                        || matches!(verdict(Rpc::FetchWork, &status), Verdict::Refused) =>
                {
                    tracing::error!(code = ?status.code(), message = status.message(), "registration refused");
                    return Err(CallError::Failed(status));
                }
                Err(status) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        code = ?status.code(),
                        error = %describe(&status),
                        retry_in_ms = delay.as_millis() as u64,
                        "cannot register with the scheduler"
                    );
                    if !stop.sleep(delay).await {
                        return Err(CallError::Stopped);
                    }
                }
            }
        }
    }

    /// Calls `rpc` through `f` with the worker's credentials, retrying transient failures with
    /// backoff (except heartbeats) and registering again when the server has forgotten the
    /// worker, until it succeeds, is refused, or `stop` fires.
    pub(crate) async fn call<R, F, Fut>(
        &self,
        rpc: Rpc,
        stop: &Stop,
        mut f: F,
    ) -> Result<R, CallError>
    where
        F: FnMut(Client, WorkerAuth) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, Status>>,
    {
        let mut backoff = Backoff::new();
        loop {
            if stop.is_stopped() {
                return Err(CallError::Stopped);
            }
            let auth = self.credentials(stop).await?;
            let status = match f(self.client.clone(), auth.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            let mut delay = backoff.next_delay();
            // Over quota: the message says when it resets; asking every few seconds won't help.
            if status.code() == Code::ResourceExhausted {
                delay = delay.max(QUOTA_RETRY);
            }
            match verdict(rpc, &status) {
                Verdict::Refused => return Err(CallError::Failed(status)),
                Verdict::Transient if !rpc.retries() => return Err(CallError::Failed(status)),
                Verdict::Reregister => {
                    tracing::warn!(
                        rpc = rpc.name(),
                        code = ?status.code(),
                        "the scheduler does not know this worker; registering again"
                    );
                    self.forget(&auth);
                }
                Verdict::Transient => tracing::warn!(
                    rpc = rpc.name(),
                    code = ?status.code(),
                    error = %describe(&status),
                    retry_in_ms = delay.as_millis() as u64,
                    "scheduler call failed"
                ),
            }
            if !stop.sleep(delay).await {
                return Err(CallError::Stopped);
            }
        }
    }
}

/// The credential in `path` if it was saved for `server` (a file of `key=value` lines).
fn load_credential(path: &Path, server: &str) -> Option<WorkerAuth> {
    let text = std::fs::read_to_string(path).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(|v| v.trim().to_string())
    };
    if field("server")? != server {
        tracing::info!(path = %path.display(), "the saved credential is for another server; registering");
        return None;
    }
    Some(WorkerAuth {
        worker_id: field("worker_id")?,
        token: field("token")?,
    })
}

/// Saves a credential readable by this user only, replacing the file atomically.
fn save_credential(path: &Path, server: &str, auth: &WorkerAuth) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    writeln!(
        file,
        "# accrete-worker credential; keep it secret\nserver={server}\nworker_id={}\ntoken={}",
        auth.worker_id, auth.token
    )?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A status's message plus its source chain (a transport error's cause is only in the chain).
pub(crate) fn describe(status: &Status) -> String {
    let mut text = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}

/// Facts about this host that the scheduler records with each replica.
pub(crate) fn platform() -> Platform {
    Platform {
        arch: std::env::consts::ARCH.to_owned(),
        os: std::env::consts::OS.to_owned(),
        cores: cores() as u32,
        memory_bytes: total_memory().unwrap_or(0),
        runtime: RUNTIME.to_owned(),
    }
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `MemTotal` from /proc/meminfo, where there is one.
fn total_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The host's name, for operators; the scheduler identifies workers by id, not by name.
pub(crate) fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            let name = std::fs::read_to_string(path).ok()?;
            let name = name.trim();
            (!name.is_empty()).then(|| name.to_owned())
        })
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exhausted_quota_is_waited_out_and_a_block_is_final() {
        let quota = Status::resource_exhausted("daily quota used; it resets at ...");
        assert!(matches!(
            verdict(Rpc::FetchWork, &quota),
            Verdict::Transient
        ));
        let blocked = Status::permission_denied("this worker is blocked");
        assert!(matches!(
            verdict(Rpc::FetchWork, &blocked),
            Verdict::Refused
        ));
    }
}

#[cfg(test)]
mod credential_tests {
    use super::*;

    #[test]
    fn a_saved_credential_is_loaded_for_its_server_only() {
        let path = std::env::temp_dir().join(format!("accrete-cred-test-{}", std::process::id()));
        let auth = WorkerAuth {
            worker_id: "0b5e6f8e-0000-4000-8000-000000000001".into(),
            token: "secret".into(),
        };
        save_credential(&path, "http://a:1", &auth).unwrap();
        assert_eq!(load_credential(&path, "http://a:1"), Some(auth));
        assert_eq!(load_credential(&path, "http://b:1"), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
        std::fs::remove_file(&path).unwrap();
        assert_eq!(load_credential(&path, "http://a:1"), None);
    }
}
