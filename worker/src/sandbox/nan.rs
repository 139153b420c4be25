//! Canonicalising NaNs where the guest can observe their bits: which instructions observe them,
//! and the check the rewrite (module `rewrite`) puts before each, instead of a check after every
//! floating-point operation as Cranelift's own option does.
//!
//! Why: hosts disagree on the sign and payload of a NaN that arithmetic produces (x86_64 makes
//! 0/0 negative, aarch64 positive; they propagate payloads differently), and a guest that sees
//! those bits would print different bytes on different hosts. Cranelift's
//! `nan_canonicalization` follows every arithmetic result with a test and a blend, four
//! instructions on the critical path of every floating-point dependency chain: it made the
//! signal-search FFT run 2x slower. But a scalar float's bits reach anything observable only
//! through a few instructions:
//!
//! - a float store (memory, and through it the guest's output, then holds the bits);
//! - a reinterpretation as an integer (`i32.reinterpret_f32`, `i64.reinterpret_f64`);
//! - `copysign`, whose result takes the sign bit of its second operand;
//! - a scalar entering a vector (`splat`, `replace_lane`), whose lanes are plain bits.
//!
//! Everything else passes bits along unchanged (locals, globals, calls, `select`, `neg`, `abs`),
//! depends only on whether a value is a NaN (comparisons; conversions to integers, which trap or
//! saturate the same everywhere), or turns a NaN into another NaN (arithmetic). So the pass puts
//! a check just before each of those instructions that replaces a NaN with the canonical quiet
//! NaN (`0x7fc00000`, `0x7ff8000000000000`), and leaves arithmetic alone.
//!
//! A vector's lanes are plain bits: a `v128` local or store does not say whether it holds
//! `f64x2`, `f32x4` or integers, so a vector cannot be checked where it is observed, only where
//! float arithmetic makes it. But not after every operation: [`vector_checks`] follows each
//! result through the stack and locals of straight-line code, and a result that only ever feeds
//! vector float arithmetic or comparisons of its own lane shape (or an `extract_lane` into the
//! scalar scheme, or a `drop`) needs no check of its own, since those turn any NaN lane into a
//! NaN lane the next check sees, or look only at whether a lane is NaN. In an FFT butterfly
//! that leaves a check on each stored result instead of on each multiply and add too. A scalar
//! entering a vector is followed the same way: it is checked (before its `splat` or
//! `replace_lane`) only if the vector it enters is observed, so a polynomial that LLVM
//! evaluates two lanes at a time pays for no lanes at all.
//!
//! The scalar check tests `t >= -inf`, which holds for every number and fails only for a NaN:
//! one flag condition on x86_64, where `t == t` needs two (equal and ordered) and Cranelift emits
//! a branch for each.
//!
//! **The contract** (the cross-architecture test checks it): every NaN a guest observes through
//! a scalar float is the positive canonical one, whatever produced it, including a negated NaN
//! or one loaded with a payload. Bits that never pass through a scalar float instruction
//! (integer or vector loads and stores, data segments) are left as they are. The checks are the
//! sandbox's, not the guest's: they cost no fuel.

use std::collections::HashSet;

use wasm_encoder::{BlockType, Function, Ieee32, Ieee64, Instruction, ValType};
use wasmparser::{BinaryReaderError, FrameKind, ModuleArity, Operator, OperatorsReader};

/// The canonical quiet NaNs: sign clear, quiet bit set, payload zero.
const CANONICAL_F32: u32 = 0x7fc0_0000;
const CANONICAL_F64: u64 = 0x7ff8_0000_0000_0000;

/// The scratch locals the check needs, one per type, numbered by the rewrite after the
/// function's own.
#[derive(Clone, Copy)]
pub(super) struct Scratch {
    pub f32: u32,
    pub f64: u32,
    pub v128: u32,
}

/// The type of a value to canonicalise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kind {
    F32,
    F64,
    F32x4,
    F64x2,
}

/// Replaces the value on top of the stack with the canonical NaN where it is a NaN (per lane
/// for vectors). A scalar takes a branch, `if t >= -inf { t } else { NaN }`: the common path is
/// one compare and a jump the CPU predicts, and the NaN constant lives only in the other arm (a
/// `select` needs it in a register at every check, which Cranelift hoists out of loops and then
/// spills). A vector is `bitselect(t, NaN, t == t)` by lane: a vector compare makes a mask
/// either way.
pub(super) fn canonicalise(f: &mut Function, kind: Kind, scratch: Scratch) {
    let scalar = |f: &mut Function, local, ty, neg_inf, ge, nan| {
        f.instruction(&Instruction::LocalTee(local));
        f.instruction(&neg_inf);
        f.instruction(&ge);
        f.instruction(&Instruction::If(BlockType::Result(ty)));
        f.instruction(&Instruction::LocalGet(local));
        f.instruction(&Instruction::Else);
        f.instruction(&nan);
        f.instruction(&Instruction::End);
    };
    let vector = |f: &mut Function, eq, nan| {
        f.instruction(&Instruction::LocalTee(scratch.v128));
        f.instruction(&nan);
        f.instruction(&Instruction::LocalGet(scratch.v128));
        f.instruction(&Instruction::LocalGet(scratch.v128));
        f.instruction(&eq);
        f.instruction(&Instruction::V128Bitselect);
    };
    match kind {
        Kind::F32 => scalar(
            f,
            scratch.f32,
            ValType::F32,
            Instruction::F32Const(Ieee32::new(f32::NEG_INFINITY.to_bits())),
            Instruction::F32Ge,
            Instruction::F32Const(Ieee32::new(CANONICAL_F32)),
        ),
        Kind::F64 => scalar(
            f,
            scratch.f64,
            ValType::F64,
            Instruction::F64Const(Ieee64::new(f64::NEG_INFINITY.to_bits())),
            Instruction::F64Ge,
            Instruction::F64Const(Ieee64::new(CANONICAL_F64)),
        ),
        Kind::F32x4 => vector(
            f,
            Instruction::F32x4Eq,
            Instruction::V128Const(i128::from_le_bytes(splat(&CANONICAL_F32.to_le_bytes()))),
        ),
        Kind::F64x2 => vector(
            f,
            Instruction::F64x2Eq,
            Instruction::V128Const(i128::from_le_bytes(splat(&CANONICAL_F64.to_le_bytes()))),
        ),
    }
}

/// 16 bytes of `lane` repeated.
fn splat(lane: &[u8]) -> [u8; 16] {
    let mut out = [0; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = lane[i % lane.len()];
    }
    out
}

/// The type of the stack's top value if `op` exposes its bits: stores, reinterpretations, the
/// sign operand of `copysign`, and scalars entering a vector.
pub(super) fn observes_top(op: &Operator<'_>) -> Option<Kind> {
    use Operator as O;
    match op {
        O::F32Store { .. }
        | O::I32ReinterpretF32
        | O::F32Copysign
        | O::F32x4Splat
        | O::F32x4ReplaceLane { .. } => Some(Kind::F32),
        O::F64Store { .. }
        | O::I64ReinterpretF64
        | O::F64Copysign
        | O::F64x2Splat
        | O::F64x2ReplaceLane { .. } => Some(Kind::F64),
        _ => None,
    }
}

/// The lane type if `op` is vector float arithmetic that can produce a NaN, whose lanes (bits)
/// the guest can then observe directly.
pub(super) fn vector_arithmetic(op: &Operator<'_>) -> Option<Kind> {
    use Operator as O;
    match op {
        O::F32x4Ceil
        | O::F32x4Floor
        | O::F32x4Trunc
        | O::F32x4Nearest
        | O::F32x4Sqrt
        | O::F32x4Add
        | O::F32x4Sub
        | O::F32x4Mul
        | O::F32x4Div
        | O::F32x4Min
        | O::F32x4Max
        | O::F32x4DemoteF64x2Zero => Some(Kind::F32x4),
        O::F64x2Ceil
        | O::F64x2Floor
        | O::F64x2Trunc
        | O::F64x2Nearest
        | O::F64x2Sqrt
        | O::F64x2Add
        | O::F64x2Sub
        | O::F64x2Mul
        | O::F64x2Div
        | O::F64x2Min
        | O::F64x2Max
        | O::F64x2PromoteLowF32x4 => Some(Kind::F64x2),
        _ => None,
    }
}

/// The lane shape of the vector operand `op` reads without exposing any NaN lane's bits:
/// arithmetic (a NaN lane gives a NaN lane, which that arithmetic's own check or a later one
/// canonicalises), comparisons and saturating conversions (which see only whether a lane is
/// NaN), and `extract_lane`, whose scalar the scalar checks cover. `pmin`/`pmax`, `neg`, `abs`
/// and every bitwise or integer operation pass bits on, so they are not here.
fn reads_lanes_as_numbers(op: &Operator<'_>) -> Option<Kind> {
    use Operator as O;
    match op {
        O::F32x4Eq
        | O::F32x4Ne
        | O::F32x4Lt
        | O::F32x4Gt
        | O::F32x4Le
        | O::F32x4Ge
        | O::F32x4ExtractLane { .. }
        | O::F64x2PromoteLowF32x4
        | O::I32x4TruncSatF32x4S
        | O::I32x4TruncSatF32x4U => Some(Kind::F32x4),
        O::F64x2Eq
        | O::F64x2Ne
        | O::F64x2Lt
        | O::F64x2Gt
        | O::F64x2Le
        | O::F64x2Ge
        | O::F64x2ExtractLane { .. }
        | O::F32x4DemoteF64x2Zero
        | O::I32x4TruncSatF64x2SZero
        | O::I32x4TruncSatF64x2UZero => Some(Kind::F64x2),
        // The rest of the vector arithmetic reads the lane shape it produces (the conversions
        // above do not).
        _ => vector_arithmetic(op),
    }
}

/// For each operator of a function body, in order, whether the sandbox checks for NaNs there:
/// after vector arithmetic, and before a scalar enters a vector ([`enters_vector`]). Nowhere
/// else (other observations are always checked), and not there either when the vector made,
/// followed through the operand stack and locals, reaches only [`reads_lanes_as_numbers`] of
/// its own shape or a `drop` before it is gone: then any NaN lane it has becomes a NaN lane of
/// the arithmetic that reads it, whose own check (or a later one) canonicalises it. A vector
/// built by `replace_lane` carries the checks its operand still owes, since its other lanes
/// pass through as bits.
///
/// The model follows straight-line code only: a *segment* runs from one control instruction
/// ([`ends_segment`]) to the next, and control enters one only at its start. At its end every
/// value still on the stack is taken as observed and gets its checks, and so does every value
/// in a local, unless the local is [`segment_scoped`]: then whatever reads it next reads a value
/// written in its own segment, and the one held at the end is dead. That is what keeps the
/// checks out of a loop body whose temporaries live in locals (LLVM's are).
pub(super) fn vector_checks(ops: OperatorsReader<'_>) -> Result<Vec<bool>, BinaryReaderError> {
    let ops = ops.into_iter().collect::<Result<Vec<_>, _>>()?;
    let scoped = segment_scoped(&ops);
    let mut checked = vec![false; ops.len()];
    let mut observe = |value: Option<Unchecked>| {
        for at in value.into_iter().flat_map(|(_, sites)| sites) {
            checked[at] = true;
        }
    };
    // What the segment has put on the stack (its top last) and in locals; `None` for anything
    // that owes no check.
    let mut stack: Vec<Option<Unchecked>> = Vec::new();
    let mut locals: Vec<(u32, Unchecked)> = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        match *op {
            Operator::LocalGet { local_index } => {
                let held = locals.iter().find(|(l, _)| *l == local_index);
                stack.push(held.map(|(_, value)| value.clone()));
            }
            Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                let value = stack.pop().flatten();
                locals.retain(|(l, _)| *l != local_index);
                if matches!(op, Operator::LocalTee { .. }) {
                    stack.push(value.clone());
                }
                if let Some(value) = value {
                    locals.push((local_index, value));
                }
            }
            _ if ends_segment(op) => {
                let live = locals.drain(..).filter(|(l, _)| !scoped.contains(l));
                for value in stack.drain(..).chain(live.map(|(_, v)| Some(v))) {
                    observe(value);
                }
            }
            _ => {
                let (pops, pushes) = op
                    .operator_arity(&NoModule)
                    .expect("ends_segment takes every operator of unknown arity");
                let mut produced = enters_vector(op)
                    .or_else(|| vector_arithmetic(op))
                    .map(|kind| (kind, vec![index]));
                let reads = reads_lanes_as_numbers(op);
                for _ in 0..pops {
                    match stack.pop().flatten() {
                        Some((kind, _)) if reads == Some(kind) => {}
                        Some(_) if matches!(op, Operator::Drop) => {}
                        // `replace_lane`'s vector operand (the scalar is never tracked).
                        Some((kind, sites))
                            if is_replace_lane(op) && enters_vector(op) == Some(kind) =>
                        {
                            produced
                                .as_mut()
                                .expect("replace_lane makes a vector")
                                .1
                                .extend(sites);
                        }
                        value => observe(value),
                    }
                }
                stack.extend((0..pushes).map(|_| produced.clone()));
            }
        }
    }
    Ok(checked)
}

fn is_replace_lane(op: &Operator<'_>) -> bool {
    matches!(
        op,
        Operator::F32x4ReplaceLane { .. } | Operator::F64x2ReplaceLane { .. }
    )
}

/// A value that owes checks if its bits are observed: its lane shape, and the operator indices
/// of the checks.
type Unchecked = (Kind, Vec<usize>);

/// The lane shape a scalar enters when `op` puts it into a vector: those scalars' checks are
/// [`vector_checks`]' to place.
pub(super) fn enters_vector(op: &Operator<'_>) -> Option<Kind> {
    use Operator as O;
    match op {
        O::F32x4Splat | O::F32x4ReplaceLane { .. } => Some(Kind::F32x4),
        O::F64x2Splat | O::F64x2ReplaceLane { .. } => Some(Kind::F64x2),
        _ => None,
    }
}

/// Whether `op` ends a segment of straight-line code: every instruction that branches, is a
/// branch's target, calls, or stops, and anything whose effect on the stack [`NoModule`]
/// cannot tell.
fn ends_segment(op: &Operator<'_>) -> bool {
    use Operator as O;
    matches!(
        op,
        O::Unreachable
            | O::Block { .. }
            | O::Loop { .. }
            | O::If { .. }
            | O::Else
            | O::End
            | O::Br { .. }
            | O::BrIf { .. }
            | O::BrTable { .. }
            | O::Return
            | O::Call { .. }
            | O::CallIndirect { .. }
            | O::ReturnCall { .. }
            | O::ReturnCallIndirect { .. }
    ) || op.operator_arity(&NoModule).is_none()
}

/// The locals that every `local.get` reads after a `local.set` or `local.tee` of the same
/// local earlier in its segment: the value such a local holds at a segment's end is never read.
/// (A parameter, or a local read before its segment writes it, is not among them.)
fn segment_scoped(ops: &[Operator<'_>]) -> HashSet<u32> {
    let mut written = HashSet::new();
    let mut read_first = HashSet::new();
    let mut all = HashSet::new();
    for op in ops {
        match *op {
            Operator::LocalGet { local_index } if !written.contains(&local_index) => {
                read_first.insert(local_index);
            }
            Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                written.insert(local_index);
                all.insert(local_index);
            }
            _ if ends_segment(op) => written.clear(),
            _ => {}
        }
    }
    all.retain(|l| !read_first.contains(l));
    all
}

/// No module at all: the arity of every operator that depends on one (calls, blocks,
/// branches) is unknown, which [`ends_segment`] takes as the end of straight-line code.
struct NoModule;

impl ModuleArity for NoModule {
    fn sub_type_at(&self, _: u32) -> Option<&wasmparser::SubType> {
        None
    }
    fn tag_type_arity(&self, _: u32) -> Option<(u32, u32)> {
        None
    }
    fn type_index_of_function(&self, _: u32) -> Option<u32> {
        None
    }
    fn func_type_of_cont_type(&self, _: &wasmparser::ContType) -> Option<&wasmparser::FuncType> {
        None
    }
    fn sub_type_of_ref_type(&self, _: &wasmparser::RefType) -> Option<&wasmparser::SubType> {
        None
    }
    fn control_stack_height(&self) -> u32 {
        0
    }
    fn label_block(&self, _: u32) -> Option<(wasmparser::BlockType, FrameKind)> {
        None
    }
}
