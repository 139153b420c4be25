//! Fuel metered by the guest's own code, and the watchdog that stops a run from outside: the
//! sandbox's budget and its wall-clock backstop, without wasmtime's fuel or epochs.
//!
//! Why not wasmtime's: its fuel and its epoch checks each end in a call into the runtime when
//! they fire, at every loop header and function entry. That call clobbers every caller-saved
//! register, so across every loop Cranelift keeps its values in the few callee-saved registers
//! or on the stack: the signal-search FFT reloaded its heap base and constants from the stack on
//! every butterfly, and either mechanism alone made that guest about 25 % slower (BENCHMARKS.md).
//! Here the check ends in a trap, which never returns, so no value has to survive it.
//!
//! **The meter.** The rewrite (module `rewrite`) gives every module a one-page memory of its own:
//! its first `i64` is the fuel left, its second the *limit*. Guest code cannot name it: guests
//! are validated without multi-memory. (A global for the fuel would need the instance's context
//! pointer as well as the memory's base in every loop; one base is one register fewer.) Each
//! function gets an `i64` local that accumulates the cost of the basic blocks it has run (a
//! constant per block: Cranelift folds the additions). A *flush* subtracts it from the fuel and
//! traps (`unreachable`) when the fuel left is below the limit. Flushes come at every loop header, before every way out of
//! the function (`return`, a branch to its own label, its `end`, a tail call), before a call
//! that may reach a host function, and before a bulk instruction. So execution between two
//! flushes is bounded by one function body plus the nesting of calls (which the stack limit
//! bounds), and a call tree without loops pays each time a call returns.
//!
//! **Costs** are wasmtime 48's default model, unit for unit (a test runs the guests under both):
//! one unit per instruction, none for `nop`, `drop`, `block`, `loop`, `else`, `end`, `return`
//! and `unreachable`; one more per function called; and one per byte, or table element, that
//! `memory.fill`, `memory.copy`, `memory.init`, `table.fill`, `table.copy`, `table.init` and
//! `table.grow` touch, so that fuel bounds the time of a loop of large copies too. A bulk
//! instruction flushes first, as wasmtime checks its fuel before one. Fuel counts the guest's
//! instructions only: the meter's and the NaN checks' own instructions are free.
//!
//! **Stopping.** The limit is 0 while a run may go on. The watchdog ([`Watchdog`]) writes
//! [`STOP`] there when a run is cancelled or passes its wall-clock deadline; the guest traps at
//! its next flush, within microseconds in any loop or call. After a trap the host tells the
//! three cases apart: the watchdog says whether it stopped the run; otherwise fuel below zero
//! means the budget ran out (a flush that takes the fuel below zero traps at once, so a guest's
//! own trap always finds it at zero or above).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use wasm_encoder::{BlockType, Function, Instruction, MemArg};
use wasmparser::Operator;

use super::Cancel;

/// Export names of what the rewrite adds. A guest may not export a name with this prefix.
pub const RESERVED_EXPORT_PREFIX: &str = "__accrete_";
/// The meter's memory.
pub const METER_EXPORT: &str = "__accrete_meter";
/// Where the meter's memory holds the fuel left, and the limit (both `i64`).
pub const FUEL_OFFSET: u64 = 0;
pub const LIMIT_OFFSET: u64 = 8;
/// The module's own start function, which the rewrite turns into an export so that it runs
/// under the meter (a start section runs during instantiation, before the fuel is set).
pub const START_EXPORT: &str = "__accrete_start";

/// Size of the meter's memory: one wasm page, its smallest.
pub const METER_MEMORY_BYTES: usize = 1 << 16;

/// The limit that stops a run: every amount of fuel is below it.
pub const STOP: i64 = i64::MAX;

/// How often the watchdog looks at the runs it watches: the granularity of cancellation and of
/// the wall-clock backstop.
const WATCH_TICK: Duration = Duration::from_millis(10);

/// What every function call costs on top of its instructions (wasmtime: "even empty functions
/// should consume at least some fuel").
const CALL_COST: i64 = 1;

/// Fuel an instruction costs, wasmtime's default model: code that generates no instructions of
/// its own is free.
pub(super) fn cost(op: &Operator<'_>) -> i64 {
    use Operator as O;
    match op {
        O::Nop
        | O::Drop
        | O::Block { .. }
        | O::Loop { .. }
        | O::Unreachable
        | O::Return
        | O::Else
        | O::End => 0,
        _ => 1,
    }
}

/// What the meter needs to instrument one function body.
#[derive(Clone, Copy)]
pub(super) struct Slots {
    /// The meter's memory.
    pub memory: u32,
    /// The body's `i64` accumulator local.
    pub spent: u32,
    /// The body's `i32` scratch local for a bulk instruction's length.
    pub length: u32,
    /// Functions below this index are imported: host functions.
    pub imported_functions: u32,
}

/// What an instruction does to the nesting of blocks, once written.
#[derive(Clone, Copy)]
pub(super) enum After {
    Nothing,
    Open,
    /// A loop opens: its header pays for the iteration before, or for the code before it.
    OpenLoop,
    Close,
}

/// The meter's state while one function body is rewritten.
pub(super) struct BodyMeter {
    slots: Slots,
    /// Open `block`, `loop` and `if` frames: a branch to label `depth` leaves the function.
    depth: u32,
    /// Cost of the instructions since the last emitted addition or flush, all in one basic block.
    pending: i64,
}

impl BodyMeter {
    pub(super) fn new(slots: Slots) -> Self {
        Self {
            slots,
            depth: 0,
            pending: CALL_COST,
        }
    }

    /// Emits what must run before `op`; returns what [`BodyMeter::after`] must do once `op` is
    /// written.
    pub(super) fn before(
        &mut self,
        f: &mut Function,
        op: &Operator<'_>,
    ) -> wasmparser::Result<After> {
        use Operator as O;
        self.pending += cost(op);
        let after = match op {
            O::Block { .. } | O::If { .. } | O::TryTable { .. } | O::Try { .. } => After::Open,
            O::Loop { .. } => After::OpenLoop,
            O::End | O::Delegate { .. } => After::Close,
            _ => After::Nothing,
        };
        match op {
            // A call of the guest's own function needs nothing: the callee pays for itself at
            // its loops and on its way out, and what this function has spent so far stays a
            // constant that the next flush subtracts. A host function may not return (WASI's
            // `proc_exit`), and an indirect call may reach one.
            O::Call { function_index } if *function_index >= self.slots.imported_functions => {}
            O::Call { .. }
            | O::CallIndirect { .. }
            | O::CallRef { .. }
            | O::ReturnCall { .. }
            | O::ReturnCallIndirect { .. }
            | O::ReturnCallRef { .. }
            | O::Return => self.flush(f),
            O::Br { relative_depth }
            | O::BrIf { relative_depth }
            | O::BrOnNull { relative_depth }
            | O::BrOnNonNull { relative_depth }
            | O::BrOnCast { relative_depth, .. }
            | O::BrOnCastFail { relative_depth, .. } => {
                self.end_block(f, *relative_depth == self.depth)
            }
            O::BrTable { targets } => {
                let mut leaves = targets.default() == self.depth;
                for target in targets.targets() {
                    leaves |= target? == self.depth;
                }
                self.end_block(f, leaves);
            }
            O::If { .. } | O::Else | O::Loop { .. } => self.spend(f),
            O::End => self.end_block(f, self.depth == 0),
            O::MemoryFill { .. }
            | O::MemoryCopy { .. }
            | O::MemoryInit { .. }
            | O::TableFill { .. }
            | O::TableCopy { .. }
            | O::TableInit { .. }
            | O::TableGrow { .. } => {
                self.charge_length(f);
                self.flush(f);
            }
            _ => {}
        }
        Ok(after)
    }

    /// Emits what must run after an instruction, and follows the nesting of blocks.
    pub(super) fn after(&mut self, f: &mut Function, after: After) {
        match after {
            After::Nothing => {}
            After::Open => self.depth += 1,
            After::OpenLoop => {
                self.depth += 1;
                self.flush(f);
            }
            // The function's own `end` leaves the depth at zero.
            After::Close => self.depth = self.depth.saturating_sub(1),
        }
    }

    /// The end of a basic block; one that may leave the function (a branch to the function's
    /// own label, or its `end`) must pay first.
    fn end_block(&mut self, f: &mut Function, leaves_function: bool) {
        if leaves_function {
            self.flush(f);
        } else {
            self.spend(f);
        }
    }

    /// Ends a basic block: adds its cost to the accumulator.
    fn spend(&mut self, f: &mut Function) {
        if self.pending == 0 {
            return;
        }
        f.instruction(&Instruction::LocalGet(self.slots.spent));
        f.instruction(&Instruction::I64Const(std::mem::take(&mut self.pending)));
        f.instruction(&Instruction::I64Add);
        f.instruction(&Instruction::LocalSet(self.slots.spent));
    }

    /// `fuel -= spent + pending; if fuel < limit { trap }; spent = 0`.
    fn flush(&mut self, f: &mut Function) {
        let Slots { memory, spent, .. } = self.slots;
        let word = |offset| MemArg {
            offset,
            align: 3,
            memory_index: memory,
        };
        // The store's address, then the new fuel.
        f.instruction(&Instruction::I32Const(0));
        f.instruction(&Instruction::I32Const(0));
        f.instruction(&Instruction::I64Load(word(FUEL_OFFSET)));
        f.instruction(&Instruction::LocalGet(spent));
        f.instruction(&Instruction::I64Sub);
        let pending = std::mem::take(&mut self.pending);
        if pending != 0 {
            f.instruction(&Instruction::I64Const(pending));
            f.instruction(&Instruction::I64Sub);
        }
        // The accumulator holds the new fuel for a moment, instead of one more local.
        f.instruction(&Instruction::LocalTee(spent));
        f.instruction(&Instruction::I64Store(word(FUEL_OFFSET)));
        f.instruction(&Instruction::LocalGet(spent));
        f.instruction(&Instruction::I32Const(0));
        f.instruction(&Instruction::I64Load(word(LIMIT_OFFSET)));
        f.instruction(&Instruction::I64LtS);
        f.instruction(&Instruction::If(BlockType::Empty));
        f.instruction(&Instruction::Unreachable);
        f.instruction(&Instruction::End);
        f.instruction(&Instruction::I64Const(0));
        f.instruction(&Instruction::LocalSet(spent));
    }

    /// Before a bulk instruction, whose length (in bytes or elements) is on top of the stack:
    /// `spent += length`.
    fn charge_length(&mut self, f: &mut Function) {
        let Slots { spent, length, .. } = self.slots;
        f.instruction(&Instruction::LocalTee(length));
        f.instruction(&Instruction::LocalGet(length));
        f.instruction(&Instruction::I64ExtendI32U);
        f.instruction(&Instruction::LocalGet(spent));
        f.instruction(&Instruction::I64Add);
        f.instruction(&Instruction::LocalSet(spent));
    }
}

/// Sets the fuel left in a meter memory's bytes.
pub(super) fn set_fuel(meter: &mut [u8], fuel: i64) {
    let at = FUEL_OFFSET as usize;
    meter[at..at + 8].copy_from_slice(&fuel.to_le_bytes());
}

/// The fuel left in a meter memory's bytes.
pub(super) fn fuel(meter: &[u8]) -> i64 {
    let at = FUEL_OFFSET as usize;
    i64::from_le_bytes(meter[at..at + 8].try_into().expect("eight bytes"))
}

/// Why the watchdog stopped a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stop {
    Cancelled,
    WallTimeout,
}

/// The limit word of one run's meter memory.
struct LimitCell(*mut i64);

// SAFETY: the pointer is only written through while its entry is registered, under the lock,
// and `Watch` removes the entry before the run's `Store` (which owns the memory) is dropped.
unsafe impl Send for LimitCell {}

struct Entry {
    id: u64,
    limit: LimitCell,
    cancel: Cancel,
    deadline: Instant,
    stopped: Option<Stop>,
}

#[derive(Default)]
struct Runs {
    entries: Vec<Entry>,
    next_id: u64,
    /// The thread waits for a run to watch, not for its next tick.
    parked: bool,
    closing: bool,
}

#[derive(Default)]
struct Shared {
    runs: Mutex<Runs>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A thread that stops watched runs when they are cancelled or pass their deadline, by writing
/// [`STOP`] into their limit. It sleeps while nothing runs. Stopped when dropped.
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    pub(super) fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = thread::Builder::new()
            .name("accrete-watchdog".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || watch_loop(&shared)
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Watches a run whose meter memory begins at `limit` until the returned guard is finished
    /// or dropped.
    ///
    /// # Safety
    /// `limit` must point to the first, 8-byte aligned word of a live meter memory, and stay
    /// valid until the returned [`Watch`] is gone.
    pub(super) unsafe fn watch(
        &self,
        limit: *mut i64,
        cancel: &Cancel,
        deadline: Instant,
    ) -> Watch<'_> {
        let mut runs = self.shared.lock();
        let id = runs.next_id;
        runs.next_id += 1;
        runs.entries.push(Entry {
            id,
            limit: LimitCell(limit),
            cancel: cancel.clone(),
            deadline,
            stopped: None,
        });
        // A ticking thread finds the run at its next tick; waking it costs a system call, which
        // would be most of a short run's overhead.
        let parked = std::mem::take(&mut runs.parked);
        drop(runs);
        if parked {
            self.shared.wake.notify_one();
        }
        Watch {
            shared: &self.shared,
            id: Some(id),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_loop(shared: &Shared) {
    let mut runs = shared.lock();
    while !runs.closing {
        if runs.entries.is_empty() {
            runs.parked = true;
            runs = shared.wake.wait(runs).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        let now = Instant::now();
        for entry in runs.entries.iter_mut().filter(|e| e.stopped.is_none()) {
            let stop = if entry.cancel.is_cancelled() {
                Stop::Cancelled
            } else if now >= entry.deadline {
                Stop::WallTimeout
            } else {
                continue;
            };
            entry.stopped = Some(stop);
            // SAFETY: registered entries point to live, aligned limit words (`Watchdog::watch`);
            // the guest only reads this word, and the store is atomic.
            unsafe { AtomicI64::from_ptr(entry.limit.0) }.store(STOP, Ordering::Relaxed);
        }
        runs = shared
            .wake
            .wait_timeout(runs, WATCH_TICK)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// One watched run. Dropping it, or [`Watch::finish`], ends the watch.
pub(super) struct Watch<'a> {
    shared: &'a Shared,
    id: Option<u64>,
}

impl Watch<'_> {
    /// Ends the watch; whether, and why, the watchdog stopped the run.
    pub(super) fn finish(mut self) -> Option<Stop> {
        self.remove()
    }

    fn remove(&mut self) -> Option<Stop> {
        let id = self.id.take()?;
        let mut runs = self.shared.lock();
        let at = runs.entries.iter().position(|e| e.id == id)?;
        runs.entries.swap_remove(at).stopped
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}
