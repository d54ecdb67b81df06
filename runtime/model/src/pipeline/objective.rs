//! From a profile to plans: one decision per KV head (moac's cache stores a KV head once,
//! sized for the widest of its query heads, so a narrower sibling would save no bytes),
//! its loss the sum of its query heads' losses at each profiled length, its cost the
//! slots (bytes) it takes in moac's cache at each constraint length; every Pareto-optimal
//! plan over the profiled lengths from the exact MILP solver (`moac::plan::optimize`).

use super::influence::HeadSums;
use super::profile::Profile;
use crate::{Error, Result};
use moac::geometry::capacity;
use moac::plan::optimize::{self as solver, Candidate, Problem, Solution};
use moac::plan::{HeadRule, Settings};

/// How [`optimize`] chooses.
#[derive(Debug, Clone)]
pub struct OptimizeOptions {
    /// KV bytes at most this fraction of the dense cache's at every constraint length.
    pub density: f64,
    /// Lengths N where the density holds (default: the profiled lengths).
    pub constraint_lengths: Vec<usize>,
    /// MoA's kernels' limit of distinct rules per layer (off by default).
    pub max_rules_per_layer: Option<usize>,
    /// Step of the alpha grid (default: MoA's, 1024 or 512 for short profiles).
    pub alpha_step: Option<u64>,
    /// Epsilon-constraint grid intervals per objective (MoA: 4).
    pub intervals: usize,
    /// Each MILP solve stops once its plan is proven within this relative distance of
    /// the optimum ([`MIP_GAP`]; 0 = prove the optimum, however long that takes). The
    /// gap each plan reached is reported; the result does not depend on timing.
    pub mip_gap: f64,
    /// Also require at least 90% of the budget to be used (MoA's lower bound).
    pub min_use: bool,
    /// The share of each length's objective that is the needle attention a plan drops
    /// (the rest: the influence it drops), both normalized ([`Objective`]). 0 = MoA's
    /// influence alone; ignored for profiles without needle sums.
    pub retrieval_weight: f64,
    /// How a span's influence is counted ([`Influence`]).
    pub influence: Influence,
    /// The share of each head's influence replaced by the mean influence of all heads
    /// at the same capacity ([`Objective`]): 0 = each head's own (MoA's), 1 = one curve
    /// for every head, so only the needle term tells heads apart.
    pub pool_influence: f64,
    /// What the needle term counts ([`Needle`]).
    pub needle: Needle,
    pub settings: Settings,
}

/// What the needle term of the objective counts at the copy steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Needle {
    /// The attention on the needle (`Level::needle`; profile version 2).
    #[default]
    Attention,
    /// The needle entries' influence |E|: what masking the needle costs the answer, to
    /// first order (`Level::needle_influence`; profile version 3). Profiles without it
    /// fall back to `Attention`.
    Influence,
}

impl std::str::FromStr for Needle {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Needle, String> {
        match s {
            "attention" => Ok(Needle::Attention),
            "influence" => Ok(Needle::Influence),
            _ => Err(format!(
                "{s:?}: the needle term counts \"attention\" or \"influence\""
            )),
        }
    }
}

impl std::fmt::Display for Needle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Needle::Attention => "attention",
            Needle::Influence => "influence",
        })
    }
}

/// The default of [`OptimizeOptions::needle`]: the needle entries' influence (the
/// attention on the needle kept layers 3-8 whole, which the pass key does not need;
/// EVAL.md).
pub const NEEDLE: Needle = Needle::Influence;

impl Needle {
    /// The needle sums of `level` this counts (the attention when the influence is not
    /// in the profile).
    fn sums(self, level: &super::profile::Level) -> Option<&Vec<Vec<HeadSums>>> {
        match self {
            Needle::Influence if level.needle_influence.is_some() => {
                level.needle_influence.as_ref()
            }
            _ => level.needle.as_ref(),
        }
    }
}

/// How the influence of the entries a span drops is added up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Influence {
    /// MoA's: the sum of every dropped entry's |E| (`HeadSums::loss`). The default:
    /// on SmolLM2 the row-wise count made nearly the same plan (EVAL.md) and its losses
    /// make the multi-objective solves much slower.
    #[default]
    Entries,
    /// Row by row, the dropped entries of a row taken together (`HeadSums::row_loss`);
    /// profiles without the row sums fall back to `Entries`.
    Rows,
}

impl std::str::FromStr for Influence {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Influence, String> {
        match s {
            "entries" => Ok(Influence::Entries),
            "rows" => Ok(Influence::Rows),
            _ => Err(format!(
                "{s:?}: the influence is counted by \"entries\" or \"rows\""
            )),
        }
    }
}

/// The way `mode` can be used on `profile`: rows only when every level has the row sums.
fn usable(profile: &Profile, mode: Influence) -> Influence {
    let has_rows = profile.levels.iter().all(|l| {
        l.heads
            .iter()
            .flatten()
            .any(|h| h.rows.first().is_some_and(|&r| r > 0.0))
    });
    if mode == Influence::Rows && has_rows {
        Influence::Rows
    } else {
        Influence::Entries
    }
}

/// The default of [`OptimizeOptions::retrieval_weight`]: with the needle influence
/// and the pooled influence, 0.5 kept the pass key at 2k (70% on 20 prompts, 0.75: 80%,
/// uniform 40%) with perplexity within 0.2% of the uniform window's (0.75: up to 1%;
/// EVAL.md, issue 22).
pub const RETRIEVAL_WEIGHT: f64 = 0.5;

/// The default of [`OptimizeOptions::mip_gap`]: a plan within 0.1% of the optimum. With
/// the pooled influence many plans lose nearly the same, and proving the last of the
/// optimum took the multi-objective front past 15 minutes on SmolLM2 (0.1 s to 20 s for
/// one solve).
pub const MIP_GAP: f64 = 1e-3;

/// The default of [`OptimizeOptions::pool_influence`]: fully pooled. On SmolLM2 the
/// per-head influence spread the heads that retrieval does not need worse than a uniform
/// window would (EVAL.md, issue 22); pooled, with the needle influence, the same pass-key
/// score came with a lower perplexity at every length measured.
pub const POOL_INFLUENCE: f64 = 1.0;

/// One plan: a rule per layer and query head, and what it costs and loses.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MadePlan {
    pub name: String,
    /// [layer][query head].
    #[serde(skip)]
    pub rules: Vec<Vec<HeadRule>>,
    /// Predicted loss per profiled length: the [`Objective`] of what is dropped.
    pub loss: Vec<f64>,
    /// KV bytes over the dense cache's, per constraint length.
    pub density: Vec<f64>,
    /// KV bytes (f16/bf16 K and V) per sequence, per constraint length.
    pub kv_bytes: Vec<u64>,
    /// The solver's relative optimality gap (0 = proven optimal; none for baselines).
    pub gap: Option<f64>,
    /// What the plan minimizes: "front" (a Pareto point of the per-length losses),
    /// "sum" (the sum of the normalized losses over lengths) or "baseline".
    pub objective: String,
}

impl MadePlan {
    /// The official MoA JSON of the plan.
    pub fn to_moa_json(&self) -> serde_json::Value {
        let col = |f: &dyn Fn(&HeadRule) -> f64| -> Vec<Vec<f64>> {
            self.rules
                .iter()
                .map(|l| l.iter().map(f).collect())
                .collect()
        };
        serde_json::json!({
            "alphas": col(&|r| r.alpha),
            "betas": col(&|r| r.beta),
        })
    }
}

/// The outcome of [`optimize`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Optimized {
    pub model: String,
    pub profile_lengths: Vec<usize>,
    pub constraint_lengths: Vec<usize>,
    pub density: f64,
    /// KV heads per layer (the plans' rules are per query head).
    pub kv_heads: usize,
    pub candidates: usize,
    /// The Pareto plans, by loss at the first profiled length.
    pub plans: Vec<MadePlan>,
    /// The uniform plan of the same density (alpha 0, beta = density), for comparison.
    pub uniform: MadePlan,
    /// Solver seconds.
    pub seconds: f64,
}

/// Per-KV-head slots of the dense cache of N tokens.
fn dense_slots(n: usize) -> u64 {
    n as u64
}

/// Bytes of one slot of one KV head: K and V of head_dim f16/bf16 values.
fn slot_bytes(head_dim: usize) -> u64 {
    2 * 2 * head_dim as u64
}

/// The loss of a level when every head keeps only its sink: the influence of everything
/// a plan could drop. Each level's losses are divided by it, so that every length counts
/// as a fraction of what it has to lose, not by how many tokens (and entries) it holds.
pub fn level_norm(profile: &Profile, level: usize) -> f64 {
    level_norm_by(profile, level, Influence::Entries)
}

/// [`level_norm`] with the influence counted as `mode` says.
pub fn level_norm_by(profile: &Profile, level: usize, mode: Influence) -> f64 {
    let lv = &profile.levels[level];
    let n: f64 = lv
        .heads
        .iter()
        .flatten()
        .map(|h| match mode {
            Influence::Entries => (h.total - h.sink).max(0.0),
            Influence::Rows => h.rows.first().copied().unwrap_or(0.0),
        })
        .sum();
    if n > 0.0 {
        n
    } else {
        1.0
    }
}

/// The needle attention of a level when every head keeps only its sink (the divisor of
/// the level's needle term); none when the profile has no needle sums or no copy step.
pub fn needle_norm(profile: &Profile, level: usize) -> Option<f64> {
    needle_norm_by(profile, level, Needle::Attention)
}

/// [`needle_norm`] with the needle term counted as `what` says.
pub fn needle_norm_by(profile: &Profile, level: usize, what: Needle) -> Option<f64> {
    let n: f64 = what
        .sums(&profile.levels[level])?
        .iter()
        .flatten()
        .map(|h| (h.total - h.sink).max(0.0))
        .sum();
    (n > 0.0).then_some(n)
}

/// What a plan loses at one profiled length: `(1 - w)` times the influence it drops over
/// the level's droppable influence ([`level_norm`]), plus `w` times the needle attention
/// of the copy steps it drops over the level's droppable needle attention
/// ([`needle_norm`]); `w` = the retrieval weight (0 when the level has no needle sums).
///
/// With pooling `p` > 0, a head's influence is `(1 - p)` times its own plus `p` times the
/// mean over all heads of the level at the same capacity: a shrinkage of each head's
/// first-order estimate toward the common curve. On SmolLM2 the per-head influence
/// ranks heads that retrieval does not need in an order that costs perplexity against a
/// uniform window (EVAL.md), so pooling it leaves the needle term to tell heads apart.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    influence: f64,
    needle: f64,
    mode: Influence,
    pool: f64,
    what: Needle,
}

impl Objective {
    pub fn of(
        profile: &Profile,
        level: usize,
        retrieval_weight: f64,
        mode: Influence,
    ) -> Objective {
        let w = retrieval_weight.clamp(0.0, 1.0);
        let mode = usable(profile, mode);
        let norm = level_norm_by(profile, level, mode);
        match needle_norm(profile, level) {
            Some(nn) if w > 0.0 => Objective {
                influence: (1.0 - w) / norm,
                needle: w / nn,
                mode,
                pool: 0.0,
                what: Needle::Attention,
            },
            _ => Objective {
                influence: 1.0 / norm,
                needle: 0.0,
                mode,
                pool: 0.0,
                what: Needle::Attention,
            },
        }
    }

    /// The same objective with the needle term counting `what` (renormalized by its own
    /// droppable total).
    pub fn needle_from(self, profile: &Profile, level: usize, what: Needle) -> Objective {
        match (
            needle_norm(profile, level),
            needle_norm_by(profile, level, what),
        ) {
            (Some(old), Some(new)) if self.needle > 0.0 => Objective {
                needle: self.needle * old / new,
                what,
                ..self
            },
            _ => self,
        }
    }

    /// The same objective with the influence pooled over heads by the share `pool`
    /// (clamped to [0, 1]).
    pub fn pooled(self, pool: f64) -> Objective {
        Objective {
            pool: pool.clamp(0.0, 1.0),
            ..self
        }
    }

    /// The influence query head (l, h) of level `level` drops at capacity `cap`.
    fn own(&self, profile: &Profile, level: usize, l: usize, h: usize, cap: u64) -> f64 {
        let sums = &profile.levels[level].heads[l][h];
        match self.mode {
            Influence::Entries => sums.loss(cap, profile.sink),
            Influence::Rows => sums.row_loss(cap, profile.sink),
        }
    }

    /// The mean over every head of the level of the influence dropped at capacity `cap`.
    fn common(&self, profile: &Profile, level: usize, cap: u64) -> f64 {
        let lv = &profile.levels[level];
        let (mut s, mut n) = (0.0, 0usize);
        for (l, layer) in lv.heads.iter().enumerate() {
            for h in 0..layer.len() {
                s += self.own(profile, level, l, h, cap);
                n += 1;
            }
        }
        s / n.max(1) as f64
    }

    /// The loss of query head (l, h) of level `level` at capacity `cap`.
    pub fn head_loss(&self, profile: &Profile, level: usize, l: usize, h: usize, cap: u64) -> f64 {
        let lv = &profile.levels[level];
        let mut influence = self.own(profile, level, l, h, cap);
        if self.pool > 0.0 {
            influence =
                (1.0 - self.pool) * influence + self.pool * self.common(profile, level, cap);
        }
        let mut v = self.influence * influence;
        if self.needle > 0.0 {
            if let Some(nd) = self.what.sums(lv) {
                v += self.needle * nd[l][h].loss(cap, profile.sink);
            }
        }
        v
    }
}

/// Slots of the uniform plan (every head `alpha 0, beta density`) at N: the budget of
/// every made plan at N (never more KV bytes than the uniform plan of the same density).
pub fn uniform_slots(profile: &Profile, density: f64, n: usize, settings: &Settings) -> u64 {
    let s = profile.shape;
    let c = capacity(
        HeadRule {
            alpha: 0.0,
            beta: density,
        },
        n as u64,
        settings,
    );
    c * (s.num_layers * s.num_kv_heads) as u64
}

/// Scores a plan (rule per layer and query head) with the profile and the cache rule;
/// losses per length as the solver saw them ([`Objective`]).
fn score(
    profile: &Profile,
    rules: &[Vec<HeadRule>],
    constraint_lengths: &[usize],
    settings: &Settings,
    objective: &dyn Fn(usize) -> Objective,
) -> (Vec<f64>, Vec<f64>, Vec<u64>) {
    let shape = profile.shape;
    let g = shape.group_size();
    let loss = profile
        .levels
        .iter()
        .enumerate()
        .map(|(i, lv)| {
            let obj = objective(i);
            let mut s = 0.0;
            for (l, layer) in rules.iter().enumerate() {
                for (h, rule) in layer.iter().enumerate() {
                    let c = capacity(*rule, lv.length as u64, settings);
                    s += obj.head_loss(profile, i, l, h, c);
                }
            }
            s
        })
        .collect();
    let mut density = Vec::new();
    let mut bytes = Vec::new();
    for &n in constraint_lengths {
        let mut slots = 0u64;
        for layer in rules {
            for kv in layer.chunks(g) {
                slots += kv
                    .iter()
                    .map(|r| capacity(*r, n as u64, settings))
                    .max()
                    .unwrap_or(0);
            }
        }
        let dense = dense_slots(n) * (shape.num_layers * shape.num_kv_heads) as u64;
        density.push(slots as f64 / dense as f64);
        bytes.push(slots * slot_bytes(shape.head_dim));
    }
    (loss, density, bytes)
}

/// Every Pareto-optimal plan of `profile` at `opts.density`.
pub fn optimize(profile: &Profile, opts: &OptimizeOptions) -> Result<Optimized> {
    let start = std::time::Instant::now();
    let d = opts.density;
    if !(d > 0.0 && d <= 1.0) {
        return Err(Error::Usage(format!(
            "density {d}: it must be in (0, 1] (the fraction of the dense cache's bytes)"
        )));
    }
    for (what, v) in [
        ("retrieval weight", opts.retrieval_weight),
        ("influence pooling", opts.pool_influence),
    ] {
        if !(0.0..=1.0).contains(&v) {
            return Err(Error::Usage(format!(
                "{what} {v}: it must be in [0, 1] (a share of the objective)"
            )));
        }
    }
    let shape = profile.shape;
    let settings = &opts.settings;
    if profile.sink != settings.sink {
        return Err(Error::Usage(format!(
            "the profile was made with a {}-token sink, the plan asks for {}",
            profile.sink, settings.sink
        )));
    }
    let lengths = profile.lengths();
    let constraint: Vec<usize> = if opts.constraint_lengths.is_empty() {
        lengths.clone()
    } else {
        opts.constraint_lengths.clone()
    };
    let as64 = |v: &[usize]| v.iter().map(|&x| x as u64).collect::<Vec<u64>>();
    let grid: Vec<Candidate> =
        solver::candidate_grid(&as64(&lengths), &as64(&constraint), opts.alpha_step)?;
    let g = shape.group_size();
    let units = shape.num_layers * shape.num_kv_heads;
    let nc = grid.len();
    let rule = |c: &Candidate| HeadRule {
        alpha: c.alpha,
        beta: c.beta,
    };
    // What a plan loses at level i.
    let objective = |i: usize| {
        Objective::of(profile, i, opts.retrieval_weight, opts.influence)
            .needle_from(profile, i, opts.needle)
            .pooled(opts.pool_influence)
    };
    // Loss of unit k = (layer, kv head) with candidate c at each level.
    let mut loss = vec![vec![0.0; units * nc]; lengths.len()];
    for (i, lv) in profile.levels.iter().enumerate() {
        let obj = objective(i);
        for k in 0..units {
            let (l, kv) = (k / shape.num_kv_heads, k % shape.num_kv_heads);
            for (c, cand) in grid.iter().enumerate() {
                let cap = capacity(rule(cand), lv.length as u64, settings);
                loss[i][k * nc + c] = (kv * g..(kv + 1) * g)
                    .map(|h| obj.head_loss(profile, i, l, h, cap))
                    .sum::<f64>();
            }
        }
    }
    let mut cost = vec![vec![0u64; units * nc]; constraint.len()];
    let mut budget = Vec::new();
    for (j, &n) in constraint.iter().enumerate() {
        for k in 0..units {
            for (c, cand) in grid.iter().enumerate() {
                cost[j][k * nc + c] = capacity(rule(cand), n as u64, settings);
            }
        }
        // The uniform plan's slots: a made plan never holds more KV bytes than it.
        let b = uniform_slots(profile, d, n, settings);
        let cheapest: u64 = (0..nc).map(|c| cost[j][c]).min().unwrap_or(0) * units as u64;
        if cheapest > b {
            return Err(Error::Usage(format!(
                "density {d} cannot be met at length {n}: even every head at its smallest capacity ({} slots) takes {:.1}% of the dense cache",
                cheapest / units as u64,
                100.0 * cheapest as f64 / (units as u64 * dense_slots(n)) as f64
            )));
        }
        budget.push(b);
    }
    let floor = opts.min_use.then(|| {
        budget
            .iter()
            .map(|&b| (b as f64 * 0.9).floor() as u64)
            .collect()
    });
    let problem = Problem {
        units,
        candidates: nc,
        loss,
        cost,
        budget,
        floor,
        max_rules_per_group: opts.max_rules_per_layer.map(|r| (shape.num_kv_heads, r)),
    };
    problem.check()?;
    let limits = solver::Limits {
        mip_gap: opts.mip_gap,
        time_limit: None,
    };
    let mut front: Vec<(Solution, &str)> =
        solver::pareto_with(&problem, opts.intervals.max(1), &limits)?
            .into_iter()
            .map(|s| (s, "front"))
            .collect();
    // The plan of the least summed (normalized) loss over the lengths, unless the front
    // has it already.
    if problem.objectives() > 1 {
        let summed = Problem {
            loss: vec![(0..units * nc)
                .map(|x| problem.loss.iter().map(|l| l[x]).sum())
                .collect()],
            ..problem.clone()
        };
        if let Some(best) = solver::solve_with(&summed, 0, &[None], &limits)? {
            if front.iter().all(|(s, _)| s.choice != best.choice) {
                front.push((best, "sum"));
            }
        }
    }
    if front.is_empty() {
        return Err(Error::Usage(format!(
            "no plan meets density {d} at every length {constraint:?} with the given limits"
        )));
    }
    let to_rules = |choice: &[usize]| -> Vec<Vec<HeadRule>> {
        (0..shape.num_layers)
            .map(|l| {
                (0..shape.num_query_heads)
                    .map(|h| rule(&grid[choice[l * shape.num_kv_heads + h / g]]))
                    .collect()
            })
            .collect()
    };
    let plans = front
        .iter()
        .enumerate()
        .map(|(i, (s, kind))| {
            let rules = to_rules(&s.choice);
            let (loss, density, kv_bytes) =
                score(profile, &rules, &constraint, settings, &objective);
            MadePlan {
                name: format!("plan-{i:02}"),
                rules,
                loss,
                density,
                kv_bytes,
                gap: Some(s.gap),
                objective: kind.to_string(),
            }
        })
        .collect();
    let uniform_rules = vec![
        vec![
            HeadRule {
                alpha: 0.0,
                beta: d
            };
            shape.num_query_heads
        ];
        shape.num_layers
    ];
    let (loss, density, kv_bytes) =
        score(profile, &uniform_rules, &constraint, settings, &objective);
    Ok(Optimized {
        model: profile.model.clone(),
        profile_lengths: lengths,
        constraint_lengths: constraint,
        density: d,
        kv_heads: shape.num_kv_heads,
        candidates: nc,
        plans,
        uniform: MadePlan {
            name: "uniform".into(),
            rules: uniform_rules,
            loss,
            density,
            kv_bytes,
            gap: None,
            objective: "baseline".into(),
        },
        seconds: start.elapsed().as_secs_f64(),
    })
}
