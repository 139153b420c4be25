//! Adoption proposals as pure rules: which inputs re-check a finding (the same input on other
//! workers, plus other seeds when the input has one) and what the re-runs say about it (the
//! outcome's evidence kind, its detail, and the finding's confidence after it).

use serde_json::{Value, json};

use crate::scheduler::{PRIOR_RIGHT, PRIOR_WRONG};

/// A worker's error rate before any evidence: the mean of the trust engine's Beta prior.
const PRIOR_WORKER_ERROR: f64 = PRIOR_WRONG / (PRIOR_WRONG + PRIOR_RIGHT);

/// Seed fields, in the order they are looked for. `init_seed` first: it moves only the
/// initialisation (tiny-model), which is what seed noise is about; `seed` otherwise.
pub const SEED_FIELDS: [&str; 2] = ["init_seed", "seed"];

/// Standard deviations of the seed spread that an improvement over the parent must exceed.
pub const NOISE_SIGMAS: f64 = 2.0;

/// Inputs that differ from one input only in the seed: (seed, input bytes).
pub type SeedVariants = Vec<(u64, Vec<u8>)>;

/// The input with its seed replaced by `k` other seeds (the next ones after it), if the input is
/// a JSON object with an unsigned integer seed field: (field, [(seed, input)]).
pub fn seed_variants(input: &[u8], k: u32) -> Option<(&'static str, SeedVariants)> {
    let Value::Object(obj) = serde_json::from_slice::<Value>(input).ok()? else {
        return None;
    };
    let field = SEED_FIELDS.into_iter().find(|f| obj.contains_key(*f))?;
    let base = obj[field].as_u64()?;
    let variants = (1..=k as u64)
        .map(|i| {
            let seed = base.wrapping_add(i);
            let mut o = obj.clone();
            o.insert(field.to_string(), json!(seed));
            (seed, Value::Object(o).to_string().into_bytes())
        })
        .collect();
    Some((field, variants))
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// The seed-noise test: does the finding's improvement over its parent exceed the seed noise?
/// Improvement is measured from the mean over seeds (the finding's own seed and the others), in
/// the metric's better direction; noise is the sample standard deviation over those seeds. The
/// parent is one run with about the same noise, so the difference of one parent run and the
/// seed mean has a spread near one standard deviation: requiring `> 2 sd` is roughly a one-sided
/// test at the 2.5 % level. None when it cannot be applied (no parent value, fewer than 2 seeds).
pub fn improvement_holds(
    values: &[f64],
    parent: Option<f64>,
    descending: bool,
) -> Option<(bool, f64)> {
    let parent = parent?;
    if values.len() < 2 {
        return None;
    }
    let (mean, sd) = mean_sd(values);
    let improvement = if descending {
        mean - parent
    } else {
        parent - mean
    };
    Some((improvement > NOISE_SIGMAS * sd, improvement))
}

/// What an adoption's re-runs found.
#[derive(Debug, Clone)]
pub struct Reruns {
    pub original_hash: Vec<u8>,
    pub original_value: f64,
    pub confidence: f64,
    /// The same input on other workers: (output hash, distinct agreeing workers), if it validated.
    pub rerun: Option<(Vec<u8>, i32)>,
    pub seed_field: Option<String>,
    /// (seed, metric value) of each seed re-run that validated.
    pub seed_values: Vec<(u64, f64)>,
    pub original_seed: Option<u64>,
    pub parent: Option<(i64, f64)>,
    pub metric: String,
    pub descending: bool,
}

/// The outcome: evidence kind, detail, confidence after.
pub fn outcome(r: &Reruns) -> (&'static str, Value, f64) {
    let reproduced = r.rerun.as_ref().is_some_and(|(h, _)| *h == r.original_hash);
    let mut values = vec![r.original_value];
    values.extend(r.seed_values.iter().map(|(_, v)| *v));
    let mut seeds: Vec<Option<u64>> = vec![r.original_seed];
    seeds.extend(r.seed_values.iter().map(|(s, _)| Some(*s)));
    let (mean, sd) = mean_sd(&values);
    let test = if r.seed_values.is_empty() {
        None
    } else {
        improvement_holds(&values, r.parent.map(|p| p.1), r.descending)
    };
    let (kind, confidence) = match (reproduced, test) {
        // Independent workers computed other bytes: the original was wrong.
        (false, _) => ("failed_to_reproduce", r.confidence * PRIOR_WORKER_ERROR),
        // The bytes hold but the improvement was seed luck: the claim does not hold.
        (true, Some((false, _))) => ("failed_to_reproduce", r.confidence * 0.5),
        (true, t) => {
            let k = r.rerun.as_ref().map_or(0, |(_, k)| *k);
            let c = 1.0 - (1.0 - r.confidence) * PRIOR_WORKER_ERROR.powi(k);
            (if t.is_some() { "adopted" } else { "reproduced" }, c)
        }
    };
    let detail = json!({
        "output_reproduced": reproduced,
        "rerun_workers": r.rerun.as_ref().map(|(_, k)| *k),
        "metric": r.metric,
        "better": if r.descending { "higher" } else { "lower" },
        "seed_field": r.seed_field,
        "seeds": seeds,
        "values": values,
        "mean": finite(mean),
        "sd": finite(sd),
        "parent_finding": r.parent.map(|p| p.0),
        "parent_value": r.parent.map(|p| p.1),
        "improvement": test.map(|t| finite(t.1)),
        "holds_over_seeds": test.map(|t| t.0),
        "test": format!("improvement of the seed mean over the parent > {NOISE_SIGMAS} sd of the seed values"),
    });
    (kind, detail, confidence.clamp(0.0, 1.0))
}

fn finite(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_variants_prefer_init_seed_and_keep_other_fields() {
        let (field, v) = seed_variants(br#"{"seed":3,"init_seed":10,"lr":0.1}"#, 2).unwrap();
        assert_eq!(field, "init_seed");
        assert_eq!(v[0].0, 11);
        let x: Value = serde_json::from_slice(&v[1].1).unwrap();
        assert_eq!(x, json!({"seed": 3, "init_seed": 12, "lr": 0.1}));
        assert!(seed_variants(br#"{"lr":0.1}"#, 2).is_none());
        assert!(seed_variants(b"not json", 2).is_none());
    }

    #[test]
    fn noise_test_separates_real_improvements_from_luck() {
        // Parent at 1.0; a real improvement: seeds all near 0.5.
        assert_eq!(
            improvement_holds(&[0.5, 0.52, 0.48], Some(1.0), false).map(|t| t.0),
            Some(true)
        );
        // Luck: one seed at 0.5, the others around the parent.
        assert_eq!(
            improvement_holds(&[0.5, 1.1, 0.95, 1.05], Some(1.0), false).map(|t| t.0),
            Some(false)
        );
        assert_eq!(
            improvement_holds(&[2.0, 2.1], Some(1.0), true).map(|t| t.0),
            Some(true)
        );
        assert!(improvement_holds(&[0.5], Some(1.0), false).is_none());
        assert!(improvement_holds(&[0.5, 0.6], None, false).is_none());
    }

    #[test]
    fn outcome_kinds() {
        let base = Reruns {
            original_hash: vec![1; 32],
            original_value: 0.5,
            confidence: 0.99,
            rerun: Some((vec![1; 32], 2)),
            seed_field: Some("init_seed".into()),
            seed_values: vec![(1, 0.51), (2, 0.49)],
            original_seed: Some(0),
            parent: Some((7, 1.0)),
            metric: "val_loss".into(),
            descending: false,
        };
        let (kind, detail, c) = outcome(&base);
        assert_eq!(kind, "adopted");
        assert!(c > 0.99);
        assert_eq!(detail["holds_over_seeds"], json!(true));
        let luck = Reruns {
            seed_values: vec![(1, 1.1), (2, 0.95)],
            ..base.clone()
        };
        let (kind, _, c) = outcome(&luck);
        assert_eq!(kind, "failed_to_reproduce");
        assert!(c < 0.99);
        let wrong = Reruns {
            rerun: Some((vec![2; 32], 2)),
            ..base.clone()
        };
        assert_eq!(outcome(&wrong).0, "failed_to_reproduce");
        let no_seeds = Reruns {
            seed_values: vec![],
            ..base
        };
        assert_eq!(outcome(&no_seeds).0, "reproduced");
    }
}
