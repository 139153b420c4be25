//! Times the signal-search experiment as the worker runs it (the embedded `wasm32-wasip1`
//! module in the real sandbox: fuel metering, NaN canonicalisation, epoch checks) against the
//! same library compiled natively, on the same inputs, and checks that both give the same bytes.
//!
//! Times are the running thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time, so a busy
//! machine does not slow whichever side happened to run while it was busy.
//!
//! `cargo run --release -p accrete-worker --example wasm_vs_native [-- RUNS [MODULE.wasm]]`
//! (MODULE defaults to the embedded signal-search build; pass another build of the same guest,
//! e.g. one with other target features, to compare it.)

use std::time::Duration;

use accrete_worker::sandbox::{Bounds, Outcome, Sandbox, SandboxConfig};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(11);
    let sandbox = Sandbox::new(&SandboxConfig {
        max_concurrent_runs: 1,
        pooling: true,
    })?;
    let wasm = match std::env::args().nth(2) {
        Some(path) => std::fs::read(path)?,
        None => accrete_tasks::SIGNAL_SEARCH.to_vec(),
    };
    let wasm = wasm.as_slice();
    let module = sandbox.compile(*blake3::hash(wasm).as_bytes(), wasm)?;
    let bounds = Bounds {
        fuel: 1_000_000_000_000,
        memory_bytes: 1 << 30,
        output_bytes: 1 << 20,
        wall_ms: 600_000,
    };
    println!(
        "runtime {}; median of {runs} runs each, CPU time of the running thread",
        accrete_worker::RUNTIME
    );
    println!("| n | native | wasm (sandbox) | wasm / native | fuel |");
    println!("| --- | --- | --- | --- | --- |");
    for log2 in [12, 16, 18, 20] {
        let input = format!(r#"{{"n": {}, "seed": 7, "tone_hz": 123.4}}"#, 1u64 << log2);
        let input = input.as_bytes();
        let mut native_out = Vec::new();
        let native = median_of(runs, || {
            let started = cpu_time();
            let out = accrete_guest::execute(input, signal_search::run).expect("native run");
            let elapsed = cpu_time() - started;
            native_out = out;
            elapsed
        });
        let mut fuel = 0;
        let wasm = median_of(runs, || {
            let started = cpu_time();
            let outcome = sandbox.run(&module, input, &bounds, 1);
            let elapsed = cpu_time() - started;
            match outcome {
                Outcome::Success { output, fuel_used } => {
                    assert_eq!(output, native_out, "wasm and native outputs differ");
                    fuel = fuel_used;
                }
                other => panic!("wasm run failed: {other:?}"),
            }
            elapsed
        });
        println!(
            "| 2^{log2} | {:.2} ms | {:.2} ms | {:.2}x | {:.1} M |",
            ms(native),
            ms(wasm),
            wasm.as_secs_f64() / native.as_secs_f64(),
            fuel as f64 / 1e6
        );
    }
    Ok(())
}

fn median_of(n: usize, mut f: impl FnMut() -> Duration) -> Duration {
    f(); // warm-up: page faults and caches, not measured
    let mut times: Vec<Duration> = (0..n).map(|_| f()).collect();
    times.sort();
    times[n / 2]
}

/// CPU time the calling thread has used.
fn cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
