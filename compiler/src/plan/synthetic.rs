//! Synthetic plans of any shape, for benchmarks and tests of shapes no published plan
//! has (Llama-3-70B-, Llama-3.1-405B-shaped, every group size): each head's rule is drawn
//! from a grid like the one MoA's optimizer picks from, deterministically per seed.

use super::{validate, ModelShape, Settings, ValidPlan};
use crate::error::Result;
use std::path::Path;

/// The alphas a synthetic head draws from (MoA's grid: multiples of 1024 tokens).
pub const ALPHAS: [f64; 5] = [-1024.0, 0.0, 1024.0, 2048.0, 4096.0];
/// The betas a synthetic head draws from (fractions of N).
pub const BETAS: [f64; 8] = [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0];

/// How the rules of a synthetic plan vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rules {
    /// Every head draws from [`ALPHAS`] x [`BETAS`]: a handful of distinct rules, as in
    /// real plans.
    Grid,
    /// Every head of every layer has a rule of its own (distinct alphas): the worst case
    /// for the size of a unit's rule tables.
    AllDistinct,
}

/// A plan of `model`'s shape named `name`, rules as `rules` says, the same for the same
/// seed.
pub fn synthetic(name: &str, model: ModelShape, rules: Rules, seed: u64) -> Result<ValidPlan> {
    let mut state = seed ^ 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut alphas, mut betas) = (Vec::new(), Vec::new());
    for l in 0..model.num_layers {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for h in 0..model.num_query_heads {
            match rules {
                Rules::Grid => {
                    a.push(ALPHAS[(next() % ALPHAS.len() as u64) as usize]);
                    b.push(BETAS[(next() % BETAS.len() as u64) as usize]);
                }
                Rules::AllDistinct => {
                    a.push(((l * model.num_query_heads + h) * 64) as f64);
                    b.push(BETAS[(next() % BETAS.len() as u64) as usize]);
                }
            }
        }
        alphas.push(a);
        betas.push(b);
    }
    validate(Path::new(name), model, Settings::default(), &alphas, &betas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_determinism() {
        let m = ModelShape {
            num_layers: 3,
            num_query_heads: 16,
            num_kv_heads: 1,
            head_dim: 64,
        };
        let a = synthetic("a", m, Rules::Grid, 7).unwrap();
        let b = synthetic("a", m, Rules::Grid, 7).unwrap();
        assert_eq!(a.sha256(), b.sha256());
        assert_ne!(
            a.sha256(),
            synthetic("a", m, Rules::Grid, 8).unwrap().sha256()
        );
        assert_eq!(a.num_layers(), 3);
        let d = synthetic("d", m, Rules::AllDistinct, 1).unwrap();
        let mut keys: Vec<_> = d.layers().flat_map(|l| l.iter().map(|r| r.key())).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 48);
    }
}
