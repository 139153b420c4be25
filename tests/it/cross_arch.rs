//! Cross-architecture validation for real: the worker cross-built for aarch64, run by qemu-user,
//! and the x86_64 worker validate each other on every guest task (and on float and NaN edge
//! cases); outputs and fuel must be bit-identical and equal to the native x86_64 computation.
//!
//! `./scripts/test` installs the cross linker and qemu-user, builds the aarch64 worker and names
//! it in `ACCRETE_AARCH64_WORKER`; without it this test fails rather than passing untested.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::{BINS, count, native_signal_search, native_tiny_model, policy, tiny_model_inputs};
use accrete_tests::{TestApp, v1 as pb};

const AARCH64_WORKER: &str = "ACCRETE_AARCH64_WORKER";
/// Debian's cross libc (libc6-arm64-cross): qemu-user's root for the dynamic loader.
const AARCH64_SYSROOT: &str = "/usr/aarch64-linux-gnu";
/// Emulation is 5-20x slower than native; this bounds the whole study, not one replica.
const XARCH_TIMEOUT: Duration = Duration::from_secs(600);
const UNITS: usize = 6;

fn aarch64_worker() -> String {
    let path = std::env::var(AARCH64_WORKER).unwrap_or_default();
    assert!(
        !path.is_empty(),
        "{AARCH64_WORKER} is not set: run ./scripts/test, which installs the aarch64 cross linker \
         and qemu-user, builds the worker for aarch64-unknown-linux-gnu and sets it"
    );
    assert!(
        std::path::Path::new(&path).is_file(),
        "{AARCH64_WORKER}={path} does not exist: run ./scripts/test to build it"
    );
    path
}

/// The edge-case values of `float_edges.wat`: signed zeros, subnormals, halves (round to even),
/// huge, infinite, and NaNs of both signs with payloads, quiet and signalling.
fn edge_values() -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        2.5,
        -2.5,
        0.1,
        1.0 / 3.0,
        3.0e9,
        1.0e20,
        -1.0e300,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        -1.5e-320,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    for bits in [
        0x7ff8_0000_0000_0000u64,
        0xfff8_0000_0000_0000,
        0x7ff0_0000_0000_0001,
        0xfff8_0000_0000_0abc,
    ] {
        v.push(f64::from_bits(bits));
    }
    v
}

/// Every pair of edge values, split into `UNITS` inputs of little-endian (a, b) pairs.
fn float_edge_inputs() -> Vec<Vec<u8>> {
    let values = edge_values();
    let pairs: Vec<(f64, f64)> = values
        .iter()
        .flat_map(|&a| values.iter().map(move |&b| (a, b)))
        .collect();
    pairs
        .chunks(pairs.len().div_ceil(UNITS))
        .map(|chunk| {
            chunk
                .iter()
                .flat_map(|(a, b)| [a.to_le_bytes(), b.to_le_bytes()].concat())
                .collect()
        })
        .collect()
}

/// WebAssembly semantics with canonical NaNs, as the sandbox promises: any NaN whose bits the
/// guest observes through a scalar float (here, `$f64` reinterprets its parameter) is the
/// positive quiet NaN with an empty payload, whatever made it: x86_64 hardware makes 0/0
/// negative and aarch64 positive, and a negated or loaded NaN keeps its sign and payload until
/// it is observed.
fn c64(x: f64) -> u64 {
    canonical(x).to_bits()
}

fn canonical(x: f64) -> f64 {
    if x.is_nan() {
        f64::from_bits(0x7ff8_0000_0000_0000)
    } else {
        x
    }
}

fn c32(x: f32) -> u64 {
    u64::from(if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() })
}

fn wasm_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if a == b {
        // -0 and +0 compare equal; min picks the negative one.
        f64::from_bits(a.to_bits() | b.to_bits())
    } else {
        a.min(b)
    }
}

fn wasm_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else if a == b {
        f64::from_bits(a.to_bits() & b.to_bits())
    } else {
        a.max(b)
    }
}

/// What `float_edges.wat` must print, computed natively value by value in its order.
fn native_float_edges(input: &[u8]) -> Vec<u8> {
    let mut bits = String::new();
    let pairs = input.len() / 16;
    for pair in input.chunks_exact(16) {
        let a = f64::from_le_bytes(pair[..8].try_into().unwrap());
        let b = f64::from_le_bytes(pair[8..].try_into().unwrap());
        let (a32, b32) = (a as f32, b as f32);
        let demoted_sq = |x: f64| {
            let x = x as f32;
            c32(x * x)
        };
        for value in [
            c64(a + b),
            c64(a - b),
            c64(a * b),
            c64(a / b),
            c64(a.sqrt()),
            c64(wasm_min(a, b)),
            c64(wasm_max(a, b)),
            c64(a.round_ties_even()),
            c64(a.floor()),
            c64(a.ceil()),
            c64(a.trunc()),
            c64(-a),
            // copysign takes the sign of `b` as observed, so of `b` canonicalised.
            c64(a.copysign(canonical(b))),
            c64(f64::from(a32)),
            c32(a32 / b32),
            c32(b32.sqrt()),
            a as i64 as u64,
            u64::from(b32 as u32),
            c64(c64(a) as i64 as f64),
            c64((a + b) * (a - b)),
            c64(a / b),
            c64(b / a),
            c64(wasm_min(a, b)),
            c64(wasm_min(b, a)),
            c64(b.sqrt()),
            demoted_sq(a),
            demoted_sq(b),
            c64(a * b + b),
            c64(b * a + a),
            c64(a / b),
        ] {
            bits.push_str(&format!("{value:016x}"));
        }
    }
    format!(r#"{{"metrics":{{"pairs":{pairs}}},"bits":"{bits}"}}"#).into_bytes()
}

/// A guest task, its inputs, and the same computation done natively.
struct Task<'a> {
    name: &'a str,
    wasm: &'a [u8],
    inputs: Vec<Vec<u8>>,
    native: fn(&[u8]) -> Vec<u8>,
}

fn signal_search_inputs() -> Vec<Vec<u8>> {
    (0..UNITS)
        .map(|i| {
            let tone = if i % 2 == 0 {
                serde_json::json!(40.0 + i as f64 * 13.0)
            } else {
                serde_json::Value::Null
            };
            let n = [1024, 2048, 4096][i % 3];
            serde_json::json!({ "seed": i, "n": n, "tone_hz": tone, "amplitude": 0.4 })
                .to_string()
                .into_bytes()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aarch64_worker_and_an_x86_64_worker_agree_bit_for_bit_on_every_task() {
    let arm = aarch64_worker();
    let mut app = TestApp::spawn().await;
    // Two workers only: a work unit never goes twice to one worker, so with a quorum of 2 each
    // one runs on both platforms.
    app.start_worker_command(
        "qemu-aarch64",
        &["-L", AARCH64_SYSROOT, &arm],
        "aarch64-under-qemu",
        2,
    );
    app.start_worker_process(&BINS, "x86_64-native", 2);

    let float_wasm = wat::parse_str(include_str!("float_edges.wat")).unwrap();
    let p = pb::ReplicationPolicy {
        // The emulated worker holds its prefetched replicas longer than a native one would.
        delay_bound_secs: 900,
        ..policy(2)
    };
    let b = pb::ResourceBounds {
        wall_ms: 600_000,
        ..pb::ResourceBounds::default()
    };
    let tasks = [
        Task {
            name: "signal-search",
            wasm: accrete_tasks::SIGNAL_SEARCH,
            inputs: signal_search_inputs(),
            native: native_signal_search,
        },
        Task {
            name: "tiny-model",
            wasm: accrete_tasks::TINY_MODEL,
            inputs: tiny_model_inputs(UNITS, 60),
            native: native_tiny_model,
        },
        Task {
            name: "float-edges",
            wasm: &float_wasm,
            inputs: float_edge_inputs(),
            native: native_float_edges,
        },
    ];
    let mut studies = Vec::new();
    for t in &tasks {
        assert_eq!(t.inputs.len(), UNITS);
        studies.push(app.submit(t.wasm, t.inputs.clone(), p, b).await);
    }

    let both: BTreeSet<&str> = ["aarch64/linux", "x86_64/linux"].into();
    for (
        Task {
            name: task,
            inputs,
            native,
            ..
        },
        study,
    ) in tasks.iter().zip(&studies)
    {
        let status = app.wait_done(study.study_id, XARCH_TIMEOUT).await;
        assert_eq!(
            (status.validated, status.failed),
            (UNITS as u64, 0),
            "{task}: {status:?}"
        );
        let findings = app.findings(study.study_id).await;
        assert_eq!(findings.len(), UNITS, "{task}");
        for f in &findings {
            let idx = study
                .work_unit_ids
                .iter()
                .position(|&id| id == f.work_unit_id)
                .unwrap();
            let expected = native(&inputs[idx]);
            assert!(
                f.output == expected,
                "{task} work unit {idx}: the agreed output differs from the native x86_64 run:\n\
                 agreed: {}\nnative: {}",
                String::from_utf8_lossy(&f.output),
                String::from_utf8_lossy(&expected)
            );
            let platforms: BTreeSet<&str> =
                f.agreeing.iter().map(|a| a.platform.as_str()).collect();
            assert_eq!(f.agreeing.len(), 2, "{task}: {f:?}");
            assert_eq!(platforms, both, "{task}: agreeing platforms");
            assert_eq!(f.dissenting, 0, "{task}: {f:?}");
            assert_eq!(
                f.agreeing[0].fuel_used, f.agreeing[1].fuel_used,
                "{task}: fuel differs between platforms"
            );
            assert!(f.agreeing[0].fuel_used > 0);
        }
    }
    // The edge cases include fresh NaNs (0/0, inf-inf): both platforms printed the canonical one.
    let canonical_nan = format!("{:016x}", 0x7ff8_0000_0000_0000u64);
    let edges = app.findings(studies[2].study_id).await;
    assert!(
        edges
            .iter()
            .all(|f| String::from_utf8_lossy(&f.output).contains(&canonical_nan))
    );
    // Every replica issued succeeded and was valid: nothing was retried or outvoted.
    assert_eq!(
        count(&app, "SELECT count(*) FROM replicas").await,
        (2 * UNITS * tasks.len()) as i64
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM replicas WHERE state <> 'success' OR validate_state <> 'valid'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM workers WHERE arch = 'aarch64' AND os = 'linux'"
        )
        .await,
        1,
        "the emulated worker reports its platform as aarch64"
    );
    app.shutdown().await;
}
