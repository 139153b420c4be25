//! The guest's virtual world: a clock that only moves when the guest looks at it or sleeps,
//! randomness drawn from the work unit's seed, capped in-memory stdout/stderr, and a
//! `poll_oneoff` that never blocks the host. Everything here is a pure function of what the guest
//! does, so replicas on different hosts observe the same world.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::{Caller, Extern};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// What the guest sees as "now" before it has looked at the clock: 2000-01-01T00:00:00Z.
pub const WALL_CLOCK_ORIGIN: Duration = Duration::from_secs(946_684_800);

/// How far virtual time advances each time the guest reads a clock. Reads must advance time, or
/// a guest waiting for time to pass (`while now() < start + 1s`) would spin until out of fuel.
pub const CLOCK_TICK_NANOS: u64 = 1_000;

/// Virtual nanoseconds since the run started, shared by both clocks and `poll_oneoff`.
#[derive(Clone, Default)]
pub struct VirtualTime(Arc<AtomicU64>);

impl VirtualTime {
    /// Reads the time and moves it one tick forward.
    fn read(&self) -> u64 {
        self.0.fetch_add(CLOCK_TICK_NANOS, Ordering::Relaxed) + CLOCK_TICK_NANOS
    }

    fn peek(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Moves time forward to `nanos` (a sleep); never backward.
    fn advance_to(&self, nanos: u64) {
        self.0.fetch_max(nanos, Ordering::Relaxed);
    }
}

impl HostWallClock for VirtualTime {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(CLOCK_TICK_NANOS)
    }

    fn now(&self) -> Duration {
        WALL_CLOCK_ORIGIN + Duration::from_nanos(self.read())
    }
}

impl HostMonotonicClock for VirtualTime {
    fn resolution(&self) -> u64 {
        CLOCK_TICK_NANOS
    }

    fn now(&self) -> u64 {
        self.read()
    }
}

/// A deterministic random stream: the BLAKE3 extendable output of the seed under a purpose string.
/// It is specified by BLAKE3 itself (not by a crate's choice of PRNG that may change between
/// versions), portable across architectures, and as unpredictable as the seed is.
pub struct SeededRng(blake3::OutputReader);

impl SeededRng {
    pub fn new(purpose: &str, seed: u64) -> Self {
        let mut hasher = blake3::Hasher::new_derive_key(purpose);
        hasher.update(&seed.to_le_bytes());
        Self(hasher.finalize_xof())
    }
}

impl rand::TryRng for SeededRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill(dst);
        Ok(())
    }
}

/// What a capped pipe does with bytes beyond its limit.
#[derive(Clone, Copy, Debug)]
pub enum Overflow {
    /// Trap the guest at once: its output is already invalid, so running on wastes the volunteer.
    Trap,
    /// Keep the first `limit` bytes and pretend the rest was written; for stderr, which is only
    /// diagnostics, so a chatty guest behaves the same however much it logs.
    Discard,
}

/// The error a guest's write traps with when stdout exceeds its limit.
#[derive(Debug, thiserror::Error)]
#[error("output exceeds the limit of {limit} bytes")]
pub struct OutputOverflow {
    pub limit: usize,
}

#[derive(Default)]
struct PipeState {
    bytes: Vec<u8>,
    overflowed: bool,
}

/// An in-memory stdout/stderr with a hard cap.
#[derive(Clone)]
pub struct CappedPipe {
    limit: usize,
    overflow: Overflow,
    state: Arc<Mutex<PipeState>>,
}

/// Largest write permit handed out at once; WASI streams conventionally use 4-64 KiB.
const WRITE_PERMIT: usize = 64 * 1024;

impl CappedPipe {
    pub fn new(limit: usize, overflow: Overflow) -> Self {
        Self {
            limit,
            overflow,
            state: Arc::default(),
        }
    }

    /// The bytes written (at most `limit`) and whether the guest tried to write more.
    pub fn take(&self) -> (Vec<u8>, bool) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut state.bytes), state.overflowed)
    }

    fn append(&self, data: &[u8]) -> Result<(), OutputOverflow> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.limit - state.bytes.len();
        if data.len() <= room {
            state.bytes.extend_from_slice(data);
            return Ok(());
        }
        state.bytes.extend_from_slice(&data[..room]);
        state.overflowed = true;
        match self.overflow {
            Overflow::Trap => Err(OutputOverflow { limit: self.limit }),
            Overflow::Discard => Ok(()),
        }
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes)
            .map_err(|e| StreamError::Trap(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(
            self.append(buf)
                .map(|()| buf.len())
                .map_err(io::Error::other),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// WASI preview 1 ABI constants (wasi_snapshot_preview1.witx).
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_BADF: u16 = 8;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;
const EVENTTYPE_CLOCK: u8 = 0;
const EVENTTYPE_FD_READ: u8 = 1;
const EVENTTYPE_FD_WRITE: u8 = 2;
const CLOCKID_REALTIME: u32 = 0;
const SUBCLOCKFLAGS_ABSTIME: u16 = 1;
const SUBSCRIPTION_SIZE: usize = 48;
const EVENT_SIZE: usize = 32;

/// Anything with a virtual clock can serve `poll_oneoff`.
pub trait HasVirtualTime {
    fn virtual_time(&self) -> &VirtualTime;
}

/// Most subscriptions one `poll_oneoff` call may carry (real programs use a handful).
pub const MAX_POLL_SUBSCRIPTIONS: usize = 1024;

/// `wasi_snapshot_preview1.poll_oneoff`, replacing wasmtime-wasi's, which sleeps the host thread
/// for as long as the guest asks (a guest could hold a slot for hours, out of reach of the
/// wall-clock backstop, which only stops wasm code, at its meter's checks). Here stdin and stdout are memory, so fd
/// subscriptions are ready at once; if there are none, the earliest clock subscription fires and
/// virtual time jumps to its deadline: sleeping is free and deterministic.
pub fn poll_oneoff<T: HasVirtualTime>(
    mut caller: Caller<'_, T>,
    subs_ptr: i32,
    events_ptr: i32,
    nsubs: i32,
    nevents_ptr: i32,
) -> i32 {
    let time = caller.data().virtual_time().clone();
    let Some(Extern::Memory(memory)) = caller.get_export("memory") else {
        return ERRNO_FAULT;
    };
    let memory = memory.data_mut(&mut caller);
    let (subs_ptr, events_ptr, nevents_ptr) = (
        subs_ptr as u32 as usize,
        events_ptr as u32 as usize,
        nevents_ptr as u32 as usize,
    );
    let nsubs = nsubs as u32 as usize;
    // The host builds one event per subscription, outside the guest's memory limit and fuel:
    // a cap keeps a hostile call from costing the host gigabytes or unmetered time.
    if nsubs == 0 || nsubs > MAX_POLL_SUBSCRIPTIONS {
        return ERRNO_INVAL;
    }
    let Some(subs) = nsubs
        .checked_mul(SUBSCRIPTION_SIZE)
        .and_then(|len| memory.get(subs_ptr..subs_ptr.checked_add(len)?))
    else {
        return ERRNO_FAULT;
    };

    let mut events: Vec<[u8; EVENT_SIZE]> = Vec::new();
    let mut clocks: Vec<(u64, u64)> = Vec::new(); // (userdata, deadline in virtual nanos)
    let now = time.peek();
    for sub in subs.chunks_exact(SUBSCRIPTION_SIZE) {
        let userdata = u64::from_le_bytes(sub[0..8].try_into().unwrap());
        let tag = sub[8];
        match tag {
            EVENTTYPE_CLOCK => {
                let id = u32::from_le_bytes(sub[16..20].try_into().unwrap());
                let timeout = u64::from_le_bytes(sub[24..32].try_into().unwrap());
                let flags = u16::from_le_bytes(sub[40..42].try_into().unwrap());
                let deadline = if flags & SUBCLOCKFLAGS_ABSTIME == 0 {
                    now.saturating_add(timeout)
                } else if id == CLOCKID_REALTIME {
                    timeout.saturating_sub(WALL_CLOCK_ORIGIN.as_nanos() as u64)
                } else {
                    timeout
                };
                clocks.push((userdata, deadline));
            }
            EVENTTYPE_FD_READ | EVENTTYPE_FD_WRITE => {
                let fd = u32::from_le_bytes(sub[16..20].try_into().unwrap());
                let valid = match tag {
                    EVENTTYPE_FD_READ => fd == 0,
                    _ => fd == 1 || fd == 2,
                };
                let nbytes = if valid && tag == EVENTTYPE_FD_WRITE {
                    WRITE_PERMIT as u64
                } else {
                    0
                };
                events.push(event(
                    userdata,
                    if valid { 0 } else { ERRNO_BADF },
                    tag,
                    nbytes,
                ));
            }
            _ => return ERRNO_INVAL,
        }
    }
    if events.is_empty() {
        let earliest = clocks.iter().map(|&(_, d)| d).min().unwrap_or(now);
        time.advance_to(earliest);
        for &(userdata, deadline) in &clocks {
            if deadline <= earliest {
                events.push(event(userdata, 0, EVENTTYPE_CLOCK, 0));
            }
        }
    }

    let Some(out) =
        memory.get_mut(events_ptr..events_ptr.saturating_add(events.len() * EVENT_SIZE))
    else {
        return ERRNO_FAULT;
    };
    for (slot, ev) in out.chunks_exact_mut(EVENT_SIZE).zip(&events) {
        slot.copy_from_slice(ev);
    }
    let Some(n) = memory.get_mut(nevents_ptr..nevents_ptr.saturating_add(4)) else {
        return ERRNO_FAULT;
    };
    n.copy_from_slice(&(events.len() as u32).to_le_bytes());
    ERRNO_SUCCESS
}

fn event(userdata: u64, error: u16, kind: u8, nbytes: u64) -> [u8; EVENT_SIZE] {
    let mut ev = [0u8; EVENT_SIZE];
    ev[0..8].copy_from_slice(&userdata.to_le_bytes());
    ev[8..10].copy_from_slice(&error.to_le_bytes());
    ev[10] = kind;
    ev[16..24].copy_from_slice(&nbytes.to_le_bytes());
    ev
}
