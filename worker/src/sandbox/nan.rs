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
//! NaN (`0x7fc00000`, `0x7ff8000000000000`), and leaves arithmetic alone. Vector float
//! arithmetic keeps a check after every operation, as Cranelift did: its lanes are observable
//! the moment it ends.
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

use wasm_encoder::{BlockType, Function, Ieee32, Ieee64, Instruction, ValType};
use wasmparser::Operator;

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
#[derive(Clone, Copy)]
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
