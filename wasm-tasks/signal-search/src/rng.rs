//! Seeded, platform-independent randomness: xoshiro256** seeded through splitmix64, and Gaussian
//! samples by Box–Muller with `libm`, so every host and the wasm guest draw the same numbers.

use crate::turns;

/// xoshiro256** (Blackman and Vigna, 2018).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        // splitmix64 never yields four zero words in a row, so the state is never all-zero.
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normal samples from one Box–Muller draw.
    pub fn gaussian_pair(&mut self) -> (f64, f64) {
        // 1 - u lies in (0, 1], so the logarithm is finite. `f64::sqrt`, not `libm::sqrt`: both
        // are correctly rounded, but on wasm32 libm's is a software routine three times slower.
        let r = (-2.0 * libm::log(1.0 - self.uniform())).sqrt();
        let (sin, cos) = turns::sincos(self.uniform());
        (r * cos, r * sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_known_first_value() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
        // Pinned: changing the generator changes every result and so every finding's meaning.
        assert_eq!(Rng::new(42).next_u64(), 1_546_998_764_402_558_742);
    }

    #[test]
    fn gaussian_moments_are_plausible() {
        let mut rng = Rng::new(7);
        let n = 100_000;
        let xs: Vec<f64> = (0..n / 2)
            .flat_map(|_| <[f64; 2]>::from(rng.gaussian_pair()))
            .collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}
