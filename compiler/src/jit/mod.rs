//! Just-in-time builds of emitted translation units: NVRTC to PTX and CUBIN per arch
//! ([`nvrtc`]), g++ to a shared library for the emu backend ([`gxx`]), both through one
//! content-addressed [`cache::Cache`] and one worker pool ([`parallel_map`]).

pub mod cache;
pub mod gxx;
pub mod nvrtc;

use crate::emit::SourceUnit;
use crate::error::{Error, Result};
use cache::Cache;
use nvrtc::{Compiled, Nvrtc};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Worker threads for `jobs` (0: one per core), never more than there is work.
pub fn workers(jobs: usize, work: usize) -> usize {
    match jobs {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        j => j,
    }
    .min(work.max(1))
}

/// Runs `f` over `items` on `workers` threads (items are taken in order, results come
/// back in the items' order). The one worker pool of every parallel build in moac.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(usize, &T) -> R + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, items.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(i, item);
                if let Ok(mut all) = results.lock() {
                    all[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .map_err(|_| Error::Internal("a build worker panicked".into()))?
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| Error::Internal(format!("build job {i} did not run"))))
        .collect()
}

/// What a progress callback hears while units compile.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// `total` jobs are about to start.
    Start { total: usize },
    /// One job finished (`done` of `total`).
    Done {
        unit: String,
        arch: String,
        done: usize,
        total: usize,
    },
    /// A cache entry could not be written (the compile goes on).
    Warning(String),
}

/// A progress callback (a bar in the CLI; nothing in a library user's build).
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Sync);

/// Timing of one (unit, arch) compile.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnitTiming {
    pub unit: String,
    pub arch: String,
    pub seconds: f64,
    pub cached: bool,
}

/// NVRTC results of every unit, per arch (`compiled[u][a]`), with timings.
#[derive(Debug, Clone)]
pub struct CompiledUnits {
    pub compiled: Vec<Vec<Compiled>>,
    pub timings: Vec<UnitTiming>,
    pub cache_hits: usize,
}

/// Compiles every (unit, arch) pair with NVRTC, in parallel, through the cache.
pub fn compile_units(
    nv: &Nvrtc,
    units: &[SourceUnit],
    archs: &[String],
    cache: Option<&Cache>,
    jobs: usize,
    progress: Option<ProgressFn>,
) -> Result<CompiledUnits> {
    // Biggest units first, so the long compiles start early.
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| std::cmp::Reverse(units[u].kernels.len()));
    let pairs: Vec<(usize, usize)> = order
        .iter()
        .flat_map(|&u| (0..archs.len()).map(move |a| (u, a)))
        .collect();
    let say = |p: Progress| {
        if let Some(f) = progress {
            f(p)
        }
    };
    say(Progress::Start { total: pairs.len() });
    let done = AtomicUsize::new(0);
    let results = parallel_map(&pairs, workers(jobs, pairs.len()), |_, &(u, a)| {
        let (unit, arch) = (&units[u], &archs[a]);
        let options = nvrtc::options(arch, &nv.include_dir);
        let key = cache::key(&unit.source, &options, &nv.version, arch);
        let start = Instant::now();
        let cached = cache.and_then(|c| c.get(&key));
        let hit = cached.is_some();
        let res = match cached {
            Some(c) => Ok(c),
            None => nvrtc::compile(nv, &unit.name, &unit.source, arch, &options).inspect(|c| {
                if let Some(cache) = cache {
                    if let Err(e) = cache.put(&key, c) {
                        say(Progress::Warning(format!("compile cache not written: {e}")));
                    }
                }
            }),
        };
        say(Progress::Done {
            unit: unit.name.clone(),
            arch: arch.clone(),
            done: done.fetch_add(1, Ordering::Relaxed) + 1,
            total: pairs.len(),
        });
        res.map(|c| {
            let t = UnitTiming {
                unit: unit.name.clone(),
                arch: arch.clone(),
                seconds: start.elapsed().as_secs_f64(),
                cached: hit,
            };
            (c, t)
        })
    })?;
    let mut per_unit: Vec<Vec<Option<Compiled>>> =
        (0..units.len()).map(|_| vec![None; archs.len()]).collect();
    let mut timings = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (c, t) = r?;
        let (u, a) = pairs[i];
        per_unit[u][a] = Some(c);
        timings.push(t);
    }
    let compiled = per_unit
        .into_iter()
        .map(|v| v.into_iter().collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Internal("a compile job is missing".into()))?;
    let cache_hits = timings.iter().filter(|t| t.cached).count();
    Ok(CompiledUnits {
        compiled,
        timings,
        cache_hits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_keeps_order_and_runs_everything() {
        let items: Vec<u64> = (0..100).collect();
        for w in [1, 2, 7] {
            let out = parallel_map(&items, w, |i, x| (i as u64) * 1000 + x * 2).unwrap();
            assert_eq!(out.len(), 100);
            for (i, o) in out.iter().enumerate() {
                assert_eq!(*o, i as u64 * 1000 + i as u64 * 2);
            }
        }
        assert!(parallel_map(&Vec::<u8>::new(), 4, |_, _| 0)
            .unwrap()
            .is_empty());
        assert_eq!(workers(3, 1), 1);
        assert_eq!(workers(3, 10), 3);
    }
}
