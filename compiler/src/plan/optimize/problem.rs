//! The problem the plan optimizer solves: the candidate span rules and MoA's grid of
//! them ([`Candidate`], [`candidate_grid`]), the [`Problem`] with its checks and the
//! values and costs of its plans, the [`Solution`] a solve returns, and what every solve
//! starts with: the check of its request (the primary objective, the caps) and the caps
//! padded to one per objective.

use crate::error::{Error, Result};
use std::time::Duration;

/// Costs (each, and their sums over the units) must stay below this to be exact in `f64`.
const F64_EXACT: u64 = 1 << 53;

/// One candidate span rule `S = alpha + beta * N` (tokens).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The constant part of the span, in tokens (may be negative).
    pub alpha: f64,
    /// The part of the span proportional to the sequence length.
    pub beta: f64,
}

impl Candidate {
    /// The span this rule gives at sequence length `n` (before any clamping).
    pub fn span(&self, n: u64) -> f64 {
        self.alpha + self.beta * n as f64
    }
}

/// MoA's candidate grid.
///
/// `alpha` runs from `-(the largest multiple of the step <= the smallest profile length)`
/// up to the largest profile length in steps of `alpha_step`; `beta` runs over
/// `0, 1/8, 2/8, ..., 1`. A pair is kept when `alpha + beta * Lmax <= Lmax`, `Lmax` being
/// the largest of the profile and constraint lengths, and `alpha + beta * Lmin > 0`,
/// `Lmin` being the smallest profile length. The grid is sorted by `(beta, alpha)`.
///
/// The step defaults (when `alpha_step` is `None`) to 1024 if the smallest profile length
/// is at least 2048, else to 512.
///
/// # Errors
///
/// [`Error::Usage`] when there are no profile lengths, a length is zero, or `alpha_step`
/// is zero.
pub fn candidate_grid(
    profile_lengths: &[u64],
    constraint_lengths: &[u64],
    alpha_step: Option<u64>,
) -> Result<Vec<Candidate>> {
    let (Some(&lmin), Some(&pmax)) = (profile_lengths.iter().min(), profile_lengths.iter().max())
    else {
        return Err(Error::Usage(
            "candidate grid: at least one profile length is needed".to_string(),
        ));
    };
    if profile_lengths.contains(&0) || constraint_lengths.contains(&0) {
        return Err(Error::Usage(
            "candidate grid: sequence lengths must be positive".to_string(),
        ));
    }
    let step = match alpha_step {
        Some(0) => {
            return Err(Error::Usage(
                "candidate grid: the alpha step must be positive".to_string(),
            ))
        }
        Some(step) => step,
        None if lmin >= 2048 => 1024,
        None => 512,
    };
    let lmax = constraint_lengths.iter().copied().fold(pmax, u64::max);
    // Exact integer arithmetic on 8 * (alpha + beta * L), beta = eighths / 8.
    let (lmin, pmax, lmax, step) = (
        i128::from(lmin),
        i128::from(pmax),
        i128::from(lmax),
        i128::from(step),
    );
    let lowest = -(lmin / step * step);
    let mut grid = Vec::new();
    for eighths in 0..=8i128 {
        let mut alpha = lowest;
        while alpha <= pmax {
            if 8 * alpha + eighths * lmax <= 8 * lmax && 8 * alpha + eighths * lmin > 0 {
                grid.push(Candidate {
                    alpha: alpha as f64,
                    beta: eighths as f64 / 8.0,
                });
            }
            alpha += step;
        }
    }
    Ok(grid)
}

/// A plan optimization problem: every unit picks exactly one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Number of units (in the caller, one per layer and KV head).
    pub units: usize,
    /// Number of candidates each unit chooses from.
    pub candidates: usize,
    /// `loss[i][k * candidates + c]`: the loss of unit `k` with candidate `c` under
    /// objective `i` (one objective per profile length). At least one objective.
    pub loss: Vec<Vec<f64>>,
    /// `cost[j][k * candidates + c]`: the cost (KV slots, say) of unit `k` with candidate
    /// `c` in constraint row `j`. May be empty (no budgets).
    pub cost: Vec<Vec<u64>>,
    /// `budget[j]`: the sum of the chosen costs in row `j` must not exceed it.
    pub budget: Vec<u64>,
    /// `floor[j]`: when given, the sum of the chosen costs in row `j` must reach it (MoA
    /// spends at least 90% of the budget).
    pub floor: Option<Vec<u64>>,
    /// `(group_size, r)`: units form consecutive groups of `group_size` (a layer's KV
    /// heads), and each group may use at most `r` distinct candidates (the kernels'
    /// limit).
    pub max_rules_per_group: Option<(usize, usize)>,
}

impl Problem {
    /// The number of objectives.
    pub fn objectives(&self) -> usize {
        self.loss.len()
    }

    /// The number of constraint rows.
    pub fn rows(&self) -> usize {
        self.cost.len()
    }

    pub(super) fn at(&self, unit: usize, candidate: usize) -> usize {
        unit * self.candidates + candidate
    }

    /// Checks that the sizes agree, every loss is finite and the costs are small enough
    /// to be exact in `f64` (each row's largest possible sum at most `2^53`).
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] naming the first inconsistency.
    pub fn check(&self) -> Result<()> {
        let usage = |message: String| Err(Error::Usage(format!("plan optimization: {message}")));
        if self.units == 0 {
            return usage("there are no units".to_string());
        }
        if self.candidates == 0 {
            return usage("there are no candidates".to_string());
        }
        let Some(size) = self.units.checked_mul(self.candidates) else {
            return usage("units x candidates overflows".to_string());
        };
        if self.loss.is_empty() {
            return usage("at least one objective is needed".to_string());
        }
        for (i, row) in self.loss.iter().enumerate() {
            if row.len() != size {
                return usage(format!(
                    "objective {i} has {} losses, expected {} units x {} candidates = {size}",
                    row.len(),
                    self.units,
                    self.candidates
                ));
            }
            if let Some(at) = row.iter().position(|v| !v.is_finite()) {
                return usage(format!(
                    "objective {i}: the loss of unit {}, candidate {} is {} (not finite)",
                    at / self.candidates,
                    at % self.candidates,
                    row[at]
                ));
            }
        }
        if self.budget.len() != self.cost.len() {
            return usage(format!(
                "{} cost rows but {} budgets",
                self.cost.len(),
                self.budget.len()
            ));
        }
        if let Some(floor) = &self.floor {
            if floor.len() != self.cost.len() {
                return usage(format!(
                    "{} cost rows but {} floors",
                    self.cost.len(),
                    floor.len()
                ));
            }
        }
        for (j, row) in self.cost.iter().enumerate() {
            if row.len() != size {
                return usage(format!(
                    "cost row {j} has {} costs, expected {} units x {} candidates = {size}",
                    row.len(),
                    self.units,
                    self.candidates
                ));
            }
            let mut most: u128 = 0;
            for unit in row.chunks(self.candidates) {
                most += u128::from(unit.iter().copied().max().unwrap_or(0));
            }
            if most > u128::from(F64_EXACT) {
                return usage(format!(
                    "cost row {j}: the largest possible sum {most} exceeds 2^53"
                ));
            }
        }
        if let Some((group_size, rules)) = self.max_rules_per_group {
            if group_size == 0 || rules == 0 {
                return usage(format!(
                    "max rules per group ({group_size}, {rules}): both must be positive"
                ));
            }
            if !self.units.is_multiple_of(group_size) {
                return usage(format!(
                    "{} units do not split into groups of {group_size}",
                    self.units
                ));
            }
        }
        Ok(())
    }

    fn check_choice(&self, choice: &[usize]) -> Result<()> {
        if choice.len() != self.units {
            return Err(Error::Usage(format!(
                "plan optimization: a choice of {} units for a problem of {}",
                choice.len(),
                self.units
            )));
        }
        if let Some(k) = choice.iter().position(|&c| c >= self.candidates) {
            return Err(Error::Usage(format!(
                "plan optimization: unit {k} chooses candidate {}, but there are {}",
                choice[k], self.candidates
            )));
        }
        Ok(())
    }

    /// Each objective's value and each cost row's sum for a choice (one candidate per
    /// unit). Expects a checked problem.
    ///
    /// # Errors
    ///
    /// [`Error::Usage`] when the choice has the wrong length or names a candidate that
    /// does not exist.
    pub fn evaluate(&self, choice: &[usize]) -> Result<(Vec<f64>, Vec<u64>)> {
        self.check_choice(choice)?;
        Ok((self.objective_values(choice), self.cost_sums(choice)))
    }

    pub(super) fn objective_values(&self, choice: &[usize]) -> Vec<f64> {
        self.row_sums(&self.loss, choice)
    }

    fn cost_sums(&self, choice: &[usize]) -> Vec<u64> {
        self.row_sums(&self.cost, choice)
    }

    /// Per row of `table` (losses or costs, unit-major), the sum over units of the
    /// chosen candidate's entry.
    fn row_sums<T: Copy + std::iter::Sum<T>>(&self, table: &[Vec<T>], choice: &[usize]) -> Vec<T> {
        table
            .iter()
            .map(|row| {
                choice
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| row[self.at(k, c)])
                    .sum()
            })
            .collect()
    }

    /// Whether a choice meets every budget, floor and the rule limit per group (caps on
    /// objectives are not part of the problem). Expects a checked problem.
    ///
    /// # Errors
    ///
    /// As [`Problem::evaluate`].
    pub fn is_feasible(&self, choice: &[usize]) -> Result<bool> {
        self.check_choice(choice)?;
        Ok(self.violation(choice).is_none())
    }

    /// What a choice breaks among the budgets, floors and the rule limit, if anything.
    pub(super) fn violation(&self, choice: &[usize]) -> Option<String> {
        for (j, sum) in self.cost_sums(choice).into_iter().enumerate() {
            if sum > self.budget[j] {
                return Some(format!(
                    "cost row {j} sums to {sum}, over its budget {}",
                    self.budget[j]
                ));
            }
            if let Some(floor) = &self.floor {
                if sum < floor[j] {
                    return Some(format!(
                        "cost row {j} sums to {sum}, under its floor {}",
                        floor[j]
                    ));
                }
            }
        }
        if let Some((group_size, rules)) = self.max_rules_per_group {
            for (g, group) in choice.chunks(group_size).enumerate() {
                let mut distinct = group.to_vec();
                distinct.sort_unstable();
                distinct.dedup();
                if distinct.len() > rules {
                    return Some(format!(
                        "group {g} uses {} distinct candidates, over the limit {rules}",
                        distinct.len()
                    ));
                }
            }
        }
        None
    }
}

/// One plan the optimizer found.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    /// The chosen candidate of every unit.
    pub choice: Vec<usize>,
    /// Every objective's value for the choice, recomputed from the losses.
    pub objectives: Vec<f64>,
    /// Every cost row's sum for the choice.
    pub costs: Vec<u64>,
    /// The objective that was minimized.
    pub primary: usize,
    /// A proven lower bound on the primary objective under the solve's budgets and caps.
    pub bound: f64,
    /// The relative optimality gap, `(value - bound) / max(|value|, tiny)`.
    pub gap: f64,
    /// Whether the solver proved the plan optimal (or the gap is at most `1e-9`).
    pub exact: bool,
}

/// Checks the primary objective and the caps against a checked problem.
pub(super) fn check_request(problem: &Problem, primary: usize, caps: &[Option<f64>]) -> Result<()> {
    let m = problem.objectives();
    if primary >= m {
        return Err(Error::Usage(format!(
            "plan optimization: primary objective {primary}, but there are {m}"
        )));
    }
    if caps.len() > m {
        return Err(Error::Usage(format!(
            "plan optimization: {} caps for {m} objectives",
            caps.len()
        )));
    }
    if let Some(i) = caps.iter().position(|c| c.is_some_and(f64::is_nan)) {
        return Err(Error::Usage(format!(
            "plan optimization: the cap on objective {i} is NaN"
        )));
    }
    Ok(())
}

/// The caps padded to one per objective, `+inf` meaning none.
pub(super) fn full_caps(problem: &Problem, caps: &[Option<f64>]) -> Vec<Option<f64>> {
    (0..problem.objectives())
        .map(|i| {
            caps.get(i)
                .copied()
                .flatten()
                .filter(|e| *e != f64::INFINITY)
        })
        .collect()
}

/// How hard [`solve_with`](super::solve_with) and [`pareto_with`](super::pareto_with) try. The default proves the optimum,
/// however long that takes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Stop once the plan is proven within this relative distance of the optimum (in the
    /// primary objective above its least possible value, so the gap in
    /// [`Solution::gap`] is at most this when losses are non-negative). 0 asks for the
    /// optimum.
    pub mip_gap: f64,
    /// The wall-clock budget of one solve (for [`pareto_with`](super::pareto_with), of
    /// each of its solves).
    /// When it runs out, the best plan found so far is returned with its gap.
    pub time_limit: Option<Duration>,
}

impl Limits {
    pub(super) fn check(&self) -> Result<()> {
        if !self.mip_gap.is_finite() || self.mip_gap < 0.0 {
            return Err(Error::Usage(format!(
                "plan optimization: the MIP gap must be a finite non-negative number, not {}",
                self.mip_gap
            )));
        }
        Ok(())
    }
}
