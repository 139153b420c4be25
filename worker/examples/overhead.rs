//! Measures the sandbox's fixed costs: compiling a small module, and running an empty `_start`
//! from a cached module (fresh `Store`, WASI context and instance each time), with the pooling
//! and the on-demand instance allocator.
//!
//! `cargo run --release -p accrete-worker --example overhead [-- GUEST.wasm [INPUT]]` also
//! compiles GUEST.wasm and runs it on INPUT (a file, or `{}`) a few times, checking that every
//! run gives the same output and fuel.

use std::time::{Duration, Instant};

use accrete_worker::sandbox::{Bounds, CompiledModule, Outcome, Sandbox, SandboxConfig};

const EMPTY: &str = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;

const ECHO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const 1024))
    (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 4) (i32.load (i32.const 8)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pooled = Sandbox::new(&SandboxConfig {
        max_concurrent_runs: 2,
        pooling: true,
    })?;
    let on_demand = Sandbox::new(&SandboxConfig {
        max_concurrent_runs: 2,
        pooling: false,
    })?;
    println!(
        "runtime {}; pooling allocator active: {}",
        accrete_worker::RUNTIME,
        pooled.is_pooling()
    );

    let echo = wat::parse_str(ECHO)?;
    let compile = median_of(20, |i| {
        let wasm = with_custom_section(&echo, i);
        let started = Instant::now();
        pooled
            .compile(*blake3::hash(&wasm).as_bytes(), &wasm)
            .expect("compiles");
        started.elapsed()
    });
    println!(
        "compile echo module ({} bytes): median {:.2} ms",
        echo.len(),
        ms(compile)
    );

    let empty = wat::parse_str(EMPTY)?;
    let bounds = Bounds {
        fuel: 1_000_000,
        memory_bytes: 1 << 20,
        output_bytes: 4096,
        wall_ms: 10_000,
    };
    for (name, sandbox) in [("pooling", &pooled), ("on-demand", &on_demand)] {
        let module = compile_once(sandbox, &empty);
        let (median, p99) = run_many(sandbox, &module, b"", &bounds, 10_000);
        println!(
            "empty _start, {name}: median {:.2} µs, p99 {:.2} µs (10k runs)",
            us(median),
            us(p99)
        );
        let module = compile_once(sandbox, &echo);
        let input = br#"{"metrics":{"x":1}}"#;
        let (median, p99) = run_many(sandbox, &module, input, &bounds, 10_000);
        println!(
            "echo stdin→stdout, {name}: median {:.2} µs, p99 {:.2} µs (10k runs)",
            us(median),
            us(p99)
        );
    }

    if let Some(path) = args.first() {
        let wasm = std::fs::read(path)?;
        let input = match args.get(1) {
            Some(p) if std::path::Path::new(p).exists() => std::fs::read(p)?,
            Some(text) => text.clone().into_bytes(),
            None => b"{}".to_vec(),
        };
        let compile = median_of(5, |i| {
            let wasm = with_custom_section(&wasm, 1000 + i);
            let started = Instant::now();
            pooled
                .compile(*blake3::hash(&wasm).as_bytes(), &wasm)
                .expect("compiles");
            started.elapsed()
        });
        println!(
            "compile {path} ({} bytes): median {:.2} ms",
            wasm.len(),
            ms(compile)
        );
        let module = compile_once(&pooled, &wasm);
        let bounds = Bounds::DEFAULT;
        let mut first: Option<Outcome> = None;
        let wall = median_of(10, |_| {
            let started = Instant::now();
            let outcome = pooled.run(&module, &input, &bounds, 42);
            let elapsed = started.elapsed();
            match &first {
                None => first = Some(outcome),
                Some(f) => assert_eq!(f, &outcome, "runs differ"),
            }
            elapsed
        });
        match first.expect("ran") {
            Outcome::Success { output, fuel_used } => println!(
                "run {path}: success, fuel {fuel_used}, median {:.3} ms, 10 identical runs; output {}",
                ms(wall),
                String::from_utf8_lossy(&output[..output.len().min(200)])
            ),
            other => println!("run {path}: {other:?}"),
        }
    }
    Ok(())
}

fn compile_once(sandbox: &Sandbox, wasm: &[u8]) -> CompiledModule {
    sandbox
        .compile(*blake3::hash(wasm).as_bytes(), wasm)
        .expect("compiles")
}

fn run_many(
    sandbox: &Sandbox,
    module: &CompiledModule,
    input: &[u8],
    bounds: &Bounds,
    n: usize,
) -> (Duration, Duration) {
    for _ in 0..200 {
        sandbox.run(module, input, bounds, 1);
    }
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let outcome = sandbox.run(module, input, bounds, 1);
            let elapsed = started.elapsed();
            assert!(!matches!(outcome, Outcome::Cancelled));
            elapsed
        })
        .collect();
    times.sort();
    (times[n / 2], times[n * 99 / 100])
}

fn median_of(n: usize, mut f: impl FnMut(usize) -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..n).map(&mut f).collect();
    times.sort();
    times[n / 2]
}

/// `wasm` with a custom section appended: a different hash (so not a cache hit), same code.
fn with_custom_section(wasm: &[u8], i: usize) -> Vec<u8> {
    let name = b"nonce";
    let payload = i.to_le_bytes();
    let size = 1 + name.len() + payload.len();
    let mut out = wasm.to_vec();
    out.extend([0u8, size as u8, name.len() as u8]);
    out.extend(name);
    out.extend(payload);
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
