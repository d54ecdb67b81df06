//! How numbers are checked against the reference, stated once for `moac verify`, the
//! tuner and the tests: one seeded generator of inputs ([`Rng`]), one tolerance table
//! ([`tolerance`]) and one error statistic ([`ErrorStats`]).

use moac::geometry::Dtype;

/// A small seeded generator (splitmix64): the same seed gives the same inputs on every
/// machine and backend.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// A generator seeded from `MOAC_TEST_SEED` or the clock (fresh inputs every run);
    /// prints the seed so a failure can be reproduced.
    pub fn fresh(what: &str) -> Rng {
        let seed = std::env::var("MOAC_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{what}: MOAC_TEST_SEED={seed}");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` uniform values times `scale`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    /// `n` uniform values already rounded to `dtype` (what a kernel actually sees).
    pub fn vec_in(&mut self, n: usize, dtype: Dtype) -> Vec<f32> {
        (0..n).map(|_| dtype.round(self.uniform())).collect()
    }

    /// `n` uniform values as element bits of `dtype`.
    pub fn bits(&mut self, n: usize, dtype: Dtype) -> Vec<u16> {
        (0..n).map(|_| dtype.to_bits(self.uniform())).collect()
    }
}

/// Tolerance (absolute, relative) of a kernel output against the reference: the output
/// is rounded to the dtype once (half an ulp) on top of f32 accumulation-order
/// differences. Cache contents are compared exactly (`(0, 0)`).
pub fn tolerance(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::F16 => (2e-3, 4e-3),
        Dtype::Bf16 => (1.6e-2, 1.6e-2),
    }
}

/// Largest absolute and relative error over a set of values, and whether all were
/// within a tolerance. NaN (an unwritten, poisoned element) counts as infinitely wrong.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ErrorStats {
    pub max_abs: f64,
    pub max_rel: f64,
    pub passed: bool,
    pub seen: usize,
}

impl Default for ErrorStats {
    fn default() -> Self {
        ErrorStats {
            max_abs: 0.0,
            max_rel: 0.0,
            passed: true,
            seen: 0,
        }
    }
}

impl ErrorStats {
    /// Adds one value: within `tol = (abs, rel)` when `|got - want| <= abs + rel * |want|`.
    pub fn add(&mut self, got: f64, want: f64, tol: (f64, f64)) {
        self.seen += 1;
        let err = (got - want).abs();
        if err.is_nan() || err > tol.0 + tol.1 * want.abs() {
            self.passed = false;
        }
        let err = if err.is_nan() { f64::INFINITY } else { err };
        self.max_abs = self.max_abs.max(err);
        self.max_rel = self.max_rel.max(err / want.abs().max(1e-3));
    }

    /// Passed, and something was compared at all.
    pub fn ok(&self) -> bool {
        self.passed && self.seen > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_fail_on_nan_and_on_error() {
        let mut s = ErrorStats::default();
        assert!(!s.ok(), "nothing compared is not a pass");
        s.add(1.0, 1.001, tolerance(Dtype::F16));
        assert!(s.ok());
        s.add(f64::NAN, 1.0, (1.0, 1.0));
        assert!(!s.ok() && s.max_abs.is_infinite());
        let mut t = ErrorStats::default();
        t.add(1.1, 1.0, tolerance(Dtype::F16));
        assert!(!t.ok());
    }

    #[test]
    fn seeded_generators_repeat() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        assert_eq!(a.vec(16, 1.0), b.vec(16, 1.0));
        let v = Rng::new(8).vec_in(1000, Dtype::Bf16);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert!(v.iter().any(|&x| x < -0.5) && v.iter().any(|&x| x > 0.5));
    }
}
