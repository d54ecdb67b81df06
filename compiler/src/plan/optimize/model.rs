//! A problem prepared for the solver ([`Model`]): the candidates that cannot matter
//! dropped, the caps and their slack ([`CAP_SLACK`]), the 0-1 program of one solve, and
//! the solves the driver asks for (the least of one objective under caps, then a
//! Pareto-optimal plan as good in it), each plan checked against the problem.

use super::lagrange::{partitions, Core, Found};
use super::milp::{Milp, Program, Row, Sense, MAX_ASSIGNMENTS};
use super::problem::Limits;
use super::problem::{Problem, Solution};
use crate::error::{Error, Result};

/// How far beyond a cap an objective may lie, relative to the cap's room above the
/// objective's least possible value (see the module documentation).
pub const CAP_SLACK: f64 = 1e-6;

/// How far beyond [`CAP_SLACK`] a plan the solver returns may lie before it is refused
/// as a solver failure, relative to the cap's room: round-off, with room to spare.
const CAP_VERIFY_SLACK: f64 = 1e-7;

/// A gap at or below this (relative) counts as a proven optimum.
const EXACT_GAP: f64 = 1e-9;

/// A problem prepared for the solver: per-unit minima, spreads and the candidates that
/// can matter.
pub(super) struct Model<'a> {
    problem: &'a Problem,
    /// `[i][k]`: the smallest loss of unit `k` under objective `i`.
    min_loss: Vec<Vec<f64>>,
    /// `[i]`: the sum over the units of `min_loss`.
    base_loss: Vec<f64>,
    /// `[i]`: the largest `loss - min_loss` of any unit and candidate.
    pub(super) spread: Vec<f64>,
    /// `[j][k]`: the smallest cost of unit `k` in row `j`.
    min_cost: Vec<Vec<u64>>,
    /// `[j]`: the sum over the units of `min_cost`.
    base_cost: Vec<u64>,
    /// `[k]`: the candidates of unit `k` that the solver considers, ascending.
    kept: Vec<Vec<usize>>,
    /// Set when the preparation already proved the problem infeasible.
    infeasible: bool,
    /// How hard each solve tries.
    pub(super) limits: Limits,
}

impl<'a> Model<'a> {
    /// The model of a checked problem with every candidate kept.
    pub(super) fn new(problem: &'a Problem) -> Model<'a> {
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
    pub(super) fn prune(&mut self) {
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
    pub(super) fn cap_limit(&self, i: usize, e: f64) -> f64 {
        e + CAP_SLACK * self.cap_room(i, e) + 1e-12 * e.abs()
    }

    /// How far cap `e` lies above the least value objective `i` can take.
    pub(super) fn cap_room(&self, i: usize, e: f64) -> f64 {
        (e - self.base_loss[i]).max(0.0)
    }

    /// The right-hand side the MILP sees for cap `e` on objective `i`, on the losses
    /// above each unit's least: below [`Model::cap_limit`] by enough that what the
    /// solver's row tolerance and the dropped coefficients let through still meets it.
    fn cap_rhs(&self, i: usize, e: f64) -> f64 {
        (e - self.base_loss[i]) + 0.7 * CAP_SLACK * self.cap_room(i, e) + 1e-12 * e.abs()
    }

    /// Whether objective values meet the caps, as the problem defines them.
    pub(super) fn meets_caps(&self, values: &[f64], caps: &[Option<f64>]) -> bool {
        caps.iter().enumerate().all(|(i, cap)| match *cap {
            Some(e) => values[i] <= self.cap_limit(i, e),
            None => true,
        })
    }

    /// The 0-1 program that minimizes `sum_i weights[i] * (f_i - base_i) / spread_i`
    /// under the budgets, floors, rule limit and caps; `None` when these are plainly
    /// infeasible. `allowed`, when given, marks the kept candidates (numbered unit by
    /// unit) a plan may use at all: the others are left out.
    pub(super) fn program(
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
    pub(super) fn reach(&self, q: usize, e: f64, core: &Core) -> f64 {
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
    pub(super) fn minimize(
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
    pub(super) fn refine(
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

/// `(value - bound) / max(|value|, tiny)`, never negative.
fn relative_gap(value: f64, bound: f64) -> f64 {
    ((value - bound) / value.abs().max(f64::MIN_POSITIVE)).max(0.0)
}
