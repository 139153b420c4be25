//! SETI-style narrow-band search: generate a seeded noisy time series, optionally inject a tone,
//! Hann-window it, FFT it and report the strongest spectral peak and its signal-to-noise ratio.
//!
//! Every transcendental function comes from `libm` (pure Rust) and nothing depends on the host,
//! so the native library and the `wasm32-wasip1` guest produce bit-identical output. `sqrt` is
//! the standard library's: IEEE 754 defines its result exactly, so the hardware instruction
//! gives the same bits everywhere, while `libm` emulates it in software on wasm32 (its wasm
//! intrinsics need a nightly compiler).
//!
//! Layout: [`Input`] and its limits, [`run`] (the experiment), [`spectrum`] (window + FFT +
//! power), `rng` (xoshiro256**, Box–Muller), `fft` (iterative radix-2), `turns` (sine and
//! cosine of a fraction of a turn, every angle's).

pub mod fft;
pub mod rng;
pub mod turns;

use accrete_guest::Output;
use serde::Deserialize;
use serde_json::json;

use crate::rng::Rng;

/// A peak is reported as `detected` when its power is at least this many dB above the median
/// bin power. For pure Gaussian noise the bin powers are about exponentially distributed, so the
/// chance that any of `n/2` bins crosses 15 dB (31.6x the median, 21.9x the mean) is about
/// `n/2 * exp(-21.9)`: 6e-7 at n = 4096 and 2e-4 at the largest n.
pub const DETECTION_THRESHOLD_DB: f64 = 15.0;

/// How many candidate peaks the payload lists.
pub const CANDIDATES: usize = 3;

pub const MIN_N: usize = 16;
pub const MAX_N: usize = 1 << 20;
pub const MAX_SAMPLE_RATE: f64 = 1e9;
pub const MIN_NOISE: f64 = 1e-6;
pub const MAX_NOISE: f64 = 1e6;
pub const MAX_AMPLITUDE: f64 = 1e6;

/// The experiment's parameters. Every field has a default, so `{}` is a valid input; unknown
/// fields are refused so that a misspelt parameter cannot silently fall back to its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Input {
    /// Seeds the noise and the tone's phase.
    pub seed: u64,
    /// Number of samples: a power of two in [`MIN_N`, `MAX_N`].
    pub n: usize,
    /// Samples per second, in (0, [`MAX_SAMPLE_RATE`]].
    pub sample_rate: f64,
    /// Standard deviation of the Gaussian noise, in [[`MIN_NOISE`], [`MAX_NOISE`]].
    pub noise: f64,
    /// Frequency of an injected sine tone, strictly between 0 and `sample_rate / 2`.
    pub tone_hz: Option<f64>,
    /// Peak amplitude of the injected tone, in [0, [`MAX_AMPLITUDE`]]; ignored without `tone_hz`.
    pub amplitude: f64,
}

impl Default for Input {
    fn default() -> Self {
        Self {
            seed: 0,
            n: 4096,
            sample_rate: 1000.0,
            noise: 1.0,
            tone_hz: None,
            amplitude: 0.5,
        }
    }
}

impl Input {
    /// Checks every parameter against its documented range.
    pub fn validate(&self) -> Result<(), String> {
        if !self.n.is_power_of_two() || !(MIN_N..=MAX_N).contains(&self.n) {
            return Err(format!(
                "n = {} must be a power of two in [{MIN_N}, {MAX_N}]",
                self.n
            ));
        }
        if !(self.sample_rate > 0.0 && self.sample_rate <= MAX_SAMPLE_RATE) {
            return Err(format!(
                "sample_rate = {} must be in (0, {MAX_SAMPLE_RATE}]",
                self.sample_rate
            ));
        }
        if !(MIN_NOISE..=MAX_NOISE).contains(&self.noise) {
            return Err(format!(
                "noise = {} must be in [{MIN_NOISE}, {MAX_NOISE}]",
                self.noise
            ));
        }
        if !(0.0..=MAX_AMPLITUDE).contains(&self.amplitude) {
            return Err(format!(
                "amplitude = {} must be in [0, {MAX_AMPLITUDE}]",
                self.amplitude
            ));
        }
        if let Some(f) = self.tone_hz {
            let nyquist = self.sample_rate / 2.0;
            if !(f > 0.0 && f < nyquist) {
                return Err(format!(
                    "tone_hz = {f} must be strictly between 0 and the Nyquist frequency {nyquist}"
                ));
            }
        }
        Ok(())
    }
}

/// The time series the experiment searches: noise plus the optional tone.
pub fn signal(input: &Input) -> Vec<f64> {
    let mut rng = Rng::new(input.seed);
    // The phase is drawn even without a tone so that the noise is the same with and without one.
    let phase = rng.uniform();
    // Both samples of each Box–Muller draw, in order (`n` is even): one call per pair, and no
    // sample kept over from one call to the next.
    let mut series = Vec::with_capacity(input.n);
    for _ in 0..input.n / 2 {
        let (a, b) = rng.gaussian_pair();
        series.extend([input.noise * a, input.noise * b]);
    }
    if let Some(f) = input.tone_hz {
        for (i, x) in series.iter_mut().enumerate() {
            // In turns: reduced exactly, so the sine is as accurate far into the series as at
            // its start.
            let cycles = f * i as f64 / input.sample_rate + phase;
            *x += input.amplitude * turns::sin(cycles);
        }
    }
    series
}

/// Power of bins `0..=n/2` of the Hann-windowed (periodic form) series.
///
/// # Panics
/// If the length is not a power of two.
pub fn spectrum(series: &[f64]) -> Vec<f64> {
    let n = series.len();
    let mut re: Vec<f64> = series
        .iter()
        .enumerate()
        .map(|(i, &x)| x * (0.5 - 0.5 * turns::cos(i as f64 / n as f64)))
        .collect();
    let mut im = vec![0.0; n];
    fft::fft(&mut re, &mut im);
    (0..=n / 2).map(|k| re[k] * re[k] + im[k] * im[k]).collect()
}

/// Median of `values` (the mean of the two middle values for an even count).
fn median(values: &[f64]) -> f64 {
    // Selection, not a sort: the same middle bits in linear time.
    let mut values = values.to_vec();
    let (m, even) = (values.len() / 2, values.len().is_multiple_of(2));
    let (below, &mut middle, _) = values.select_nth_unstable_by(m, f64::total_cmp);
    if even {
        let below = below.iter().copied().max_by(f64::total_cmp);
        0.5 * (below.expect("an even count has values below the middle") + middle)
    } else {
        middle
    }
}

fn db(ratio: f64) -> f64 {
    10.0 * libm::log10(ratio)
}

/// Runs the search. Metrics:
/// - `peak_bin`: the strongest bin in `1..=n/2` (DC excluded; the lowest on a tie);
/// - `peak_hz`: that bin's centre frequency, `peak_bin * sample_rate / n`;
/// - `peak_hz_fine`: the frequency refined by Gaussian (log-parabolic) interpolation over the
///   peak and its two neighbours (equal to `peak_hz` at the spectrum's ends);
/// - `snr_db`: peak power over the median power of bins `1..=n/2`, in dB;
/// - `detected`: 1 if `snr_db >= DETECTION_THRESHOLD_DB`, else 0.
///
/// The payload lists the strongest [`CANDIDATES`] local maxima (`bin`, `hz`, `snr_db`) and the
/// threshold used.
pub fn run(input: Input) -> Result<Output, String> {
    input.validate()?;
    let n = input.n;
    let power = spectrum(&signal(&input));
    let bins = &power[1..]; // bins[i] is bin i + 1
    let floor = median(bins);
    let hz = |bin: usize| bin as f64 * input.sample_rate / n as f64;

    // Local maxima: strictly above the left neighbour, not below the right one, so the first of
    // two equal top bins is the one kept.
    let mut candidates: Vec<usize> = (0..bins.len())
        .filter(|&i| {
            (i == 0 || bins[i] > bins[i - 1]) && (i + 1 == bins.len() || bins[i] >= bins[i + 1])
        })
        .collect();
    // Strongest first, the lower bin on a tie: a total order, so selecting the top few and
    // sorting only those gives exactly what sorting them all would.
    let order = |&a: &usize, &b: &usize| bins[b].total_cmp(&bins[a]).then(a.cmp(&b));
    if candidates.len() > CANDIDATES {
        candidates.select_nth_unstable_by(CANDIDATES - 1, order);
        candidates.truncate(CANDIDATES);
    }
    candidates.sort_unstable_by(order);
    let peak = candidates[0];
    let peak_bin = peak + 1;

    let mut offset = 0.0;
    if peak > 0 && peak + 1 < bins.len() {
        let (a, b, c) = (
            libm::log(bins[peak - 1]),
            libm::log(bins[peak]),
            libm::log(bins[peak + 1]),
        );
        let curvature = a - 2.0 * b + c;
        if curvature < 0.0 && curvature.is_finite() {
            offset = (0.5 * (a - c) / curvature).clamp(-0.5, 0.5);
        }
    }

    let snr_db = db(bins[peak] / floor);
    let payload = json!({
        "candidates": candidates
            .iter()
            .map(|&i| json!({"bin": i + 1, "hz": hz(i + 1), "snr_db": db(bins[i] / floor)}))
            .collect::<Vec<_>>(),
        "threshold_db": DETECTION_THRESHOLD_DB,
    });
    Ok(Output::new()
        .metric("peak_bin", peak_bin as f64)
        .metric("peak_hz", hz(peak_bin))
        .metric(
            "peak_hz_fine",
            (peak_bin as f64 + offset) * input.sample_rate / n as f64,
        )
        .metric("snr_db", snr_db)
        .metric(
            "detected",
            if snr_db >= DETECTION_THRESHOLD_DB {
                1.0
            } else {
                0.0
            },
        )
        .payload(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(out: &Output, name: &str) -> f64 {
        out.metrics[name]
    }

    #[test]
    fn finds_an_injected_tone() {
        for (seed, tone) in [(1, 123.4), (2, 250.0), (3, 31.7), (4, 487.9)] {
            let input = Input {
                seed,
                tone_hz: Some(tone),
                amplitude: 0.5,
                ..Input::default()
            };
            let out = run(input).unwrap();
            let bin_width = 1000.0 / 4096.0;
            assert!(
                (metric(&out, "peak_hz") - tone).abs() <= bin_width,
                "{out:?}"
            );
            assert!(
                (metric(&out, "peak_hz_fine") - tone).abs() <= 0.1 * bin_width,
                "{out:?}"
            );
            assert_eq!(metric(&out, "detected"), 1.0, "{out:?}");
            assert!(metric(&out, "snr_db") > 20.0, "{out:?}");
        }
    }

    #[test]
    fn pure_noise_is_not_a_detection() {
        for seed in 0..20 {
            let out = run(Input {
                seed,
                ..Input::default()
            })
            .unwrap();
            assert_eq!(metric(&out, "detected"), 0.0, "seed {seed}: {out:?}");
            let snr = metric(&out, "snr_db");
            assert!(
                (5.0..DETECTION_THRESHOLD_DB).contains(&snr),
                "seed {seed}: {snr}"
            );
        }
    }

    #[test]
    fn a_tone_below_the_noise_is_missed_and_a_louder_one_found() {
        let at = |amplitude| {
            let input = Input {
                seed: 9,
                tone_hz: Some(200.0),
                amplitude,
                ..Input::default()
            };
            metric(&run(input).unwrap(), "detected")
        };
        assert_eq!(at(0.02), 0.0);
        assert_eq!(at(0.3), 1.0);
    }

    #[test]
    fn candidates_are_ordered_and_start_with_the_peak() {
        let input = Input {
            tone_hz: Some(100.0),
            ..Input::default()
        };
        let out = run(input).unwrap();
        let candidates = out.payload["candidates"].as_array().unwrap();
        assert_eq!(candidates.len(), CANDIDATES);
        assert_eq!(
            candidates[0]["bin"].as_f64(),
            Some(metric(&out, "peak_bin"))
        );
        let snrs: Vec<f64> = candidates
            .iter()
            .map(|c| c["snr_db"].as_f64().unwrap())
            .collect();
        assert!(snrs.windows(2).all(|w| w[0] >= w[1]), "{snrs:?}");
    }

    /// The selection picks what a full sort of every local maximum would, in the same order.
    #[test]
    fn candidates_are_the_strongest_local_maxima() {
        for seed in 0..20 {
            let input = Input {
                seed,
                n: 64,
                ..Input::default()
            };
            let power = spectrum(&signal(&input));
            let bins = &power[1..];
            let mut want: Vec<usize> = (0..bins.len())
                .filter(|&i| {
                    (i == 0 || bins[i] > bins[i - 1])
                        && (i + 1 == bins.len() || bins[i] >= bins[i + 1])
                })
                .collect();
            want.sort_by(|&a, &b| bins[b].total_cmp(&bins[a]).then(a.cmp(&b)));
            want.truncate(CANDIDATES);
            let out = run(input).unwrap();
            let got: Vec<usize> = out.payload["candidates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["bin"].as_u64().unwrap() as usize - 1)
                .collect();
            assert_eq!(got, want, "seed {seed}");
        }
    }

    #[test]
    fn same_input_same_bytes_and_seed_matters() {
        let bytes = |seed| {
            accrete_guest::execute(
                format!(r#"{{"seed":{seed},"tone_hz":77.7}}"#).as_bytes(),
                run,
            )
            .unwrap()
        };
        assert_eq!(bytes(5), bytes(5));
        assert_ne!(bytes(5), bytes(6));
        let direct = run(Input {
            seed: 5,
            tone_hz: Some(77.7),
            ..Input::default()
        })
        .unwrap()
        .render();
        assert_eq!(bytes(5), direct);
    }

    #[test]
    fn refuses_nonsense() {
        let bad = [
            r#"{"n": 1000}"#,
            r#"{"n": 8}"#,
            r#"{"n": 4194304}"#,
            r#"{"sample_rate": 0}"#,
            r#"{"sample_rate": -5}"#,
            r#"{"noise": 0}"#,
            r#"{"amplitude": -1}"#,
            r#"{"tone_hz": 500}"#,
            r#"{"tone_hz": 0}"#,
            r#"{"tone_hz": -3}"#,
        ];
        for input in bad {
            let got = accrete_guest::execute(input.as_bytes(), run);
            assert!(
                matches!(got, Err(accrete_guest::GuestError::Refused(_))),
                "{input}: {got:?}"
            );
        }
        let typo = accrete_guest::execute(br#"{"tone_Hz": 5}"#, run);
        assert!(matches!(typo, Err(accrete_guest::GuestError::BadJson(_))));
        assert!(accrete_guest::execute(b"{}", run).is_ok());
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        // Against a full sort, with ties, on every length up to 64.
        let mut rng = Rng::new(11);
        for len in 1..=64 {
            let values: Vec<f64> = (0..len).map(|_| (rng.uniform() * 8.0).floor()).collect();
            let mut sorted = values.clone();
            sorted.sort_by(f64::total_cmp);
            let m = len / 2;
            let want = if len % 2 == 0 {
                0.5 * (sorted[m - 1] + sorted[m])
            } else {
                sorted[m]
            };
            assert_eq!(median(&values).to_bits(), want.to_bits(), "{values:?}");
        }
    }

    /// Pinned bytes: a change that moves any result (the generator, the window, the FFT's
    /// arithmetic order, a libm upgrade) fails here instead of silently splitting findings.
    #[test]
    fn default_output_is_pinned() {
        let out = accrete_guest::execute(b"{}", run).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                r#"{"metrics":{"detected":0.0,"peak_bin":1492.0,"peak_hz":364.2578125,"#,
                r#""peak_hz_fine":364.2005913207333,"snr_db":10.453791043024417},"#,
                r#""payload":{"candidates":[{"bin":1492,"hz":364.2578125,"#,
                r#""snr_db":10.453791043024417},{"bin":775,"hz":189.208984375,"#,
                r#""snr_db":10.097399863491418},{"bin":1482,"hz":361.81640625,"#,
                r#""snr_db":9.971783586737605}],"threshold_db":15.0}}"#
            )
        );
    }
}
