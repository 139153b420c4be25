//! autoresearch-style experiment: train a small MLP on a seeded synthetic two-class data set for
//! a fixed number of steps with the given hyperparameters and report the validation loss.
//!
//! The budget is a step count, not wall time, so results compare across hardware; with `libm`
//! for every transcendental, the native library and the wasm guest give bit-identical output
//! (`sqrt` is the standard library's: it is exact, and `libm`'s is software on wasm32).
//!
//! Layout: [`Input`] and its limits, [`run`] (the experiment), `data` (data sets), `model` (the
//! MLP and SGD), `rng` (xoshiro256**, Box–Muller).

pub mod data;
pub mod model;
pub mod rng;

use accrete_guest::Output;
use serde::Deserialize;
use serde_json::json;

pub use crate::data::Dataset;
use crate::model::{Mlp, Sgd};
use crate::rng::Rng;

pub const MAX_HIDDEN: usize = 256;
pub const MAX_STEPS: usize = 20_000;
pub const MAX_BATCH: usize = 256;
pub const MAX_SET_SIZE: usize = 65_536;
pub const MAX_LR: f64 = 100.0;
pub const MAX_MOMENTUM: f64 = 0.999;
pub const MAX_L2: f64 = 10.0;
pub const MAX_NOISE: f64 = 10.0;
/// Upper bound on hidden-unit evaluations, `max(hidden, 1) * (steps * batch + train_size +
/// (CURVE_POINTS + 1) * val_size)`. One costs about 300 wasm instructions (fuel), mostly `tanh`,
/// so a valid run stays below about 5 * 10^9 fuel (about 1 s in wasmtime, 0.25 s natively).
pub const MAX_WORK: u64 = 1 << 24;
/// How many points of the validation-loss curve the payload holds (plus the initial one).
pub const CURVE_POINTS: usize = 10;

/// Salt that separates the initialisation stream from the data stream when both seeds are equal.
const INIT_STREAM: u64 = 0x6a09_e667_f3bc_c908;

/// The experiment's parameters. Every field has a default, so `{}` is a valid input; unknown
/// fields are refused so that a misspelt hyperparameter cannot silently fall back to its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Input {
    /// Default for `data_seed` and `init_seed`.
    pub seed: u64,
    /// Seeds the data set (train and validation points); defaults to `seed`.
    pub data_seed: Option<u64>,
    /// Seeds the initial weights and the minibatch order; defaults to `seed`. Re-running a
    /// finding with other init seeds on the same data measures its seed noise.
    pub init_seed: Option<u64>,
    pub dataset: Dataset,
    /// Standard deviation of the Gaussian noise added to each coordinate, in [0, `MAX_NOISE`].
    pub noise: f64,
    /// Training points, in [`batch`, `MAX_SET_SIZE`].
    pub train_size: usize,
    /// Validation points, in [1, `MAX_SET_SIZE`].
    pub val_size: usize,
    /// Hidden width, in [0, `MAX_HIDDEN`]; 0 is logistic regression on the raw coordinates.
    pub hidden: usize,
    /// Learning rate, in (0, `MAX_LR`].
    pub lr: f64,
    /// Classical (heavy-ball) momentum, in [0, `MAX_MOMENTUM`].
    pub momentum: f64,
    /// L2 penalty on weights (not biases), in [0, `MAX_L2`].
    pub l2: f64,
    /// SGD steps, in [0, `MAX_STEPS`].
    pub steps: usize,
    /// Minibatch size, in [1, `MAX_BATCH`].
    pub batch: usize,
}

impl Default for Input {
    fn default() -> Self {
        Self {
            seed: 0,
            data_seed: None,
            init_seed: None,
            dataset: Dataset::Moons,
            noise: 0.2,
            train_size: 512,
            val_size: 1024,
            hidden: 16,
            lr: 0.1,
            momentum: 0.9,
            l2: 0.0,
            steps: 500,
            batch: 32,
        }
    }
}

impl Input {
    /// Hidden-unit evaluations the run costs (see [`MAX_WORK`]).
    pub fn work(&self) -> u64 {
        let per_unit = self.steps as u64 * self.batch as u64
            + self.train_size as u64
            + (CURVE_POINTS as u64 + 1) * self.val_size as u64;
        self.hidden.max(1) as u64 * per_unit
    }

    /// Checks every parameter against its documented range.
    pub fn validate(&self) -> Result<(), String> {
        fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
            if ok { Ok(()) } else { Err(what()) }
        }
        check(self.hidden <= MAX_HIDDEN, || {
            format!("hidden = {} must be at most {MAX_HIDDEN}", self.hidden)
        })?;
        check(self.steps <= MAX_STEPS, || {
            format!("steps = {} must be at most {MAX_STEPS}", self.steps)
        })?;
        check((1..=MAX_BATCH).contains(&self.batch), || {
            format!("batch = {} must be in [1, {MAX_BATCH}]", self.batch)
        })?;
        check(
            (self.batch..=MAX_SET_SIZE).contains(&self.train_size),
            || {
                format!(
                    "train_size = {} must be in [batch = {}, {MAX_SET_SIZE}]",
                    self.train_size, self.batch
                )
            },
        )?;
        check((1..=MAX_SET_SIZE).contains(&self.val_size), || {
            format!(
                "val_size = {} must be in [1, {MAX_SET_SIZE}]",
                self.val_size
            )
        })?;
        check(self.lr > 0.0 && self.lr <= MAX_LR, || {
            format!("lr = {} must be in (0, {MAX_LR}]", self.lr)
        })?;
        check((0.0..=MAX_MOMENTUM).contains(&self.momentum), || {
            format!(
                "momentum = {} must be in [0, {MAX_MOMENTUM}]",
                self.momentum
            )
        })?;
        check((0.0..=MAX_L2).contains(&self.l2), || {
            format!("l2 = {} must be in [0, {MAX_L2}]", self.l2)
        })?;
        check((0.0..=MAX_NOISE).contains(&self.noise), || {
            format!("noise = {} must be in [0, {MAX_NOISE}]", self.noise)
        })?;
        check(self.work() <= MAX_WORK, || {
            format!(
                "the run is too large: max(hidden, 1) * (steps * batch + train_size + {} * \
                 val_size) = {} exceeds {MAX_WORK}",
                CURVE_POINTS + 1,
                self.work()
            )
        })
    }
}

/// Runs the experiment. Metrics:
/// - `val_loss`, `train_loss`: mean binary cross-entropy (nats) over the validation and the
///   training set after training (logits clamped to ±`model::REPORTED_LOGIT_CAP`, so finite);
/// - `val_accuracy`: fraction of validation points classified correctly;
/// - `steps`: steps completed; `diverged`: 1 if training stopped early because an update would
///   have made a parameter non-finite (the last finite parameters are evaluated), else 0;
/// - `params`: number of trained parameters.
///
/// The payload holds `curve`, the validation loss at step 0 and at [`CURVE_POINTS`] evenly
/// spaced steps, as `[step, val_loss]` pairs.
pub fn run(input: Input) -> Result<Output, String> {
    input.validate()?;
    let data_seed = input.data_seed.unwrap_or(input.seed);
    let init_seed = input.init_seed.unwrap_or(input.seed);

    let mut data_rng = Rng::new(data_seed);
    let train = data::generate(input.dataset, input.train_size, input.noise, &mut data_rng);
    let val = data::generate(input.dataset, input.val_size, input.noise, &mut data_rng);

    let mut init_rng = Rng::new(init_seed ^ INIT_STREAM);
    let mut model = Mlp::new(input.hidden, &mut init_rng);
    let sgd = Sgd {
        lr: input.lr,
        momentum: input.momentum,
        l2: input.l2,
        batch: input.batch,
    };

    let mut curve = vec![json!([0, model.evaluate(&val).0])];
    let mut checkpoints: Vec<usize> = (1..=CURVE_POINTS)
        .map(|k| k * input.steps / CURVE_POINTS)
        .filter(|&s| s > 0)
        .collect();
    checkpoints.dedup();
    let mut next_checkpoint = 0;
    let done = model::train(
        &mut model,
        &train,
        sgd,
        input.steps,
        &mut init_rng,
        |step, m| {
            if checkpoints.get(next_checkpoint) == Some(&step) {
                curve.push(json!([step, m.evaluate(&val).0]));
                next_checkpoint += 1;
            }
        },
    );
    let diverged = done < input.steps;
    if diverged {
        curve.push(json!([done, model.evaluate(&val).0]));
    }

    let (val_loss, val_accuracy) = model.evaluate(&val);
    let (train_loss, _) = model.evaluate(&train);
    Ok(Output::new()
        .metric("val_loss", val_loss)
        .metric("train_loss", train_loss)
        .metric("val_accuracy", val_accuracy)
        .metric("steps", done as f64)
        .metric("diverged", if diverged { 1.0 } else { 0.0 })
        .metric("params", model.params.len() as f64)
        .payload(json!({ "curve": curve })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val_loss(input: Input) -> f64 {
        run(input).unwrap().metrics["val_loss"]
    }

    #[test]
    fn loss_decreases_with_steps() {
        let losses: Vec<f64> = [0, 50, 200, 1000]
            .iter()
            .map(|&steps| {
                val_loss(Input {
                    steps,
                    ..Input::default()
                })
            })
            .collect();
        assert!(losses.windows(2).all(|w| w[1] < w[0]), "{losses:?}");
        assert!(losses[3] < 0.5 * losses[0], "{losses:?}");
    }

    #[test]
    fn good_hyperparameters_beat_bad_ones() {
        let good = val_loss(Input::default());
        let tiny_lr = val_loss(Input {
            lr: 1e-4,
            ..Input::default()
        });
        let linear = val_loss(Input {
            hidden: 0,
            ..Input::default()
        });
        let huge_l2 = val_loss(Input {
            l2: 1.0,
            ..Input::default()
        });
        assert!(good + 0.1 < tiny_lr, "good {good} vs tiny lr {tiny_lr}");
        assert!(good + 0.05 < linear, "good {good} vs linear {linear}");
        assert!(good + 0.05 < huge_l2, "good {good} vs l2 {huge_l2}");
    }

    #[test]
    fn same_input_same_bytes_and_init_seed_only_moves_init() {
        let bytes = |json: &str| accrete_guest::execute(json.as_bytes(), run).unwrap();
        assert_eq!(bytes(r#"{"seed": 3}"#), bytes(r#"{"seed": 3}"#));
        assert_eq!(
            bytes(r#"{"seed": 3}"#),
            bytes(r#"{"data_seed": 3, "init_seed": 3}"#)
        );
        assert_ne!(
            bytes(r#"{"seed": 3}"#),
            bytes(r#"{"seed": 3, "init_seed": 4}"#)
        );
        let direct = run(Input {
            seed: 3,
            ..Input::default()
        })
        .unwrap()
        .render();
        assert_eq!(bytes(r#"{"seed": 3}"#), direct);
    }

    #[test]
    fn divergence_is_reported_with_finite_metrics() {
        let out = run(Input {
            lr: 100.0,
            l2: 10.0,
            momentum: 0.999,
            ..Input::default()
        })
        .unwrap();
        assert_eq!(out.metrics["diverged"], 1.0, "{out:?}");
        assert!(out.metrics["steps"] < 500.0);
        assert!(out.metrics.values().all(|v| v.is_finite()));
    }

    #[test]
    fn every_dataset_and_logistic_regression_run() {
        for dataset in [Dataset::Moons, Dataset::Rings, Dataset::Spirals] {
            for hidden in [0, 4] {
                let out = run(Input {
                    dataset,
                    hidden,
                    steps: 20,
                    ..Input::default()
                })
                .unwrap();
                assert_eq!(out.metrics["params"], Mlp::param_count(hidden) as f64);
            }
        }
    }

    #[test]
    fn refuses_nonsense() {
        let bad = [
            r#"{"hidden": 257}"#,
            r#"{"steps": 20001}"#,
            r#"{"batch": 0}"#,
            r#"{"batch": 257}"#,
            r#"{"batch": 64, "train_size": 32}"#,
            r#"{"val_size": 0}"#,
            r#"{"lr": 0}"#,
            r#"{"lr": -0.1}"#,
            r#"{"momentum": 1}"#,
            r#"{"l2": -1}"#,
            r#"{"noise": 11}"#,
            r#"{"hidden": 256, "steps": 20000, "batch": 256}"#,
        ];
        for input in bad {
            let got = accrete_guest::execute(input.as_bytes(), run);
            assert!(
                matches!(got, Err(accrete_guest::GuestError::Refused(_))),
                "{input}: {got:?}"
            );
        }
        for input in [r#"{"learning_rate": 0.1}"#, r#"{"dataset": "circles"}"#] {
            let got = accrete_guest::execute(input.as_bytes(), run);
            assert!(
                matches!(got, Err(accrete_guest::GuestError::BadJson(_))),
                "{input}"
            );
        }
        // Every batch size up to 64 fits the work bound at hidden 64 and 2000 steps.
        let largest_promised = Input {
            hidden: 64,
            steps: 2000,
            batch: 64,
            ..Input::default()
        };
        assert_eq!(largest_promised.validate(), Ok(()));
        let too_much = Input {
            batch: 128,
            ..largest_promised
        };
        assert!(too_much.validate().unwrap_err().contains("too large"));
    }

    /// Pinned bytes: a change that moves any result (the generator, the data, the arithmetic
    /// order, a libm upgrade) fails here instead of silently splitting findings across versions.
    #[test]
    fn default_output_is_pinned() {
        let out = accrete_guest::execute(b"{}", run).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            concat!(
                r#"{"metrics":{"diverged":0.0,"params":65.0,"steps":500.0,"#,
                r#""train_loss":0.09884621410447235,"val_accuracy":0.97265625,"#,
                r#""val_loss":0.08147852471097033},"payload":{"curve":[[0,0.9367908693056827],"#,
                r#"[50,0.2499180926869211],[100,0.1917245292800594],[150,0.15292775335842548],"#,
                r#"[200,0.11840009139237026],[250,0.10471172955918716],[300,0.0957673219081332],"#,
                r#"[350,0.09175818148849388],[400,0.09209461385268479],"#,
                r#"[450,0.08822955291012971],[500,0.08147852471097033]]}}"#
            )
        );
    }
}
