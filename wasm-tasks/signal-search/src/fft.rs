//! Iterative radix-2 FFT (decimation in time), written here rather than taken from a crate so
//! every operation, and so every rounding, is the same on every host and in wasm.

use crate::turns;

/// In-place forward DFT, `X[k] = sum_j x[j] exp(-2 pi i j k / n)`, of `re + i im`.
///
/// # Panics
/// If the lengths differ or are not a power of two.
pub fn fft(re: &mut [f64], im: &mut [f64]) {
    let n = re.len();
    assert_eq!(n, im.len(), "real and imaginary parts differ in length");
    assert!(n.is_power_of_two(), "FFT length {n} is not a power of two");
    if n < 2 {
        return;
    }
    let bits = n.trailing_zeros();
    for i in 0..n {
        let j = ((i as u64).reverse_bits() >> (64 - bits)) as usize;
        if i < j {
            re.swap(i, j);
            im.swap(i, j);
        }
    }
    let twiddles = twiddles(n);
    // Stage by stage: blocks of `2 * half`, each butterfly pairing element `j` of a block's
    // first half with element `j` of its second. Chunks, halves and zipped iterators instead of
    // indices leave no bounds check in the loop, which matters most in wasm, where each is a
    // compare, a branch and a block more for the compiler and the fuel meter.
    let mut half = 1;
    while half < n {
        let stage = &twiddles[half - 1..2 * half - 1];
        for (re, im) in re
            .chunks_exact_mut(2 * half)
            .zip(im.chunks_exact_mut(2 * half))
        {
            let (re_a, re_b) = re.split_at_mut(half);
            let (im_a, im_b) = im.split_at_mut(half);
            let pairs = re_a.iter_mut().zip(re_b).zip(im_a.iter_mut().zip(im_b));
            for (((ra, rb), (ia, ib)), &(wr, wi)) in pairs.zip(stage) {
                let tr = *rb * wr - *ib * wi;
                let ti = *rb * wi + *ib * wr;
                *rb = *ra - tr;
                *ib = *ia - ti;
                *ra += tr;
                *ia += ti;
            }
        }
        half *= 2;
    }
}

/// The twiddles `exp(-2 pi i j / len)`, `j < len / 2`, of every stage `len = 2, 4, ..., n`,
/// each stage's contiguous at offset `len / 2 - 1` (`n - 1` in all). Each comes straight from
/// cos/sin of `k / n` turns, shared by every stage, instead of a running product, so
/// rounding errors do not accumulate across a stage and every stage sees the same bits.
fn twiddles(n: usize) -> Vec<(f64, f64)> {
    let finest: Vec<(f64, f64)> = (0..n / 2)
        .map(|k| {
            let (sin, cos) = turns::sincos(k as f64 / n as f64);
            (cos, -sin)
        })
        .collect();
    let mut stages = Vec::with_capacity(n - 1);
    let mut half = 1;
    while half < n {
        stages.extend(finest.iter().step_by(n / 2 / half));
        half *= 2;
    }
    stages
}

#[cfg(test)]
mod tests {
    use core::f64::consts::TAU;

    use super::*;
    use crate::rng::Rng;

    fn naive_dft(re: &[f64], im: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let n = re.len();
        let mut out_re = vec![0.0; n];
        let mut out_im = vec![0.0; n];
        for k in 0..n {
            for j in 0..n {
                let angle = TAU * ((j * k) % n) as f64 / n as f64;
                let (c, s) = (libm::cos(angle), libm::sin(angle));
                out_re[k] += re[j] * c + im[j] * s;
                out_im[k] += im[j] * c - re[j] * s;
            }
        }
        (out_re, out_im)
    }

    #[test]
    fn matches_naive_dft_on_small_sizes() {
        let mut rng = Rng::new(3);
        for n in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            let (re, im): (Vec<f64>, Vec<f64>) = (0..n).map(|_| rng.gaussian_pair()).unzip();
            let (want_re, want_im) = naive_dft(&re, &im);
            let (mut got_re, mut got_im) = (re.clone(), im.clone());
            fft(&mut got_re, &mut got_im);
            for k in 0..n {
                let err = (got_re[k] - want_re[k]).abs() + (got_im[k] - want_im[k]).abs();
                assert!(err < 1e-10 * n as f64, "n={n} k={k} err={err}");
            }
        }
    }

    #[test]
    fn impulse_and_constant() {
        let mut re = vec![0.0; 8];
        let mut im = vec![0.0; 8];
        re[0] = 1.0;
        fft(&mut re, &mut im);
        assert!(re.iter().all(|&x| x == 1.0) && im.iter().all(|&x| x == 0.0));

        let mut re = vec![1.0; 8];
        let mut im = vec![0.0; 8];
        fft(&mut re, &mut im);
        assert_eq!(re[0], 8.0);
        assert!(re[1..].iter().chain(&im).all(|&x| x.abs() < 1e-12));
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn refuses_non_power_of_two() {
        fft(&mut [0.0; 6], &mut [0.0; 6]);
    }
}
