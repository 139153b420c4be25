//! Canonicalises NaNs where the guest can observe their bits, by rewriting the module before it
//! is compiled, instead of after every floating-point operation as Cranelift's own option does.
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
//! **The contract** (the cross-architecture test checks it): every NaN a guest observes through
//! a scalar float is the positive canonical one, whatever produced it, including a negated NaN
//! or one loaded with a payload. Bits that never pass through a scalar float instruction
//! (integer or vector loads and stores, data segments) are left as they are. The check costs
//! six instructions of fuel each time it runs.

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{Function, Ieee32, Ieee64, Instruction, ValType};
use wasmparser::{FunctionBody, Operator, Parser, Payload};

/// Locals (parameters included) a function may have: wasmparser's limit, which wasmtime
/// enforces.
const MAX_LOCALS: u32 = 50_000;
/// Scratch locals the rewrite adds to every function; the server refuses modules with a
/// function over `MAX_LOCALS - SCRATCH_LOCALS` (server/src/module_check.rs), so no module it
/// accepts fails here.
const SCRATCH_LOCALS: u32 = 3;

/// The canonical quiet NaNs: sign clear, quiet bit set, payload zero.
const CANONICAL_F32: u32 = 0x7fc0_0000;
const CANONICAL_F64: u64 = 0x7ff8_0000_0000_0000;

/// Why a module could not be rewritten. Only a module wasmtime would also refuse gets here, as
/// [`canonicalise_observed_nans`] runs after validation.
#[derive(Debug, thiserror::Error)]
#[error("cannot canonicalise NaNs in this module: {0}")]
pub struct RewriteError(String);

/// Rewrites a valid module so that no non-canonical NaN can be stored, reinterpreted, used as
/// a sign or put into a vector, and so that vector float arithmetic yields canonical NaNs.
pub fn canonicalise_observed_nans(wasm: &[u8]) -> Result<Vec<u8>, RewriteError> {
    let mut rewriter = Rewriter::survey(wasm)?;
    let mut module = wasm_encoder::Module::new();
    rewriter
        .parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| RewriteError(e.to_string()))?;
    Ok(module.finish())
}

/// What the function bodies need to know about the rest of the module: each defined function's
/// parameter count (new locals are numbered after the existing ones).
struct Rewriter {
    /// Parameter count of each defined function, in code-section order.
    params: Vec<u32>,
    /// Index into `params` of the next body to rewrite.
    next_body: usize,
}

impl Rewriter {
    fn survey(wasm: &[u8]) -> Result<Self, RewriteError> {
        let err = |e: wasmparser::BinaryReaderError| RewriteError(e.to_string());
        let mut type_params = Vec::new();
        let mut params = Vec::new();
        for payload in Parser::new(0).parse_all(wasm) {
            match payload.map_err(err)? {
                Payload::TypeSection(types) => {
                    for ty in types.into_iter_err_on_gc_types() {
                        type_params.push(ty.map_err(err)?.params().len() as u32);
                    }
                }
                Payload::FunctionSection(functions) => {
                    for ty in functions {
                        let ty = ty.map_err(err)? as usize;
                        let count = type_params.get(ty).ok_or_else(|| {
                            RewriteError(format!("function type {ty} is missing"))
                        })?;
                        params.push(*count);
                    }
                }
                _ => {}
            }
        }
        Ok(Self {
            params,
            next_body: 0,
        })
    }
}

impl Reencode for Rewriter {
    type Error = RewriteError;

    fn parse_custom_section(
        &mut self,
        module: &mut wasm_encoder::Module,
        section: wasmparser::CustomSectionReader<'_>,
    ) -> Result<(), reencode::Error<Self::Error>> {
        // Code metadata (branch hints and the like) and DWARF locate instructions by byte
        // offset, which the rewrite moves; the module runs the same without them.
        if section.name().starts_with("metadata.code.") || section.name().starts_with(".debug_") {
            return Ok(());
        }
        reencode::utils::parse_custom_section(self, module, section)
    }

    fn parse_function_body(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        func: FunctionBody<'_>,
    ) -> Result<(), reencode::Error<Self::Error>> {
        let params = *self.params.get(self.next_body).ok_or_else(|| {
            reencode::Error::UserError(RewriteError("more bodies than functions".into()))
        })?;
        self.next_body += 1;

        let mut locals = Vec::new();
        let mut next_local = params;
        for pair in func.get_locals_reader()? {
            let (count, ty) = pair?;
            next_local = next_local.checked_add(count).ok_or_else(|| {
                reencode::Error::UserError(RewriteError("too many locals".into()))
            })?;
            locals.push((count, self.val_type(ty)?));
        }
        if next_local > MAX_LOCALS - SCRATCH_LOCALS {
            return Err(reencode::Error::UserError(RewriteError(format!(
                "a function has {next_local} locals and parameters; the sandbox adds \
                 {SCRATCH_LOCALS} to each function and the limit is {MAX_LOCALS}"
            ))));
        }
        // One scratch local per type the canonicalising sequence needs.
        let scratch = Scratch {
            f32: next_local,
            f64: next_local + 1,
            v128: next_local + 2,
        };
        locals.extend([(1, ValType::F32), (1, ValType::F64), (1, ValType::V128)]);

        let mut f = Function::new(locals);
        let mut reader = func.get_operators_reader()?;
        while !reader.eof() {
            let op = reader.read()?;
            if let Some(kind) = observes_top(&op) {
                canonicalise(&mut f, kind, scratch);
            }
            let after = vector_arithmetic(&op);
            f.instruction(&self.instruction(op)?);
            if let Some(kind) = after {
                canonicalise(&mut f, kind, scratch);
            }
        }
        code.function(&f);
        Ok(())
    }
}

/// The scratch locals added to each function.
#[derive(Clone, Copy)]
struct Scratch {
    f32: u32,
    f64: u32,
    v128: u32,
}

/// The type of a value to canonicalise.
#[derive(Clone, Copy)]
enum Kind {
    F32,
    F64,
    F32x4,
    F64x2,
}

/// Replaces the value on top of the stack with the canonical NaN where it is a NaN (per lane
/// for vectors): `t = top; select(t, NaN, t == t)`, or `bitselect` by lane for vectors.
fn canonicalise(f: &mut Function, kind: Kind, scratch: Scratch) {
    let (local, nan, equal) = match kind {
        Kind::F32 => (
            scratch.f32,
            Instruction::F32Const(Ieee32::new(CANONICAL_F32)),
            Instruction::F32Eq,
        ),
        Kind::F64 => (
            scratch.f64,
            Instruction::F64Const(Ieee64::new(CANONICAL_F64)),
            Instruction::F64Eq,
        ),
        Kind::F32x4 => (
            scratch.v128,
            Instruction::V128Const(i128::from_le_bytes(splat(&CANONICAL_F32.to_le_bytes()))),
            Instruction::F32x4Eq,
        ),
        Kind::F64x2 => (
            scratch.v128,
            Instruction::V128Const(i128::from_le_bytes(splat(&CANONICAL_F64.to_le_bytes()))),
            Instruction::F64x2Eq,
        ),
    };
    f.instruction(&Instruction::LocalTee(local));
    f.instruction(&nan);
    f.instruction(&Instruction::LocalGet(local));
    f.instruction(&Instruction::LocalGet(local));
    f.instruction(&equal);
    f.instruction(&match kind {
        Kind::F32 | Kind::F64 => Instruction::Select,
        Kind::F32x4 | Kind::F64x2 => Instruction::V128Bitselect,
    });
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
fn observes_top(op: &Operator<'_>) -> Option<Kind> {
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
fn vector_arithmetic(op: &Operator<'_>) -> Option<Kind> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Engine, Module};

    /// The sandbox's own engine: modules are checked against exactly what it accepts.
    fn engine() -> Engine {
        Engine::new(&super::super::engine_config(None)).expect("engine")
    }

    fn smith_config() -> wasm_smith::Config {
        wasm_smith::Config {
            exceptions_enabled: false,
            gc_enabled: false,
            memory64_enabled: false,
            relaxed_simd_enabled: false,
            threads_enabled: false,
            max_memories: 1,
            ..wasm_smith::Config::default()
        }
    }

    /// Bytes from splitmix64: the seed fixes every generated module.
    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                (z ^ (z >> 31)) as u8
            })
            .collect()
    }

    /// (operators, places that get a check) in a module's code.
    fn survey_code(wasm: &[u8]) -> (usize, usize) {
        let (mut ops, mut sites) = (0, 0);
        for payload in Parser::new(0).parse_all(wasm) {
            if let Payload::CodeSectionEntry(body) = payload.unwrap() {
                for op in body.get_operators_reader().unwrap() {
                    let op = op.unwrap();
                    ops += 1;
                    sites += usize::from(observes_top(&op).is_some())
                        + usize::from(vector_arithmetic(&op).is_some());
                }
            }
        }
        (ops, sites)
    }

    /// Every valid module stays valid, and gains exactly one six-instruction check per place
    /// that needs one: the rewrite numbers its scratch locals after each function's own, keeps
    /// stack types, and copies everything else.
    #[test]
    fn random_valid_modules_stay_valid_with_one_check_per_observation() {
        let engine = engine();
        let (mut modules, mut checks) = (0, 0);
        for seed in 0..300 {
            let raw = bytes(seed, 8192);
            let mut u = arbitrary::Unstructured::new(&raw);
            let Ok(module) = wasm_smith::Module::new(smith_config(), &mut u) else {
                continue;
            };
            let wasm = module.to_bytes();
            Module::validate(&engine, &wasm)
                .unwrap_or_else(|e| panic!("seed {seed}: wasm-smith made an invalid module: {e}"));
            let rewritten =
                canonicalise_observed_nans(&wasm).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            Module::validate(&engine, &rewritten)
                .unwrap_or_else(|e| panic!("seed {seed}: the rewrite broke the module: {e}"));
            let ((before, sites), (after, _)) = (survey_code(&wasm), survey_code(&rewritten));
            assert_eq!(after, before + 6 * sites, "seed {seed}");
            modules += 1;
            checks += sites;
        }
        assert!(modules >= 250, "only {modules} modules generated");
        assert!(checks >= 500, "only {checks} checks in {modules} modules");
    }
}
