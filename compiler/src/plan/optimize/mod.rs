//! The solver behind MoA's plan optimization: a multiple-choice knapsack with several
//! budget rows and several objectives.
//!
//! There are `units` (in the caller, one per layer and KV head); each picks exactly one of
//! `candidates` span rules ([`Candidate`], `S = alpha + beta * N`). Each choice has a loss
//! under every objective (one per profile length) and a cost in every constraint row (KV
//! slots at one length, say). [`solve`] minimizes one objective under the budgets and
//! optional caps on the others; [`pareto`] runs MoA's epsilon-constraint method over
//! such solves; [`exhaustive`] enumerates every choice and is the reference for tests.
//!
//! Nothing here knows about models: the inputs are plain numbers.
//!
//! # How a solve works
//!
//! Handed whole to the pure-Rust MILP solver `microlp`, a problem of the real size (90
//! units of 60 candidates, a few rows) takes it seconds to minutes per solve. So a solve
//! first drops candidates that cannot matter (over a budget alone, or dominated), then
//! takes multipliers of the side rows from a subgradient ascent on the Lagrangian (which
//! keeps "one candidate per unit" and, for small groups, the rule limit). The multipliers
//! give a lower bound `L` and, per candidate of each unit, a reduced cost: no plan worth
//! `U` uses a candidate whose reduced cost exceeds `U - L`. `microlp` then solves the
//! 0-1 program over a small core of candidates (a few per unit), and the core widens
//! until the plan it yields proves that nothing outside could do better. Cells of
//! [`pareto`] that cap an objective near its minimum are narrowed the same way by that
//! objective's anchor.
//!
//! Solves without caps take milliseconds; with caps on other objectives (the Pareto
//! grid) they can take seconds to minutes to prove, so [`solve_with`] and [`pareto_with`]
//! accept [`Limits`] (a MIP gap, a time per solve) and every [`Solution`] reports its
//! proven gap.
//!
//! # Caps and tolerances
//!
//! Costs are integers and every budget and floor is met exactly. Losses are real numbers,
//! and the solver holds its rows to a small absolute tolerance, so a cap `e` on objective
//! `i` is met when `f_i <= e + CAP_SLACK * (e - b_i) + 1e-12 * |e|`, where `b_i` is the
//! least value `f_i` can take (every unit at its least loss). [`exhaustive`] uses the same
//! rule; the solver sees a little less room, so the two agree except where a plan lies
//! within that slack of the cap.

use crate::error::{Error, Result};
use microlp::{
    ComparisonOp, OptimizationDirection, SolutionStatus, SolveOptions, SolveOutcome, Variable,
};
use std::time::{Duration, Instant};

/// The number of cap values per capped objective that [`pareto`] uses when the caller has
/// no preference (MoA's default).
pub const DEFAULT_INTERVALS: usize = 4;

/// The most choices [`exhaustive`] enumerates (`candidates ^ units`).
pub const EXHAUSTIVE_LIMIT: u64 = 2_000_000;

/// How far beyond a cap an objective may lie, relative to the cap's room above the
/// objective's least possible value (see the module documentation).
pub const CAP_SLACK: f64 = 1e-6;

/// How far beyond [`CAP_SLACK`] a plan the solver returns may lie before it is refused
/// as a solver failure, relative to the cap's room: round-off, with room to spare.
const CAP_VERIFY_SLACK: f64 = 1e-7;

/// A gap at or below this (relative) counts as a proven optimum.
const EXACT_GAP: f64 = 1e-9;

/// The relative tolerance of the dominance test in [`pareto`].
const DOMINANCE_TOLERANCE: f64 = 1e-12;

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

    fn at(&self, unit: usize, candidate: usize) -> usize {
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

    fn objective_values(&self, choice: &[usize]) -> Vec<f64> {
        self.loss
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

    fn cost_sums(&self, choice: &[usize]) -> Vec<u64> {
        self.cost
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
    fn violation(&self, choice: &[usize]) -> Option<String> {
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

/// A problem prepared for the solver: per-unit minima, spreads and the candidates that
/// can matter.
struct Model<'a> {
    problem: &'a Problem,
    /// `[i][k]`: the smallest loss of unit `k` under objective `i`.
    min_loss: Vec<Vec<f64>>,
    /// `[i]`: the sum over the units of `min_loss`.
    base_loss: Vec<f64>,
    /// `[i]`: the largest `loss - min_loss` of any unit and candidate.
    spread: Vec<f64>,
    /// `[j][k]`: the smallest cost of unit `k` in row `j`.
    min_cost: Vec<Vec<u64>>,
    /// `[j]`: the sum over the units of `min_cost`.
    base_cost: Vec<u64>,
    /// `[k]`: the candidates of unit `k` that the solver considers, ascending.
    kept: Vec<Vec<usize>>,
    /// Set when the preparation already proved the problem infeasible.
    infeasible: bool,
    /// How hard each solve tries.
    limits: Limits,
}

/// What one MILP solve found.
struct Found {
    choice: Vec<usize>,
    /// The solver proved optimality.
    proven: bool,
    /// A lower bound on the optimum, in the units of the program's objective.
    bound: f64,
    /// What the Lagrangian proved about the program's plans.
    core: Core,
}

/// The Lagrangian's verdict on a program: every plan the MILP solver could accept is
/// worth at least `lower + sum of its variables' rc - slack` (program units).
struct Core {
    /// The reduced cost of every variable of the program.
    rc: Vec<f64>,
    /// The Lagrangian bound.
    lower: f64,
    /// What the solver's tolerances on the rows can take off a plan's worth.
    slack: f64,
}

impl<'a> Model<'a> {
    /// The model of a checked problem with every candidate kept.
    fn new(problem: &'a Problem) -> Model<'a> {
        let k_units = problem.units;
        let cands = problem.candidates;
        let mut min_loss = Vec::with_capacity(problem.objectives());
        let mut spread = Vec::with_capacity(problem.objectives());
        for row in &problem.loss {
            let mins: Vec<f64> = row
                .chunks(cands)
                .map(|u| u.iter().copied().fold(f64::INFINITY, f64::min))
                .collect();
            let s = row
                .chunks(cands)
                .zip(&mins)
                .map(|(u, &m)| u.iter().map(|&v| v - m).fold(0.0, f64::max))
                .fold(0.0, f64::max);
            min_loss.push(mins);
            spread.push(s);
        }
        let base_loss = min_loss.iter().map(|m| m.iter().sum()).collect();
        let min_cost: Vec<Vec<u64>> = problem
            .cost
            .iter()
            .map(|row| {
                row.chunks(cands)
                    .map(|u| u.iter().copied().min().unwrap_or(0))
                    .collect()
            })
            .collect();
        let base_cost = min_cost.iter().map(|m| m.iter().sum()).collect();
        Model {
            problem,
            min_loss,
            base_loss,
            spread,
            min_cost,
            base_cost,
            kept: vec![(0..cands).collect(); k_units],
            infeasible: false,
            limits: Limits::default(),
        }
    }

    /// Drops the candidates no optimal plan needs: those whose cost alone breaks a budget
    /// when every other unit takes its cheapest candidate, and (where no floor or binding
    /// rule limit makes it unsafe) those another candidate of the same unit dominates.
    fn prune(&mut self) {
        let p = self.problem;
        for (j, &budget) in p.budget.iter().enumerate() {
            let Some(room) = budget.checked_sub(self.base_cost[j]) else {
                self.infeasible = true;
                return;
            };
            for (k, kept) in self.kept.iter_mut().enumerate() {
                let min = self.min_cost[j][k];
                kept.retain(|&c| p.cost[j][p.at(k, c)] - min <= room);
            }
        }
        // A floor that binds makes a cheaper candidate not always better.
        let floor_binds: Vec<bool> = (0..p.rows())
            .map(|j| {
                p.floor
                    .as_ref()
                    .is_some_and(|floor| floor[j] > self.base_cost[j])
            })
            .collect();
        // Under a binding rule limit, swapping one unit's candidate can add a distinct rule.
        let rules_bind = p
            .max_rules_per_group
            .is_some_and(|(size, rules)| rules < size);
        if !rules_bind {
            for (k, kept) in self.kept.iter_mut().enumerate() {
                let dominated = |a: usize, b: usize| {
                    // `a` is at least as good as `b` in everything.
                    p.loss.iter().all(|row| row[p.at(k, a)] <= row[p.at(k, b)])
                        && p.cost.iter().enumerate().all(|(j, row)| {
                            let (ca, cb) = (row[p.at(k, a)], row[p.at(k, b)]);
                            if floor_binds[j] {
                                ca == cb
                            } else {
                                ca <= cb
                            }
                        })
                };
                let all = kept.clone();
                kept.retain(|&b| {
                    !all.iter()
                        .any(|&a| a != b && dominated(a, b) && (!dominated(b, a) || a < b))
                });
            }
        }
        if self.kept.iter().any(|kept| kept.is_empty()) {
            self.infeasible = true;
        }
    }

    /// The largest value objective `i` may take under cap `e` (module documentation).
    fn cap_limit(&self, i: usize, e: f64) -> f64 {
        e + CAP_SLACK * self.cap_room(i, e) + 1e-12 * e.abs()
    }

    /// How far cap `e` lies above the least value objective `i` can take.
    fn cap_room(&self, i: usize, e: f64) -> f64 {
        (e - self.base_loss[i]).max(0.0)
    }

    /// The right-hand side the MILP sees for cap `e` on objective `i`, on the losses
    /// above each unit's least: below [`Model::cap_limit`] by enough that what the
    /// solver's row tolerance and the dropped coefficients let through still meets it.
    fn cap_rhs(&self, i: usize, e: f64) -> f64 {
        (e - self.base_loss[i]) + 0.7 * CAP_SLACK * self.cap_room(i, e) + 1e-12 * e.abs()
    }

    /// Whether objective values meet the caps, as the problem defines them.
    fn meets_caps(&self, values: &[f64], caps: &[Option<f64>]) -> bool {
        caps.iter().enumerate().all(|(i, cap)| match *cap {
            Some(e) => values[i] <= self.cap_limit(i, e),
            None => true,
        })
    }

    /// The 0-1 program that minimizes `sum_i weights[i] * (f_i - base_i) / spread_i`
    /// under the budgets, floors, rule limit and caps; `None` when these are plainly
    /// infeasible. `allowed`, when given, marks the kept candidates (numbered unit by
    /// unit) a plan may use at all: the others are left out.
    fn program(
        &self,
        weights: &[f64],
        caps: &[Option<f64>],
        filter: &[Option<f64>],
        allowed: Option<&[bool]>,
    ) -> Option<Program> {
        if self.infeasible {
            return None;
        }
        let p = self.problem;
        // A candidate whose loss alone (over the unit's least) exceeds a cap's room is in
        // no plan that meets the cap.
        let mut rooms = Vec::new();
        for (i, cap) in filter.iter().enumerate() {
            if let Some(e) = *cap {
                let rhs = self.cap_rhs(i, e);
                if rhs < 0.0 {
                    return None;
                }
                rooms.push((i, rhs));
            }
        }
        let mut start = Vec::with_capacity(p.units + 1);
        let mut unit_of = Vec::new();
        let mut cand = Vec::new();
        start.push(0);
        let mut index = 0;
        for (k, kept) in self.kept.iter().enumerate() {
            for &c in kept {
                let fits = rooms
                    .iter()
                    .all(|&(i, rhs)| p.loss[i][p.at(k, c)] - self.min_loss[i][k] <= rhs);
                if fits && allowed.is_none_or(|a| a.get(index).copied().unwrap_or(false)) {
                    unit_of.push(k);
                    cand.push(c);
                }
                index += 1;
            }
            if cand.len() == start[k] {
                return None;
            }
            start.push(cand.len());
        }
        let reduced = |i: usize, x: usize| {
            let k = unit_of[x];
            (p.loss[i][p.at(k, cand[x])] - self.min_loss[i][k]) / self.spread[i]
        };
        let obj = (0..cand.len())
            .map(|x| {
                weights
                    .iter()
                    .enumerate()
                    .filter(|&(i, &w)| w != 0.0 && self.spread[i] > 0.0)
                    .map(|(i, &w)| w * reduced(i, x))
                    .sum()
            })
            .collect();
        let mut program = Program {
            start,
            cand: cand.clone(),
            obj,
            rows: Vec::new(),
            rules: None,
            width: p.candidates,
            partitions: Vec::new(),
            max_assignments: MAX_ASSIGNMENTS,
        };
        if let Some((size, rules)) = p.max_rules_per_group.filter(|&(size, r)| r < size) {
            program.rules = Some((size, rules));
            program.partitions = partitions(size, rules).unwrap_or_default();
        }
        // Budget and floor rows, in costs above each unit's cheapest (exact integers).
        for (j, row) in p.cost.iter().enumerate() {
            let extra: Vec<u64> = (0..program.cand.len())
                .map(|x| {
                    let k = unit_of[x];
                    row[p.at(k, program.cand[x])] - self.min_cost[j][k]
                })
                .collect();
            let most: u64 = program
                .start
                .windows(2)
                .map(|w| extra[w[0]..w[1]].iter().copied().max().unwrap_or(0))
                .sum();
            let coef: Vec<f64> = extra.iter().map(|&e| e as f64).collect();
            let room = p.budget[j].checked_sub(self.base_cost[j])?;
            if most > room {
                program
                    .rows
                    .push(Row::new(coef.clone(), room as f64, Sense::AtMost));
            }
            if let Some(floor) = &p.floor {
                if let Some(need) = floor[j].checked_sub(self.base_cost[j]) {
                    if need > most {
                        return None;
                    }
                    if need > 0 {
                        program
                            .rows
                            .push(Row::new(coef, need as f64, Sense::AtLeast));
                    }
                }
            }
        }
        // Cap rows, on the losses above each unit's least, scaled by their largest (so
        // that the solver's absolute row tolerance is small against the cap's room).
        // Tiny scaled coefficients are dropped: they would spread a row's magnitudes far
        // beyond what the simplex handles well, and all of them together move an
        // objective by a tenth of the cap slack at most.
        let negligible = CAP_SLACK / (10.0 * p.units as f64);
        for (i, cap) in caps.iter().enumerate() {
            let Some(e) = *cap else { continue };
            let rhs = self.cap_rhs(i, e);
            if rhs < 0.0 {
                return None;
            }
            let above: Vec<f64> = (0..program.cand.len())
                .map(|x| {
                    let k = unit_of[x];
                    p.loss[i][p.at(k, cand[x])] - self.min_loss[i][k]
                })
                .collect();
            // Scaled by the largest loss a plan under the cap can have (candidates over
            // it are only in a program for its numbering: a refinement keeps them out).
            let fitting = above
                .iter()
                .copied()
                .filter(|&a| a <= rhs)
                .fold(0.0, f64::max);
            let scale = if fitting > 0.0 {
                fitting
            } else {
                above.iter().copied().fold(0.0, f64::max)
            };
            if scale <= 0.0 {
                continue;
            }
            let rhs = rhs / scale;
            let coef: Vec<f64> = above
                .iter()
                .map(|&a| {
                    let v = a / scale;
                    if v >= negligible {
                        v
                    } else {
                        0.0
                    }
                })
                .collect();
            let most: f64 = program
                .start
                .windows(2)
                .map(|w| coef[w[0]..w[1]].iter().copied().fold(0.0, f64::max))
                .sum();
            if most > rhs {
                program.rows.push(Row::new(coef, rhs, Sense::AtMost));
            }
        }
        Some(program)
    }

    /// Minimizes `sum_i weights[i] * (f_i - base_i) / spread_i` under the budgets,
    /// floors, rule limit and caps, `hint` a plan to start from. `Ok(None)` when
    /// infeasible.
    fn run(
        &self,
        weights: &[f64],
        caps: &[Option<f64>],
        hint: Option<&[usize]>,
        allowed: Option<&[bool]>,
    ) -> Result<Option<Found>> {
        match self.program(weights, caps, caps, allowed) {
            Some(program) => program.solve(hint, &self.limits),
            None => Ok(None),
        }
    }

    /// The largest reduced cost, in `core` (from minimizing objective `q` alone), of a
    /// variable that a plan meeting a cap `e` on `q` can use: such a plan is worth at
    /// most the cap (with its slack, the MILP solver's row tolerance and the
    /// coefficients a cap row drops) in that solve's objective.
    fn reach(&self, q: usize, e: f64, core: &Core) -> f64 {
        let worth = if self.spread[q] > 0.0 {
            (self.cap_limit(q, e) - self.base_loss[q]) / self.spread[q]
        } else {
            0.0
        };
        worth + 1e-9 - core.lower + core.slack
    }

    /// Refuses a plan the solver returned that breaks the problem (a solver failure).
    fn verify(&self, choice: &[usize], values: &[f64], caps: &[Option<f64>]) -> Result<()> {
        if let Some(broken) = self.problem.violation(choice) {
            return Err(Error::Internal(format!(
                "plan optimization: the MILP solver returned a plan that breaks the problem: {broken}"
            )));
        }
        for (i, cap) in caps.iter().enumerate() {
            let Some(e) = *cap else { continue };
            let limit =
                self.cap_limit(i, e) + CAP_VERIFY_SLACK * self.cap_room(i, e) + 1e-10 * e.abs();
            if values[i] > limit {
                return Err(Error::Internal(format!(
                    "plan optimization: the MILP solver returned a plan whose objective {i} is {}, over its cap {e}",
                    values[i]
                )));
            }
        }
        Ok(())
    }

    /// Minimizes objective `primary` under the caps: the plan, checked, as a
    /// [`Solution`], with what the Lagrangian proved (see [`Model::program`] for
    /// `allowed`).
    fn minimize(
        &self,
        primary: usize,
        caps: &[Option<f64>],
        hint: Option<&[usize]>,
        allowed: Option<&[bool]>,
    ) -> Result<Option<(Solution, Core)>> {
        let mut weights = vec![0.0; self.problem.objectives()];
        weights[primary] = 1.0;
        let Some(found) = self.run(&weights, caps, hint, allowed)? else {
            return Ok(None);
        };
        let (values, costs) = self.problem.evaluate(&found.choice)?;
        self.verify(&found.choice, &values, caps)?;
        let value = values[primary];
        let bound = if found.proven || self.spread[primary] <= 0.0 {
            value
        } else {
            (self.base_loss[primary] + found.bound * self.spread[primary]).min(value)
        };
        let gap = relative_gap(value, bound);
        let solution = Solution {
            choice: found.choice,
            objectives: values,
            costs,
            primary,
            bound,
            gap,
            exact: found.proven || gap <= EXACT_GAP,
        };
        Ok(Some((solution, found.core)))
    }

    /// Among the plans that meet the caps and keep objective `first.primary` at most its
    /// value in `first`, finds one with the smallest sum of all objectives (each divided
    /// by its spread): a Pareto-optimal plan as good as `first` in its primary.
    ///
    /// `core` is what the solve that found `first` proved: those plans are worth (in
    /// that solve's objective) at most `first`'s value plus the cap slack, so they use
    /// only the variables whose reduced cost that allows, usually a few. `allowed` must
    /// be that solve's.
    fn refine(
        &self,
        first: &Solution,
        core: &Core,
        caps: &[Option<f64>],
        allowed: Option<&[bool]>,
    ) -> Result<Solution> {
        let p = first.primary;
        let mut tight = caps.to_vec();
        tight[p] = Some(first.objectives[p]);
        let weights = vec![1.0; self.problem.objectives()];
        let Some(program) = self.program(&weights, &tight, caps, allowed) else {
            // The first plan meets these rows; the model should not have said otherwise.
            return Ok(first.clone());
        };
        let reach = self.reach(p, first.objectives[p], core);
        let room = self.cap_rhs(p, first.objectives[p]);
        let problem = self.problem;
        let mut keep = vec![false; program.cand.len()];
        for k in 0..program.units() {
            for x in program.vars(k) {
                let above = problem.loss[p][problem.at(k, program.cand[x])] - self.min_loss[p][k];
                keep[x] = core.rc[x] <= reach && above <= room;
            }
        }
        let warm = program.picks_of(&first.choice);
        let limits = &self.limits;
        let choice: Vec<usize> =
            match program.milp(&keep, warm.as_deref(), limits.mip_gap, limits.time_limit)? {
                Milp::Plan { pick, .. } => pick.iter().map(|&x| program.cand[x]).collect(),
                // As above (or out of time): the first plan stays.
                Milp::Infeasible | Milp::Stopped => return Ok(first.clone()),
            };
        let (values, costs) = self.problem.evaluate(&choice)?;
        self.verify(&choice, &values, &tight)?;
        let gap = relative_gap(values[p], first.bound);
        let exact = gap <= EXACT_GAP || (first.exact && values[p] <= first.objectives[p]);
        Ok(Solution {
            choice,
            objectives: values,
            costs,
            primary: p,
            bound: first.bound,
            gap,
            exact,
        })
    }
}

/// Which way a row of a [`Program`] bounds its sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sense {
    AtMost,
    AtLeast,
}

/// One side constraint of a [`Program`]: the sum of the chosen variables' coefficients
/// is at most (or at least) `rhs`.
struct Row {
    /// One coefficient per variable of the program.
    coef: Vec<f64>,
    rhs: f64,
    sense: Sense,
    /// The row's largest coefficient (1 for none): the Lagrangian sees the row divided
    /// by it, so that every multiplier works on the same scale.
    norm: f64,
}

impl Row {
    fn new(coef: Vec<f64>, rhs: f64, sense: Sense) -> Row {
        let norm = coef.iter().fold(0.0f64, |m, c| m.max(c.abs()));
        Row {
            coef,
            rhs,
            sense,
            norm: if norm > 0.0 { norm } else { 1.0 },
        }
    }

    /// The Lagrangian multiplier's factor: the row as `<=`, normalized.
    fn factor(&self) -> f64 {
        match self.sense {
            Sense::AtMost => 1.0 / self.norm,
            Sense::AtLeast => -1.0 / self.norm,
        }
    }

    /// How far the MILP solver may overstep the row: its feasibility tolerance (`1e-7`)
    /// and round-off, with room to spare.
    fn tolerance(&self) -> f64 {
        1e-6 + 1e-12 * self.rhs.abs()
    }
}

/// The most subgradient steps of one Lagrangian dual.
const DUAL_STEPS: usize = 600;
/// Steps without a better bound before the step size halves.
const DUAL_PATIENCE: usize = 15;
/// The smallest step scale (relative to Polyak's) before the dual stops.
const DUAL_LEAST_SCALE: f64 = 1e-3;

/// The 0-1 program of one solve, over the kept candidates: one variable per unit and
/// kept candidate, numbered unit by unit.
///
/// It is solved exactly by reduced-cost fixing: multipliers of the side rows (from a
/// subgradient ascent on the Lagrangian, which keeps only "one candidate per unit")
/// give a lower bound `L` and, per variable, a reduced cost `rc >= 0` such that every
/// plan is worth at least `L + sum of its variables' rc`. A plan worth `U` therefore
/// only uses variables with `rc <= U - L`; the MILP solver sees just those (usually a
/// few per unit), and when its optimum `U` proves that no dropped variable could do
/// better, that optimum is the program's.
struct Program {
    /// Unit `k`'s variables are `start[k]..start[k + 1]`.
    start: Vec<usize>,
    /// The candidate of each variable.
    cand: Vec<usize>,
    /// The objective coefficient of each variable.
    obj: Vec<f64>,
    rows: Vec<Row>,
    /// `(group_size, r)` when the rule limit binds.
    rules: Option<(usize, usize)>,
    /// The number of candidates of the problem (candidate ids are below it).
    width: usize,
    /// When the rule limit binds, every partition of a group's units into at most `r`
    /// blocks (units of a block share a candidate), so that the Lagrangian honors the
    /// limit; empty when there are too many (the MILP solver alone honors it then).
    partitions: Vec<Vec<Vec<usize>>>,
    /// The most rule-abiding assignments of a group that [`Program::milp`] makes the
    /// options of one block ([`MAX_ASSIGNMENTS`]).
    max_assignments: usize,
}

/// The most partitions of one group the Lagrangian enumerates (see [`Program`]).
const MAX_PARTITIONS: usize = 4096;

/// Every partition of `0..size` into at most `blocks` blocks, each a list of blocks;
/// `None` when there are more than [`MAX_PARTITIONS`].
fn partitions(size: usize, blocks: usize) -> Option<Vec<Vec<Vec<usize>>>> {
    // Restricted growth strings: label[0] = 0, label[i] <= 1 + max(label[..i]).
    fn grow(
        label: &mut Vec<usize>,
        used: usize,
        size: usize,
        blocks: usize,
        out: &mut Vec<Vec<Vec<usize>>>,
    ) -> bool {
        if label.len() == size {
            if out.len() >= MAX_PARTITIONS {
                return false;
            }
            let mut part = vec![Vec::new(); used];
            for (unit, &b) in label.iter().enumerate() {
                part[b].push(unit);
            }
            out.push(part);
            return true;
        }
        for b in 0..(used + 1).min(blocks) {
            label.push(b);
            let ok = grow(label, used.max(b + 1), size, blocks, out);
            label.pop();
            if !ok {
                return false;
            }
        }
        true
    }
    let mut out = Vec::new();
    grow(&mut Vec::with_capacity(size), 0, size, blocks, &mut out).then_some(out)
}

impl Program {
    fn units(&self) -> usize {
        self.start.len() - 1
    }

    fn vars(&self, k: usize) -> std::ops::Range<usize> {
        self.start[k]..self.start[k + 1]
    }

    /// The Lagrangian at multipliers `lam` (one per row, `>= 0`): returns its value and
    /// fills `rc` with every variable's reduced cost (each unit's smallest is 0) and
    /// `pick` with each unit's variable of smallest reduced cost.
    fn lagrangian(&self, lam: &[f64], rc: &mut [f64], pick: &mut [usize]) -> f64 {
        rc.copy_from_slice(&self.obj);
        let mut value = 0.0;
        for (row, &l) in self.rows.iter().zip(lam) {
            let m = l * row.factor();
            if m != 0.0 {
                for (r, &a) in rc.iter_mut().zip(&row.coef) {
                    *r += m * a;
                }
                value -= m * row.rhs;
            }
        }
        if let (Some((size, _)), false) = (self.rules, self.partitions.is_empty()) {
            for g in 0..self.units() / size {
                value += self.group_lagrangian(g * size, size, rc, pick);
            }
            return value;
        }
        for (k, slot) in pick.iter_mut().enumerate() {
            let vars = self.vars(k);
            let mut best = vars.start;
            for x in vars.clone() {
                if rc[x] < rc[best] {
                    best = x;
                }
            }
            let least = rc[best];
            for r in &mut rc[vars] {
                *r -= least;
            }
            value += least;
            *slot = best;
        }
        value
    }

    /// The Lagrangian's part of one group of units (`first..first + size`) under the
    /// rule limit: the cheapest assignment over every partition of the units into
    /// blocks that share a candidate. `rc` holds the group's costs on entry and their
    /// reduced costs on return (a variable's is what forcing it costs the group at
    /// least); `pick` gets the cheapest assignment. Returns the group's least cost.
    fn group_lagrangian(
        &self,
        first: usize,
        size: usize,
        rc: &mut [f64],
        pick: &mut [usize],
    ) -> f64 {
        let width = self.width;
        let mut table = vec![f64::INFINITY; size * width];
        for local in 0..size {
            for x in self.vars(first + local) {
                table[local * width + self.cand[x]] = rc[x];
            }
        }
        let block_cost = |block: &[usize], c: usize| -> f64 {
            block.iter().map(|&local| table[local * width + c]).sum()
        };
        // The cheapest candidate and cost of every block of every partition.
        let best_of = |block: &[usize]| -> (usize, f64) {
            (0..width)
                .map(|c| (c, block_cost(block, c)))
                .fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a })
        };
        let mut least = f64::INFINITY;
        let mut choice = vec![0usize; size];
        let mut forced = vec![f64::INFINITY; size * width];
        for part in &self.partitions {
            let bests: Vec<(usize, f64)> = part.iter().map(|block| best_of(block)).collect();
            let total: f64 = bests.iter().map(|b| b.1).sum();
            if !total.is_finite() {
                continue;
            }
            if total < least {
                least = total;
                for (block, &(c, _)) in part.iter().zip(&bests) {
                    for &local in block {
                        choice[local] = c;
                    }
                }
            }
            for (block, &(_, cost)) in part.iter().zip(&bests) {
                let others = total - cost;
                for c in 0..width {
                    let with = others + block_cost(block, c);
                    for &local in block {
                        let slot = &mut forced[local * width + c];
                        *slot = slot.min(with);
                    }
                }
            }
        }
        if !least.is_finite() {
            // No assignment meets the limit: the program is infeasible.
            return f64::INFINITY;
        }
        for local in 0..size {
            let k = first + local;
            for x in self.vars(k) {
                rc[x] = (forced[local * width + self.cand[x]] - least).max(0.0);
                if self.cand[x] == choice[local] {
                    pick[k] = x;
                }
            }
        }
        least
    }

    /// The objective of a plan (one variable per unit).
    fn value(&self, pick: &[usize]) -> f64 {
        pick.iter().map(|&x| self.obj[x]).sum()
    }

    /// Whether a plan meets every row exactly and the rule limit.
    fn feasible(&self, pick: &[usize]) -> bool {
        let rows_hold = self.rows.iter().all(|row| {
            let sum: f64 = pick.iter().map(|&x| row.coef[x]).sum();
            match row.sense {
                Sense::AtMost => sum <= row.rhs,
                Sense::AtLeast => sum >= row.rhs,
            }
        });
        let Some((size, rules)) = self.rules else {
            return rows_hold;
        };
        rows_hold
            && pick.chunks(size).all(|group| {
                let mut used: Vec<usize> = group.iter().map(|&x| self.cand[x]).collect();
                used.sort_unstable();
                used.dedup();
                used.len() <= rules
            })
    }

    /// Multipliers for the rows by projected subgradient ascent (Polyak steps towards
    /// the best plan known, or a guess above the bound while none is). Returns the
    /// multipliers of the best bound, and updates `incumbent` with any feasible plan
    /// the Lagrangian picks on the way.
    fn dual(&self, incumbent: &mut Option<(f64, Vec<usize>)>, most: f64) -> Vec<f64> {
        let rows = self.rows.len();
        let mut lam = vec![0.0; rows];
        let mut best = (f64::NEG_INFINITY, lam.clone());
        let mut rc = vec![0.0; self.cand.len()];
        let mut pick = vec![0; self.units()];
        let mut scale = 1.0;
        let mut stalled = 0;
        for _ in 0..DUAL_STEPS {
            let bound = self.lagrangian(&lam, &mut rc, &mut pick);
            if self.feasible(&pick) {
                let v = self.value(&pick);
                let better = match incumbent {
                    Some((known, _)) => v < *known,
                    None => true,
                };
                if better {
                    *incumbent = Some((v, pick.clone()));
                }
            }
            if bound > best.0 {
                best = (bound, lam.clone());
                stalled = 0;
            } else {
                stalled += 1;
                if stalled >= DUAL_PATIENCE {
                    scale /= 2.0;
                    stalled = 0;
                    if scale < DUAL_LEAST_SCALE {
                        break;
                    }
                }
            }
            let target = match incumbent {
                Some((v, _)) => *v,
                None => best.0 + 0.1 * (1.0 + best.0.abs()),
            };
            if target - best.0 <= 1e-9 * (1.0 + target.abs()) || best.0 > most + 1.0 {
                break;
            }
            // The projected subgradient: each row's excess over its right-hand side.
            let mut grad = vec![0.0; rows];
            for (j, row) in self.rows.iter().enumerate() {
                let sum: f64 = pick.iter().map(|&x| row.coef[x]).sum();
                let g = (sum - row.rhs) * row.factor();
                grad[j] = if lam[j] <= 0.0 && g < 0.0 { 0.0 } else { g };
            }
            let norm: f64 = grad.iter().map(|g| g * g).sum();
            if norm <= 0.0 {
                break;
            }
            let step = scale * (target - bound).max(0.0) / norm;
            for (l, g) in lam.iter_mut().zip(&grad) {
                *l = (*l + step * g).max(0.0);
            }
        }
        best.1
    }

    /// The optimum of the program (see the type's documentation), or a plan within
    /// `limits`; `hint` a plan (by candidate) to start from. `Ok(None)` when infeasible.
    fn solve(&self, hint: Option<&[usize]>, limits: &Limits) -> Result<Option<Found>> {
        let deadline = limits.time_limit.map(|t| Instant::now() + t);
        let units = self.units();
        // The largest value any plan can have.
        let most: f64 = (0..units)
            .map(|k| self.obj[self.vars(k)].iter().copied().fold(0.0, f64::max))
            .sum();
        let mut incumbent = hint
            .and_then(|h| self.picks_of(h))
            .filter(|pick| self.feasible(pick))
            .map(|pick| (self.value(&pick), pick));
        let lam = self.dual(&mut incumbent, most);
        let mut rc = vec![0.0; self.cand.len()];
        let mut pick = vec![0; units];
        let lower = self.lagrangian(&lam, &mut rc, &mut pick);
        // A plan the MILP solver accepts may overstep each row by its tolerance.
        let slack: f64 = self
            .rows
            .iter()
            .zip(&lam)
            .map(|(row, l)| l * row.tolerance() / row.norm)
            .sum::<f64>()
            + 1e-9 * (1.0 + lower.abs());
        if !lower.is_finite() || lower - slack > most {
            return Ok(None);
        }
        let finish = |incumbent: (f64, Vec<usize>), bound: f64, rc: Vec<f64>| {
            let (value, pick) = incumbent;
            let proven = bound >= value - 1e-12 * (1.0 + value.abs());
            Found {
                choice: pick.iter().map(|&x| self.cand[x]).collect(),
                proven,
                bound: if proven { value } else { bound.min(value) },
                core: Core { rc, lower, slack },
            }
        };
        // Start from a small core (about three variables per unit) for a good plan,
        // then widen it to what that plan's worth requires.
        let mut sorted = rc.clone();
        sorted.sort_by(f64::total_cmp);
        let mut delta = sorted[(3 * units).min(sorted.len() - 1)].max(slack);
        if let Some((v, _)) = &incumbent {
            delta = delta.min(v - lower + slack).max(0.0);
        }
        loop {
            let keep: Vec<bool> = rc.iter().map(|&r| r <= delta).collect();
            // Every plan that uses a variable outside the core is worth at least this.
            let outside = lower - slack
                + rc.iter()
                    .copied()
                    .filter(|&r| r > delta)
                    .fold(f64::INFINITY, f64::min);
            let warm = incumbent
                .as_ref()
                .map(|(_, pick)| pick.as_slice())
                .filter(|pick| pick.iter().all(|&x| keep[x]));
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let milp = if left.is_some_and(|t| t.is_zero()) {
                Milp::Stopped
            } else {
                self.milp(&keep, warm, limits.mip_gap, left)?
            };
            let core_bound = match milp {
                Milp::Infeasible if outside == f64::INFINITY => return Ok(None),
                Milp::Infeasible => f64::INFINITY,
                Milp::Stopped => match incumbent {
                    Some(found) => return Ok(Some(finish(found, lower, rc))),
                    None => {
                        return Err(Error::Usage(
                            "plan optimization: the time limit ran out before any plan was \
                             found; allow more time"
                                .to_string(),
                        ))
                    }
                },
                Milp::Plan { pick, bound } => {
                    let v = self.value(&pick);
                    if incumbent.as_ref().is_none_or(|(known, _)| v <= *known) {
                        incumbent = Some((v, pick));
                    }
                    bound
                }
            };
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            let best = incumbent.as_ref().map(|(v, _)| *v);
            if let Some(best) = best {
                let bound = core_bound.min(outside);
                let close =
                    best - bound <= limits.mip_gap * best.abs() + 1e-12 * (1.0 + best.abs());
                if close || timed_out || outside == f64::INFINITY {
                    if let Some(found) = incumbent {
                        return Ok(Some(finish(found, bound, rc)));
                    }
                }
                // No plan better than the incumbent uses a variable beyond this.
                let need = best - lower + slack;
                if need > delta {
                    delta = need;
                    continue;
                }
            } else if timed_out {
                return Err(Error::Usage(
                    "plan optimization: the time limit ran out before any plan was found; \
                     allow more time"
                        .to_string(),
                ));
            }
            // Infeasible within the core, or the core's plans are not yet good enough
            // (only under a MIP gap): widen it.
            let next = rc
                .iter()
                .copied()
                .filter(|&r| r > delta)
                .fold(f64::INFINITY, f64::min);
            delta = next.max(4.0 * delta);
            if let Some((v, _)) = &incumbent {
                delta = delta.min(v - lower + slack).max(next);
            }
        }
    }

    /// A plan given by candidate as variables, if every candidate is one of its unit's.
    fn picks_of(&self, choice: &[usize]) -> Option<Vec<usize>> {
        if choice.len() != self.units() {
            return None;
        }
        choice
            .iter()
            .enumerate()
            .map(|(k, &c)| self.vars(k).find(|&x| self.cand[x] == c))
            .collect()
    }

    /// The MILP over the variables `keep` marks, `warm` a plan to start from, stopping at
    /// relative gap `gap` or after `time`.
    ///
    /// Each unit is a block that takes one of its kept variables, except under a
    /// binding rule limit: a group with few enough rule-abiding assignments of its kept
    /// variables is one block that takes one of those assignments (the strongest
    /// formulation); a larger group keeps one block per unit and links them with
    /// `y[g, c] >= x` and `sum_c y[g, c] <= r`.
    fn milp(
        &self,
        keep: &[bool],
        warm: Option<&[usize]>,
        gap: f64,
        time: Option<Duration>,
    ) -> Result<Milp> {
        let units = self.units();
        let kept: Vec<Vec<usize>> = (0..units)
            .map(|k| self.vars(k).filter(|&x| keep[x]).collect())
            .collect();
        if kept.iter().any(|v| v.is_empty()) {
            return Ok(Milp::Infeasible);
        }
        // The blocks: each option is the variables (one per unit) it picks.
        let mut blocks: Vec<Vec<Vec<usize>>> = Vec::new();
        // Groups linked by y variables: their blocks (one per unit) start here.
        let mut linked: Vec<usize> = Vec::new();
        match self.rules {
            Some((size, rules)) => {
                for g in 0..units / size {
                    let group = &kept[g * size..(g + 1) * size];
                    match self.assignments(group, rules, self.max_assignments) {
                        Some(options) if options.is_empty() => return Ok(Milp::Infeasible),
                        Some(options) => blocks.push(options),
                        None => {
                            linked.push(blocks.len());
                            blocks
                                .extend(group.iter().map(|v| v.iter().map(|&x| vec![x]).collect()));
                        }
                    }
                }
            }
            None => blocks.extend(kept.iter().map(|v| v.iter().map(|&x| vec![x]).collect())),
        }
        let mut lp = microlp::Problem::new(OptimizationDirection::Minimize);
        let vars: Vec<Vec<Variable>> = blocks
            .iter()
            .map(|options| {
                options
                    .iter()
                    .map(|picks| lp.add_binary_var(picks.iter().map(|&x| self.obj[x]).sum()))
                    .collect()
            })
            .collect();
        for block in &vars {
            lp.add_constraint(block.iter().map(|&v| (v, 1.0)), ComparisonOp::Eq, 1.0);
        }
        for row in &self.rows {
            let mut terms = Vec::new();
            let mut most = 0.0;
            for (options, block) in blocks.iter().zip(&vars) {
                let mut block_most: f64 = 0.0;
                for (picks, &v) in options.iter().zip(block) {
                    let a: f64 = picks.iter().map(|&x| row.coef[x]).sum();
                    if a != 0.0 {
                        terms.push((v, a));
                    }
                    block_most = block_most.max(a);
                }
                most += block_most;
            }
            match row.sense {
                Sense::AtMost if most > row.rhs => {
                    lp.add_constraint(terms, ComparisonOp::Le, row.rhs);
                }
                Sense::AtLeast if most < row.rhs => return Ok(Milp::Infeasible),
                Sense::AtLeast => lp.add_constraint(terms, ComparisonOp::Ge, row.rhs),
                Sense::AtMost => {}
            }
        }
        // The linked groups: y[g, c] >= x for the group's variables of candidate c, and
        // sum_c y[g, c] <= r.
        let mut rule_vars: Vec<(usize, Vec<(usize, Variable)>)> = Vec::new();
        if let Some((size, rules)) = self.rules {
            for &first in &linked {
                let mut used: Vec<usize> = blocks[first..first + size]
                    .iter()
                    .flatten()
                    .map(|picks| self.cand[picks[0]])
                    .collect();
                used.sort_unstable();
                used.dedup();
                if used.len() <= rules {
                    continue;
                }
                let ys: Vec<(usize, Variable)> =
                    used.iter().map(|&c| (c, lp.add_binary_var(0.0))).collect();
                for b in first..first + size {
                    for (picks, &v) in blocks[b].iter().zip(&vars[b]) {
                        if let Ok(at) = ys.binary_search_by_key(&self.cand[picks[0]], |&(c, _)| c) {
                            lp.add_constraint([(v, 1.0), (ys[at].1, -1.0)], ComparisonOp::Le, 0.0);
                        }
                    }
                }
                lp.add_constraint(
                    ys.iter().map(|&(_, y)| (y, 1.0)),
                    ComparisonOp::Le,
                    rules as f64,
                );
                rule_vars.push((first, ys));
            }
        }
        let mut options = SolveOptions::default();
        options.mip_gap = gap;
        options.time_limit = time;
        if let Some(warm) = warm {
            let mut start: Vec<(Variable, f64)> = Vec::new();
            for (options, block) in blocks.iter().zip(&vars) {
                for (picks, &v) in options.iter().zip(block) {
                    let on = picks.iter().all(|x| warm.contains(x));
                    start.push((v, if on { 1.0 } else { 0.0 }));
                }
            }
            for (first, ys) in &rule_vars {
                for &(c, y) in ys {
                    let size = self.rules.map_or(0, |(size, _)| size);
                    let on = (*first..*first + size).any(|b| {
                        blocks[b]
                            .iter()
                            .any(|picks| self.cand[picks[0]] == c && warm.contains(&picks[0]))
                    });
                    start.push((y, if on { 1.0 } else { 0.0 }));
                }
            }
            options.warm_start = Some(start);
        }
        let solution = match lp.solve_with(options) {
            Ok(SolveOutcome::Solution(solution)) => solution,
            Ok(SolveOutcome::Interrupted(_)) => return Ok(Milp::Stopped),
            Err(microlp::Error::Infeasible) => return Ok(Milp::Infeasible),
            Err(e) => {
                return Err(Error::Internal(format!(
                    "plan optimization: the MILP solver failed: {e}"
                )))
            }
        };
        let mut picked: Vec<usize> = Vec::with_capacity(units);
        for (b, (options, block)) in blocks.iter().zip(&vars).enumerate() {
            let chosen: Vec<&Vec<usize>> = options
                .iter()
                .zip(block)
                .filter(|&(_, &v)| solution.var_value(v) > 0.5)
                .map(|(picks, _)| picks)
                .collect();
            match chosen.as_slice() {
                [picks] => picked.extend(picks.iter().copied()),
                _ => {
                    return Err(Error::Internal(format!(
                        "plan optimization: the MILP solver gave block {b} {} options",
                        chosen.len()
                    )))
                }
            }
        }
        // Blocks follow the units in order, so the picks are one per unit in order.
        let pick = picked;
        let value = self.value(&pick);
        let bound = if solution.status() == SolutionStatus::Optimal {
            value
        } else {
            solution
                .stats()
                .best_bound
                .unwrap_or(f64::NEG_INFINITY)
                .min(value)
        };
        Ok(Milp::Plan { pick, bound })
    }

    /// Every assignment of a group's kept variables (`group[i]` for its `i`-th unit)
    /// that uses at most `rules` distinct candidates, one variable per unit in order;
    /// `None` when the kept variables allow more than `most` assignments (before the
    /// limit).
    fn assignments(
        &self,
        group: &[Vec<usize>],
        rules: usize,
        most: usize,
    ) -> Option<Vec<Vec<usize>>> {
        let mut total: usize = 1;
        for v in group {
            total = total.checked_mul(v.len())?;
            if total > most {
                return None;
            }
        }
        let mut out = Vec::new();
        let mut at = vec![0usize; group.len()];
        loop {
            let picks: Vec<usize> = group.iter().zip(&at).map(|(v, &i)| v[i]).collect();
            let mut used: Vec<usize> = picks.iter().map(|&x| self.cand[x]).collect();
            used.sort_unstable();
            used.dedup();
            if used.len() <= rules {
                out.push(picks);
            }
            // Next assignment, odometer-style.
            let mut d = 0;
            while d < group.len() {
                at[d] += 1;
                if at[d] < group[d].len() {
                    break;
                }
                at[d] = 0;
                d += 1;
            }
            if d == group.len() {
                return Some(out);
            }
        }
    }
}

/// The most assignments of one group's kept variables that [`Program::milp`] turns into
/// options of one block.
const MAX_ASSIGNMENTS: usize = 2048;

/// What one MILP solve over a core ended with.
enum Milp {
    /// No plan within the core.
    Infeasible,
    /// The time limit ran out before any plan was found.
    Stopped,
    /// A plan (one variable per unit) and a lower bound on the core's optimum.
    Plan { pick: Vec<usize>, bound: f64 },
}

/// `(value - bound) / max(|value|, tiny)`, never negative.
fn relative_gap(value: f64, bound: f64) -> f64 {
    ((value - bound) / value.abs().max(f64::MIN_POSITIVE)).max(0.0)
}

/// Checks the primary objective and the caps against a checked problem.
fn check_request(problem: &Problem, primary: usize, caps: &[Option<f64>]) -> Result<()> {
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
fn full_caps(problem: &Problem, caps: &[Option<f64>]) -> Vec<Option<f64>> {
    (0..problem.objectives())
        .map(|i| {
            caps.get(i)
                .copied()
                .flatten()
                .filter(|e| *e != f64::INFINITY)
        })
        .collect()
}

/// How hard [`solve_with`] and [`pareto_with`] try. The default proves the optimum,
/// however long that takes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// Stop once the plan is proven within this relative distance of the optimum (in the
    /// primary objective above its least possible value, so the gap in
    /// [`Solution::gap`] is at most this when losses are non-negative). 0 asks for the
    /// optimum.
    pub mip_gap: f64,
    /// The wall-clock budget of one solve (for [`pareto_with`], of each of its solves).
    /// When it runs out, the best plan found so far is returned with its gap.
    pub time_limit: Option<Duration>,
}

impl Limits {
    fn check(&self) -> Result<()> {
        if !self.mip_gap.is_finite() || self.mip_gap < 0.0 {
            return Err(Error::Usage(format!(
                "plan optimization: the MIP gap must be a finite non-negative number, not {}",
                self.mip_gap
            )));
        }
        Ok(())
    }
}

/// Minimizes objective `primary` subject to the budgets, the floors, the rule limit per
/// group and, for each `i` with `caps[i] = Some(e)`, objective `i` at most `e` (within
/// [`CAP_SLACK`], see the module documentation). `caps` may be shorter than the number
/// of objectives (the rest uncapped). `Ok(None)` when no plan meets them. The plan is
/// the proven optimum.
///
/// # Errors
///
/// [`Error::Usage`] for an inconsistent problem or request; [`Error::Internal`] when the
/// MILP solver fails or returns a plan that does not check.
pub fn solve(problem: &Problem, primary: usize, caps: &[Option<f64>]) -> Result<Option<Solution>> {
    solve_with(problem, primary, caps, &Limits::default())
}

/// [`solve`] within `limits`: the plan may then be short of the optimum, by at most
/// its reported [`Solution::gap`].
///
/// # Errors
///
/// Those of [`solve`]; [`Error::Usage`] for a negative or non-finite MIP gap, or when
/// the time limit runs out before any plan is found.
pub fn solve_with(
    problem: &Problem,
    primary: usize,
    caps: &[Option<f64>],
    limits: &Limits,
) -> Result<Option<Solution>> {
    problem.check()?;
    check_request(problem, primary, caps)?;
    limits.check()?;
    let caps = full_caps(problem, caps);
    let mut model = Model::new(problem);
    model.limits = *limits;
    model.prune();
    Ok(model
        .minimize(primary, &caps, None, None)?
        .map(|(solution, _)| solution))
}

/// Every Pareto-optimal plan MoA's epsilon-constraint method finds.
///
/// First the anchor of each objective (its minimum alone); then, for each primary `p` and
/// each cell of a grid where every other objective `q` is capped at one of `intervals`
/// evenly spaced values from its minimum (its anchor's value) to its largest value over
/// the anchors (both included), the minimum of `p`. Each plan found is then replaced by
/// the plan of least total (all objectives, each divided by its spread) among those that
/// meet its cell's caps and are no worse in `p` (up to [`CAP_SLACK`], and then both
/// stay): a Pareto-optimal plan, where ties in `p` could otherwise leave a dominated
/// one. Infeasible cells are dropped,
/// identical choices merged, dominated plans removed; the result is sorted by objective 0
/// (then the others). With one objective it is the single anchor; an infeasible problem
/// gives an empty list.
///
/// Every solve is exact, which on large problems (90 units of 60 candidates) can take
/// minutes per grid cell: see [`pareto_with`].
///
/// # Errors
///
/// [`Error::Usage`] for an inconsistent problem or `intervals == 0`; the errors of
/// [`solve`].
pub fn pareto(problem: &Problem, intervals: usize) -> Result<Vec<Solution>> {
    pareto_with(problem, intervals, &Limits::default())
}

/// [`pareto`] with every solve within `limits`. A plan whose solve stopped short of its
/// proof (see [`Solution::exact`]) is only as good as its gap, and the plans of such
/// solves need not be exactly Pareto-optimal.
///
/// # Errors
///
/// Those of [`pareto`] and [`solve_with`].
pub fn pareto_with(problem: &Problem, intervals: usize, limits: &Limits) -> Result<Vec<Solution>> {
    problem.check()?;
    limits.check()?;
    if intervals == 0 {
        return Err(Error::Usage(
            "plan optimization: the Pareto grid needs at least one interval".to_string(),
        ));
    }
    let mut model = Model::new(problem);
    model.limits = *limits;
    model.prune();
    let m = problem.objectives();
    let none = vec![None; m];
    let mut found: Vec<Solution> = Vec::new();
    let mut minima = Vec::with_capacity(m);
    let mut cores = Vec::with_capacity(m);
    for p in 0..m {
        let Some((anchor, core)) = model.minimize(p, &none, None, None)? else {
            return Ok(Vec::new());
        };
        minima.push(anchor.objectives[p]);
        if m > 1 {
            let better = model.refine(&anchor, &core, &none, None)?;
            keep_refined(&mut found, anchor, better);
        } else {
            found.push(anchor);
        }
        cores.push(core);
    }
    if m > 1 {
        let maxima: Vec<f64> = (0..m)
            .map(|q| {
                found
                    .iter()
                    .map(|s| s.objectives[q])
                    .fold(minima[q], f64::max)
            })
            .collect();
        let level = |q: usize, t: usize| {
            if intervals == 1 {
                maxima[q]
            } else {
                minima[q] + (maxima[q] - minima[q]) * t as f64 / (intervals - 1) as f64
            }
        };
        for p in 0..m {
            let others: Vec<usize> = (0..m).filter(|&q| q != p).collect();
            let mut seen: Vec<Vec<u64>> = Vec::new();
            let mut cell = vec![0usize; others.len()];
            loop {
                let mut caps = vec![None; m];
                for (&q, &t) in others.iter().zip(&cell) {
                    caps[q] = Some(level(q, t));
                }
                let key: Vec<u64> = caps.iter().map(|c| c.unwrap_or(0.0).to_bits()).collect();
                if !seen.contains(&key) {
                    seen.push(key);
                    // Start from the best plan found so far that meets this cell's caps.
                    let hint = found
                        .iter()
                        .filter(|s| model.meets_caps(&s.objectives, &caps))
                        .min_by(|a, b| a.objectives[p].total_cmp(&b.objectives[p]))
                        .map(|s| s.choice.clone());
                    // A plan that meets a cap on q uses only the variables that the
                    // anchor of q allows (cells that cap q near its minimum are hard
                    // for the cell's own Lagrangian).
                    let allowed: Vec<bool> = (0..cores[p].rc.len())
                        .map(|x| {
                            others.iter().all(|&q| match caps[q] {
                                Some(e) => cores[q].rc[x] <= model.reach(q, e, &cores[q]),
                                None => true,
                            })
                        })
                        .collect();
                    let first = model.minimize(p, &caps, hint.as_deref(), Some(&allowed))?;
                    if let Some((first, core)) = first {
                        // A plan found before is already Pareto-optimal.
                        if !found.iter().any(|s| s.choice == first.choice) {
                            let better = model.refine(&first, &core, &caps, Some(&allowed))?;
                            keep_refined(&mut found, first, better);
                        }
                    }
                }
                // Next cell, odometer-style.
                let mut d = 0;
                while d < cell.len() {
                    cell[d] += 1;
                    if cell[d] < intervals {
                        break;
                    }
                    cell[d] = 0;
                    d += 1;
                }
                if d == cell.len() {
                    break;
                }
            }
        }
    }
    Ok(non_dominated(found))
}

/// Adds a refined plan to `found`, and the plan it refined too when the solver's
/// tolerance let the refined one be worse in the primary: the first is then the one
/// with the proven least primary (and, the least being unique up to that tolerance,
/// Pareto-optimal as well).
fn keep_refined(found: &mut Vec<Solution>, first: Solution, better: Solution) {
    let p = first.primary;
    let (a, b) = (first.objectives[p], better.objectives[p]);
    if b > a + DOMINANCE_TOLERANCE * a.abs().max(b.abs()) {
        found.push(first);
    }
    found.push(better);
}

/// Whether `a` dominates `b`: no worse in every objective and better in one, up to a
/// tiny relative tolerance.
fn dominates(a: &[f64], b: &[f64]) -> bool {
    let mut better = false;
    for (&x, &y) in a.iter().zip(b) {
        let tol = DOMINANCE_TOLERANCE * x.abs().max(y.abs());
        if x > y + tol {
            return false;
        }
        if x < y - tol {
            better = true;
        }
    }
    better
}

/// The distinct, non-dominated solutions, sorted by their objectives.
fn non_dominated(mut all: Vec<Solution>) -> Vec<Solution> {
    all.sort_by(|a, b| {
        a.choice
            .cmp(&b.choice)
            .then(b.exact.cmp(&a.exact))
            .then(a.gap.total_cmp(&b.gap))
    });
    all.dedup_by(|later, earlier| later.choice == earlier.choice);
    let mut kept: Vec<Solution> = all
        .iter()
        .filter(|s| !all.iter().any(|o| dominates(&o.objectives, &s.objectives)))
        .cloned()
        .collect();
    kept.sort_by(|a, b| {
        let by_objectives = a
            .objectives
            .iter()
            .zip(&b.objectives)
            .map(|(x, y)| x.total_cmp(y))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal);
        by_objectives.then_with(|| a.choice.cmp(&b.choice))
    });
    kept
}

/// The optimum of [`solve`]'s problem by enumerating every choice; ties go to the first
/// choice in lexicographic order. For tests and tiny problems.
///
/// # Errors
///
/// [`Error::Usage`] for an inconsistent problem or request, or when there are more than
/// [`EXHAUSTIVE_LIMIT`] choices.
pub fn exhaustive(
    problem: &Problem,
    primary: usize,
    caps: &[Option<f64>],
) -> Result<Option<Solution>> {
    problem.check()?;
    check_request(problem, primary, caps)?;
    let caps = full_caps(problem, caps);
    let total = u32::try_from(problem.units)
        .ok()
        .and_then(|k| (problem.candidates as u64).checked_pow(k))
        .filter(|&n| n <= EXHAUSTIVE_LIMIT);
    if total.is_none() {
        return Err(Error::Usage(format!(
            "plan optimization: {} candidates ^ {} units is more than {EXHAUSTIVE_LIMIT} choices",
            problem.candidates, problem.units
        )));
    }
    let model = Model::new(problem);
    let mut best: Option<(f64, Vec<usize>)> = None;
    let mut choice = vec![0usize; problem.units];
    loop {
        if problem.violation(&choice).is_none() {
            let values = problem.objective_values(&choice);
            let better = match &best {
                Some((v, _)) => values[primary] < *v,
                None => true,
            };
            if better && model.meets_caps(&values, &caps) {
                best = Some((values[primary], choice.clone()));
            }
        }
        // Next choice, last unit fastest (lexicographic order).
        let mut d = problem.units;
        while d > 0 {
            d -= 1;
            choice[d] += 1;
            if choice[d] < problem.candidates {
                break;
            }
            choice[d] = 0;
        }
        if choice.iter().all(|&c| c == 0) {
            break;
        }
    }
    let Some((value, choice)) = best else {
        return Ok(None);
    };
    let (objectives, costs) = problem.evaluate(&choice)?;
    Ok(Some(Solution {
        choice,
        objectives,
        costs,
        primary,
        bound: value,
        gap: 0.0,
        exact: true,
    }))
}

#[cfg(test)]
mod tests;
