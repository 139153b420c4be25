//! Sweep specs (TOML or JSON): a grid or a seeded random search over named parameters, plus the
//! study's replication policy and resource bounds. Expands to one JSON input per work unit.

use std::collections::BTreeMap;

use accrete_proto::v1 as pb;
use serde::Deserialize;
use serde_json::{Map, Value};

/// A study described by a sweep file.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SweepSpec {
    /// The study's name; the CLI's `--name` overrides it.
    pub name: Option<String>,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub sweep: Search,
    /// Each parameter: a list of values (a grid axis, or a random choice), a range
    /// `{ min, max, log = false, int = false }` (random search only), or one fixed value.
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
    #[serde(default)]
    pub policy: PolicySpec,
    #[serde(default)]
    pub bounds: BoundsSpec,
    /// Per-metric tolerances; empty compares outputs by exact BLAKE3 equality.
    #[serde(default)]
    pub tolerance: BTreeMap<String, ToleranceSpec>,
}

impl SweepSpec {
    pub fn tolerance_pb(&self) -> Vec<pb::MetricTolerance> {
        self.tolerance
            .iter()
            .map(|(metric, t)| pb::MetricTolerance {
                metric: metric.clone(),
                abs: t.abs,
                rel: t.rel,
            })
            .collect()
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "snake_case", tag = "kind")]
pub enum Search {
    /// Every combination of the listed values. (A struct variant, not a unit one, so that
    /// `deny_unknown_fields` refuses e.g. `samples` here: serde ignores extra fields of an
    /// internally tagged unit variant.)
    Grid {},
    /// `samples` draws, reproducible from `seed`.
    Random {
        samples: u32,
        #[serde(default)]
        seed: u64,
    },
}

impl Default for Search {
    fn default() -> Search {
        Search::Grid {}
    }
}

/// BOINC's replication policy; unset fields take the server's defaults.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    pub min_quorum: Option<u32>,
    pub target_nresults: Option<u32>,
    pub max_error_results: Option<u32>,
    pub max_total_results: Option<u32>,
    pub max_success_results: Option<u32>,
    pub delay_bound_secs: Option<u32>,
    /// Adaptive replication: trusted workers run work units alone, with random spot checks.
    pub adaptive: Option<bool>,
}

/// A numeric tolerance on one metric, for modules that are not bit-deterministic: outputs
/// agree when the metric differs by at most `abs` or at most `rel` times the larger magnitude.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct ToleranceSpec {
    #[serde(default)]
    pub abs: f64,
    #[serde(default)]
    pub rel: f64,
}

/// Resource bounds for every work unit; unset fields take the server's defaults.
#[derive(Debug, Deserialize, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct BoundsSpec {
    pub fuel: Option<u64>,
    pub memory_mb: Option<u64>,
    pub output_kb: Option<u64>,
    pub wall_secs: Option<u64>,
}

impl PolicySpec {
    pub fn to_pb(self) -> pb::ReplicationPolicy {
        pb::ReplicationPolicy {
            min_quorum: self.min_quorum.unwrap_or(0),
            target_nresults: self.target_nresults.unwrap_or(0),
            max_error_results: self.max_error_results.unwrap_or(0),
            max_total_results: self.max_total_results.unwrap_or(0),
            max_success_results: self.max_success_results.unwrap_or(0),
            delay_bound_secs: self.delay_bound_secs.unwrap_or(0),
            adaptive: self.adaptive.unwrap_or(false),
        }
    }
}

impl BoundsSpec {
    pub fn to_pb(self) -> pb::ResourceBounds {
        pb::ResourceBounds {
            fuel: self.fuel.unwrap_or(0),
            memory_bytes: self.memory_mb.map_or(0, |m| m << 20),
            output_bytes: self.output_kb.map_or(0, |k| k << 10),
            wall_ms: self.wall_secs.map_or(0, |s| s * 1000),
        }
    }
}

/// Most work units one sweep may expand to.
pub const MAX_UNITS: usize = 1_000_000;

/// 2^53: integer ranges must lie within ±this, where f64 counts every integer.
const MAX_EXACT: f64 = 9_007_199_254_740_992.0;

impl SweepSpec {
    /// Parses TOML, or JSON when the text starts with `{`.
    pub fn parse(text: &str) -> Result<SweepSpec, String> {
        if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| format!("sweep spec (JSON): {e}"))
        } else {
            toml::from_str(text).map_err(|e| format!("sweep spec (TOML): {e}"))
        }
    }

    /// One JSON object per work unit, in a stable order.
    pub fn expand(&self) -> Result<Vec<Value>, String> {
        match self.sweep {
            Search::Grid {} => self.grid(),
            Search::Random { samples, seed } => self.random(samples, seed),
        }
    }

    fn grid(&self) -> Result<Vec<Value>, String> {
        let mut points = vec![Map::new()];
        for (name, spec) in &self.params {
            let values = match spec {
                Value::Array(values) if values.is_empty() => {
                    return Err(format!("parameter {name:?} has an empty list"));
                }
                Value::Array(values) => values.clone(),
                Value::Object(_) => {
                    return Err(format!(
                        "parameter {name:?} is a range, which only a random sweep can sample; \
                         list its values for a grid"
                    ));
                }
                fixed => vec![fixed.clone()],
            };
            if points.len().saturating_mul(values.len()) > MAX_UNITS {
                return Err(format!("the grid has more than {MAX_UNITS} points"));
            }
            points = points
                .into_iter()
                .flat_map(|p| {
                    values.iter().map(move |v| {
                        let mut p = p.clone();
                        p.insert(name.clone(), v.clone());
                        p
                    })
                })
                .collect();
        }
        Ok(points.into_iter().map(Value::Object).collect())
    }

    fn random(&self, samples: u32, seed: u64) -> Result<Vec<Value>, String> {
        if samples == 0 || samples as usize > MAX_UNITS {
            return Err(format!("samples must be between 1 and {MAX_UNITS}"));
        }
        let ranges: Vec<(&String, Param)> = self
            .params
            .iter()
            .map(|(name, spec)| Param::parse(name, spec).map(|p| (name, p)))
            .collect::<Result<_, _>>()?;
        let mut rng = SplitMix64(seed);
        Ok((0..samples)
            .map(|_| {
                let point: Map<String, Value> = ranges
                    .iter()
                    .map(|(name, p)| ((*name).clone(), p.sample(&mut rng)))
                    .collect();
                Value::Object(point)
            })
            .collect())
    }
}

enum Param {
    Fixed(Value),
    Choice(Vec<Value>),
    Range {
        min: f64,
        max: f64,
        log: bool,
        int: bool,
    },
}

impl Param {
    fn parse(name: &str, spec: &Value) -> Result<Param, String> {
        match spec {
            Value::Array(v) if v.is_empty() => Err(format!("parameter {name:?} has an empty list")),
            Value::Array(v) => Ok(Param::Choice(v.clone())),
            Value::Object(o) => {
                let num = |k: &str| {
                    o.get(k)
                        .and_then(Value::as_f64)
                        .ok_or_else(|| format!("parameter {name:?}: range needs a numeric {k:?}"))
                };
                let flag = |k: &str| o.get(k).and_then(Value::as_bool).unwrap_or(false);
                if let Some(k) = o
                    .keys()
                    .find(|k| !["min", "max", "log", "int"].contains(&k.as_str()))
                {
                    return Err(format!("parameter {name:?}: unknown range field {k:?}"));
                }
                let (min, max, log, int) = (num("min")?, num("max")?, flag("log"), flag("int"));
                if !min.is_finite() || !max.is_finite() || min > max || (log && min <= 0.0) {
                    return Err(format!(
                        "parameter {name:?}: need min <= max (and min > 0 for a log range)"
                    ));
                }
                // Integers are counted in f64 and i64: beyond 2^53 neither is exact.
                if int && (min.ceil() > max.floor() || min < -MAX_EXACT || max > MAX_EXACT) {
                    return Err(format!(
                        "parameter {name:?}: an integer range needs an integer between min and \
                         max, within ±2^53"
                    ));
                }
                Ok(Param::Range { min, max, log, int })
            }
            fixed => Ok(Param::Fixed(fixed.clone())),
        }
    }

    fn sample(&self, rng: &mut SplitMix64) -> Value {
        match self {
            Param::Fixed(v) => v.clone(),
            Param::Choice(v) => v[(rng.next() % v.len() as u64) as usize].clone(),
            Param::Range { min, max, log, int } => {
                let u = rng.unit();
                if *int {
                    let (lo, hi) = (min.ceil() as i64, max.floor() as i64);
                    Value::from(
                        lo + (u * ((hi - lo + 1) as f64)).floor().min((hi - lo) as f64) as i64,
                    )
                } else if *log {
                    // Rounding in ln/exp can land a hair outside the range.
                    Value::from(
                        (min.ln() + u * (max.ln() - min.ln()))
                            .exp()
                            .clamp(*min, *max),
                    )
                } else if (max - min).is_finite() {
                    Value::from((min + u * (max - min)).clamp(*min, *max))
                } else {
                    // A span wider than f64 holds (e.g. -1e308..1e308) would sample infinity.
                    Value::from((min * (1.0 - u) + max * u).clamp(*min, *max))
                }
            }
        }
    }
}

/// A tiny, stable generator so a sweep's seed names the same points in every version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_the_cartesian_product_in_name_order() {
        let s = SweepSpec::parse(
            r#"
            [params]
            lr = [0.1, 0.3]
            hidden = [4, 8, 16]
            steps = 100
            [policy]
            min_quorum = 3
            "#,
        )
        .unwrap();
        let pts = s.expand().unwrap();
        assert_eq!(pts.len(), 6);
        assert_eq!(pts[0].to_string(), r#"{"hidden":4,"lr":0.1,"steps":100}"#);
        assert_eq!(pts[5].to_string(), r#"{"hidden":16,"lr":0.3,"steps":100}"#);
        assert_eq!(s.policy.to_pb().min_quorum, 3);
    }

    #[test]
    fn random_is_reproducible_and_in_range() {
        let text = r#"{"sweep": {"kind": "random", "samples": 50, "seed": 9},
                       "params": {"lr": {"min": 0.001, "max": 1.0, "log": true},
                                  "hidden": {"min": 2, "max": 5, "int": true},
                                  "act": ["tanh", "relu"]}}"#;
        let a = SweepSpec::parse(text).unwrap().expand().unwrap();
        let b = SweepSpec::parse(text).unwrap().expand().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        for p in &a {
            let lr = p["lr"].as_f64().unwrap();
            let h = p["hidden"].as_i64().unwrap();
            assert!((0.001..=1.0).contains(&lr) && (2..=5).contains(&h), "{p}");
        }
        assert!(a.iter().any(|p| p["hidden"] == 5) && a.iter().any(|p| p["hidden"] == 2));
    }

    #[test]
    fn type_errors_are_reported() {
        assert!(
            SweepSpec::parse("[policy]\nmin_quorum = \"two\"")
                .unwrap_err()
                .contains("min_quorum")
        );
        assert!(
            SweepSpec::parse("[polcy]\nx = 1")
                .unwrap_err()
                .contains("polcy")
        );
        let range_in_grid = SweepSpec::parse("[params]\nlr = { min = 0.1, max = 1.0 }").unwrap();
        assert!(range_in_grid.expand().unwrap_err().contains("range"));
        let bad = SweepSpec::parse(
            "[sweep]\nkind = \"random\"\nsamples = 3\n[params]\nlr = { min = 2.0, max = 1.0 }",
        )
        .unwrap();
        assert!(bad.expand().is_err());
    }

    #[test]
    fn a_grid_refuses_the_random_search_fields() {
        let err = SweepSpec::parse("[sweep]\nkind = \"grid\"\nsamples = 4\n").unwrap_err();
        assert!(err.contains("samples"), "{err}");
    }

    #[test]
    fn sampled_ranges_stay_in_range_at_the_edges() {
        let sample = |range: &str| {
            let text = format!(
                r#"{{"sweep": {{"kind": "random", "samples": 200, "seed": 3}},
                     "params": {{"x": {range}}}}}"#
            );
            SweepSpec::parse(&text).unwrap().expand()
        };
        // Spans wider than f64 can hold.
        for p in sample(r#"{"min": -1e308, "max": 1.7e308}"#).unwrap() {
            let x = p["x"].as_f64().unwrap_or_else(|| panic!("{p}"));
            assert!((-1e308..=1.7e308).contains(&x), "{p}");
        }
        for p in sample(r#"{"min": 1e-300, "max": 1e300, "log": true}"#).unwrap() {
            let x = p["x"].as_f64().unwrap_or_else(|| panic!("{p}"));
            assert!((1e-300..=1e300).contains(&x), "{p}");
        }
        // No integer inside, and integers beyond what f64 counts exactly.
        assert!(sample(r#"{"min": 0.2, "max": 0.8, "int": true}"#).is_err());
        assert!(sample(r#"{"min": -1e19, "max": 1e19, "int": true}"#).is_err());
        let p = sample(r#"{"min": 0.2, "max": 1.8, "int": true}"#).unwrap();
        assert!(p.iter().all(|p| p["x"] == 1), "{p:?}");
    }
}
