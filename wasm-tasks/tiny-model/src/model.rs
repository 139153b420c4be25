//! A two-input, one-output MLP with one tanh hidden layer (or none: logistic regression), trained
//! with minibatch SGD with momentum on the binary cross-entropy. Plain loops in a fixed order and
//! `libm` for every transcendental, so training is bit-identical on every host and in wasm.

use crate::data::Samples;
use crate::rng::Rng;

/// Logits are clamped to this magnitude when a loss is *reported*, bounding an example's loss
/// (and so every reported loss) at about 50 nats: a diverged model stays finite and ranks last.
pub const REPORTED_LOGIT_CAP: f64 = 50.0;

/// Parameters, flat so an update is one loop: for `hidden > 0` the layout is
/// `w1 (hidden x 2) | b1 (hidden) | w2 (hidden) | b2`; for `hidden == 0` it is `w (2) | b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    pub hidden: usize,
    pub params: Vec<f64>,
}

/// `log(1 + exp(t))` without overflow.
fn softplus(t: f64) -> f64 {
    t.max(0.0) + libm::log1p(libm::exp(-t.abs()))
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + libm::exp(-z))
    } else {
        let e = libm::exp(z);
        e / (1.0 + e)
    }
}

/// Binary cross-entropy of logit `z` against label `y` (0 or 1).
fn bce(z: f64, y: f64) -> f64 {
    if y > 0.5 { softplus(-z) } else { softplus(z) }
}

impl Mlp {
    /// Glorot-style Gaussian initialisation: weights with variance 1/fan_in, biases zero.
    pub fn new(hidden: usize, rng: &mut Rng) -> Self {
        let mut params = Vec::with_capacity(Self::param_count(hidden));
        if hidden == 0 {
            params.extend((0..2).map(|_| rng.gaussian() * core::f64::consts::FRAC_1_SQRT_2));
            params.push(0.0);
        } else {
            let out_scale = 1.0 / (hidden as f64).sqrt();
            params
                .extend((0..2 * hidden).map(|_| rng.gaussian() * core::f64::consts::FRAC_1_SQRT_2));
            params.extend((0..hidden).map(|_| 0.0));
            params.extend((0..hidden).map(|_| rng.gaussian() * out_scale));
            params.push(0.0);
        }
        Self { hidden, params }
    }

    pub fn param_count(hidden: usize) -> usize {
        if hidden == 0 { 3 } else { 4 * hidden + 1 }
    }

    /// Whether parameter `i` is a weight (decayed by L2) rather than a bias.
    fn is_weight(&self, i: usize) -> bool {
        let h = self.hidden;
        if h == 0 {
            i < 2
        } else {
            i < 2 * h || (3 * h..4 * h).contains(&i)
        }
    }

    /// The logit for `x`; fills `act` with the hidden activations.
    fn forward(&self, x: [f64; 2], act: &mut [f64]) -> f64 {
        let h = self.hidden;
        let p = &self.params;
        if h == 0 {
            return p[0] * x[0] + p[1] * x[1] + p[2];
        }
        let (w1, rest) = p.split_at(2 * h);
        let (b1, rest) = rest.split_at(h);
        let (w2, b2) = rest.split_at(h);
        let mut z = b2[0];
        // Zipped iterators rather than indexing: no bounds checks, which wasm pays for in fuel.
        for (((w, b), out), v) in w1.chunks_exact(2).zip(b1).zip(act.iter_mut()).zip(w2) {
            let a = libm::tanh(w[0] * x[0] + w[1] * x[1] + b);
            *out = a;
            z += v * a;
        }
        z
    }

    /// Adds the gradient of the batch-mean loss over `batch` (indices into `data`) to `grad`,
    /// and returns the batch-mean loss.
    fn accumulate_gradient(
        &self,
        data: &Samples,
        batch: &[usize],
        act: &mut [f64],
        grad: &mut [f64],
    ) -> f64 {
        let h = self.hidden;
        let scale = 1.0 / batch.len() as f64;
        let mut loss = 0.0;
        for &i in batch {
            let x = data.x[i];
            let y = data.y[i];
            let z = self.forward(x, act);
            loss += bce(z, y);
            let dz = (sigmoid(z) - y) * scale;
            if h == 0 {
                grad[0] += dz * x[0];
                grad[1] += dz * x[1];
                grad[2] += dz;
                continue;
            }
            let w2 = &self.params[3 * h..4 * h];
            let (g_w1, rest) = grad.split_at_mut(2 * h);
            let (g_b1, rest) = rest.split_at_mut(h);
            let (g_w2, _) = rest.split_at_mut(h);
            for ((((gw, gb), gv), &a), &v) in g_w1
                .chunks_exact_mut(2)
                .zip(g_b1.iter_mut())
                .zip(g_w2.iter_mut())
                .zip(act.iter())
                .zip(w2)
            {
                let da = dz * v * (1.0 - a * a);
                gw[0] += da * x[0];
                gw[1] += da * x[1];
                *gb += da;
                *gv += dz * a;
            }
            grad[4 * h] += dz;
        }
        loss * scale
    }

    /// Mean reported loss (logits clamped to [`REPORTED_LOGIT_CAP`]) and accuracy over `data`.
    pub fn evaluate(&self, data: &Samples) -> (f64, f64) {
        let mut act = vec![0.0; self.hidden];
        let mut loss = 0.0;
        let mut correct = 0usize;
        for (x, &y) in data.x.iter().zip(&data.y) {
            let z = self.forward(*x, &mut act);
            // A NaN logit counts as confidently wrong.
            let capped = if z.is_nan() {
                if y > 0.5 {
                    -REPORTED_LOGIT_CAP
                } else {
                    REPORTED_LOGIT_CAP
                }
            } else {
                z.clamp(-REPORTED_LOGIT_CAP, REPORTED_LOGIT_CAP)
            };
            loss += bce(capped, y);
            if (z > 0.0) == (y > 0.5) {
                correct += 1;
            }
        }
        let n = data.len() as f64;
        (loss / n, correct as f64 / n)
    }
}

/// Optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub l2: f64,
    pub batch: usize,
}

/// Trains `model` in place, calling `checkpoint(step, model)` after the steps listed in
/// `checkpoints` (ascending). Returns how many steps ran: fewer than `steps` if an update would
/// have made a parameter non-finite, in which case the last finite parameters are kept.
pub fn train(
    model: &mut Mlp,
    data: &Samples,
    sgd: Sgd,
    steps: usize,
    rng: &mut Rng,
    mut checkpoint: impl FnMut(usize, &Mlp),
) -> usize {
    let n = model.params.len();
    let mut act = vec![0.0; model.hidden];
    let mut grad = vec![0.0; n];
    let mut velocity = vec![0.0; n];
    let mut next = vec![0.0; n];
    let mut order: Vec<usize> = (0..data.len()).collect();
    let mut cursor = data.len(); // forces a shuffle before the first batch
    for step in 1..=steps {
        // Epochs without replacement; a remainder smaller than a batch is skipped.
        if cursor + sgd.batch > order.len() {
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            cursor = 0;
        }
        let batch = &order[cursor..cursor + sgd.batch];
        cursor += sgd.batch;

        grad.fill(0.0);
        model.accumulate_gradient(data, batch, &mut act, &mut grad);
        let mut finite = true;
        for i in 0..n {
            let mut g = grad[i];
            if model.is_weight(i) {
                g += sgd.l2 * model.params[i];
            }
            velocity[i] = sgd.momentum * velocity[i] + g;
            next[i] = model.params[i] - sgd.lr * velocity[i];
            finite &= next[i].is_finite() && velocity[i].is_finite();
        }
        if !finite {
            return step - 1;
        }
        std::mem::swap(&mut model.params, &mut next);
        checkpoint(step, model);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_helpers_are_stable() {
        assert!((softplus(0.0) - core::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(softplus(-1000.0), 0.0);
        assert_eq!(softplus(1000.0), 1000.0);
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((bce(2.0, 1.0) - bce(-2.0, 0.0)).abs() < 1e-15);
    }

    /// The analytic gradient matches central finite differences.
    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = Rng::new(11);
        let data = crate::data::generate(crate::data::Dataset::Moons, 16, 0.1, &mut rng);
        let batch: Vec<usize> = (0..16).collect();
        for hidden in [0, 3] {
            let model = Mlp::new(hidden, &mut rng);
            let mut act = vec![0.0; hidden];
            let mut grad = vec![0.0; model.params.len()];
            model.accumulate_gradient(&data, &batch, &mut act, &mut grad);
            for (i, &analytic) in grad.iter().enumerate() {
                let loss_at = |delta: f64| {
                    let mut m = model.clone();
                    m.params[i] += delta;
                    let mut g = vec![0.0; m.params.len()];
                    m.accumulate_gradient(&data, &batch, &mut act.clone(), &mut g)
                };
                let eps = 1e-6;
                let numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
                assert!(
                    (numeric - analytic).abs() < 1e-7,
                    "hidden={hidden} i={i}: {numeric} vs {analytic}"
                );
            }
        }
    }
}
