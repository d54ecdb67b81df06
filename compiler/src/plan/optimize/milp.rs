//! The 0-1 program of one solve ([`Program`]: one variable per unit and kept
//! candidate, its objective and side rows) and its MILP over a core of variables,
//! handed to `microlp`.

use crate::error::{Error, Result};
use microlp::{
    ComparisonOp, OptimizationDirection, SolutionStatus, SolveOptions, SolveOutcome, Variable,
};
use std::time::Duration;

/// Which way a row of a [`Program`] bounds its sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sense {
    AtMost,
    AtLeast,
}

/// One side constraint of a [`Program`]: the sum of the chosen variables' coefficients
/// is at most (or at least) `rhs`.
pub(super) struct Row {
    /// One coefficient per variable of the program.
    pub(super) coef: Vec<f64>,
    pub(super) rhs: f64,
    sense: Sense,
    /// The row's largest coefficient (1 for none): the Lagrangian sees the row divided
    /// by it, so that every multiplier works on the same scale.
    pub(super) norm: f64,
}

impl Row {
    pub(super) fn new(coef: Vec<f64>, rhs: f64, sense: Sense) -> Row {
        let norm = coef.iter().fold(0.0f64, |m, c| m.max(c.abs()));
        Row {
            coef,
            rhs,
            sense,
            norm: if norm > 0.0 { norm } else { 1.0 },
        }
    }

    /// The Lagrangian multiplier's factor: the row as `<=`, normalized.
    pub(super) fn factor(&self) -> f64 {
        match self.sense {
            Sense::AtMost => 1.0 / self.norm,
            Sense::AtLeast => -1.0 / self.norm,
        }
    }

    /// How far the MILP solver may overstep the row: its feasibility tolerance (`1e-7`)
    /// and round-off, with room to spare.
    pub(super) fn tolerance(&self) -> f64 {
        1e-6 + 1e-12 * self.rhs.abs()
    }
}

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
pub(super) struct Program {
    /// Unit `k`'s variables are `start[k]..start[k + 1]`.
    pub(super) start: Vec<usize>,
    /// The candidate of each variable.
    pub(super) cand: Vec<usize>,
    /// The objective coefficient of each variable.
    pub(super) obj: Vec<f64>,
    pub(super) rows: Vec<Row>,
    /// `(group_size, r)` when the rule limit binds.
    pub(super) rules: Option<(usize, usize)>,
    /// The number of candidates of the problem (candidate ids are below it).
    pub(super) width: usize,
    /// When the rule limit binds, every partition of a group's units into at most `r`
    /// blocks (units of a block share a candidate), so that the Lagrangian honors the
    /// limit; empty when there are too many (the MILP solver alone honors it then).
    pub(super) partitions: Vec<Vec<Vec<usize>>>,
    /// The most rule-abiding assignments of a group that [`Program::milp`] makes the
    /// options of one block ([`MAX_ASSIGNMENTS`]).
    pub(super) max_assignments: usize,
}

impl Program {
    pub(super) fn units(&self) -> usize {
        self.start.len() - 1
    }

    pub(super) fn vars(&self, k: usize) -> std::ops::Range<usize> {
        self.start[k]..self.start[k + 1]
    }

    /// The objective of a plan (one variable per unit).
    pub(super) fn value(&self, pick: &[usize]) -> f64 {
        pick.iter().map(|&x| self.obj[x]).sum()
    }

    /// Whether a plan meets every row exactly and the rule limit.
    pub(super) fn feasible(&self, pick: &[usize]) -> bool {
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

    /// A plan given by candidate as variables, if every candidate is one of its unit's.
    pub(super) fn picks_of(&self, choice: &[usize]) -> Option<Vec<usize>> {
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
    pub(super) fn milp(
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
pub(super) const MAX_ASSIGNMENTS: usize = 2048;

/// What one MILP solve over a core ended with.
pub(super) enum Milp {
    /// No plan within the core.
    Infeasible,
    /// The time limit ran out before any plan was found.
    Stopped,
    /// A plan (one variable per unit) and a lower bound on the core's optimum.
    Plan { pick: Vec<usize>, bound: f64 },
}
