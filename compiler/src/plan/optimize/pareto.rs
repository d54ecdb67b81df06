//! The driver: [`solve`] and [`solve_with`] (one objective's least under caps, within
//! [`Limits`]), [`pareto`] and [`pareto_with`] (MoA's epsilon-constraint grid over such
//! solves, [`DEFAULT_INTERVALS`] cap values per objective by default, then the distinct
//! non-dominated plans).

use super::model::Model;
use super::problem::{check_request, full_caps, Limits, Problem, Solution};
use crate::error::{Error, Result};

/// The number of cap values per capped objective that [`pareto`] uses when the caller has
/// no preference (MoA's default).
pub const DEFAULT_INTERVALS: usize = 4;

/// The relative tolerance of the dominance test in [`pareto`].
const DOMINANCE_TOLERANCE: f64 = 1e-12;

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
///
/// [`CAP_SLACK`]: super::CAP_SLACK
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
///
/// [`CAP_SLACK`]: super::CAP_SLACK
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
