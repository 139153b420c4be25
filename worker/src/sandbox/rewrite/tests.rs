//! Property tests of the rewrite on random valid modules from wasm-smith: they stay valid, the
//! NaN checks land exactly where they should, and every loop header and call pays the meter.

use wasmparser::Operator;
use wasmtime::{Engine, Module};

use super::*;

/// The sandbox's own engines: modules are generated for what guests may use and checked
/// against what the sandbox compiles.
fn engines() -> (Engine, Engine) {
    let guest = Engine::new(&super::super::guest_config()).expect("guest engine");
    let sandbox = Engine::new(&super::super::engine_config(None)).expect("engine");
    (guest, sandbox)
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

/// What a module's code holds: operators, places that get a NaN check, loops, calls that may
/// reach a host function (to an import, or indirect), and reads of the meter's memory
/// (`i64.load` from memory `meter`).
#[derive(Debug, Default, PartialEq)]
struct Survey {
    ops: usize,
    /// Scalar checks (before stores and the like) and vector ones (after vector arithmetic).
    scalar_sites: usize,
    vector_sites: usize,
    loops: usize,
    host_calls: usize,
    meter_reads: usize,
    /// Loops whose code begins with the meter's flush: two addresses, then the fuel's load.
    metered_loops: usize,
}

fn survey_code(wasm: &[u8], imported_functions: u32, meter: Option<u32>) -> Survey {
    let mut s = Survey::default();
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::CodeSectionEntry(body) = payload.unwrap() {
            // Instructions since the last `loop`, up to three.
            let mut since_loop: Option<Vec<Operator>> = None;
            for op in body.get_operators_reader().unwrap() {
                let op = op.unwrap();
                if let Some(ops) = since_loop.as_mut() {
                    ops.push(op.clone());
                    if let [
                        Operator::I32Const { value: 0 },
                        Operator::I32Const { value: 0 },
                        Operator::I64Load { memarg },
                    ] = ops.as_slice()
                    {
                        s.metered_loops += usize::from(Some(memarg.memory) == meter);
                    }
                    if ops.len() == 3 {
                        since_loop = None;
                    }
                }
                if matches!(op, Operator::Loop { .. }) {
                    since_loop = Some(Vec::new());
                }
                s.ops += 1;
                s.scalar_sites += usize::from(nan::observes_top(&op).is_some());
                s.vector_sites += usize::from(nan::vector_arithmetic(&op).is_some());
                match op {
                    Operator::Loop { .. } => s.loops += 1,
                    Operator::Call { function_index } if function_index < imported_functions => {
                        s.host_calls += 1
                    }
                    Operator::CallIndirect { .. } | Operator::ReturnCallIndirect { .. } => {
                        s.host_calls += 1
                    }
                    Operator::I64Load { memarg } if Some(memarg.memory) == meter => {
                        s.meter_reads += 1
                    }
                    _ => {}
                }
            }
        }
    }
    s
}

/// Random valid modules from wasm-smith, with their seeds.
fn modules(guest: &Engine) -> impl Iterator<Item = (u64, Vec<u8>)> + '_ {
    (0..300).filter_map(move |seed| {
        let raw = bytes(seed, 8192);
        let mut u = arbitrary::Unstructured::new(&raw);
        let module = wasm_smith::Module::new(smith_config(), &mut u).ok()?;
        let wasm = module.to_bytes();
        Module::validate(guest, &wasm)
            .unwrap_or_else(|e| panic!("seed {seed}: wasm-smith made an invalid module: {e}"));
        Some((seed, wasm))
    })
}

/// With the NaN checks alone, every valid module stays valid and gains exactly one check per
/// place that needs one (eight instructions for a scalar, six for a vector): the rewrite
/// numbers its scratch locals after each function's own, keeps stack types, and copies
/// everything else.
#[test]
fn random_valid_modules_stay_valid_with_one_check_per_observation() {
    let (guest, sandbox) = engines();
    let nan_only = Options {
        nan: true,
        meter: false,
    };
    let (mut count, mut checks) = (0, 0);
    for (seed, wasm) in modules(&guest) {
        let rewritten = rewrite(&wasm, nan_only).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        Module::validate(&sandbox, &rewritten)
            .unwrap_or_else(|e| panic!("seed {seed}: the rewrite broke the module: {e}"));
        let (before, after) = (
            survey_code(&wasm, 0, None),
            survey_code(&rewritten, 0, None),
        );
        let added = 8 * before.scalar_sites + 6 * before.vector_sites;
        assert_eq!(after.ops, before.ops + added, "seed {seed}");
        count += 1;
        checks += before.scalar_sites + before.vector_sites;
    }
    assert!(count >= 250, "only {count} modules generated");
    assert!(checks >= 500, "only {checks} checks in {count} modules");
}

/// With everything on, as the sandbox runs it, every valid module stays valid, and the meter
/// reads its limit at every loop header and before every call that may reach the host (and at
/// each way out of a function, so at least that often).
#[test]
fn random_valid_modules_stay_valid_with_the_meter_at_every_loop_and_call() {
    let (guest, sandbox) = engines();
    let (mut count, mut loops) = (0, 0);
    for (seed, wasm) in modules(&guest) {
        let rewritten =
            rewrite(&wasm, Options::SANDBOX).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        Module::validate(&sandbox, &rewritten)
            .unwrap_or_else(|e| panic!("seed {seed}: the rewrite broke the module: {e}"));
        let survey = Rewriter::survey(&wasm, Options::SANDBOX).unwrap();
        let imports = survey.imported_functions;
        let before = survey_code(&wasm, imports, None);
        let after = survey_code(&rewritten, imports, Some(survey.meter_memory()));
        assert_eq!(after.metered_loops, before.loops, "seed {seed}");
        // Each function also pays at its end.
        assert!(
            after.meter_reads >= before.loops + before.host_calls,
            "seed {seed}: {before:?} -> {after:?}"
        );
        assert_eq!(
            (after.loops, after.host_calls),
            (before.loops, before.host_calls)
        );
        count += 1;
        loops += before.loops;
    }
    assert!(count >= 250, "only {count} modules generated");
    assert!(loops >= 100, "only {loops} loops in {count} modules");
}

#[test]
fn reserved_export_names_are_refused() {
    let wasm = wat::parse_str(
        r#"(module (global (export "__accrete_fuel") i64 (i64.const 1)) (func (export "_start")))"#,
    )
    .unwrap();
    let err = rewrite(&wasm, Options::SANDBOX).unwrap_err().to_string();
    assert!(err.contains("__accrete_fuel"), "{err}");
}
