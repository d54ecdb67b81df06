//! The plan pipeline from profile to plans on a tiny random Llama (no model file):
//! - a profile written and read back is the same; the same samples give the same profile;
//!   a run resumes from its finished samples;
//! - every plan `optimize` returns meets the density at every constraint length exactly as
//!   moac's cache geometry counts bytes, loads as a valid plan, gives the query heads of
//!   one KV head one rule, and the same profile gives the same plans;
//! - the best plan's predicted loss is no worse than the uniform plan's of the same
//!   density, and is optimal against brute force on a small instance;
//! - bad input (density out of (0, 1], a budget no plan meets, lengths the calibration set
//!   lacks, a profile of another model, an empty calibration file) is a clear error;
//! - `make` (the whole pipeline in one call, on the tiny model with a word-level
//!   tokenizer) writes its work files and a valid plan within the density, and a second
//!   call reuses every stage's file and chooses the same plan.
#![allow(clippy::unwrap_used)]

use moac::geometry::{CacheGeometry, Dtype};
use moac::plan::{ModelShape, Settings};
use moac_model::chat::{ChatTemplate, CHATML};
use moac_model::llama::{Llama, LlamaConfig, RopeStyle};
use moac_model::pipeline::calib::{CalibHeader, CalibSample, CalibSet, FORMAT};
use moac_model::pipeline::make::{make, MakeOptions, Reused};
use moac_model::pipeline::objective::{optimize, Influence, Needle, OptimizeOptions};
use moac_model::pipeline::profile::{self, Profile};
use moac_model::pipeline::stages::Quiet;
use moac_model::pipeline::tasks::Family;
use moac_model::tokenizer::Tokenizer;
use moac_model::Model;
use moac_runtime::reference::check::Rng;
use std::path::Path;

fn tiny_config(num_layers: usize, rope: RopeStyle) -> LlamaConfig {
    LlamaConfig {
        num_layers,
        hidden: 32,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        vocab_size: 50,
        rope_theta: 10000.0,
        rms_eps: 1e-5,
        context_len: 2048,
        rope,
    }
}

fn tiny() -> Llama {
    Llama::random(tiny_config(3, RopeStyle::HalfSplit), 64, 11).unwrap()
}

fn calib(lengths: &[usize], per: usize, seed: u64) -> CalibSet {
    let mut rng = Rng::new(seed);
    let mut samples = Vec::new();
    for &n in lengths {
        for s in 0..per {
            let answer = 20 + rng.below(12) as usize;
            let prompt_len = n - 32;
            let mut tokens: Vec<u32> = (0..prompt_len + answer)
                .map(|_| rng.below(50) as u32)
                .collect();
            if s % 2 == 0 {
                // The answer copies a stretch of the prompt (a needle to read).
                let (head, tail) = tokens.split_at_mut(prompt_len);
                tail.copy_from_slice(&head[100..100 + answer]);
            }
            samples.push(CalibSample {
                // Ids are free text: one that looks like a path must not make one.
                id: format!("n{n}-{s}-summary:text/src.txt (a source)"),
                length: n,
                task: "random".into(),
                prompt_len,
                tokens,
                answer: String::new(),
                truth: false,
            });
        }
    }
    CalibSet {
        header: CalibHeader {
            format: FORMAT.into(),
            version: 1,
            model: "tiny".into(),
            vocab_size: 50,
            seed,
            max_answer: 32,
            sources: vec!["random tokens".into()],
        },
        samples,
    }
}

fn run(m: &Llama, set: &CalibSet, out: &Path) -> (Profile, usize) {
    let mut resumed = 0;
    let p = profile::run(m, "tiny", set, &[], 64, out, &mut |_, _, r| {
        resumed += r as usize
    })
    .unwrap();
    (p, resumed)
}

fn options(density: f64, constraint: Vec<usize>) -> OptimizeOptions {
    OptimizeOptions {
        density,
        constraint_lengths: constraint,
        max_rules_per_layer: None,
        alpha_step: Some(128),
        mip_gap: 0.0,
        intervals: 4,
        min_use: false,
        retrieval_weight: 0.0,
        pool_influence: 0.0,
        needle: Needle::Attention,
        influence: Influence::Entries,
        settings: Settings::default(),
    }
}

#[test]
fn profile_round_trips_is_deterministic_and_resumes() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let set = calib(&[256, 512], 2, 1);
    let out = dir.path().join("p.safetensors");
    let (p, resumed) = run(&m, &set, &out);
    assert_eq!(resumed, 0);
    assert_eq!(p.lengths(), vec![256, 512]);
    assert!(p.levels.iter().all(|l| l.samples == 2 && l.loss > 0.0));
    // Half the samples copy their answer from the prompt: needle attention was found.
    assert!(p.levels.iter().all(|l| l
        .needle
        .as_ref()
        .is_some_and(|nd| nd.iter().flatten().any(|h| h.total > 0.0))));
    let parts = std::fs::read_dir(profile::parts_dir(&out)).unwrap().count();
    assert_eq!(parts, 4, "one file per sample, flat in the parts folder");
    // ... and what masking it would cost (version 3).
    assert!(p.levels.iter().all(|l| l
        .needle_influence
        .as_ref()
        .is_some_and(|nd| nd.iter().flatten().any(|h| h.total > 0.0))));
    p.write(&out).unwrap();
    assert_eq!(Profile::read(&out).unwrap(), p);
    // A version 2 profile (no needle influence) reads back without it.
    let mut v2 = p.clone();
    for l in &mut v2.levels {
        l.needle_influence = None;
    }
    let f2 = dir.path().join("v2.safetensors");
    v2.write(&f2).unwrap();
    assert_eq!(Profile::read(&f2).unwrap(), v2);
    // A version 1 profile (no needle sums, no row sums) reads back without them.
    let mut old = v2.clone();
    for l in &mut old.levels {
        l.needle = None;
        l.heads
            .iter_mut()
            .flatten()
            .for_each(|h| h.rows.iter_mut().for_each(|r| *r = 0.0));
    }
    let f1 = dir.path().join("v1.safetensors");
    old.write(&f1).unwrap();
    assert_eq!(Profile::read(&f1).unwrap(), old);
    // The parts are still there: a second run takes them all and agrees.
    let (again, resumed) = run(&m, &set, &out);
    assert_eq!(resumed, 4);
    assert_eq!(again, p);
    // Without the parts, the computation itself is reproducible.
    std::fs::remove_dir_all(profile::parts_dir(&out)).unwrap();
    let (fresh, resumed) = run(&m, &set, &out);
    assert_eq!(resumed, 0);
    assert_eq!(fresh, p);
    // Another calibration set with the same ids is not mistaken for this one.
    let other = calib(&[256, 512], 2, 2);
    let (q, resumed) = run(&m, &other, &out);
    assert_eq!(resumed, 0);
    assert_ne!(q, p);
}

#[test]
fn plans_meet_the_density_as_the_geometry_counts_and_beat_uniform() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let set = calib(&[512, 1024], 1, 3);
    let (p, _) = run(&m, &set, &dir.path().join("p.safetensors"));
    let shape = m.config.shape();
    let constraint = vec![512, 1024, 2048];
    for density in [0.3, 0.5, 0.75] {
        let out = optimize(&p, &options(density, constraint.clone())).unwrap();
        assert!(!out.plans.is_empty());
        let again = optimize(&p, &options(density, constraint.clone())).unwrap();
        for (a, b) in out.plans.iter().zip(&again.plans) {
            assert_eq!(a.rules, b.rules, "same profile, same plans");
        }
        for plan in &out.plans {
            let json = plan.to_moa_json();
            let get =
                |k: &str| -> Vec<Vec<f64>> { serde_json::from_value(json[k].clone()).unwrap() };
            let valid = moac::plan::validate(
                Path::new("made.json"),
                shape,
                Settings::default(),
                &get("alphas"),
                &get("betas"),
            )
            .unwrap();
            for (i, &n) in constraint.iter().enumerate() {
                let geo = CacheGeometry::new(&valid, n as u64 - 128, 128).unwrap();
                let (kv, dense) = (
                    geo.kv_bytes(Dtype::F16, 1),
                    geo.dense_kv_bytes(Dtype::F16, 1),
                );
                assert!(
                    kv <= out.uniform.kv_bytes[i],
                    "density {density} at N = {n}: {kv} bytes, uniform {} (dense {dense})",
                    out.uniform.kv_bytes[i]
                );
                assert_eq!(
                    plan.kv_bytes[i], kv,
                    "the optimizer counts bytes as the geometry does"
                );
            }
            for layer in &plan.rules {
                for group in layer.chunks(shape.group_size()) {
                    assert!(group.iter().all(|r| r == &group[0]), "one rule per KV head");
                }
            }
        }
        // The budget is the uniform plan's bytes (its capacities round up to 64, so at
        // 0.3 it holds a little more than 0.3 of dense): the best plan at each length is
        // at least as good as uniform.
        for i in 0..out.profile_lengths.len() {
            let best = out
                .plans
                .iter()
                .map(|p| p.loss[i])
                .fold(f64::INFINITY, f64::min);
            assert!(
                best <= out.uniform.loss[i] * (1.0 + 1e-9),
                "density {density}: best predicted loss {best} at length {} worse than uniform {}",
                out.profile_lengths[i],
                out.uniform.loss[i]
            );
        }
    }
}

#[test]
fn the_plan_is_optimal_against_brute_force() {
    // One layer, two KV heads, one profiled length: few enough choices to enumerate.
    let m = Llama::random(tiny_config(1, RopeStyle::Interleaved), 64, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = run(&m, &calib(&[768], 1, 9), &dir.path().join("p.safetensors"));
    let opts = options(0.5, vec![768, 1536]);
    let out = optimize(&p, &opts).unwrap();
    let best = &out.plans[0];
    // Every pair of rules from the grid the optimizer used.
    let grid = moac::plan::optimize::candidate_grid(&[768], &[768, 1536], Some(128)).unwrap();
    let settings = Settings::default();
    let mut brute = f64::INFINITY;
    for a in &grid {
        for b in &grid {
            let rules = [*a, *a, *b, *b];
            let mut slots = [0u64; 2];
            for (j, n) in [768u64, 1536].into_iter().enumerate() {
                for r in [a, b] {
                    let rule = moac::plan::HeadRule {
                        alpha: r.alpha,
                        beta: r.beta,
                    };
                    slots[j] += moac::geometry::capacity(rule, n, &settings);
                }
                if slots[j] as f64 > 0.5 * 2.0 * n as f64 {
                    slots[0] = u64::MAX;
                }
            }
            if slots[0] == u64::MAX {
                continue;
            }
            let loss: f64 = rules
                .iter()
                .enumerate()
                .map(|(h, r)| {
                    let rule = moac::plan::HeadRule {
                        alpha: r.alpha,
                        beta: r.beta,
                    };
                    p.levels[0].heads[0][h].loss(moac::geometry::capacity(rule, 768, &settings), 64)
                })
                .sum();
            brute = brute.min(loss);
        }
    }
    // The optimizer reports losses as fractions of what the length has to lose.
    let brute = brute / moac_model::pipeline::objective::level_norm(&p, 0);
    assert!(
        (best.loss[0] - brute).abs() <= 1e-9 * brute.max(1e-12),
        "optimizer {} vs brute force {brute}",
        best.loss[0]
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let m = tiny();
    let dir = tempfile::tempdir().unwrap();
    let set = calib(&[512], 1, 4);
    let out = dir.path().join("p.safetensors");
    let (p, _) = run(&m, &set, &out);
    for d in [0.0, -0.5, 1.5, f64::NAN] {
        let e = optimize(&p, &options(d, vec![])).unwrap_err().to_string();
        assert!(e.contains("density"), "{e}");
    }
    // 5% of a 512-token cache is 25 tokens, below the 128-token minimum capacity: the
    // uniform plan is every head at the minimum, and so is the only plan within its bytes.
    let made = optimize(&p, &options(0.05, vec![512, 4096])).unwrap();
    assert_eq!(made.uniform.density[0], 0.25);
    for plan in &made.plans {
        assert_eq!(plan.kv_bytes[0], made.uniform.kv_bytes[0], "{}", plan.name);
        assert!(
            plan.kv_bytes[1] <= made.uniform.kv_bytes[1],
            "{}",
            plan.name
        );
    }
    // Lengths the calibration set lacks.
    let e = profile::run(&m, "tiny", &set, &[1024], 64, &out, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("1024"), "{e}");
    // A profile of another model shape.
    let other = ModelShape {
        num_layers: 4,
        ..m.config.shape()
    };
    let e = p.check(&out, &other).unwrap_err().to_string();
    assert!(e.contains("3 layers") && e.contains("4 layers"), "{e}");
    // Files: empty, header only, not a profile.
    let f = dir.path().join("c.jsonl");
    std::fs::write(&f, "").unwrap();
    assert!(CalibSet::read(&f)
        .unwrap_err()
        .to_string()
        .contains("c.jsonl"));
    let header = serde_json::to_string(&set.header).unwrap();
    std::fs::write(&f, format!("{header}\n")).unwrap();
    assert!(CalibSet::read(&f)
        .unwrap_err()
        .to_string()
        .contains("no samples"));
    std::fs::write(&f, format!("{header}\n{{\"id\": 3}}\n")).unwrap();
    let e = CalibSet::read(&f).unwrap_err().to_string();
    assert!(e.contains("line 2"), "{e}");
    assert!(Profile::read(&f).is_err());
}

/// SmolLM2-135M's attention shape.
fn smollm2_shape() -> ModelShape {
    ModelShape {
        num_layers: 30,
        num_query_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
    }
}

/// A profile of `shape` at `lengths` whose head (layer, query head) has sums drawn by
/// `mass(layer, head, distance, rng)` per token distance and per block distance.
fn synthetic_profile(
    shape: ModelShape,
    lengths: &[usize],
    mut mass: impl FnMut(usize, usize, usize, &mut Rng) -> f64,
    seed: u64,
) -> Profile {
    use moac_model::pipeline::influence::HeadSums;
    let mut rng = Rng::new(seed);
    let levels = lengths
        .iter()
        .map(|&n| {
            let heads = (0..shape.num_layers)
                .map(|l| {
                    (0..shape.num_query_heads)
                        .map(|h| {
                            let mut s = HeadSums::new(n);
                            for (d, t) in s.token.iter_mut().enumerate() {
                                *t = mass(l, h, d, &mut rng);
                            }
                            for (b, t) in s.block.iter_mut().enumerate() {
                                *t = 64.0 * mass(l, h, b * 64, &mut rng);
                            }
                            s.sink = rng.next_f64();
                            s.total =
                                s.sink + s.token.iter().sum::<f64>() + s.block.iter().sum::<f64>();
                            s
                        })
                        .collect()
                })
                .collect();
            profile::Level {
                length: n,
                samples: 1,
                loss: 1.0,
                heads,
                needle: None,
                needle_influence: None,
            }
        })
        .collect();
    Profile {
        model: "synthetic".into(),
        shape,
        sink: 64,
        levels,
    }
}

/// KV slots of a plan at N, counted from its rules (the widest query head of each KV
/// head), independently of the optimizer's own count.
fn slots_at(rules: &[Vec<moac::plan::HeadRule>], g: usize, n: usize) -> u64 {
    let settings = Settings::default();
    rules
        .iter()
        .flat_map(|layer| layer.chunks(g))
        .map(|kv| {
            kv.iter()
                .map(|r| moac::geometry::capacity(*r, n as u64, &settings))
                .max()
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn plans_never_hold_more_kv_bytes_than_uniform_at_any_constraint_length() {
    // One profiled length per case (solves without caps on other objectives take
    // milliseconds; a random three-objective front can take minutes to prove), every
    // constraint length from 1k to 8k: the budget rows are what is under test.
    let constraint = vec![1024, 2048, 4096, 8192];
    let mut rng = Rng::fresh("plans_never_exceed_uniform");
    let shapes = [
        smollm2_shape(),
        ModelShape {
            num_layers: 4,
            num_query_heads: 8,
            num_kv_heads: 2,
            head_dim: 128,
        },
    ];
    for (k, shape) in shapes.into_iter().enumerate() {
        // Random influence: a random scale per head, decaying with distance at a random rate.
        let seed = rng.next_u64();
        let mut scales = Rng::new(seed ^ 7);
        let per_head: Vec<(f64, f64)> = (0..shape.num_layers * shape.num_query_heads)
            .map(|_| (scales.next_f64(), 30.0 + 3000.0 * scales.next_f64()))
            .collect();
        let lengths = [[1024], [2048], [4096]][k % 3 + (seed % 2) as usize];
        let p = synthetic_profile(
            shape,
            &lengths,
            |l, h, d, r| {
                let (a, tau) = per_head[l * shape.num_query_heads + h];
                a * (-(d as f64) / tau).exp() * (0.5 + r.next_f64())
            },
            seed,
        );
        for density in [0.25, 0.3, 0.5] {
            let mut o = options(density, constraint.clone());
            o.alpha_step = None;
            o.intervals = 2;
            let out = optimize(&p, &o).unwrap();
            let g = shape.group_size();
            for (i, &n) in constraint.iter().enumerate() {
                let uniform = slots_at(&out.uniform.rules, g, n);
                assert_eq!(out.uniform.kv_bytes[i], uniform * 4 * shape.head_dim as u64);
                for plan in &out.plans {
                    let s = slots_at(&plan.rules, g, n);
                    assert!(
                        s <= uniform,
                        "shape {k}, density {density}, {} ({}): {s} slots at N = {n}, uniform {uniform}",
                        plan.name,
                        plan.objective
                    );
                    assert_eq!(plan.kv_bytes[i], s * 4 * shape.head_dim as u64);
                }
            }
        }
    }
}

#[test]
fn heads_planted_as_costly_to_shorten_get_the_long_spans() {
    let shape = smollm2_shape();
    let lengths = [1024, 2048, 4096];
    let constraint = vec![1024, 2048, 4096, 8192];
    let mut rng = Rng::fresh("planted_heads");
    // Nine KV heads (of 90) whose query heads draw on every distance alike, as much as
    // the others do on their nearest tokens; every other head's influence fades within a
    // few hundred tokens.
    let mut planted = std::collections::BTreeSet::new();
    while planted.len() < 9 {
        planted.insert(rng.below(90) as usize);
    }
    let seed = rng.next_u64();
    let p = synthetic_profile(
        shape,
        &lengths,
        |l, h, d, r| {
            let unit = l * shape.num_kv_heads + h / shape.group_size();
            if planted.contains(&unit) {
                0.5 + r.next_f64()
            } else {
                (-(d as f64) / 60.0).exp() * (0.5 + r.next_f64())
            }
        },
        seed,
    );
    let mut o = options(0.25, constraint.clone());
    o.alpha_step = None;
    o.intervals = 2;
    let out = optimize(&p, &o).unwrap();
    let settings = Settings::default();
    let long_at = |plan: &moac_model::pipeline::objective::MadePlan, ns: &[usize]| {
        let mut set = std::collections::BTreeSet::new();
        for (l, layer) in plan.rules.iter().enumerate() {
            for (j, kv) in layer.chunks(shape.group_size()).enumerate() {
                if ns
                    .iter()
                    .all(|&n| moac::geometry::capacity(kv[0], n as u64, &settings) >= n as u64)
                {
                    set.insert(l * shape.num_kv_heads + j);
                }
            }
        }
        set
    };
    // The plan of least loss over all lengths (the summed objective's) gives exactly the
    // planted heads full spans at every profiled length.
    let best = out
        .plans
        .iter()
        .min_by(|a, b| {
            a.loss
                .iter()
                .sum::<f64>()
                .total_cmp(&b.loss.iter().sum::<f64>())
        })
        .unwrap();
    assert_eq!(
        long_at(best, &lengths),
        planted,
        "{} ({}): the heads with full spans at every profiled length",
        best.name,
        best.objective
    );
    // Every plan of the front gives them full spans at the length it is best at.
    for (i, &n) in lengths.iter().enumerate() {
        let anchor = out
            .plans
            .iter()
            .min_by(|a, b| a.loss[i].total_cmp(&b.loss[i]))
            .unwrap();
        assert_eq!(
            long_at(anchor, &[n]),
            planted,
            "{} ({}), best at N = {n}: the heads with full spans",
            anchor.name,
            anchor.objective
        );
    }
}

#[test]
fn the_retrieval_weight_gives_the_heads_that_read_the_needle_long_spans() {
    use moac_model::pipeline::influence::HeadSums;
    let shape = smollm2_shape();
    let lengths = [1024, 2048];
    let constraint = vec![1024, 2048, 4096];
    let mut rng = Rng::fresh("needle_heads");
    // The influence says nothing about retrieval: every head's fades within a few
    // hundred tokens. Six KV heads read the needle at every distance.
    let mut planted = std::collections::BTreeSet::new();
    while planted.len() < 6 {
        planted.insert(rng.below(90) as usize);
    }
    let seed = rng.next_u64();
    let mut p = synthetic_profile(
        shape,
        &lengths,
        |_, _, d, r| (-(d as f64) / 200.0).exp() * (0.5 + r.next_f64()),
        seed,
    );
    for lv in &mut p.levels {
        let n = lv.length;
        let needle = (0..shape.num_layers)
            .map(|l| {
                (0..shape.num_query_heads)
                    .map(|h| {
                        let mut s = HeadSums::new(n);
                        let unit = l * shape.num_kv_heads + h / shape.group_size();
                        let per = if planted.contains(&unit) { 1.0 } else { 1e-3 };
                        for t in s.token.iter_mut() {
                            *t = per * (0.5 + rng.next_f64()) / n as f64;
                        }
                        s.total = s.token.iter().sum();
                        s
                    })
                    .collect()
            })
            .collect();
        lv.needle = Some(needle);
    }
    let settings = Settings::default();
    let long = |plan: &moac_model::pipeline::objective::MadePlan| {
        let mut set = std::collections::BTreeSet::new();
        for (l, layer) in plan.rules.iter().enumerate() {
            for (j, kv) in layer.chunks(shape.group_size()).enumerate() {
                if lengths
                    .iter()
                    .all(|&n| moac::geometry::capacity(kv[0], n as u64, &settings) >= n as u64)
                {
                    set.insert(l * shape.num_kv_heads + j);
                }
            }
        }
        set
    };
    let summed = |o: &OptimizeOptions| {
        let out = optimize(&p, o).unwrap();
        out.plans
            .iter()
            .find(|x| x.objective == "sum")
            .or_else(|| {
                out.plans.iter().min_by(|a, b| {
                    a.loss
                        .iter()
                        .sum::<f64>()
                        .total_cmp(&b.loss.iter().sum::<f64>())
                })
            })
            .cloned()
            .unwrap()
    };
    let mut o = options(0.5, constraint.clone());
    o.alpha_step = None;
    o.intervals = 1;
    // Influence alone: no reason to keep the planted heads whole.
    let plain = summed(&o);
    assert!(
        !planted.is_subset(&long(&plain)),
        "without the needle term the planted heads are not singled out"
    );
    // With the needle term, every planted head keeps its whole span.
    o.retrieval_weight = 0.5;
    let made = summed(&o);
    let got = long(&made);
    assert!(
        planted.is_subset(&got),
        "planted {planted:?}, full spans {got:?}"
    ); // With the influence pooled over heads, the needle term alone singles them out.
    o.pool_influence = 1.0;
    let pooled = long(&summed(&o));
    assert!(
        planted.is_subset(&pooled),
        "pooled: planted {planted:?}, full spans {pooled:?}"
    );
}

#[test]
fn the_objective_counts_the_influence_by_rows_or_by_entries_as_asked() {
    use moac_model::pipeline::objective::{level_norm_by, Objective};
    let shape = smollm2_shape();
    let mut rng = Rng::fresh("objective_modes");
    let seed = rng.next_u64();
    let mut p = synthetic_profile(shape, &[1024], |_, _, _, r| r.next_f64(), seed);
    for s in p.levels[0].heads.iter_mut().flatten() {
        for r in s.rows.iter_mut() {
            *r = rng.next_f64();
        }
    }
    for cap in [128u64, 512, 1024] {
        let k = ((cap - 64) / 64) as usize;
        let (l, h) = (rng.below(30) as usize, rng.below(9) as usize);
        let s = &p.levels[0].heads[l][h];
        let rows = Objective::of(&p, 0, 0.0, Influence::Rows).head_loss(&p, 0, l, h, cap);
        let want = s.rows[k] / level_norm_by(&p, 0, Influence::Rows);
        assert!((rows - want).abs() <= 1e-12 * want.abs().max(1.0));
        let entries = Objective::of(&p, 0, 0.0, Influence::Entries).head_loss(&p, 0, l, h, cap);
        let want = s.loss(cap, 64) / level_norm_by(&p, 0, Influence::Entries);
        assert!((entries - want).abs() <= 1e-12 * want.abs().max(1.0));
    }
    // A profile without row sums counts by entries whatever is asked.
    for s in p.levels[0].heads.iter_mut().flatten() {
        s.rows.iter_mut().for_each(|r| *r = 0.0);
    }
    let (l, h) = (3, 4);
    let asked = Objective::of(&p, 0, 0.0, Influence::Rows).head_loss(&p, 0, l, h, 256);
    let entries = Objective::of(&p, 0, 0.0, Influence::Entries).head_loss(&p, 0, l, h, 256);
    assert_eq!(asked, entries);
}

#[test]
fn pooled_influence_shrinks_each_head_toward_the_mean_of_all_heads() {
    use moac_model::pipeline::objective::{level_norm_by, Objective};
    let shape = smollm2_shape();
    let mut rng = Rng::fresh("pooled_influence");
    let seed = rng.next_u64();
    // Heads differ a lot: each has its own decay length.
    let p = synthetic_profile(
        shape,
        &[1024],
        |l, h, d, r| (-(d as f64) / (20.0 + 30.0 * ((l * 9 + h) % 17) as f64)).exp() * r.next_f64(),
        seed,
    );
    let norm = level_norm_by(&p, 0, Influence::Entries);
    let base = Objective::of(&p, 0, 0.0, Influence::Entries);
    for cap in [64u64, 128, 448, 1024] {
        // The mean over all 270 query heads, straight from the sums.
        let mut mean = 0.0;
        for layer in &p.levels[0].heads {
            for s in layer {
                mean += s.loss(cap, 64);
            }
        }
        mean /= (shape.num_layers * shape.num_query_heads) as f64;
        for _ in 0..5 {
            let (l, h) = (rng.below(30) as usize, rng.below(9) as usize);
            let own = p.levels[0].heads[l][h].loss(cap, 64);
            for pool in [0.0, 0.3, 1.0] {
                let got = base.pooled(pool).head_loss(&p, 0, l, h, cap);
                let want = ((1.0 - pool) * own + pool * mean) / norm;
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1e-300),
                    "cap {cap} head ({l},{h}) pool {pool}: {got} vs {want}"
                );
            }
        }
    }
    // Fully pooled, any two heads lose the same at a span.
    let a = base.pooled(1.0).head_loss(&p, 0, 0, 0, 256);
    let b = base.pooled(1.0).head_loss(&p, 0, 29, 8, 256);
    assert!((a - b).abs() <= 1e-12 * a.abs());
    // Out-of-range shares are the caller's error.
    let mut o = options(0.5, vec![1024, 2048]);
    o.pool_influence = 1.5;
    let e = optimize(&p, &o).unwrap_err().to_string();
    assert!(e.contains("influence pooling 1.5"), "{e}");
    o.pool_influence = 0.0;
    o.retrieval_weight = -0.1;
    let e = optimize(&p, &o).unwrap_err().to_string();
    assert!(e.contains("retrieval weight -0.1"), "{e}");
}

#[test]
fn the_needle_term_counts_attention_or_influence_as_asked() {
    use moac_model::pipeline::influence::HeadSums;
    use moac_model::pipeline::objective::{level_norm, needle_norm_by, Objective};
    let shape = smollm2_shape();
    let mut rng = Rng::fresh("needle_modes");
    let seed = rng.next_u64();
    let mut p = synthetic_profile(shape, &[1024], |_, _, _, r| r.next_f64(), seed);
    let random = |rng: &mut Rng| -> Vec<Vec<HeadSums>> {
        (0..shape.num_layers)
            .map(|_| {
                (0..shape.num_query_heads)
                    .map(|_| {
                        let mut s = HeadSums::new(1024);
                        s.token.iter_mut().for_each(|t| *t = rng.next_f64());
                        s.block.iter_mut().for_each(|t| *t = rng.next_f64());
                        s.sink = rng.next_f64();
                        s.total =
                            s.sink + s.token.iter().sum::<f64>() + s.block.iter().sum::<f64>();
                        s
                    })
                    .collect()
            })
            .collect()
    };
    p.levels[0].needle = Some(random(&mut rng));
    p.levels[0].needle_influence = Some(random(&mut rng));
    let w = 0.6;
    let base = Objective::of(&p, 0, w, Influence::Entries);
    for cap in [128u64, 512, 960] {
        let (l, h) = (rng.below(30) as usize, rng.below(9) as usize);
        let lv = &p.levels[0];
        let inf = (1.0 - w) * lv.heads[l][h].loss(cap, 64) / level_norm(&p, 0);
        for (what, sums) in [
            (Needle::Attention, lv.needle.as_ref().unwrap()),
            (Needle::Influence, lv.needle_influence.as_ref().unwrap()),
        ] {
            let norm = needle_norm_by(&p, 0, what).unwrap();
            let want = inf + w * sums[l][h].loss(cap, 64) / norm;
            let got = base.needle_from(&p, 0, what).head_loss(&p, 0, l, h, cap);
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "{what:?} cap {cap}: {got} vs {want}"
            );
        }
    }
    // A profile of version 2 has no needle influence: the attention is counted.
    let attention = base
        .needle_from(&p, 0, Needle::Attention)
        .head_loss(&p, 0, 1, 2, 256);
    p.levels[0].needle_influence = None;
    let asked = base
        .needle_from(&p, 0, Needle::Influence)
        .head_loss(&p, 0, 1, 2, 256);
    assert_eq!(asked, attention);
}

/// A tiny random Llama as a [`Model`] (head_dim 64: the kernels' smallest, which the
/// dense answers and validation run through): a word-level tokenizer of 50 ids (every word it
/// does not know is `<unk>`), the ChatML template, no stop ids (answers run to their
/// full length).
fn tiny_model(dir: &Path) -> Model {
    let mut vocab = serde_json::Map::new();
    let words = [
        "<unk>",
        "<s>",
        "the",
        "of",
        "is",
        "a",
        "in",
        "and",
        "to",
        "what",
        "key",
        "value",
        "record",
        "town",
        "name",
        "number",
        "answer",
        "question",
        "user",
        "assistant",
        ":",
        ",",
        ".",
        "?",
        "\"",
        "{",
        "}",
        "<|",
        "|>",
        "im_start",
        "im_end",
    ];
    for (i, w) in words.iter().enumerate() {
        vocab.insert(w.to_string(), serde_json::json!(i));
    }
    for d in 0..10 {
        vocab.insert(d.to_string(), serde_json::json!(words.len() + d));
    }
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    let tokenizer = Tokenizer::from_hf_dir(dir).unwrap();
    assert!(tokenizer.vocab_size() <= 50);
    Model {
        path: dir.join("tiny.gguf"),
        llama: Llama::random(
            LlamaConfig {
                num_layers: 2,
                hidden: 64,
                head_dim: 64,
                ..tiny_config(2, RopeStyle::HalfSplit)
            },
            64,
            11,
        )
        .unwrap(),
        tokenizer,
        chat: ChatTemplate::new(CHATML.into(), "ChatML", "<s>".into(), String::new()),
    }
}

#[test]
fn make_writes_a_valid_plan_and_a_second_call_resumes_from_the_work_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let output = dir.path().join("out").join("made.json");
    let mut opts = MakeOptions::new(0.5, &output);
    opts.lengths = vec![384];
    opts.samples = vec![3];
    opts.families = vec![Family::Kv, Family::Needle, Family::Town];
    opts.max_answer = 32;
    opts.validate_samples = 3;
    opts.validate_plans = 2;
    opts.constraint_lengths = vec![384, 512, 1024];
    let first = make(&model, &opts, &mut Quiet).unwrap();
    let work = dir.path().join("out").join("made.json.work");
    assert_eq!(first.work, work);
    assert_eq!(first.reused, Reused::default(), "nothing to reuse at first");
    for f in [
        "calib.jsonl",
        "validate.jsonl",
        "profile.safetensors",
        "plans/summary.json",
        "plans/front.svg",
        "plans/uniform.json",
    ] {
        assert!(work.join(f).is_file(), "{f}");
    }
    assert!(!work.join("profile.safetensors.parts").exists());
    // The held-out samples run at 1.25 times the profiled length, on 64-token blocks.
    let v = first.validation.as_ref().unwrap();
    assert_eq!((v.length, v.samples), (512, 3));
    // Dense, uniform, and the two plans of least predicted loss (one length: the front
    // may hold a single plan).
    assert_eq!(v.rows.len(), 2 + first.optimized.plans.len().min(2));
    assert_eq!(
        (v.rows[0].name.as_str(), v.rows[1].name.as_str()),
        ("dense", "uniform")
    );
    assert!(v.rows.iter().all(|r| r.loss.is_finite() && r.loss > 0.0));
    assert!(first.chosen.starts_with(work.join("plans")));
    // The output is the chosen plan's file, and a valid plan for the model within the
    // density at every constraint length.
    let bytes = std::fs::read(&output).unwrap();
    assert_eq!(bytes, std::fs::read(&first.chosen).unwrap());
    let plan =
        moac::plan::load_for_model(&output, model.llama.config.shape(), &model.path).unwrap();
    model.llama.check_plan(&plan).unwrap();
    let made = first.plan().unwrap();
    assert!(made.density.iter().all(|&d| d <= 0.5), "{:?}", made.density);
    for (i, &n) in first.optimized.constraint_lengths.iter().enumerate() {
        let geo = CacheGeometry::new(&plan, n as u64 - 128, 128).unwrap();
        assert_eq!(geo.kv_bytes(Dtype::F16, 1), made.kv_bytes[i], "N = {n}");
    }
    // A second call reuses every stage's file and makes the same plan.
    let calib_time = std::fs::metadata(work.join("calib.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    std::fs::remove_file(&output).unwrap();
    let second = make(&model, &opts, &mut Quiet).unwrap();
    assert_eq!(
        second.reused,
        Reused {
            calibration: true,
            profile: true,
            profile_samples: 0,
            held_out: true,
        }
    );
    let modified = std::fs::metadata(work.join("calib.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(modified, calib_time);
    assert_eq!(second.chosen, first.chosen);
    assert_eq!(second.validation, first.validation);
    assert_eq!(std::fs::read(&output).unwrap(), bytes);
    // Another density reuses the calibration and the profile, and solves again.
    opts.density = 0.75;
    opts.validate_plans = 0;
    let third = make(&model, &opts, &mut Quiet).unwrap();
    assert!(third.reused.calibration && third.reused.profile);
    assert!(third.validation.is_none());
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&third.chosen).unwrap()
    );
    // A density out of (0, 1] is refused before anything runs.
    opts.density = 1.5;
    let e = make(&model, &opts, &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("density"), "{e}");
}
