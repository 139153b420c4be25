//! Sandbox tests: each failure kind from a small hand-written WAT guest, the virtual clock and
//! seeded randomness, the absence of a filesystem, and determinism of output and fuel.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::*;

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        Sandbox::new(&SandboxConfig {
            max_concurrent_runs: 8,
            pooling: true,
        })
        .expect("sandbox")
    })
}

/// Compiles a guest whose body is `body`, with helpers to write to stdout/stderr and print a u64
/// in decimal. Memory: 0..8 iovec, 8 nwritten, 16..40 digits, 48..64 scratch, 64.. `data`.
fn guest(data: &str, body: &str) -> CompiledModule {
    let wat = format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get" (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{data}")
  (func $write_fd (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $write (param $ptr i32) (param $len i32)
    (call $write_fd (i32.const 1) (local.get $ptr) (local.get $len)))
  (func $write_u64 (param $v i64) (local $p i32)
    (local.set $p (i32.const 40))
    (loop $digits
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i64.store8 (local.get $p) (i64.add (i64.const 48) (i64.rem_u (local.get $v) (i64.const 10))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digits (i64.ne (local.get $v) (i64.const 0))))
    (call $write (local.get $p) (i32.sub (i32.const 40) (local.get $p))))
  (func (export "_start") {body}))"#
    );
    compile_wat(&wat)
}

fn compile_wat(wat: &str) -> CompiledModule {
    let wasm = wat::parse_str(wat).expect("valid WAT");
    sandbox()
        .compile(*blake3::hash(&wasm).as_bytes(), &wasm)
        .expect("compiles")
}

/// A guest printing `{"metrics":{"a":A,"b":B}}` where A and B are u64 expressions in `body`.
fn metrics_guest(prelude: &str, a: &str, b: &str) -> CompiledModule {
    // data: 64..80 `{"metrics":{"a":`, 80..85 `,"b":`, 85..87 `}}`
    guest(
        r#"{\"metrics\":{\"a\":,\"b\":}}"#,
        &format!(
            "{prelude}
            (call $write (i32.const 64) (i32.const 16))
            (call $write_u64 {a})
            (call $write (i32.const 80) (i32.const 5))
            (call $write_u64 {b})
            (call $write (i32.const 85) (i32.const 2))"
        ),
    )
}

fn small() -> Bounds {
    Bounds {
        fuel: 10_000_000,
        memory_bytes: 1 << 20,
        output_bytes: 4096,
        wall_ms: 10_000,
    }
}

fn failure(outcome: &Outcome) -> (FailureKind, &str) {
    match outcome {
        Outcome::Failure { kind, message, .. } => (*kind, message),
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn output(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Success { output, .. } => String::from_utf8(output.clone()).unwrap(),
        other => panic!("expected success, got {other:?}"),
    }
}

#[test]
fn success_with_metrics() {
    let m = metrics_guest("", "(i64.const 7)", "(i64.const 42)");
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(output(&outcome), r#"{"metrics":{"a":7,"b":42}}"#);
    assert!(outcome.fuel_used() > 0);
}

#[test]
fn input_arrives_on_stdin() {
    // Reads up to 32 bytes of stdin into 48.. and echoes them to stdout.
    let m = guest(
        "",
        "(i32.store (i32.const 0) (i32.const 128)) (i32.store (i32.const 4) (i32.const 32))
         (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
         (call $write (i32.const 128) (i32.load (i32.const 8)))",
    );
    let input = br#"{"metrics":{"echo":1}}"#;
    let outcome = sandbox().run(&m, input, &small(), 1);
    assert_eq!(output(&outcome).as_bytes(), input);
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    let m = guest("", "(loop $forever (br $forever))");
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutOfFuel);
    assert_eq!(outcome.fuel_used(), small().fuel);
}

#[test]
fn growing_memory_forever_is_out_of_memory() {
    let m = guest(
        "",
        "(loop $grow
           (br_if $grow (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
         unreachable",
    );
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutOfMemory, "{outcome:?}");
}

#[test]
fn initial_memory_above_the_limit_is_out_of_memory() {
    let m = compile_wat(r#"(module (memory 100) (func (export "_start")))"#);
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutOfMemory, "{outcome:?}");
}

#[test]
fn flooding_stdout_is_output_too_large() {
    let m = guest(
        "0123456789abcdef",
        "(loop $flood (call $write (i32.const 64) (i32.const 16)) (br $flood))",
    );
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(
        failure(&outcome).0,
        FailureKind::OutputTooLarge,
        "{outcome:?}"
    );
    // Stopped at the first write past the limit, long before the fuel ran out.
    assert!(outcome.fuel_used() < small().fuel / 10);
}

#[test]
fn output_exactly_at_the_limit_is_fine() {
    let json = br#"{"metrics":{"x":1}}"#;
    let m = guest(
        r#"{\"metrics\":{\"x\":1}}"#,
        "(call $write (i32.const 64) (i32.const 19))",
    );
    let bounds = Bounds {
        output_bytes: json.len() as u64,
        ..small()
    };
    assert_eq!(output(&sandbox().run(&m, b"", &bounds, 1)).as_bytes(), json);
    let bounds = Bounds {
        output_bytes: json.len() as u64 - 1,
        ..small()
    };
    let outcome = sandbox().run(&m, b"", &bounds, 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutputTooLarge);
}

#[test]
fn flooding_stderr_is_harmless() {
    let m = guest(
        r#"{\"metrics\":{\"x\":1}}"#,
        "(local $i i32)
         (loop $chatter
           (call $write_fd (i32.const 2) (i32.const 64) (i32.const 19))
           (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if $chatter (i32.lt_u (local.get $i) (i32.const 10000))))
         (call $write (i32.const 64) (i32.const 19))",
    );
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(output(&outcome), r#"{"metrics":{"x":1}}"#);
}

#[test]
fn non_json_output_is_bad_output() {
    let m = guest("hello", "(call $write (i32.const 64) (i32.const 5))");
    let outcome = sandbox().run(&m, b"", &small(), 1);
    let (kind, message) = failure(&outcome);
    assert_eq!(kind, FailureKind::BadOutput);
    assert!(message.contains("JSON"), "{message}");
}

#[test]
fn unreachable_is_a_trap_with_stderr_in_the_message() {
    let m = guest(
        "boom",
        "(call $write_fd (i32.const 2) (i32.const 64) (i32.const 4)) unreachable",
    );
    let outcome = sandbox().run(&m, b"", &small(), 1);
    let (kind, message) = failure(&outcome);
    assert_eq!(kind, FailureKind::Trap);
    assert!(message.contains("unreachable"), "{message}");
    assert!(message.contains("boom"), "{message}");
}

#[test]
fn nonzero_exit_is_a_trap_and_zero_exit_is_success() {
    let m = guest("", "(call $proc_exit (i32.const 3))");
    let outcome = sandbox().run(&m, b"", &small(), 1);
    let (kind, message) = failure(&outcome);
    assert_eq!(kind, FailureKind::Trap);
    assert!(message.contains("exited with code 3"), "{message}");

    let m = guest(
        r#"{\"metrics\":{\"x\":1}}"#,
        "(call $write (i32.const 64) (i32.const 19)) (call $proc_exit (i32.const 0))",
    );
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        r#"{"metrics":{"x":1}}"#
    );
}

/// With fuel for ever, a 30 ms backstop must stop `m`, and soon.
fn assert_stops_at_the_backstop(m: &CompiledModule) {
    let bounds = Bounds {
        fuel: u64::MAX / 2,
        wall_ms: 30,
        ..small()
    };
    let started = Instant::now();
    let outcome = sandbox().run(m, b"", &bounds, 1);
    assert_eq!(failure(&outcome).0, FailureKind::WallTimeout, "{outcome:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn wall_clock_backstop_stops_a_loop_with_endless_fuel() {
    assert_stops_at_the_backstop(&guest("", "(loop $forever (br $forever))"));
}

#[test]
fn cancel_stops_a_run() {
    let m = guest("", "(loop $forever (br $forever))");
    let bounds = Bounds {
        fuel: u64::MAX / 2,
        ..small()
    };
    let cancel = Cancel::new();
    let started = Instant::now();
    let outcome = std::thread::scope(|s| {
        let run = s.spawn(|| sandbox().run_cancellable(&m, b"", &bounds, 1, &cancel));
        std::thread::sleep(Duration::from_millis(30));
        cancel.cancel();
        run.join().unwrap()
    });
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Prints realtime and monotonic clock readings.
fn clock_guest() -> CompiledModule {
    metrics_guest(
        "(drop (call $clock_time_get (i32.const 0) (i64.const 1) (i32.const 48)))
         (drop (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 56)))",
        "(i64.load (i32.const 48))",
        "(i64.load (i32.const 56))",
    )
}

#[test]
fn clocks_are_virtual_and_identical_across_runs() {
    let m = clock_guest();
    let first = output(&sandbox().run(&m, b"", &small(), 1));
    std::thread::sleep(Duration::from_millis(5));
    let second = output(&sandbox().run(&m, b"", &small(), 2));
    assert_eq!(first, second);
    let wall = WALL_CLOCK_ORIGIN.as_nanos() as u64 + CLOCK_TICK_NANOS;
    let mono = 2 * CLOCK_TICK_NANOS;
    assert_eq!(first, format!(r#"{{"metrics":{{"a":{wall},"b":{mono}}}}}"#));
}

#[test]
fn sleeping_advances_virtual_time_without_waiting() {
    // One relative monotonic-clock subscription of an hour at 128, event out at 192.
    let hour: u64 = 3600 * 1_000_000_000;
    let m = metrics_guest(
        &format!(
            "(i64.store (i32.const 128) (i64.const 99))
             (i32.store8 (i32.const 136) (i32.const 0))
             (i32.store (i32.const 144) (i32.const 1))
             (i64.store (i32.const 152) (i64.const {hour}))
             (i64.store (i32.const 160) (i64.const 0))
             (i32.store16 (i32.const 168) (i32.const 0))
             (drop (call $poll_oneoff (i32.const 128) (i32.const 192) (i32.const 1) (i32.const 48)))
             (drop (call $clock_time_get (i32.const 1) (i64.const 1) (i32.const 56)))"
        ),
        "(i64.add (i64.load (i32.const 192)) (i64.extend_i32_u (i32.load (i32.const 48))))",
        "(i64.load (i32.const 56))",
    );
    let started = Instant::now();
    let text = output(&sandbox().run(&m, b"", &small(), 1));
    assert!(started.elapsed() < Duration::from_secs(1));
    // userdata 99 + one event; the clock reads an hour plus one tick.
    let after = hour + CLOCK_TICK_NANOS;
    assert_eq!(text, format!(r#"{{"metrics":{{"a":100,"b":{after}}}}}"#));
}

/// Prints two u64s from `random_get`.
fn random_guest() -> CompiledModule {
    metrics_guest(
        "(drop (call $random_get (i32.const 48) (i32.const 16)))",
        "(i64.load (i32.const 48))",
        "(i64.load (i32.const 56))",
    )
}

#[test]
fn randomness_follows_the_seed() {
    let m = random_guest();
    let a = output(&sandbox().run(&m, b"", &small(), 7));
    let b = output(&sandbox().run(&m, b"", &small(), 7));
    let c = output(&sandbox().run(&m, b"", &small(), 8));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn there_is_no_filesystem() {
    // fd 3 would be the first preopen; path_open on it must fail too. Both return EBADF (8).
    let m = metrics_guest(
        "(i32.store (i32.const 48) (call $fd_prestat_get (i32.const 3) (i32.const 96)))
         (i32.store (i32.const 56) (call $path_open (i32.const 3) (i32.const 0) (i32.const 64)
            (i32.const 1) (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 96)))",
        "(i64.load32_u (i32.const 48))",
        "(i64.load32_u (i32.const 56))",
    );
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        r#"{"metrics":{"a":8,"b":8}}"#
    );
}

#[test]
fn same_run_twice_gives_same_bytes_and_fuel() {
    // Some arithmetic, a float NaN's bits, the clock and randomness, all in one output.
    let m = metrics_guest(
        "(local $i i64) (local $acc i64)
         (loop $l
           (local.set $acc (i64.add (i64.mul (local.get $acc) (i64.const 31)) (local.get $i)))
           (local.set $i (i64.add (local.get $i) (i64.const 1)))
           (br_if $l (i64.lt_u (local.get $i) (i64.const 10000))))
         (drop (call $random_get (i32.const 48) (i32.const 8)))
         (i64.store (i32.const 56)
           (i64.xor (i64.reinterpret_f64 (f64.div (f64.const 0) (f64.const 0)))
                    (local.get $acc)))",
        "(i64.load (i32.const 48))",
        "(i64.load (i32.const 56))",
    );
    let first = sandbox().run(&m, b"", &small(), 5);
    let second = sandbox().run(&m, b"", &small(), 5);
    assert!(matches!(first, Outcome::Success { .. }), "{first:?}");
    assert_eq!(first, second);
}

#[test]
fn nan_is_canonical() {
    let m = metrics_guest(
        "",
        "(i64.reinterpret_f64 (f64.div (f64.const 0) (f64.const 0)))",
        "(i64.extend_i32_u (i32.reinterpret_f32 (f32.sqrt (f32.const -1))))",
    );
    let canonical_f64 = 0x7ff8_0000_0000_0000u64;
    let canonical_f32 = 0x7fc0_0000u64;
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        format!(r#"{{"metrics":{{"a":{canonical_f64},"b":{canonical_f32}}}}}"#)
    );
}

/// A NaN with a payload: x86_64 arithmetic passes the payload on (0x7ff8...0abc), so without
/// canonicalisation these tests would see it, or its sign, in every observation below.
const PAYLOAD_NAN: &str = "(f64.reinterpret_i64 (i64.const 0x7ff8000000000abc))";
const CANONICAL_F64: u64 = 0x7ff8_0000_0000_0000;

#[test]
fn a_nan_is_canonical_when_stored_or_reinterpreted_whatever_made_it() {
    // Stored from arithmetic (the payload propagates on x86_64), and reinterpreted after a
    // negation (which only flips the sign, on any host).
    let m = metrics_guest(
        &format!("(f64.store (i32.const 48) (f64.add {PAYLOAD_NAN} (f64.const 1)))"),
        "(i64.load (i32.const 48))",
        &format!("(i64.reinterpret_f64 (f64.neg {PAYLOAD_NAN}))"),
    );
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        format!(r#"{{"metrics":{{"a":{CANONICAL_F64},"b":{CANONICAL_F64}}}}}"#)
    );
}

#[test]
fn a_nan_is_canonical_as_a_sign_and_as_f32() {
    // copysign(1, -NaN) would be -1.0; an f32 NaN from arithmetic, stored.
    let m = metrics_guest(
        "(f32.store (i32.const 48)
           (f32.mul (f32.reinterpret_i32 (i32.const 0xffc00123)) (f32.const 2)))",
        &format!("(i64.reinterpret_f64 (f64.copysign (f64.const 1) (f64.neg {PAYLOAD_NAN})))"),
        "(i64.load32_u (i32.const 48))",
    );
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        format!(
            r#"{{"metrics":{{"a":{},"b":{}}}}}"#,
            1.0f64.to_bits(),
            0x7fc0_0000u32
        )
    );
}

#[test]
fn a_nan_entering_or_made_in_a_vector_is_canonical() {
    // A scalar NaN splatted into a vector, and vector arithmetic on payload NaNs of both signs,
    // both stored as plain vector bits (at 1024, clear of the guest's own data). Each lane is a
    // NaN, so the OR of the two lanes is the canonical NaN only if both lanes are.
    let m = metrics_guest(
        &format!(
            "(v128.store (i32.const 1024) (f64x2.splat (f64.add {PAYLOAD_NAN} (f64.const 1))))
             (v128.store (i32.const 1040)
               (f64x2.mul (f64x2.splat (f64.const 2))
                          (v128.const i64x2 0x7ff8000000000abc 0xfff8000000000def)))"
        ),
        "(i64.or (i64.load (i32.const 1024)) (i64.load (i32.const 1032)))",
        "(i64.or (i64.load (i32.const 1040)) (i64.load (i32.const 1048)))",
    );
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        format!(r#"{{"metrics":{{"a":{CANONICAL_F64},"b":{CANONICAL_F64}}}}}"#)
    );
}

/// Payload NaNs of both signs as two f64 lanes.
const PAYLOAD_F64X2: &str = "(v128.const i64x2 0x7ff8000000000abc 0xfff8000000000def)";

#[test]
fn a_vector_nan_is_canonical_wherever_vector_arithmetic_lets_it_out() {
    // Results the rewrite does not check where they are made (they only feed more f64x2
    // arithmetic) and results it must: stored after a chain and after a local read twice, read
    // as integer lanes, out of a block, read on the `else` path of an `if` whose `then` writes
    // the local again, and read by a loop's next iteration. Each stored lane is a NaN.
    let setup = format!(
        "(local $v v128) (local $u v128) (local $c v128) (local $i i32)
         (v128.store (i32.const 1024)
           (f64x2.add (f64x2.mul {PAYLOAD_F64X2} (f64x2.splat (f64.const 2)))
                      (f64x2.splat (f64.const 1))))
         (local.set $v (f64x2.mul {PAYLOAD_F64X2} (f64x2.splat (f64.const 3))))
         (v128.store (i32.const 1040) (f64x2.sub (local.get $v) (local.get $v)))
         (local.set $u (f64x2.mul {PAYLOAD_F64X2} (f64x2.splat (f64.const 4))))
         (v128.store (i32.const 1056) (i64x2.add (local.get $u) (v128.const i64x2 0 0)))
         (v128.store (i32.const 1072)
           (block (result v128) (f64x2.div {PAYLOAD_F64X2} (f64x2.splat (f64.const 5)))))
         ;; f64x2 lanes read as f32x4
         (v128.store (i32.const 1088)
           (f32x4.add (f64x2.mul {PAYLOAD_F64X2} (f64x2.splat (f64.const 1)))
                      (f32x4.splat (f32.const 0))))
         (local.set $v (f64x2.mul {PAYLOAD_F64X2} (f64x2.splat (f64.const 6))))
         (if (local.get $i)
           (then (local.set $v (f64x2.splat (f64.const 0))))
           (else (v128.store (i32.const 1104) (local.get $v))))
         (local.set $c (v128.const i64x2 0 0))
         (loop
           (v128.store (i32.const 1120) (local.get $c))
           (local.set $c (f64x2.mul {PAYLOAD_F64X2} (f64x2.splat (f64.const 7))))
           (local.set $i (i32.add (local.get $i) (i32.const 1)))
           (br_if 0 (i32.lt_u (local.get $i) (i32.const 2))))"
    );
    assert_canonical_lanes(&setup, (0..8).chain(10..14), 1088);
}

/// Runs `setup`, which stores NaN lanes from 1024 on, and requires the f64 lanes with the given
/// indices (8 bytes each from 1024) to be canonical NaNs (their OR is the canonical NaN only if
/// all are), and the 8 bytes at `f32_lanes`, an f64 NaN read as f32x4 lanes by f32x4.add, to be
/// a canonical f32 NaN above a zero: of a payload NaN, the low half is the f32 subnormal 0xabc,
/// which the addition keeps.
fn assert_canonical_lanes(setup: &str, lanes: impl Iterator<Item = u32>, f32_lanes: u32) {
    let or_lanes = lanes
        .map(|i| format!("(i64.load (i32.const {}))", 1024 + 8 * i))
        .reduce(|acc, load| format!("(i64.or {acc} {load})"))
        .unwrap();
    let m = metrics_guest(
        setup,
        &or_lanes,
        &format!("(i64.load (i32.const {f32_lanes}))"),
    );
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        format!(
            r#"{{"metrics":{{"a":{CANONICAL_F64},"b":{}}}}}"#,
            0x7fc0_0000_0000_0000u64
        )
    );
}

#[test]
fn a_scalar_nan_entering_a_vector_is_canonical_wherever_the_vector_lets_it_out() {
    // Arithmetic on a payload NaN keeps its payload on x86_64. The scalars enter vectors that
    // are stored straight after `replace_lane` (the splat's lane passes through it as bits), fed
    // to f64x2 arithmetic (whose own check covers them) and read as f32x4 lanes.
    let nan = format!("(f64.add {PAYLOAD_NAN} (f64.const 1))");
    let setup = format!(
        "(v128.store (i32.const 1024) (f64x2.replace_lane 1 (f64x2.splat {nan}) {nan}))
         (v128.store (i32.const 1040)
           (f64x2.mul (f64x2.replace_lane 0 (f64x2.splat {nan}) {nan})
                      (f64x2.splat (f64.const 2))))
         (v128.store (i32.const 1056)
           (f32x4.add (f64x2.splat {nan}) (f32x4.splat (f32.const 0))))"
    );
    assert_canonical_lanes(&setup, 0..4, 1056);
}

#[test]
fn a_function_without_room_for_the_scratch_locals_is_a_clear_module_error() {
    // The rewrite adds five locals to every function; wasmtime allows 50,000 in all.
    let module = |locals: usize| {
        let wasm = wat::parse_str(format!(
            r#"(module (memory (export "memory") 1)
                 (func (export "_start") (local {})))"#,
            "f64 ".repeat(locals)
        ))
        .unwrap();
        sandbox().compile(*blake3::hash(&wasm).as_bytes(), &wasm)
    };
    let fits = module(49_995).expect("compiles");
    // It ran to the end: printing nothing is all it did wrong.
    let outcome = sandbox().run(&fits, b"", &small(), 1);
    assert!(
        matches!(
            outcome,
            Outcome::Failure {
                kind: FailureKind::BadOutput,
                ..
            }
        ),
        "{outcome:?}"
    );
    match module(49_996) {
        Err(ModuleError::Compile(message)) => {
            assert!(message.contains("49996 locals"), "{message}")
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn bytes_that_do_not_match_the_hash_are_refused() {
    let wasm = wat::parse_str(r#"(module (func (export "_start")))"#).unwrap();
    let wrong = *blake3::hash(b"something else").as_bytes();
    let err = sandbox().compile(wrong, &wasm).unwrap_err();
    assert!(matches!(err, ModuleError::HashMismatch { .. }), "{err}");
    assert!(
        sandbox().module(&wrong).is_none(),
        "a mismatch must not be cached"
    );
}

#[test]
fn broken_modules_are_module_errors_and_cached() {
    let junk = b"\0asm\x01\0\0\0\xff".to_vec();
    let hash = *blake3::hash(&junk).as_bytes();
    assert!(matches!(
        sandbox().compile(hash, &junk),
        Err(ModuleError::Compile(_))
    ));
    assert!(matches!(
        sandbox().module(&hash),
        Some(Err(ModuleError::Compile(_)))
    ));

    // WAT text is not a module, even though wasmtime could compile it.
    let text = br#"(module (func (export "_start")))"#;
    let hash = *blake3::hash(text).as_bytes();
    assert!(matches!(
        sandbox().compile(hash, text),
        Err(ModuleError::Compile(_))
    ));

    let wasm =
        wat::parse_str(r#"(module (import "env" "secret" (func)) (func (export "_start")))"#)
            .unwrap();
    let hash = *blake3::hash(&wasm).as_bytes();
    assert!(matches!(
        sandbox().compile(hash, &wasm),
        Err(ModuleError::Link(_))
    ));

    let no_start = compile_wat(r#"(module (func (export "main")))"#);
    let outcome = sandbox().run(&no_start, b"", &small(), 1);
    assert_eq!(failure(&outcome).0, FailureKind::Module);
}

#[test]
fn zero_bounds_mean_defaults() {
    assert_eq!(
        Bounds {
            fuel: 0,
            memory_bytes: 0,
            output_bytes: 0,
            wall_ms: 0
        }
        .or_default(),
        Bounds::DEFAULT
    );
    let m = metrics_guest("", "(i64.const 1)", "(i64.const 2)");
    let zero = Bounds {
        fuel: 0,
        memory_bytes: 0,
        output_bytes: 0,
        wall_ms: 0,
    };
    assert!(matches!(
        sandbox().run(&m, b"", &zero, 1),
        Outcome::Success { .. }
    ));
}

#[test]
fn runtime_names_the_wasmtime_version() {
    assert!(RUNTIME.starts_with("wasmtime 48."), "{RUNTIME}");
}

/// Fuel and output of `_start` under wasmtime's own fuel, on the module as it is.
fn wasmtime_fuel(wasm: &[u8], input: &[u8]) -> (u64, Vec<u8>) {
    let mut config = Config::new();
    config.consume_fuel(true);
    let engine = Engine::new(&config).unwrap();
    let module = Module::from_binary(&engine, wasm).unwrap();
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| s).unwrap();
    let stdout = wasmtime_wasi::p2::pipe::MemoryOutputPipe::new(1 << 20);
    let wasi = WasiCtxBuilder::new()
        .stdin(MemoryInputPipe::new(input.to_vec()))
        .stdout(stdout.clone())
        .build_p1();
    let mut store = Store::new(&engine, wasi);
    let budget = u64::MAX / 2;
    store.set_fuel(budget).unwrap();
    let instance = linker.instantiate(&mut store, &module).unwrap();
    let start = instance
        .get_typed_func::<(), ()>(&mut store, "_start")
        .unwrap();
    if let Err(e) = start.call(&mut store, ()) {
        assert!(
            matches!(e.downcast_ref::<I32Exit>(), Some(I32Exit(0))),
            "{e:?}"
        );
    }
    (
        budget - store.get_fuel().unwrap(),
        stdout.contents().to_vec(),
    )
}

/// Compiles with other rewrite options than the sandbox's.
fn compile_with(wasm: &[u8], options: rewrite::Options) -> CompiledModule {
    let (pre, exports) = sandbox().prepare(wasm, options).expect("compiles");
    CompiledModule {
        hash: *blake3::hash(wasm).as_bytes(),
        pre,
        exports: Arc::new(exports),
    }
}

/// Every way out of a block the meter must follow: returns from inside a loop, `br_if` and
/// `br_table` to the function's own label, `if`/`else`, direct, indirect and recursive calls.
const CONTROL_FLOW: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{\"metrics\":{\"x\":1}}")
  (type $unary (func (param i32) (result i32)))
  (table 2 funcref)
  (elem (i32.const 0) $leaf $exits)
  (func $leaf (type $unary) (i32.add (local.get 0) (i32.const 1)))
  (func $exits (type $unary) (local $i i32)
    (loop $l
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if 1 (i32.mul (local.get $i) (i32.const 2)) (i32.gt_u (local.get $i) (local.get 0)))
      (if (i32.eq (local.get $i) (i32.const 3)) (then (return (i32.const 300))))
      (br $l))
    (unreachable))
  (func $table (param $x i32)
    (block $a
      (block $b
        (br_table $a $b 2 (i32.and (local.get $x) (i32.const 3))))
      (i32.store (i32.const 100) (i32.add (i32.load (i32.const 100)) (i32.const 10)))
      (return))
    (if (i32.gt_u (local.get $x) (i32.const 20))
      (then (i32.store (i32.const 100) (i32.add (i32.load (i32.const 100)) (i32.const 1))))
      (else (nop))))
  (func $fib (param $n i32) (result i32)
    (if (result i32) (i32.lt_u (local.get $n) (i32.const 2))
      (then (local.get $n))
      (else (i32.add (call $fib (i32.sub (local.get $n) (i32.const 1)))
                     (call $fib (i32.sub (local.get $n) (i32.const 2)))))))
  (func (export "_start") (local $i i32) (local $sum i32)
    (loop $each
      (local.set $sum (i32.add (local.get $sum) (call $exits (i32.and (local.get $i) (i32.const 7)))))
      (call $table (local.get $i))
      (local.set $sum (i32.add (local.get $sum)
        (call_indirect (type $unary) (local.get $i) (i32.and (local.get $i) (i32.const 1)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $each (i32.lt_u (local.get $i) (i32.const 50))))
    (drop (call $fib (i32.const 12)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 19))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// The meter counts exactly what wasmtime's fuel counts: on the real guests (whose Rust code
/// copies memory with `memory.copy`) and on every kind of branch, with the NaN checks in place
/// and costing nothing.
#[test]
fn fuel_counts_the_guests_instructions_as_wasmtime_does() {
    let control_flow = wat::parse_str(CONTROL_FLOW).unwrap();
    let cases: [(&str, &[u8], &[u8]); 3] = [
        ("control flow", &control_flow, b""),
        (
            "signal-search",
            accrete_tasks::SIGNAL_SEARCH,
            br#"{"n": 1024, "tone_hz": 50}"#,
        ),
        ("tiny-model", accrete_tasks::TINY_MODEL, br#"{"steps": 20}"#),
    ];
    for (name, wasm, input) in cases {
        let (expected, expected_output) = wasmtime_fuel(wasm, input);
        let m = compile_with(wasm, rewrite::Options::SANDBOX);
        let bounds = Bounds {
            fuel: 1 << 40,
            memory_bytes: 256 << 20,
            ..small()
        };
        match sandbox().run(&m, input, &bounds, 1) {
            Outcome::Success { output, fuel_used } => {
                assert_eq!(output, expected_output, "{name}");
                assert_eq!(fuel_used, expected, "{name}");
                assert!(fuel_used > 1000, "{name}: {fuel_used}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

/// A guest that runs `op` with length `len` 100 times, then prints metrics.
fn bulk_guest(op: &str, len: u32) -> CompiledModule {
    guest(
        r#"{\"metrics\":{\"x\":1}}"#,
        &format!(
            "(local $i i32)
             (loop $again
               ({op} (i32.const 4096) (i32.const 1024) (i32.const {len}))
               (local.set $i (i32.add (local.get $i) (i32.const 1)))
               (br_if $again (i32.lt_u (local.get $i) (i32.const 100))))
             (call $write (i32.const 64) (i32.const 19))"
        ),
    )
}

#[test]
fn bulk_instructions_pay_for_their_length() {
    let bounds = Bounds {
        memory_bytes: 1 << 20,
        ..small()
    };
    for op in ["memory.fill", "memory.copy"] {
        let fuel = |len| match sandbox().run(&bulk_guest(op, len), b"", &bounds, 1) {
            Outcome::Success { fuel_used, .. } => fuel_used,
            other => panic!("{op} {len}: {other:?}"),
        };
        // 100 runs of 57,600 bytes at one unit per byte.
        assert_eq!(fuel(57_600) - fuel(0), 100 * 57_600, "{op}");
    }
}

#[test]
fn a_loop_of_large_fills_runs_out_of_fuel_not_into_the_backstop() {
    // One unit per fill would let this run for hours; by length it uses its 10 M fuel in about
    // ten fills of 1 MiB.
    let m = guest(
        "",
        "(drop (memory.grow (i32.const 16)))
         (loop $forever (memory.fill (i32.const 0) (i32.const 0) (i32.const 1048576)) (br $forever))",
    );
    let bounds = Bounds {
        memory_bytes: 2 << 20,
        ..small()
    };
    let started = Instant::now();
    let outcome = sandbox().run(&m, b"", &bounds, 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutOfFuel, "{outcome:?}");
    assert_eq!(outcome.fuel_used(), bounds.fuel);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// `_start` prints the byte the start function stored, so the output says which ran first.
fn start_guest(start_body: &str) -> CompiledModule {
    compile_wat(&format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{{\"metrics\":{{\"x\":0}}}}")
  (start $init)
  (func $init {start_body})
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 19))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#
    ))
}

#[test]
fn a_start_function_runs_first_under_the_meter() {
    // Offset 80 is the digit of x.
    let m = start_guest("(i32.store8 (i32.const 80) (i32.const 55))");
    assert_eq!(
        output(&sandbox().run(&m, b"", &small(), 1)),
        r#"{"metrics":{"x":7}}"#
    );
    // A start function that never ends used to run inside instantiation; now it pays fuel and
    // answers to the backstop like any guest code.
    let m = start_guest("(loop $forever (br $forever))");
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutOfFuel, "{outcome:?}");
    assert_stops_at_the_backstop(&m);
}

/// `_start` calls a tree of functions without a single loop: ten calls at each of nine levels,
/// a billion calls in all.
fn call_tree_guest() -> CompiledModule {
    let mut funcs = String::from("(func $f9)");
    for level in (0..9).rev() {
        let calls = format!("(call $f{})", level + 1).repeat(10);
        funcs.push_str(&format!("(func $f{level} {calls})"));
    }
    compile_wat(&format!(
        r#"(module (memory (export "memory") 1) {funcs} (func (export "_start") (call $f0)))"#
    ))
}

#[test]
fn a_call_tree_without_loops_pays_fuel_and_stops_at_the_backstop() {
    let m = call_tree_guest();
    let outcome = sandbox().run(&m, b"", &small(), 1);
    assert_eq!(failure(&outcome).0, FailureKind::OutOfFuel, "{outcome:?}");
    assert_stops_at_the_backstop(&m);
}

#[test]
fn a_guest_cannot_have_a_second_memory() {
    // The sandbox's engine has multi-memory for the meter; guests are validated without it.
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1) (memory 1) (func (export "_start")))"#,
    )
    .unwrap();
    match sandbox().compile(*blake3::hash(&wasm).as_bytes(), &wasm) {
        Err(ModuleError::Compile(message)) => {
            assert!(message.contains("multiple memories"), "{message}")
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn a_memory_bound_under_one_page_allows_one_page() {
    // The meter's own page does not count against the guest's bound.
    let m = compile_wat(r#"(module (memory (export "memory") 0) (func (export "_start")))"#);
    let bounds = Bounds {
        memory_bytes: 1,
        ..small()
    };
    let outcome = sandbox().run(&m, b"", &bounds, 1);
    assert_eq!(failure(&outcome).0, FailureKind::BadOutput, "{outcome:?}");
}

/// Whatever a run writes, the next run of the module starts from zeroed memory and its data
/// segments: in the part the pool keeps mapped between runs (restored by hand) and past it
/// (unmapped), and in pages the run grew.
#[test]
fn every_run_starts_from_fresh_memory() {
    let (kept, past_kept) = (2 << 20, (KEEP_RESIDENT_BYTES as u32) + (1 << 20));
    // Prints {"metrics":{"a":A,"b":B}} from the data segment at 64, A and B the sums of words
    // that a fresh memory holds as zeros, then overwrites those words and the data segment.
    let scribbles: String = [64, 4096, kept, past_kept]
        .map(|addr| format!("(i64.store (i32.const {addr}) (i64.const -1))"))
        .concat();
    let m = guest(
        r#"{\"metrics\":{\"a\":,\"b\":}}"#,
        &format!(
            "(if (i32.lt_s (memory.grow (i32.const 99)) (i32.const 0)) (then unreachable))
            (call $write (i32.const 64) (i32.const 16))
            (call $write_u64 (i64.add (i64.load (i32.const 4096)) (i64.load (i32.const {kept}))))
            (call $write (i32.const 80) (i32.const 5))
            (call $write_u64 (i64.load (i32.const {past_kept})))
            (call $write (i32.const 85) (i32.const 2))
            {scribbles}"
        ),
    );
    let bounds = Bounds {
        memory_bytes: 100 << 16,
        ..small()
    };
    for run in 0..20 {
        let got = sandbox().run(&m, b"", &bounds, 5);
        assert_eq!(output(&got), r#"{"metrics":{"a":0,"b":0}}"#, "run {run}");
    }
}
