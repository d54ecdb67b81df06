//! The Lagrangian core of a [`Program`]'s solve ([`Program::solve`]): multipliers of the
//! side rows by subgradient ascent (the rule limit honored per group through the
//! partitions of its units), the lower bound and reduced costs they give ([`Core`]), and
//! the core of variables that widens until the MILP solver's plan over it is proven
//! optimal or within the limits ([`Found`]).

use super::milp::{Milp, Program};
use super::problem::Limits;
use crate::error::{Error, Result};
use std::time::Instant;

/// What one MILP solve found.
pub(super) struct Found {
    pub(super) choice: Vec<usize>,
    /// The solver proved optimality.
    pub(super) proven: bool,
    /// A lower bound on the optimum, in the units of the program's objective.
    pub(super) bound: f64,
    /// What the Lagrangian proved about the program's plans.
    pub(super) core: Core,
}

/// The Lagrangian's verdict on a program: every plan the MILP solver could accept is
/// worth at least `lower + sum of its variables' rc - slack` (program units).
pub(super) struct Core {
    /// The reduced cost of every variable of the program.
    pub(super) rc: Vec<f64>,
    /// The Lagrangian bound.
    pub(super) lower: f64,
    /// What the solver's tolerances on the rows can take off a plan's worth.
    pub(super) slack: f64,
}

/// The most subgradient steps of one Lagrangian dual.
const DUAL_STEPS: usize = 600;
/// Steps without a better bound before the step size halves.
const DUAL_PATIENCE: usize = 15;
/// The smallest step scale (relative to Polyak's) before the dual stops.
const DUAL_LEAST_SCALE: f64 = 1e-3;

/// The most partitions of one group the Lagrangian enumerates (see [`Program`]).
const MAX_PARTITIONS: usize = 4096;

/// Every partition of `0..size` into at most `blocks` blocks, each a list of blocks;
/// `None` when there are more than [`MAX_PARTITIONS`].
pub(super) fn partitions(size: usize, blocks: usize) -> Option<Vec<Vec<Vec<usize>>>> {
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
    pub(super) fn solve(&self, hint: Option<&[usize]>, limits: &Limits) -> Result<Option<Found>> {
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
}
