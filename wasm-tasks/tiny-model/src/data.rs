//! Seeded synthetic two-class data sets in the plane, none of them linearly separable.

use core::f64::consts::{PI, TAU};

use serde::Deserialize;

use crate::rng::Rng;

/// Which two-class problem to learn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// Two interleaving half circles (scikit-learn's `make_moons`), centred on the origin.
    Moons,
    /// Two concentric circles of radius 0.5 (class 0) and 1 (class 1).
    Rings,
    /// Two interleaved spirals of 1.5 turns; hard, so use a small `noise` (about 0.05).
    Spirals,
}

/// Points and their labels (0 or 1), classes alternating so every prefix is balanced.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub x: Vec<[f64; 2]>,
    pub y: Vec<f64>,
}

impl Samples {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }
}

/// Draws `size` labelled points with Gaussian noise of standard deviation `noise` per coordinate.
pub fn generate(dataset: Dataset, size: usize, noise: f64, rng: &mut Rng) -> Samples {
    let mut x = Vec::with_capacity(size);
    let mut y = Vec::with_capacity(size);
    for i in 0..size {
        let class = i % 2;
        let u = rng.uniform();
        let clean = match dataset {
            Dataset::Moons => {
                let t = PI * u;
                let (c, s) = (libm::cos(t), libm::sin(t));
                if class == 0 {
                    [c - 0.5, s - 0.25]
                } else {
                    [0.5 - c, 0.25 - s]
                }
            }
            Dataset::Rings => {
                let r = if class == 0 { 0.5 } else { 1.0 };
                let t = TAU * u;
                [r * libm::cos(t), r * libm::sin(t)]
            }
            Dataset::Spirals => {
                let t = 3.0 * PI * u + PI * class as f64;
                let r = 0.1 + 0.9 * u;
                [r * libm::cos(t), r * libm::sin(t)]
            }
        };
        x.push([
            clean[0] + noise * rng.gaussian(),
            clean[1] + noise * rng.gaussian(),
        ]);
        y.push(class as f64);
    }
    Samples { x, y }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_seeded_and_bounded() {
        for dataset in [Dataset::Moons, Dataset::Rings, Dataset::Spirals] {
            let a = generate(dataset, 101, 0.1, &mut Rng::new(1));
            let b = generate(dataset, 101, 0.1, &mut Rng::new(1));
            assert_eq!(a, b);
            assert_eq!(a.len(), 101);
            assert_eq!(a.y.iter().filter(|&&y| y == 1.0).count(), 50);
            assert!(a.x.iter().all(|p| p[0].abs() < 3.0 && p[1].abs() < 3.0));
            assert_ne!(a, generate(dataset, 101, 0.1, &mut Rng::new(2)));
        }
    }
}
