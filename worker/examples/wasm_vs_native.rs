//! Times the signal-search experiment as the worker runs it (the embedded `wasm32-wasip1`
//! module in the real sandbox: the fuel meter, NaN canonicalisation, the watchdog) against the
//! same library compiled natively, on the same inputs, and checks that both give the same bytes.
//!
//! Times are the running thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time. Native and
//! wasm runs alternate, and the ratio printed is the median of each pair's ratio: on a shared
//! virtual machine the CPU's speed drifts by tens of percent over seconds, and a pair sees the
//! same drift on both sides.
//!
//! `cargo run --release -p accrete-worker --example wasm_vs_native [-- RUNS [MODULE.wasm
//! [LOG2,...]]]` (MODULE defaults to the embedded signal-search build, `-` names it; pass another
//! build of the same guest, e.g. one with other target features, to compare it. LOG2 lists the
//! sizes, default `12,16,18,20`: small ones such as `4,8` show the fixed cost of a run.)

use std::time::Duration;

use accrete_worker::sandbox::{Bounds, Outcome, Sandbox, SandboxConfig};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(11)
        .max(1);
    let sandbox = Sandbox::new(&SandboxConfig {
        max_concurrent_runs: 1,
        pooling: true,
    })?;
    let wasm = match std::env::args().nth(2) {
        Some(path) if path != "-" => std::fs::read(path)?,
        _ => accrete_tasks::SIGNAL_SEARCH.to_vec(),
    };
    let sizes: Vec<u32> = match std::env::args().nth(3) {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        None => vec![12, 16, 18, 20],
    };
    if let Some(bad) = sizes.iter().find(|&&log2| !(4..=20).contains(&log2)) {
        anyhow::bail!("LOG2 {bad} is outside signal-search's sizes, 2^4 to 2^20");
    }
    let wasm = wasm.as_slice();
    let module = sandbox.compile(*blake3::hash(wasm).as_bytes(), wasm)?;
    let bounds = Bounds {
        fuel: 1_000_000_000_000,
        memory_bytes: 1 << 30,
        output_bytes: 1 << 20,
        wall_ms: 600_000,
    };
    println!(
        "runtime {}; {runs} alternating native/wasm pairs per n, CPU time of the running thread",
        accrete_worker::RUNTIME
    );
    println!(
        "| n | native (median) | wasm (median) | wasm / native (median of pairs) | middle half of pairs | fuel |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for log2 in sizes {
        let input = format!(r#"{{"n": {}, "seed": 7, "tone_hz": 123.4}}"#, 1u64 << log2);
        let input = input.as_bytes();
        let native_run = || {
            let started = cpu_time();
            let out = accrete_guest::execute(input, signal_search::run).expect("native run");
            (cpu_time() - started, out)
        };
        let wasm_run = || {
            let started = cpu_time();
            let outcome = sandbox.run(&module, input, &bounds, 1);
            let elapsed = cpu_time() - started;
            match outcome {
                Outcome::Success { output, fuel_used } => (elapsed, output, fuel_used),
                other => panic!("wasm run failed: {other:?}"),
            }
        };
        // Warm-up, not measured: page faults, caches, the allocator's first growth.
        let (_, expected) = native_run();
        let (_, output, fuel) = wasm_run();
        assert_eq!(output, expected, "wasm and native outputs differ");
        let mut native = Vec::with_capacity(runs);
        let mut wasm = Vec::with_capacity(runs);
        let mut ratios = Vec::with_capacity(runs);
        for _ in 0..runs {
            let (n, _) = native_run();
            let (w, output, used) = wasm_run();
            assert_eq!(output, expected, "wasm and native outputs differ");
            assert_eq!(used, fuel, "fuel differs between runs of the same input");
            native.push(n);
            wasm.push(w);
            ratios.push(w.as_secs_f64() / n.as_secs_f64());
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "| 2^{log2} | {:.2} ms | {:.2} ms | {:.2}x | {:.2}-{:.2}x | {:.1} M |",
            ms(median(&mut native)),
            ms(median(&mut wasm)),
            ratios[runs / 2],
            ratios[runs / 4],
            ratios[(3 * runs) / 4],
            fuel as f64 / 1e6
        );
    }
    Ok(())
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
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
