//! The reference for tests: [`exhaustive`] enumerates every choice of a small problem.

use super::model::Model;
use super::problem::{check_request, full_caps, Problem, Solution};
use crate::error::{Error, Result};

/// The most choices [`exhaustive`] enumerates (`candidates ^ units`).
pub const EXHAUSTIVE_LIMIT: u64 = 2_000_000;

/// The optimum of [`solve`]'s problem by enumerating every choice; ties go to the first
/// choice in lexicographic order. For tests and tiny problems.
///
/// # Errors
///
/// [`Error::Usage`] for an inconsistent problem or request, or when there are more than
/// [`EXHAUSTIVE_LIMIT`] choices.
///
/// [`solve`]: super::solve
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
