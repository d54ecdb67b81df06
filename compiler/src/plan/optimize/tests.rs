//! The solver against exhaustive enumeration and MoA-sized timing runs.

use super::lagrange::partitions;
use super::model::Model;
use super::*;
use crate::error::Error;
use std::time::Duration;

/// SplitMix64: a small seeded generator for reproducible instances.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// Every choice of a small problem, in lexicographic order.
fn all_choices(p: &Problem) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    let mut choice = vec![0usize; p.units];
    loop {
        out.push(choice.clone());
        let mut d = p.units;
        while d > 0 {
            d -= 1;
            choice[d] += 1;
            if choice[d] < p.candidates {
                break;
            }
            choice[d] = 0;
        }
        if choice.iter().all(|&c| c == 0) {
            return out;
        }
    }
}

/// A random small instance: losses of several kinds (wide-ranged, small integers
/// with many ties), costs, budgets between the least and the most possible, maybe a
/// floor and a rule limit.
fn random_problem(rng: &mut Rng, objectives: usize) -> Problem {
    let units = rng.range(2, 5) as usize;
    let candidates = rng.range(2, 5) as usize;
    let rows = rng.range(1, 3) as usize;
    let n = units * candidates;
    let kind = rng.range(0, 2);
    let loss: Vec<Vec<f64>> = (0..objectives)
        .map(|_| {
            (0..n)
                .map(|_| match kind {
                    0 => rng.unit() * 10.0,
                    1 => 10f64.powf(rng.unit() * 8.0 - 6.0),
                    _ => rng.range(0, 4) as f64,
                })
                .collect()
        })
        .collect();
    let cost: Vec<Vec<u64>> = (0..rows)
        .map(|_| (0..n).map(|_| rng.range(0, 100)).collect())
        .collect();
    let mut budget = Vec::new();
    let mut floor = Vec::new();
    for row in &cost {
        let least: u64 = row
            .chunks(candidates)
            .map(|u| u.iter().min().copied().unwrap_or(0))
            .sum();
        let most: u64 = row
            .chunks(candidates)
            .map(|u| u.iter().max().copied().unwrap_or(0))
            .sum();
        let b = rng.range(least, most);
        budget.push(b);
        floor.push(rng.range(least, b));
    }
    let floor = if rng.range(0, 3) == 0 {
        Some(floor)
    } else {
        None
    };
    let max_rules_per_group = if rng.coin() {
        let size = if units.is_multiple_of(2) && rng.coin() {
            2
        } else {
            units
        };
        Some((size, rng.range(1, size as u64) as usize))
    } else {
        None
    };
    Problem {
        units,
        candidates,
        loss,
        cost,
        budget,
        floor,
        max_rules_per_group,
    }
}

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(scale)
}

#[test]
fn grid_follows_moa() {
    let grid = candidate_grid(&[1024, 2048, 4096], &[1024, 2048, 4096, 8192], None).unwrap();
    assert!(!grid.is_empty());
    for c in &grid {
        assert!(c.alpha + c.beta * 8192.0 <= 8192.0, "{c:?}");
        assert!(c.alpha + c.beta * 1024.0 > 0.0, "{c:?}");
        assert_eq!(c.alpha % 512.0, 0.0, "{c:?}");
        assert!((-1024.0..=4096.0).contains(&c.alpha), "{c:?}");
        assert_eq!((c.beta * 8.0).fract(), 0.0, "{c:?}");
    }
    let has = |alpha: f64, beta: f64| grid.contains(&Candidate { alpha, beta });
    assert!(has(0.0, 0.5));
    assert!(has(4096.0, 0.0));
    assert!(has(-512.0, 1.0));
    assert!(has(0.0, 1.0));
    assert!(!has(4096.0, 1.0));
    assert!(!has(-1024.0, 0.0));
    assert!(!has(-1024.0, 1.0));
    for w in grid.windows(2) {
        assert!((w[0].beta, w[0].alpha) < (w[1].beta, w[1].alpha));
    }
    // Every pair of the full grid that passes the filters is there.
    let mut expected = 0;
    for eighths in 0..=8 {
        let beta = eighths as f64 / 8.0;
        for a in -2..=8 {
            let alpha = a as f64 * 512.0;
            if alpha + beta * 8192.0 <= 8192.0 && alpha + beta * 1024.0 > 0.0 {
                expected += 1;
            }
        }
    }
    assert_eq!(grid.len(), expected);

    let wide = candidate_grid(&[2048, 4096, 8192], &[], None).unwrap();
    assert!(wide.iter().all(|c| c.alpha % 1024.0 == 0.0));
    assert_eq!(
        wide.iter().map(|c| c.alpha).fold(f64::INFINITY, f64::min),
        -1024.0
    );
    assert!(wide.contains(&Candidate {
        alpha: 8192.0,
        beta: 0.0
    }));
    assert!(!wide.contains(&Candidate {
        alpha: -2048.0,
        beta: 1.0
    }));
    let stepped = candidate_grid(&[2048], &[], Some(256)).unwrap();
    assert!(stepped.contains(&Candidate {
        alpha: 256.0,
        beta: 0.0
    }));
}

#[test]
fn grid_refuses_bad_input() {
    assert!(candidate_grid(&[], &[1024], None).is_err());
    assert!(candidate_grid(&[0, 1024], &[], None).is_err());
    assert!(candidate_grid(&[1024], &[0], None).is_err());
    assert!(candidate_grid(&[1024], &[], Some(0)).is_err());
}

fn tiny() -> Problem {
    Problem {
        units: 2,
        candidates: 2,
        loss: vec![vec![1.0, 0.0, 1.0, 0.0]],
        cost: vec![vec![1, 2, 1, 2]],
        budget: vec![3],
        floor: None,
        max_rules_per_group: None,
    }
}

#[test]
fn check_refuses_mismatched_sizes() {
    assert!(tiny().check().is_ok());
    let mut p = tiny();
    p.loss[0].pop();
    assert!(p.check().is_err());
    let mut p = tiny();
    p.cost[0].push(1);
    assert!(p.check().is_err());
    let mut p = tiny();
    p.budget.push(1);
    assert!(p.check().is_err());
    let mut p = tiny();
    p.floor = Some(vec![]);
    assert!(p.check().is_err());
    let mut p = tiny();
    p.loss[0][1] = f64::NAN;
    assert!(p.check().is_err());
    let mut p = tiny();
    p.loss.clear();
    assert!(p.check().is_err());
    let mut p = tiny();
    p.units = 0;
    assert!(p.check().is_err());
    let mut p = tiny();
    p.max_rules_per_group = Some((3, 1));
    assert!(p.check().is_err());
    let mut p = tiny();
    p.cost[0][0] = 1 << 60;
    assert!(p.check().is_err());
    assert!(solve(&tiny(), 1, &[]).is_err());
    assert!(solve(&tiny(), 0, &[None, None]).is_err());
    assert!(solve(&tiny(), 0, &[Some(f64::NAN)]).is_err());
    assert!(pareto(&tiny(), 0).is_err());
    assert!(tiny().evaluate(&[0]).is_err());
    assert!(tiny().evaluate(&[0, 2]).is_err());
}

#[test]
fn tiny_problem_solves() {
    let s = solve(&tiny(), 0, &[]).unwrap().unwrap();
    assert_eq!(s.objectives, vec![1.0]);
    assert_eq!(s.costs, vec![3]);
    assert!(s.exact);
    assert_eq!(s.gap, 0.0);
    assert!(s.choice == vec![0, 1] || s.choice == vec![1, 0]);
    let mut p = tiny();
    p.budget = vec![1];
    assert_eq!(solve(&p, 0, &[]).unwrap(), None);
    assert_eq!(exhaustive(&p, 0, &[]).unwrap(), None);
    assert_eq!(pareto(&p, 4).unwrap(), vec![]);
    let mut p = tiny();
    p.floor = Some(vec![5]);
    assert_eq!(solve(&p, 0, &[]).unwrap(), None);
    assert_eq!(solve(&tiny(), 0, &[Some(0.5)]).unwrap(), None);
    let capped = solve(&tiny(), 0, &[Some(1.0)]).unwrap().unwrap();
    assert_eq!(capped.objectives, vec![1.0]);
    let one = pareto(&tiny(), 4).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].objectives, vec![1.0]);
}

/// A plan that meets the budgets exactly and the caps as `solve` defines them.
fn assert_valid(p: &Problem, s: &Solution, caps: &[Option<f64>]) {
    let (values, costs) = p.evaluate(&s.choice).unwrap();
    assert_eq!(values, s.objectives);
    assert_eq!(costs, s.costs);
    assert!(p.is_feasible(&s.choice).unwrap(), "{s:?}");
    for (j, &sum) in costs.iter().enumerate() {
        assert!(sum <= p.budget[j]);
    }
    let model = Model::new(p);
    for (i, cap) in caps.iter().enumerate() {
        if let Some(e) = *cap {
            assert!(
                values[i] <= model.cap_limit(i, e) + 1e-7 * model.cap_room(i, e) + 1e-10 * e.abs(),
                "{s:?}"
            );
        }
    }
}

#[test]
fn solve_matches_exhaustive() {
    let mut rng = Rng(0x5EED_0001);
    let (mut feasible, mut capped) = (0, 0);
    for round in 0..400 {
        let objectives = rng.range(1, 3) as usize;
        let p = random_problem(&mut rng, objectives);
        let primary = rng.range(0, objectives as u64 - 1) as usize;
        let mut caps = vec![None; objectives];
        if rng.coin() {
            let choices = all_choices(&p);
            for (i, cap) in caps.iter_mut().enumerate() {
                if i == primary || !rng.coin() {
                    continue;
                }
                // Half the caps sit exactly on some plan's value.
                let pick = &choices[rng.range(0, choices.len() as u64 - 1) as usize];
                let v = p.evaluate(pick).unwrap().0[i];
                *cap = Some(if rng.coin() {
                    v
                } else {
                    v * (0.5 + rng.unit())
                });
            }
        }
        let got = solve(&p, primary, &caps).unwrap();
        let want = exhaustive(&p, primary, &caps).unwrap();
        let scale = Model::new(&p).spread[primary];
        match (&got, &want) {
            (Some(g), Some(w)) => {
                feasible += 1;
                if caps.iter().any(Option::is_some) {
                    capped += 1;
                }
                assert_valid(&p, g, &caps);
                assert!(
                    close(g.objectives[primary], w.objectives[primary], scale),
                    "round {round}: solve {g:?} vs exhaustive {w:?} for {p:?} caps {caps:?}"
                );
                assert!(g.bound <= g.objectives[primary]);
                assert!(g.exact);
            }
            (None, None) => {}
            _ => panic!(
                "round {round}: solve {got:?} vs exhaustive {want:?} for {p:?} caps {caps:?}"
            ),
        }
    }
    assert!(feasible > 100, "{feasible}");
    assert!(capped > 30, "{capped}");
}

/// The rule limit's fallbacks (a Lagrangian that leaves it to the MILP solver, and
/// groups linked by y variables instead of enumerated) find the same optima.
#[test]
fn rule_fallbacks_match_exhaustive() {
    let mut rng = Rng(0x5EED_0003);
    let mut checked = 0;
    for round in 0..300 {
        let objectives = rng.range(1, 2) as usize;
        let p = random_problem(&mut rng, objectives);
        if p.max_rules_per_group.is_none() {
            continue;
        }
        let want = exhaustive(&p, 0, &[]).unwrap();
        let mut model = Model::new(&p);
        model.prune();
        let mut weights = vec![0.0; objectives];
        weights[0] = 1.0;
        for (plain, linked) in [(true, false), (false, true), (true, true)] {
            let none = vec![None; objectives];
            let got = match model.program(&weights, &none, &none, None) {
                Some(mut program) => {
                    if plain {
                        program.partitions.clear();
                    }
                    if linked {
                        program.max_assignments = 0;
                    }
                    program.solve(None, &Limits::default()).unwrap()
                }
                None => None,
            };
            match (&got, &want) {
                (Some(g), Some(w)) => {
                    checked += 1;
                    assert!(p.is_feasible(&g.choice).unwrap());
                    let v = p.evaluate(&g.choice).unwrap().0[0];
                    let scale = model.spread[0];
                    assert!(
                        close(v, w.objectives[0], scale),
                        "round {round} ({plain}, {linked}): {v} vs {w:?} in {p:?}"
                    );
                }
                (None, None) => {}
                _ => panic!("round {round} ({plain}, {linked}): feasibility differs in {p:?}"),
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

#[test]
fn pareto_is_pareto_optimal() {
    let mut rng = Rng(0x5EED_0002);
    let mut fronts = 0;
    for round in 0..80 {
        let objectives = rng.range(1, 3) as usize;
        let p = random_problem(&mut rng, objectives);
        let front = pareto(&p, DEFAULT_INTERVALS).unwrap();
        let feasible: Vec<Vec<f64>> = all_choices(&p)
            .into_iter()
            .filter(|c| p.is_feasible(c).unwrap())
            .map(|c| p.evaluate(&c).unwrap().0)
            .collect();
        if feasible.is_empty() {
            assert!(front.is_empty());
            continue;
        }
        fronts += 1;
        assert!(!front.is_empty());
        if objectives == 1 {
            assert_eq!(front.len(), 1);
        }
        let model = Model::new(&p);
        for s in &front {
            assert_valid(&p, s, &[]);
            // No feasible plan is no worse in every objective and better in one by
            // more than the solver's tolerance.
            for f in &feasible {
                let mut better = false;
                let mut worse = false;
                for ((&fi, &si), &spread) in f.iter().zip(&s.objectives).zip(&model.spread) {
                    let scale = si.abs().max(spread);
                    better |= fi < si - 1e-8 * scale;
                    worse |= fi > si + 1e-12 * scale;
                }
                assert!(
                    !better || worse,
                    "round {round}: {s:?} is dominated by {f:?} in {p:?}"
                );
            }
        }
        for pair in front.windows(2) {
            assert!(pair[0].objectives[0] <= pair[1].objectives[0]);
            assert_ne!(pair[0].choice, pair[1].choice);
        }
        for i in 0..objectives {
            let best = feasible.iter().map(|f| f[i]).fold(f64::INFINITY, f64::min);
            let reached = front
                .iter()
                .map(|s| s.objectives[i])
                .fold(f64::INFINITY, f64::min);
            assert!(
                close(best, reached, model.spread[i]),
                "round {round}: objective {i}: {best} vs {reached}"
            );
        }
    }
    assert!(fronts > 30, "{fronts}");
}

/// A MoA-shaped instance: losses fall and costs grow with the span.
fn moa_like(units: usize, candidates: usize, objectives: usize, rows: usize, seed: u64) -> Problem {
    let mut rng = Rng(seed);
    let spans: Vec<f64> = (0..candidates).map(|_| 0.05 + 0.95 * rng.unit()).collect();
    let mut loss = vec![Vec::with_capacity(units * candidates); objectives];
    let mut cost = vec![Vec::with_capacity(units * candidates); rows];
    for _ in 0..units {
        for (i, row) in loss.iter_mut().enumerate() {
            let scale = 10f64.powf(rng.unit() * 4.0 - 3.0);
            let rate = 2.0 + 6.0 * rng.unit() + i as f64;
            for &s in &spans {
                row.push(scale * (-rate * s).exp() * (0.9 + 0.2 * rng.unit()));
            }
        }
        for (j, row) in cost.iter_mut().enumerate() {
            let length = 1024.0 * (1 << j) as f64;
            for &s in &spans {
                row.push((s * length).round() as u64);
            }
        }
    }
    let budget = cost
        .iter()
        .map(|row| {
            (row.chunks(candidates)
                .map(|u| u.iter().max().copied().unwrap_or(0))
                .sum::<u64>() as f64
                * 0.5) as u64
        })
        .collect();
    Problem {
        units,
        candidates,
        loss,
        cost,
        budget,
        floor: None,
        max_rules_per_group: None,
    }
}

#[test]
fn moa_sized_solve_completes() {
    let p = moa_like(90, 60, 3, 4, 7);
    let s = solve(&p, 0, &[]).unwrap().unwrap();
    assert_valid(&p, &s, &[]);
    assert!(s.exact && s.gap == 0.0);
    let capped = [None, Some(s.objectives[1] * 0.8), None];
    let t = solve(&p, 0, &capped).unwrap().unwrap();
    assert_valid(&p, &t, &capped);
    assert!(t.exact);
    assert!(t.objectives[0] >= s.objectives[0]);
    let mut ruled = p.clone();
    ruled.max_rules_per_group = Some((3, 2));
    let r = solve(&ruled, 0, &[]).unwrap().unwrap();
    assert_valid(&ruled, &r, &[]);
    assert!(r.exact);
    assert!(r.objectives[0] >= s.objectives[0]);
}

#[test]
fn partitions_cover_each_unit_once() {
    let count = |size, blocks| partitions(size, blocks).map(|p| p.len());
    assert_eq!(count(3, 1), Some(1));
    assert_eq!(count(3, 2), Some(4));
    assert_eq!(count(4, 2), Some(8));
    assert_eq!(count(4, 3), Some(14));
    assert_eq!(count(5, 5), Some(52));
    assert_eq!(count(16, 8), None);
    for part in partitions(5, 3).unwrap() {
        assert!(part.len() <= 3 && part.iter().all(|b| !b.is_empty()));
        let mut all: Vec<usize> = part.concat();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
    }
}

#[test]
fn limits_bound_the_gap() {
    let bad = Limits {
        mip_gap: -1.0,
        time_limit: None,
    };
    assert!(solve_with(&tiny(), 0, &[], &bad).is_err());
    assert!(pareto_with(&tiny(), 4, &bad).is_err());
    let p = moa_like(30, 20, 2, 2, 3);
    let exact = solve(&p, 0, &[]).unwrap().unwrap();
    let loose = Limits {
        mip_gap: 0.05,
        time_limit: None,
    };
    let s = solve_with(&p, 0, &[], &loose).unwrap().unwrap();
    assert_valid(&p, &s, &[]);
    assert!(s.gap <= 0.05 && s.bound <= s.objectives[0]);
    assert!(s.bound <= exact.objectives[0] * (1.0 + 1e-9));
    assert!(s.objectives[0] >= exact.objectives[0] * (1.0 - 1e-9));
    // No time at all: a plan the Lagrangian happened to find, or an error.
    let none = Limits {
        mip_gap: 0.0,
        time_limit: Some(Duration::ZERO),
    };
    match solve_with(&p, 0, &[], &none) {
        Ok(Some(s)) => {
            assert_valid(&p, &s, &[]);
            assert!(s.bound <= exact.objectives[0] * (1.0 + 1e-9));
        }
        Ok(None) => panic!("a feasible problem answered infeasible"),
        Err(e) => assert!(matches!(e, Error::Usage(_))),
    }
    for s in pareto_with(&p, 3, &loose).unwrap() {
        assert_valid(&p, &s, &[]);
    }
}

/// Times one solve and one Pareto front at the real use's size.
fn time_pareto(limits: &Limits, label: &str) {
    for (rules, shape) in [
        (None, "no rule limit"),
        (Some((3, 2)), "<= 2 rules per 3 units"),
    ] {
        let mut p = moa_like(90, 60, 3, 4, 11);
        p.max_rules_per_group = rules;
        let started = std::time::Instant::now();
        let s = solve_with(&p, 0, &[], limits).unwrap().unwrap();
        eprintln!(
            "{label}, {shape}: one solve {:?} (gap {:e})",
            started.elapsed(),
            s.gap
        );
        let started = std::time::Instant::now();
        let front = pareto_with(&p, DEFAULT_INTERVALS, limits).unwrap();
        let worst = front.iter().map(|s| s.gap).fold(0.0, f64::max);
        let inexact = front.iter().filter(|s| !s.exact).count();
        eprintln!(
            "{label}, {shape}: pareto {:?}, {} plans, {inexact} not proven, worst gap {worst:e}",
            started.elapsed(),
            front.len()
        );
        for s in &front {
            assert_valid(&p, s, &[]);
        }
    }
}

/// The real use's size (90 units x 60 candidates x 3 objectives x 4 rows) under
/// limits, for timing by hand:
/// `cargo test --release -p moac --lib plan::optimize -- --ignored --nocapture`.
#[test]
#[ignore]
fn moa_sized_pareto_timing() {
    let gap = Limits {
        mip_gap: 1e-3,
        time_limit: None,
    };
    time_pareto(&gap, "MIP gap 1e-3");
    let timed = Limits {
        mip_gap: 0.0,
        time_limit: Some(Duration::from_secs(2)),
    };
    time_pareto(&timed, "2 s per solve");
}

/// As [`moa_sized_pareto_timing`], exact (takes many minutes).
#[test]
#[ignore]
fn moa_sized_pareto_exact_timing() {
    time_pareto(&Limits::default(), "exact");
}
