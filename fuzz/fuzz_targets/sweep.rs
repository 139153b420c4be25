//! Fuzzes sweep specs (cli/src/sweep.rs), TOML and JSON: parsing and expansion never panic,
//! expansion stays under its cap, and every sampled range value lies in its range.
#![no_main]

// Included by path rather than through the accrete CLI crate, whose dependencies include the
// worker's wasmtime; the file depends on accrete-proto, serde, serde_json and toml alone.
#[path = "../../cli/src/sweep.rs"]
#[allow(dead_code)]
mod sweep;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|text: &str| {
    let Ok(spec) = sweep::SweepSpec::parse(text) else {
        return;
    };
    let _ = spec.tolerance_pb();
    let _ = spec.policy.to_pb();
    let _ = spec.bounds.to_pb();
    // Big sweeps are legal but slow to expand; the cap itself is checked before expansion.
    if matches!(spec.sweep, sweep::Search::Random { samples, .. } if samples > 10_000) {
        return;
    }
    let Ok(points) = spec.expand() else {
        return;
    };
    assert!(points.len() <= sweep::MAX_UNITS);
    if let sweep::Search::Random { .. } = spec.sweep {
        for point in &points {
            for (name, p) in &spec.params {
                let Value::Object(range) = p else { continue };
                let (min, max) = (
                    range["min"].as_f64().unwrap(),
                    range["max"].as_f64().unwrap(),
                );
                let v = point[name]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: {} is not a number", point[name]));
                assert!(min <= v && v <= max, "{name}: {v} outside [{min}, {max}]");
            }
        }
    }
});
