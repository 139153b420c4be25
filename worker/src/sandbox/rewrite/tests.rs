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
    /// Scalar checks (before stores and the like, and before the scalars entering a vector
    /// that `nan::vector_checks` follows out to an observation), vector arithmetic, and the
    /// vector results it follows out to one (each gets a check after it).
    scalar_sites: usize,
    vector_sites: usize,
    vector_checks: usize,
    /// Scalars entering a vector, and those of them checked.
    lanes_entering: usize,
    lane_checks: usize,
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
            let checks = nan::vector_checks(body.get_operators_reader().unwrap()).unwrap();
            // Instructions since the last `loop`, up to three.
            let mut since_loop: Option<Vec<Operator>> = None;
            for (op, check) in body.get_operators_reader().unwrap().into_iter().zip(checks) {
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
                let enters_vector = nan::enters_vector(&op).is_some();
                s.scalar_sites +=
                    usize::from(nan::observes_top(&op).is_some() && (!enters_vector || check));
                s.lanes_entering += usize::from(enters_vector);
                s.lane_checks += usize::from(enters_vector && check);
                s.vector_sites += usize::from(nan::vector_arithmetic(&op).is_some());
                s.vector_checks += usize::from(check && nan::vector_arithmetic(&op).is_some());
                assert!(
                    !check || enters_vector || nan::vector_arithmetic(&op).is_some(),
                    "a vector check at {op:?}"
                );
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
/// place that needs one (eight instructions for a scalar, six for a vector result that leaves
/// arithmetic): the rewrite numbers its scratch locals after each function's own, keeps stack
/// types, and copies everything else.
#[test]
fn random_valid_modules_stay_valid_with_one_check_per_observation() {
    let (guest, sandbox) = engines();
    let nan_only = Options {
        nan: true,
        meter: false,
    };
    let (mut count, mut checks) = (0, 0);
    let (mut vector_sites, mut vector_checks, mut lanes, mut lane_checks) = (0, 0, 0, 0);
    for (seed, wasm) in modules(&guest) {
        let rewritten = rewrite(&wasm, nan_only).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        Module::validate(&sandbox, &rewritten)
            .unwrap_or_else(|e| panic!("seed {seed}: the rewrite broke the module: {e}"));
        let (before, after) = (
            survey_code(&wasm, 0, None),
            survey_code(&rewritten, 0, None),
        );
        assert!(before.vector_checks <= before.vector_sites, "seed {seed}");
        let added = 8 * before.scalar_sites + 6 * before.vector_checks;
        assert_eq!(after.ops, before.ops + added, "seed {seed}");
        count += 1;
        checks += before.scalar_sites + before.vector_checks;
        vector_sites += before.vector_sites;
        vector_checks += before.vector_checks;
        lanes += before.lanes_entering;
        lane_checks += before.lane_checks;
    }
    assert!(count >= 250, "only {count} modules generated");
    assert!(checks >= 500, "only {checks} checks in {count} modules");
    // Random code rarely feeds one vector result straight into more arithmetic of its shape,
    // but it does often enough to see both outcomes, for results and for lanes entering.
    assert!(
        vector_checks > 0 && vector_checks < vector_sites,
        "{vector_checks} of {vector_sites} vector results checked"
    );
    assert!(
        lane_checks > 0 && lane_checks < lanes,
        "{lane_checks} of {lanes} scalars entering a vector checked"
    );
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

/// Which vector results get a check, in the shape of an FFT butterfly: products feeding sums
/// on the stack and through locals need none, a sum that is stored or leaves through a local
/// that is read after a branch or a branch target does, and so does a result read as another
/// lane shape or as integer lanes. A loop's temporary that dies at the back edge needs none.
/// A scalar entering a vector is checked where the vector is, not where it enters.
#[test]
fn vector_results_are_checked_where_they_leave_arithmetic_of_their_shape() {
    let wasm = wat::parse_str(
        r#"(module (memory 1)
             (func (param $a v128) (param $b v128) (param $w v128) (local $t v128) (local $u v128)
               ;; t = b * w (through a local: no check), stored a + t and a - t (checks)
               (local.set $t (f64x2.mul (local.get $b) (local.get $w)))
               (v128.store (i32.const 0) (f64x2.add (local.get $a) (local.get $t)))
               (v128.store (i32.const 16) (f64x2.sub (local.get $a) (local.get $t)))
               ;; compared, extracted, dropped: no checks
               (drop (f64x2.lt (f64x2.sqrt (local.get $a)) (local.get $b)))
               (drop (f64x2.extract_lane 1 (f64x2.div (local.get $a) (local.get $b))))
               (drop (f64x2.min (local.get $a) (local.get $b)))
               ;; another shape, integer lanes, a value still in a local at a block: checks
               (drop (f32x4.add (f64x2.max (local.get $a) (local.get $b)) (local.get $w)))
               (drop (i64x2.add (f64x2.ceil (local.get $a)) (local.get $w)))
               (local.set $t (f64x2.floor (local.get $a)))
               (block)
               (v128.store (i32.const 32) (local.get $t))
               ;; read on the path that skips the `then`, which writes the local again: checks
               (local.set $t (f64x2.nearest (local.get $a)))
               (if (i32.const 0)
                 (then (local.set $t (f64x2.trunc (local.get $a))))
                 (else (v128.store (i32.const 48) (local.get $t))))
               ;; a loop's temporary, written before it is read in the body: no check for it;
               ;; a value the next iteration reads before writing it: a check
               (loop
                 (local.set $u (f64x2.mul (local.get $a) (local.get $b)))
                 (v128.store (i32.const 64) (f64x2.add (local.get $u) (local.get $u)))
                 (v128.store (i32.const 80) (local.get $w))
                 (local.set $w (f64x2.div (local.get $a) (local.get $b)))
                 (br_if 0 (i32.const 0)))
               ;; scalars entering a vector that is stored (the splat's lane passes through
               ;; replace_lane): checks; one that only feeds arithmetic: none
               (v128.store (i32.const 96)
                 (f64x2.replace_lane 1 (f64x2.splat (f64.load (i32.const 0)))
                                       (f64.load (i32.const 8))))
               (drop (f64x2.mul (f64x2.splat (f64.load (i32.const 0))) (local.get $a)))))"#,
    )
    .unwrap();
    let mut checked = Vec::new();
    for payload in Parser::new(0).parse_all(&wasm) {
        if let Payload::CodeSectionEntry(body) = payload.unwrap() {
            let ops: Vec<_> = body
                .get_operators_reader()
                .unwrap()
                .into_iter()
                .map(Result::unwrap)
                .collect();
            let checks = nan::vector_checks(body.get_operators_reader().unwrap()).unwrap();
            for (op, check) in ops.iter().zip(checks) {
                if nan::vector_arithmetic(op).is_some() || nan::enters_vector(op).is_some() {
                    checked.push((format!("{op:?}"), check));
                } else {
                    assert!(!check, "{op:?} makes no vector");
                }
            }
        }
    }
    let expect = [
        ("F64x2Mul", false),
        ("F64x2Add", true),
        ("F64x2Sub", true),
        ("F64x2Sqrt", false),
        ("F64x2Div", false),
        ("F64x2Min", false),
        ("F64x2Max", true),
        ("F32x4Add", false),
        ("F64x2Ceil", true),
        ("F64x2Floor", true),
        ("F64x2Nearest", true),
        ("F64x2Trunc", true),
        ("F64x2Mul", false),
        ("F64x2Add", true),
        ("F64x2Div", true),
        ("F64x2Splat", true),
        ("F64x2ReplaceLane { lane: 1 }", true),
        ("F64x2Splat", false),
        ("F64x2Mul", false),
    ];
    let expect: Vec<_> = expect.iter().map(|&(op, c)| (op.to_string(), c)).collect();
    assert_eq!(checked, expect);
}
