//! Sine and cosine of a fraction of a turn, `2 pi t`, reduced to the nearest quarter turn
//! exactly, in turns, before any rounding: what IEEE 754's `sinPi` and `cosPi` do.
//!
//! Every angle the experiment takes is a fraction of a turn (`k / n`, a uniform draw, the tone's
//! phase). Multiplying by `2 pi` first and handing `libm` an angle up to `2 pi` rounds the
//! product at the angle's full size, then makes `libm` reduce it again by `pi / 2` in extended
//! precision (`rem_pio2`, a large function whose prologue, shadow-stack frame and tuple returned
//! through memory every call pays in wasm). Reducing in turns is exact, so the one rounding left
//! is that of an angle within `pi / 4`, which `libm` evaluates directly.

use core::f64::consts::TAU;

/// `(sin, cos)` of `2 pi t`, for `|t| < 2^48` (the rounding below needs `|4 t| < 2^51`; every
/// angle here is under 2^20 turns, most in `[0, 1)`).
pub fn sincos(t: f64) -> (f64, f64) {
    let (x, quarter) = reduce(t);
    let (sin, cos) = libm::sincos(x);
    match quarter {
        0 => (sin, cos),
        1 => (cos, -sin),
        2 => (-sin, -cos),
        _ => (-cos, sin),
    }
}

/// `sin(2 pi t)`, the first of [`sincos`], bit for bit (`libm::sin` and `libm::cos` within
/// `pi / 4` are `libm::sincos`'s two halves).
pub fn sin(t: f64) -> f64 {
    let (x, quarter) = reduce(t);
    match quarter {
        0 => libm::sin(x),
        1 => libm::cos(x),
        2 => -libm::sin(x),
        _ => -libm::cos(x),
    }
}

/// `cos(2 pi t)`, the second of [`sincos`].
pub fn cos(t: f64) -> f64 {
    let (x, quarter) = reduce(t);
    match quarter {
        0 => libm::cos(x),
        1 => -libm::sin(x),
        2 => -libm::cos(x),
        _ => libm::sin(x),
    }
}

/// `2 pi t = x + quarter * pi / 2` with `|x| <= pi / 4` and `quarter` in `0..4`.
fn reduce(t: f64) -> (f64, u32) {
    debug_assert!(t.abs() < (1u64 << 48) as f64, "{t} turns");
    // 1.5 * 2^52: adding it leaves no fraction bits, so the sum rounds `quarters` to the nearest
    // integer (ties to even) and subtracting it back is exact. Without a branch, which on random
    // angles would be mispredicted half the time, and without `round` or `floor`, which natively,
    // without SSE4.1, are calls into the C library.
    const ROUND: f64 = 6_755_399_441_055_744.0;
    let quarters = 4.0 * t; // exact: a power-of-two scaling
    let nearest = (quarters + ROUND) - ROUND;
    // Exact (Sterbenz), and in [-1/2, 1/2]: the angle is within pi / 4.
    let fraction = quarters - nearest;
    // `TAU / 4` is `TAU` with its exponent lowered: exactly the `f64` nearest `pi / 2`, so at
    // `fraction = 1/2` the angle is exactly the `f64` nearest `pi / 4`, inside libm's direct path.
    // `& 3` of a two's-complement integer is its remainder modulo 4, negative ones included.
    ((TAU / 4.0) * fraction, (nearest as i64 & 3) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within a few ulps of `libm` on the rounded angle, which carries the product's rounding
    /// at full size: the two differ by at most that.
    #[test]
    fn agrees_with_libm_across_the_turn() {
        let mut worst: f64 = 0.0;
        // Tiny angles too, where libm returns the argument itself or 1.
        let tiny = [1e-300, 1e-12, 1.6e-9, 2e-9, 2.4e-9, 1e-8];
        for t in (0..=65_536).map(|k| k as f64 / 65_536.0).chain(tiny) {
            let (sin, cos) = sincos(t);
            let (want_sin, want_cos) = libm::sincos(TAU * t);
            worst = worst
                .max((sin - want_sin).abs())
                .max((cos - want_cos).abs());
            assert_eq!(sin.to_bits(), super::sin(t).to_bits(), "t = {t}");
            assert_eq!(cos.to_bits(), super::cos(t).to_bits(), "t = {t}");
        }
        assert!(worst < 4.0 * f64::EPSILON, "worst difference {worst:e}");
    }

    #[test]
    fn exact_at_the_quarters() {
        for (t, sin, cos) in [
            (0.0, 0.0, 1.0),
            (0.25, 1.0, 0.0),
            (0.5, 0.0, -1.0),
            (0.75, -1.0, 0.0),
            (1.0, 0.0, 1.0),
            (-0.25, -1.0, 0.0),
        ] {
            let got = sincos(t);
            assert_eq!(got, (sin, cos), "t = {t}");
        }
    }

    #[test]
    fn the_eighth_turn_takes_the_direct_path() {
        // Both sides of the quarter boundary reduce to an angle no larger than pi / 4.
        for t in [0.125, 0.375, 0.625, 0.875, 0.125 - 1e-17, 0.375 + 1e-16] {
            let (x, _) = reduce(t);
            assert!(x.abs() <= core::f64::consts::FRAC_PI_4, "t = {t}: x = {x}");
        }
    }
}
