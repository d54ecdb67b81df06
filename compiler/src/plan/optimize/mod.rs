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
//!
//! [`pareto`]: fn@pareto
//! [`exhaustive`]: fn@exhaustive

mod exhaustive;
mod lagrange;
mod milp;
mod model;
mod pareto;
mod problem;

pub use exhaustive::{exhaustive, EXHAUSTIVE_LIMIT};
pub use model::CAP_SLACK;
pub use pareto::{pareto, pareto_with, solve, solve_with, DEFAULT_INTERVALS};
pub use problem::{candidate_grid, Candidate, Limits, Problem, Solution};

#[cfg(test)]
mod tests;
