//! The deterministic WebAssembly sandbox: one shared wasmtime `Engine` and `Linker`, a cache of
//! compiled modules keyed by BLAKE3 hash, and `run`, which executes one work unit in a fresh
//! `Store` and classifies how it ended.
//!
//! Same module + input + seed ⇒ bit-identical stdout and fuel on every host: NaNs are
//! canonicalised (module `nan`), threads and relaxed SIMD are off, the clock is virtual (module
//! `virt`), the randomness is seeded, and fuel (not wall time) is the budget, metered by the
//! guest's own rewritten code (module `meter`). The guest gets stdin, stdout, stderr and nothing
//! else: no preopened directories, no environment, no network.
//!
//! Layout: `rewrite` (the one pass over a module before it compiles), `nan` and `meter` (what
//! that pass adds; `meter` also holds the watchdog behind the wall-clock backstop), `virt` (the
//! virtual clock, seeded randomness and capped pipes).
//!
//! **Invariant**: whatever a guest does (trap, exhaust memory or fuel, loop, sleep, flood its
//! output), `run` returns an [`Outcome`]; it never panics on guest behaviour and never blocks
//! longer than the wall-clock backstop.

mod meter;
mod nan;
mod rewrite;
mod virt;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::{
    Config, Enabled, Engine, Extern, InstanceAllocationStrategy, InstancePre, Linker, Module,
    ModuleExport, PoolingAllocationConfig, ProfilingStrategy, ResourceLimiter, Store,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

pub use virt::{CLOCK_TICK_NANOS, WALL_CLOCK_ORIGIN};
use virt::{CappedPipe, HasVirtualTime, OutputOverflow, Overflow, SeededRng, VirtualTime};

/// A module's identity: the BLAKE3 hash of its bytes.
pub type ModuleHash = [u8; 32];

/// The runtime this sandbox is built on and its NaN and fuel schemes, as reported to the
/// scheduler and kept in each finding's provenance (e.g. "wasmtime 48.0.8 nan=observed
/// fuel=guest"). `nan=observed`: NaNs are canonical where the guest can observe their bits
/// (module `nan`); workers before it had Cranelift canonicalise every arithmetic result, and
/// differ on a negated or loaded NaN. `fuel=guest`: fuel is the meter's count of the guest's own
/// instructions (module `meter`), wasmtime's model unit for unit; workers before it reported
/// wasmtime's count of the rewritten module, which also counted the NaN checks.
pub const RUNTIME: &str = concat!(
    "wasmtime ",
    env!("ACCRETE_WASMTIME_VERSION"),
    " nan=observed fuel=guest"
);

/// Stderr kept for failure messages; the rest is discarded (the guest never notices).
const STDERR_LIMIT: usize = 4 * 1024;

/// Largest table a guest may have, the same under both instance allocators, so a module
/// behaves the same whichever one a host ends up with.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Compiled modules kept; the least recently used is dropped beyond this.
const MODULE_CACHE_ENTRIES: usize = 64;

/// Resource bounds of one run. Every field is enforced deterministically except `wall_ms`, the
/// backstop for hosts far slower than the fuel budget assumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Fuel: one unit per wasm instruction the guest runs and per function call, and one per
    /// byte a bulk memory instruction moves (module `meter`).
    pub fuel: u64,
    /// Largest linear memory, in bytes (a bound under one 64 KiB page allows one page).
    pub memory_bytes: u64,
    /// Largest stdout, in bytes.
    pub output_bytes: u64,
    /// Wall-clock backstop, in milliseconds.
    pub wall_ms: u64,
}

impl Bounds {
    /// What a worker applies to a bound the scheduler left at zero ("the server default"). The
    /// scheduler should always send resolved bounds; these only keep a zero from meaning
    /// "nothing allowed".
    pub const DEFAULT: Bounds = Bounds {
        fuel: 10_000_000_000,
        memory_bytes: 256 << 20,
        output_bytes: 1 << 20,
        wall_ms: 600_000,
    };

    /// Replaces zero fields by [`Bounds::DEFAULT`].
    pub fn or_default(self) -> Bounds {
        let pick = |v: u64, d: u64| if v == 0 { d } else { v };
        let d = Self::DEFAULT;
        Bounds {
            fuel: pick(self.fuel, d.fuel),
            memory_bytes: pick(self.memory_bytes, d.memory_bytes),
            output_bytes: pick(self.output_bytes, d.output_bytes),
            wall_ms: pick(self.wall_ms, d.wall_ms),
        }
    }
}

impl Default for Bounds {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why a run failed; mirrors the proto `ErrorKind` (converted at the gRPC edge).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The guest trapped or exited with a non-zero code.
    Trap,
    OutOfFuel,
    /// A memory growth beyond `Bounds::memory_bytes` was refused and the guest then failed.
    OutOfMemory,
    OutputTooLarge,
    /// The guest exited successfully but stdout is not the metrics JSON (`parse_metrics`).
    BadOutput,
    /// The wall-clock backstop fired.
    WallTimeout,
    /// The module did not compile, link or instantiate here (or has no `_start`).
    Module,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Trap => "trap",
            FailureKind::OutOfFuel => "out of fuel",
            FailureKind::OutOfMemory => "out of memory",
            FailureKind::OutputTooLarge => "output too large",
            FailureKind::BadOutput => "bad output",
            FailureKind::WallTimeout => "wall timeout",
            FailureKind::Module => "module",
        })
    }
}

/// How one run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit code 0 and stdout satisfies the output contract.
    Success { output: Vec<u8>, fuel_used: u64 },
    Failure {
        kind: FailureKind,
        message: String,
        fuel_used: u64,
    },
    /// Stopped through a [`Cancel`] before it finished; not a result of the work unit.
    Cancelled,
}

impl Outcome {
    pub fn fuel_used(&self) -> u64 {
        match self {
            Outcome::Success { fuel_used, .. } | Outcome::Failure { fuel_used, .. } => *fuel_used,
            Outcome::Cancelled => 0,
        }
    }

    fn failure(kind: FailureKind, message: impl Into<String>, fuel_used: u64) -> Self {
        Outcome::Failure {
            kind,
            message: message.into(),
            fuel_used,
        }
    }
}

/// Why a module cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// The bytes are not the module that was asked for; nothing was compiled.
    #[error("module bytes hash to {actual}, not the expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("module does not compile: {0}")]
    Compile(String),
    /// Compiles but needs imports the sandbox does not provide.
    #[error("module does not link: {0}")]
    Link(String),
}

/// A compiled, linked module, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct CompiledModule {
    hash: ModuleHash,
    pre: InstancePre<State>,
    exports: Arc<Exports>,
}

/// The exports a run uses, looked up once per module.
struct Exports {
    /// The guest's `_start`; a module without one fails every run as a module error.
    main: Option<ModuleExport>,
    /// The guest's start function, run before `_start` (module `rewrite`).
    start: Option<ModuleExport>,
    meter: ModuleExport,
}

impl Exports {
    fn of(module: &Module) -> Result<Self, ModuleError> {
        Ok(Self {
            main: module.get_export_index("_start"),
            start: module.get_export_index(meter::START_EXPORT),
            meter: module
                .get_export_index(meter::METER_EXPORT)
                .ok_or_else(|| {
                    ModuleError::Compile("the rewritten module lacks its meter".into())
                })?,
        })
    }
}

impl CompiledModule {
    pub fn hash(&self) -> &ModuleHash {
        &self.hash
    }
}

impl fmt::Debug for CompiledModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CompiledModule({})",
            blake3::Hash::from(self.hash).to_hex()
        )
    }
}

/// A flag that stops a run within about 10 ms (the watchdog's tick), e.g. when the worker shuts
/// down. Cheap to clone; clones share the flag.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How the sandbox is set up.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Most runs at once (the worker's slots); sizes the pooling allocator.
    pub max_concurrent_runs: u32,
    /// Use the pooling instance allocator (instantiation ~3x faster). If the pool cannot be
    /// reserved (e.g. a virtual-memory ulimit), the sandbox falls back to on-demand allocation.
    pub pooling: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: 4,
            pooling: true,
        }
    }
}

/// The sandbox: shared by every slot of a worker (it is `Send + Sync`).
pub struct Sandbox {
    engine: Engine,
    /// Validates guests with the features they may use: `engine` also has multi-memory, for
    /// the meter's own memory.
    guest_features: Engine,
    linker: Linker<State>,
    modules: Mutex<ModuleCache>,
    pooling: bool,
    watchdog: meter::Watchdog,
}

impl Sandbox {
    pub fn new(config: &SandboxConfig) -> anyhow::Result<Self> {
        let profiler = profiler_from_env();
        let engine_config = |pool| {
            let mut config = engine_config(pool);
            if let Some(profiler) = profiler {
                config.profiler(profiler);
            }
            config
        };
        // The fastest allocator this host allows: the pool resetting only the pages a run wrote
        // (PAGEMAP_SCAN, Linux 6.7+), the pool resetting everything, then on-demand allocation.
        let mut refusal = None;
        let pooled = if config.pooling {
            [true, false].into_iter().find_map(|scan_written_pages| {
                let pool = Pool {
                    slots: config.max_concurrent_runs,
                    scan_written_pages,
                };
                Engine::new(&engine_config(Some(pool)))
                    .inspect_err(
                        |e| tracing::debug!(error = %e, ?pool, "pooling allocator refused"),
                    )
                    .map_err(|e| refusal = Some(e))
                    .ok()
            })
        } else {
            None
        };
        if let (None, Some(e)) = (&pooled, refusal) {
            tracing::warn!(error = %e, "pooling allocator unavailable; allocating on demand");
        }
        let pooling = pooled.is_some();
        let engine = match pooled {
            Some(engine) => engine,
            None => Engine::new(&engine_config(None)).map_err(anyhow::Error::from)?,
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)
            .map_err(anyhow::Error::from)?;
        linker.allow_shadowing(true);
        linker
            .func_wrap(
                "wasi_snapshot_preview1",
                "poll_oneoff",
                virt::poll_oneoff::<State>,
            )
            .map_err(anyhow::Error::from)?;
        Ok(Self {
            engine,
            guest_features: Engine::new(&guest_config()).map_err(anyhow::Error::from)?,
            linker,
            modules: Mutex::new(ModuleCache::default()),
            pooling,
            watchdog: meter::Watchdog::start()?,
        })
    }

    /// Whether instances come from the pooling allocator.
    pub fn is_pooling(&self) -> bool {
        self.pooling
    }

    /// The cached module for `hash`: compiled, or known not to compile. `None` if never seen.
    pub fn module(&self, hash: &ModuleHash) -> Option<Result<CompiledModule, ModuleError>> {
        self.cache().get(hash)
    }

    /// Verifies that `wasm` hashes to `hash`, compiles and links it, and caches the result (a
    /// failure too, so a broken module is not recompiled for each of its work units). Slow
    /// (milliseconds): call it off the async runtime. A hash mismatch is not cached: it says
    /// nothing about the module.
    pub fn compile(&self, hash: ModuleHash, wasm: &[u8]) -> Result<CompiledModule, ModuleError> {
        if let Some(cached) = self.module(&hash) {
            return cached;
        }
        let actual = blake3::hash(wasm);
        if *actual.as_bytes() != hash {
            return Err(ModuleError::HashMismatch {
                expected: blake3::Hash::from(hash).to_hex().to_string(),
                actual: actual.to_hex().to_string(),
            });
        }
        let result = self
            .prepare(wasm, rewrite::Options::SANDBOX)
            .map(|(pre, exports)| CompiledModule {
                hash,
                pre,
                exports: Arc::new(exports),
            });
        self.cache().insert(hash, result.clone());
        result
    }

    /// Validates, rewrites, compiles and links.
    fn prepare(
        &self,
        wasm: &[u8],
        options: rewrite::Options,
    ) -> Result<(InstancePre<State>, Exports), ModuleError> {
        // Validate before rewriting, so a malformed module is refused for what it is, and with
        // the guests' features, so a guest cannot name the meter's memory; `from_binary`, not
        // `new`: the latter would also accept WAT text.
        Module::validate(&self.guest_features, wasm)
            .map_err(|e| ModuleError::Compile(format!("{e:#}")))?;
        let rewritten =
            rewrite::rewrite(wasm, options).map_err(|e| ModuleError::Compile(e.to_string()))?;
        let module = Module::from_binary(&self.engine, &rewritten)
            .map_err(|e| ModuleError::Compile(format!("{e:#}")))?;
        let exports = Exports::of(&module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| ModuleError::Link(format!("{e:#}")))?;
        Ok((pre, exports))
    }

    /// Runs `module`'s `_start` with `input` on stdin under `bounds`, with randomness from
    /// `seed`. Synchronous and CPU-bound: call it from a blocking thread (e.g.
    /// `tokio::task::spawn_blocking`), never from an async task: WASI host calls block on the
    /// ambient tokio runtime, which panics inside one.
    pub fn run(
        &self,
        module: &CompiledModule,
        input: &[u8],
        bounds: &Bounds,
        seed: u64,
    ) -> Outcome {
        self.run_cancellable(module, input, bounds, seed, &Cancel::new())
    }

    /// [`Sandbox::run`], stoppable through `cancel` (then it returns [`Outcome::Cancelled`]).
    pub fn run_cancellable(
        &self,
        module: &CompiledModule,
        input: &[u8],
        bounds: &Bounds,
        seed: u64,
        cancel: &Cancel,
    ) -> Outcome {
        let bounds = bounds.or_default();
        let output_limit = usize::try_from(bounds.output_bytes).unwrap_or(usize::MAX - 1);
        let stdout = CappedPipe::new(output_limit, Overflow::Trap);
        let stderr = CappedPipe::new(STDERR_LIMIT, Overflow::Discard);
        let time = VirtualTime::default();
        let wasi = WasiCtxBuilder::new()
            .stdin(MemoryInputPipe::new(input.to_vec()))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .args(&["task"])
            .wall_clock(time.clone())
            .monotonic_clock(time.clone())
            .secure_random(SeededRng::new("accrete 2025 guest secure_random v1", seed))
            .insecure_random(SeededRng::new(
                "accrete 2025 guest insecure_random v1",
                seed,
            ))
            .insecure_random_seed(u128::from(seed))
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build_p1();
        let state = State {
            wasi,
            time,
            limiter: Limiter {
                memory_bytes: usize::try_from(bounds.memory_bytes).unwrap_or(usize::MAX),
                denied: false,
            },
        };
        let deadline = Instant::now() + Duration::from_millis(bounds.wall_ms);
        let budget = i64::try_from(bounds.fuel).unwrap_or(i64::MAX);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);

        let mut fuel_left = budget;
        let mut stopped = None;
        // No guest code runs while instantiating: the rewrite turned a start function into an
        // export.
        let result = match module.pre.instantiate(&mut store) {
            Err(e) => Err(Ended::Instantiate(e)),
            Ok(instance) => {
                let exports = &*module.exports;
                let Some(Extern::Memory(meter)) =
                    instance.get_module_export(&mut store, &exports.meter)
                else {
                    return Outcome::failure(FailureKind::Module, "the meter is missing", 0);
                };
                meter::set_fuel(meter.data_mut(&mut store), budget);
                // SAFETY: the meter memory is one page that cannot grow (min = max = 1), so it
                // stays where it is, page-aligned, until `store` is dropped; the watch ends
                // below, before that.
                let watch = unsafe {
                    let limit = meter.data_ptr(&store).add(meter::LIMIT_OFFSET as usize);
                    self.watchdog.watch(limit.cast::<i64>(), cancel, deadline)
                };
                let mut call = |e: &ModuleExport| match instance.get_module_export(&mut store, e) {
                    Some(Extern::Func(f)) => match f.typed::<(), ()>(&store) {
                        Ok(f) => f.call(&mut store, ()).map_err(Ended::Call),
                        Err(_) => Err(Ended::NoStart),
                    },
                    _ => Err(Ended::NoStart),
                };
                let ran = match (&exports.start, &exports.main) {
                    (_, None) => Err(Ended::NoStart),
                    (None, Some(main)) => call(main),
                    (Some(start), Some(main)) => call(start).and_then(|()| call(main)),
                };
                stopped = watch.finish();
                fuel_left = meter::fuel(meter.data(&store));
                ran
            }
        };
        let fuel_used = u64::try_from(budget - fuel_left.max(0)).unwrap_or(0);
        let limiter = &store.data().limiter;
        let denied = limiter.denied.then_some(limiter.memory_bytes);
        drop(store);
        let (output, overflowed) = stdout.take();
        let (diagnostics, _) = stderr.take();
        let ending = Ending {
            stopped,
            out_of_fuel: fuel_left < 0,
            overflowed,
            memory_denied: denied,
            wall: Duration::from_millis(bounds.wall_ms),
        };
        classify(result, &ending, output, &diagnostics, fuel_used)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, ModuleCache> {
        self.modules.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How the guest call ended, before classification.
enum Ended {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
    /// No `_start` function to call.
    NoStart,
}

/// What the host knows about a run besides how the call ended.
struct Ending {
    /// The watchdog stopped it.
    stopped: Option<meter::Stop>,
    /// The fuel left went below zero: the meter's trap ended the run.
    out_of_fuel: bool,
    /// Stdout went past its limit.
    overflowed: bool,
    /// The memory limit refused a growth (the limit, in bytes).
    memory_denied: Option<usize>,
    /// The wall-clock backstop.
    wall: Duration,
}

/// Decides the outcome. The order matters where several things went wrong: a wall timeout or a
/// cancellation says nothing about the guest; an output overflow traps at the offending write;
/// fuel below zero means the meter trapped; a refused memory growth explains a trap that
/// followed it.
fn classify(
    result: Result<(), Ended>,
    ending: &Ending,
    output: Vec<u8>,
    stderr: &[u8],
    fuel_used: u64,
) -> Outcome {
    use FailureKind as K;
    let with_stderr = |message: String| {
        let stderr = String::from_utf8_lossy(stderr);
        let stderr = stderr.trim();
        if stderr.is_empty() {
            message
        } else {
            format!("{message}; stderr: {stderr}")
        }
    };
    let error = match result {
        Ok(()) => None,
        Err(Ended::Instantiate(e)) => {
            if let Some(limit) = ending.memory_denied {
                let message = format!("initial memory exceeds the limit of {limit} bytes");
                return Outcome::failure(K::OutOfMemory, message, fuel_used);
            }
            return Outcome::failure(K::Module, format!("instantiation failed: {e:#}"), fuel_used);
        }
        Err(Ended::NoStart) => {
            let message = "the module exports no `_start` function of type [] -> []";
            return Outcome::failure(K::Module, message, fuel_used);
        }
        Err(Ended::Call(e)) => match e.downcast_ref::<I32Exit>() {
            Some(I32Exit(0)) => None,
            _ => Some(e),
        },
    };
    if let Some(e) = error {
        match ending.stopped {
            Some(meter::Stop::Cancelled) => return Outcome::Cancelled,
            Some(meter::Stop::WallTimeout) => {
                let message = format!("wall-clock backstop of {:?} reached", ending.wall);
                return Outcome::failure(K::WallTimeout, message, fuel_used);
            }
            None => {}
        }
        if ending.overflowed || e.downcast_ref::<OutputOverflow>().is_some() {
            return Outcome::failure(K::OutputTooLarge, root_message(&e), fuel_used);
        }
        let (kind, message) = if ending.out_of_fuel {
            (K::OutOfFuel, format!("all {fuel_used} fuel used"))
        } else if let Some(I32Exit(code)) = e.downcast_ref::<I32Exit>() {
            (K::Trap, format!("guest exited with code {code}"))
        } else {
            (K::Trap, root_message(&e))
        };
        let (kind, message) = match (kind, ending.memory_denied) {
            (K::Trap, Some(limit)) => (
                K::OutOfMemory,
                format!("memory growth beyond {limit} bytes was refused, then: {message}"),
            ),
            _ => (kind, message),
        };
        return Outcome::failure(kind, with_stderr(message), fuel_used);
    }
    if ending.overflowed {
        // A guest that ignored a refused write and exited 0 still produced too much.
        return Outcome::failure(K::OutputTooLarge, "output exceeds its limit", fuel_used);
    }
    match accrete_proto::output::parse_metrics(&output) {
        Ok(_) => Outcome::Success { output, fuel_used },
        Err(e) => Outcome::failure(K::BadOutput, with_stderr(e.to_string()), fuel_used),
    }
}

/// The error's own message plus its root cause, without the wasm backtrace wasmtime attaches
/// as context (long, and not needed to tell failures apart).
fn root_message(e: &wasmtime::Error) -> String {
    let root = e.root_cause().to_string();
    let top = e.to_string();
    if top == root || top.contains("backtrace") || top.starts_with("error while executing") {
        root
    } else {
        format!("{top}: {root}")
    }
}

/// Per-run store data.
struct State {
    wasi: WasiP1Ctx,
    time: VirtualTime,
    limiter: Limiter,
}

impl HasVirtualTime for State {
    fn virtual_time(&self) -> &VirtualTime {
        &self.time
    }
}

/// The memory limit, remembering whether it refused anything so a later failure can be called
/// out of memory rather than a generic trap.
struct Limiter {
    memory_bytes: usize,
    denied: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // The meter's page is allowed under any bound; a guest's memory bound is at least
        // that page too, as the limiter cannot tell the two memories apart.
        if desired > self.memory_bytes.max(meter::METER_MEMORY_BYTES) {
            self.denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn memories(&self) -> usize {
        // The guest's and the meter's.
        2
    }
}

/// A pooling allocator's shape.
#[derive(Clone, Copy, Debug)]
struct Pool {
    /// Most runs at once.
    slots: u32,
    /// Whether to find the pages a run wrote with Linux's `PAGEMAP_SCAN` (6.7+) and reset only
    /// those, keeping [`KEEP_RESIDENT_BYTES`] of each memory mapped between runs.
    scan_written_pages: bool,
}

/// How much of each memory stays mapped between runs when the pool can tell which pages a run
/// wrote: wasmtime restores those by hand (zeroes, or the data segments) and leaves the rest,
/// where otherwise it unmaps every page and the next run faults each one in again, a kernel
/// entry, a zeroed page and, on a multi-threaded worker, a TLB shootdown of the other cores per
/// page. A Rust guest's first MiB is its stack and its heap follows: 4 MiB holds all of a
/// signal-search at the default n = 2^12 and most of one at 2^16. The price is memory: up to
/// 4 MiB stays resident for each slot a run has written, of `2 x slots + 2`. Without the scan
/// wasmtime would restore all of it by hand on every run, so then it keeps 64 KiB, the cost of
/// one small `memset`.
const KEEP_RESIDENT_BYTES: usize = 4 << 20;

/// Names a profiler for the compiled guests: `perfmap` writes `/tmp/perf-PID.map` (function
/// names for `perf report`), `jitdump` a `jit-PID.dump` for `perf inject --jit` (their code too,
/// for `perf annotate`).
pub const PROFILE_ENV: &str = "ACCRETE_WASM_PROFILE";

/// The profiler [`PROFILE_ENV`] names, read once per sandbox: compiled guest code is otherwise
/// anonymous memory to `perf` (BENCHMARKS.md).
fn profiler_from_env() -> Option<ProfilingStrategy> {
    match std::env::var(PROFILE_ENV).as_deref() {
        Ok("perfmap") => Some(ProfilingStrategy::PerfMap),
        Ok("jitdump") => Some(ProfilingStrategy::JitDump),
        Ok(other) => {
            tracing::warn!("{PROFILE_ENV}={other:?} is neither perfmap nor jitdump; ignored");
            None
        }
        Err(_) => None,
    }
}

fn engine_config(pool: Option<Pool>) -> Config {
    let mut config = guest_config();
    // The meter's own memory is a module's second; `guest_config` keeps guests to one.
    config.wasm_multi_memory(true);
    if let Some(Pool {
        slots,
        scan_written_pages,
    }) = pool
    {
        // Runs never exceed the slots; the margin covers a run finishing while the next starts.
        let instances = slots.saturating_mul(2).saturating_add(2);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(instances)
            // The guest's memory and the meter's.
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances)
            .total_stacks(instances)
            .total_gc_heaps(0)
            .total_component_instances(0)
            .max_memories_per_module(2)
            .max_tables_per_module(1)
            .table_elements(MAX_TABLE_ELEMENTS)
            // 4 GiB, all a 32-bit memory can address, so the pool never caps a work unit's
            // memory below its own bound: the limiter decides, the same on every host.
            .max_memory_size(1 << 32);
        if scan_written_pages {
            // `Yes`: refuse to build the engine where the scan is missing, so that the caller
            // falls back to the pool without it rather than hand-resetting 4 MiB a run.
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
                .table_keep_resident(1 << 16);
        } else {
            pool.linear_memory_keep_resident(1 << 16);
        }
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// What a guest module may use, the sandbox's engine less the meter's second memory.
fn guest_config() -> Config {
    let mut config = Config::new();
    config
        // Off: the meter in the guest's own code (module `meter`) is the budget and the
        // backstop; wasmtime's fuel and epoch checks would each slow loops by about 25 %.
        .consume_fuel(false)
        .epoch_interruption(false)
        // Off: `nan` canonicalises NaNs where the guest can see their bits, which costs far
        // less than Cranelift's check after every operation.
        .cranelift_nan_canonicalization(false)
        // Off: everything whose result may differ between hosts or runs.
        .wasm_threads(false)
        .shared_memory(false)
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        // Off: features whose resource use depends on the allocator or collector, so a module
        // could fit on one host and not on another.
        .wasm_multi_memory(false)
        .wasm_memory64(false)
        .wasm_gc(false)
        .wasm_component_model(false);
    config
}

/// Compiled modules by hash, with least-recently-used eviction.
#[derive(Default)]
struct ModuleCache {
    entries: HashMap<ModuleHash, (Result<CompiledModule, ModuleError>, u64)>,
    clock: u64,
}

impl ModuleCache {
    fn get(&mut self, hash: &ModuleHash) -> Option<Result<CompiledModule, ModuleError>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(hash).map(|(m, used)| {
            *used = clock;
            m.clone()
        })
    }

    fn insert(&mut self, hash: ModuleHash, module: Result<CompiledModule, ModuleError>) {
        self.clock += 1;
        self.entries.insert(hash, (module, self.clock));
        if self.entries.len() > MODULE_CACHE_ENTRIES
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| *h)
        {
            self.entries.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests;
