;; Float and NaN edge cases for the cross-architecture test (cross_arch.rs): reads pairs (a, b)
;; of little-endian f64 from stdin and writes, for each pair, the bits of results whose NaNs,
;; zero signs or roundings differ between x86_64 and aarch64 hardware unless the sandbox makes
;; them deterministic. Output: {"metrics":{"pairs":N},"bits":"<16 hex digits per value>"}.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  ;; 0: iovec, 8: byte count, 16: hex digits, 1024: input (at most 32 KiB), 65536: output.
  (memory (export "memory") 4)
  (data (i32.const 16) "0123456789abcdef")
  (global $out (mut i32) (i32.const 65536))

  (func $byte (param $b i32)
    (i32.store8 (global.get $out) (local.get $b))
    (global.set $out (i32.add (global.get $out) (i32.const 1))))

  (func $str (param $at i32) (param $len i32)
    (loop $l
      (if (local.get $len)
        (then
          (call $byte (i32.load8_u (local.get $at)))
          (local.set $at (i32.add (local.get $at) (i32.const 1)))
          (local.set $len (i32.sub (local.get $len) (i32.const 1)))
          (br $l)))))

  (func $decimal (param $n i32)
    (if (i32.ge_u (local.get $n) (i32.const 10))
      (then (call $decimal (i32.div_u (local.get $n) (i32.const 10)))))
    (call $byte (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10)))))

  (func $hex (param $x i64)
    (local $shift i64)
    (local.set $shift (i64.const 60))
    (loop $l
      (call $byte (i32.load8_u offset=16 (i32.wrap_i64
        (i64.and (i64.shr_u (local.get $x) (local.get $shift)) (i64.const 15)))))
      (local.set $shift (i64.sub (local.get $shift) (i64.const 4)))
      (br_if $l (i64.ge_s (local.get $shift) (i64.const 0)))))

  (func $f64 (param $x f64) (call $hex (i64.reinterpret_f64 (local.get $x))))
  (func $f32 (param $x f32) (call $hex (i64.extend_i32_u (i32.reinterpret_f32 (local.get $x)))))

  ;; The order of these values is the contract with `native_float_edges` in cross_arch.rs.
  (func $pair (param $a f64) (param $b f64)
    (local $v v128) (local $w v128) (local $q v128)
    (call $f64 (f64.add (local.get $a) (local.get $b)))
    (call $f64 (f64.sub (local.get $a) (local.get $b)))
    (call $f64 (f64.mul (local.get $a) (local.get $b)))
    (call $f64 (f64.div (local.get $a) (local.get $b)))
    (call $f64 (f64.sqrt (local.get $a)))
    (call $f64 (f64.min (local.get $a) (local.get $b)))
    (call $f64 (f64.max (local.get $a) (local.get $b)))
    (call $f64 (f64.nearest (local.get $a)))
    (call $f64 (f64.floor (local.get $a)))
    (call $f64 (f64.ceil (local.get $a)))
    (call $f64 (f64.trunc (local.get $a)))
    (call $f64 (f64.neg (local.get $a)))
    (call $f64 (f64.copysign (local.get $a) (local.get $b)))
    (call $f64 (f64.promote_f32 (f32.demote_f64 (local.get $a))))
    (call $f32 (f32.div (f32.demote_f64 (local.get $a)) (f32.demote_f64 (local.get $b))))
    (call $f32 (f32.sqrt (f32.demote_f64 (local.get $b))))
    (call $hex (i64.trunc_sat_f64_s (local.get $a)))
    (call $hex (i64.extend_i32_u (i32.trunc_sat_f32_u (f32.demote_f64 (local.get $b)))))
    (call $f64 (f64.convert_i64_s (i64.reinterpret_f64 (local.get $a))))
    (call $f64 (f64.mul (f64.add (local.get $a) (local.get $b))
                        (f64.sub (local.get $a) (local.get $b))))
    ;; The same through SIMD lanes: v = [a, b], w = [b, a].
    (local.set $v (f64x2.replace_lane 1 (f64x2.splat (local.get $a)) (local.get $b)))
    (local.set $w (f64x2.replace_lane 1 (f64x2.splat (local.get $b)) (local.get $a)))
    (local.set $q (f64x2.div (local.get $v) (local.get $w)))
    (call $f64 (f64x2.extract_lane 0 (local.get $q)))
    (call $f64 (f64x2.extract_lane 1 (local.get $q)))
    (local.set $q (f64x2.min (local.get $v) (local.get $w)))
    (call $f64 (f64x2.extract_lane 0 (local.get $q)))
    (call $f64 (f64x2.extract_lane 1 (local.get $q)))
    (local.set $q (f64x2.sqrt (local.get $v)))
    (call $f64 (f64x2.extract_lane 1 (local.get $q)))
    (local.set $q (f32x4.demote_f64x2_zero (local.get $v)))
    (local.set $q (f32x4.mul (local.get $q) (local.get $q)))
    (call $f32 (f32x4.extract_lane 0 (local.get $q)))
    (call $f32 (f32x4.extract_lane 1 (local.get $q)))
    ;; Vector bits read as integer lanes: a product that only feeds a sum (which the rewrite
    ;; leaves unchecked) and a scalar entering a vector.
    (local.set $q (f64x2.add (f64x2.mul (local.get $v) (local.get $w)) (local.get $w)))
    (call $hex (i64x2.extract_lane 0 (local.get $q)))
    (call $hex (i64x2.extract_lane 1 (local.get $q)))
    (call $hex (i64x2.extract_lane 0 (f64x2.splat (f64.div (local.get $a) (local.get $b))))))

  (func (export "_start")
    (local $len i32) (local $i i32)
    ;; Read stdin until end of input (or 32 KiB).
    (loop $read
      (i32.store (i32.const 0) (i32.add (i32.const 1024) (local.get $len)))
      (i32.store (i32.const 4) (i32.sub (i32.const 32768) (local.get $len)))
      (if (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8))
        (then unreachable))
      (local.set $len (i32.add (local.get $len) (i32.load (i32.const 8))))
      (br_if $read (i32.and (i32.ne (i32.load (i32.const 8)) (i32.const 0))
                            (i32.lt_u (local.get $len) (i32.const 32768)))))
    (call $str (i32.const 128) (i32.const 20))
    (call $decimal (i32.shr_u (local.get $len) (i32.const 4)))
    (call $str (i32.const 160) (i32.const 10))
    (loop $pairs
      (if (i32.le_u (i32.add (local.get $i) (i32.const 16)) (local.get $len))
        (then
          (call $pair
            (f64.load offset=1024 (local.get $i))
            (f64.load offset=1032 (local.get $i)))
          (local.set $i (i32.add (local.get $i) (i32.const 16)))
          (br $pairs))))
    (call $str (i32.const 192) (i32.const 2))
    (local.set $i (i32.const 65536))
    (loop $write
      (if (i32.lt_u (local.get $i) (global.get $out))
        (then
          (i32.store (i32.const 0) (local.get $i))
          (i32.store (i32.const 4) (i32.sub (global.get $out) (local.get $i)))
          (if (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))
            (then unreachable))
          (local.set $i (i32.add (local.get $i) (i32.load (i32.const 8))))
          (br $write)))))

  (data (i32.const 128) "{\"metrics\":{\"pairs\":")
  (data (i32.const 160) "},\"bits\":\"")
  (data (i32.const 192) "\"}"))
