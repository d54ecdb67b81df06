//! `moac verify`: every generated kernel of the chosen layers against the cpu reference,
//! on fresh random inputs: prefill in both modes, cache fill (slot by slot, exact),
//! appends and decode steps that wrap the rings. Outputs are poisoned before every
//! launch, so an element a kernel never writes fails.

use crate::cuda_layer::{CudaDevice, CudaLayer};
use crate::emu::EmuBuild;
use crate::emu_layer::{from_bits, to_bits, EmuLayer, HostCache};
use crate::error::{Error, Result};
use crate::exec::LayerExec;
use crate::layer::LayerShape;
use crate::reference;
use candle_core::{DType, Device, Tensor};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::{KernelKind, LowerOptions, PrefillMode};
use moac::plan::ValidPlan;

/// Where the generated kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyBackend {
    Emu,
    Cuda,
}

/// What to verify and on which inputs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub layers: Vec<usize>,
    pub dtype: Dtype,
    pub backend: VerifyBackend,
    /// Prompt length of each batch row (ragged rows are right-padded).
    pub prompt_lens: Vec<usize>,
    pub max_new_tokens: usize,
    /// Decode steps run after the prefill (at most max_new_tokens).
    pub steps: usize,
    pub seed: u64,
    pub emu: EmuBuild,
    /// Test-only: lower with a deliberately planted bug (see `moac::ir::PlantedBug`).
    pub planted_bug: Option<moac::ir::PlantedBug>,
    /// Launch configurations to use instead of the heuristic's, by kind slug (the
    /// tuner's candidates; plans only, not artifacts).
    pub launch_overrides: std::collections::BTreeMap<String, moac::ir::LaunchConfig>,
    /// Run the prefill of this kind only (`None`: both modes; a non-prefill kind: none).
    /// Fill, append, decode and merge always run: they share the cache.
    pub only: Option<moac::ir::KernelKind>,
}

/// The outcome for one kernel of one layer.
#[derive(Debug, Clone)]
pub struct KernelCheck {
    pub layer: usize,
    pub kernel: String,
    pub kind: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub passed: bool,
}

impl std::fmt::Display for KernelCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "layer {:>2}  {:<16} {:<40} max abs {:.2e}  max rel {:.2e}  {}",
            self.layer,
            self.kind,
            self.kernel,
            self.max_abs,
            self.max_rel,
            if self.passed { "PASS" } else { "FAIL" }
        )
    }
}

struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, dtype: Dtype) -> Vec<f32> {
        (0..n)
            .map(|_| from_bits(to_bits(self.uniform(), dtype), dtype))
            .collect()
    }
}

fn cdt(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Tolerance of a kernel output against the reference: the output is rounded to the
/// dtype once (half an ulp) on top of f32 accumulation-order differences.
pub fn tolerance(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::F16 => (2e-3, 4e-3),
        Dtype::Bf16 => (1.6e-2, 1.6e-2),
    }
}

#[derive(Default)]
struct Acc {
    max_abs: f64,
    max_rel: f64,
    passed: bool,
    seen: usize,
}

impl Acc {
    fn new() -> Self {
        Acc {
            passed: true,
            ..Acc::default()
        }
    }
    fn add(&mut self, got: f64, want: f64, tol: (f64, f64)) {
        self.seen += 1;
        let err = (got - want).abs();
        let within = err <= tol.0 + tol.1 * want.abs();
        if err.is_nan() || !within {
            self.passed = false;
        }
        // NaN (an unwritten, poisoned element) counts as infinitely wrong.
        let err = if err.is_nan() { f64::INFINITY } else { err };
        self.max_abs = self.max_abs.max(err);
        self.max_rel = self.max_rel.max(err / want.abs().max(1e-3));
    }
}

/// Runs the checks. Each returned line is one kernel of one layer.
pub fn verify(plan: &ValidPlan, opts: &VerifyOptions) -> Result<Vec<KernelCheck>> {
    check_options(opts)?;
    let low = moac::ir::lower(
        plan,
        &LowerOptions {
            dtype: opts.dtype,
            layers: Some(opts.layers.clone()),
            planted_bug: opts.planted_bug,
            launch_overrides: opts.launch_overrides.clone(),
            ..LowerOptions::default()
        },
    )?;
    let units = moac::emit::emit_units(&low)?;
    verify_lowered(plan, &low, &units, &[], opts)
}

/// Runs the checks on the kernels of an artifact written by `moac compile`: its sources
/// on emu, its CUBINs (or PTX) on cuda, so no NVRTC is needed on a GPU machine. The
/// layers must be among the artifact's; its dtype is used.
pub fn verify_artifact(
    art: &crate::artifact::Artifact,
    opts: &VerifyOptions,
) -> Result<Vec<KernelCheck>> {
    check_options(opts)?;
    if opts.planted_bug.is_some() || !opts.launch_overrides.is_empty() {
        return Err(Error::Shape(
            "planted bugs and launch overrides need a plan, not an artifact".into(),
        ));
    }
    if let Some((p, m)) = art.fixed {
        let p_ = opts.prompt_lens.iter().copied().max().unwrap_or(0) as u64;
        if p_ + opts.max_new_tokens as u64 != p + m {
            return Err(Error::Shape(format!(
                "the artifact is specialized to N = {} (prompt {p} + {m}); choose --prompt-lens and --max-new-tokens with max prompt + M = {}",
                p + m,
                p + m
            )));
        }
    }
    let compiled: Vec<usize> = art.lowered.layers.iter().map(|l| l.layer).collect();
    if let Some(l) = opts.layers.iter().find(|l| !compiled.contains(l)) {
        return Err(Error::Shape(format!(
            "layer {l} is not in the artifact (compiled layers: {compiled:?})"
        )));
    }
    let mut low = art.lowered.clone();
    low.layers.retain(|l| opts.layers.contains(&l.layer));
    let opts = VerifyOptions {
        dtype: art.dtype,
        ..opts.clone()
    };
    verify_lowered(&art.plan, &low, &art.units, &art.binaries, &opts)
}

fn check_options(opts: &VerifyOptions) -> Result<()> {
    if opts.backend == VerifyBackend::Cuda {
        crate::cuda_available()?;
    }
    if opts.prompt_lens.is_empty() || opts.steps > opts.max_new_tokens {
        return Err(Error::Shape(format!(
            "verify needs at least one prompt and steps <= max_new_tokens (got {} steps, M = {})",
            opts.steps, opts.max_new_tokens
        )));
    }
    Ok(())
}

fn verify_lowered(
    plan: &ValidPlan,
    low: &moac::ir::Lowered,
    units: &[moac::emit::SourceUnit],
    binaries: &[crate::artifact::UnitBinaries],
    opts: &VerifyOptions,
) -> Result<Vec<KernelCheck>> {
    let p_ = opts.prompt_lens.iter().copied().max().unwrap_or(0);
    let geo = CacheGeometry::new(plan, p_ as u64, opts.max_new_tokens as u64)?;
    let mut rng = Rng(opts.seed);
    let mut out = Vec::new();
    let dev = match opts.backend {
        VerifyBackend::Cuda => Some(CudaDevice::open()?),
        VerifyBackend::Emu => None,
    };
    for lk in &low.layers {
        let shape = LayerShape::new(&geo, lk.layer);
        let lines = match &dev {
            Some(dev) => {
                let cuda = CudaLayer::new(
                    dev,
                    shape.clone(),
                    opts.dtype,
                    lk,
                    &low.kernels,
                    units,
                    binaries,
                )?;
                verify_layer(&cuda, &shape, lk, opts, &mut rng)?
            }
            None => {
                let emu = EmuLayer::new(
                    shape.clone(),
                    opts.dtype,
                    lk,
                    &low.kernels,
                    units,
                    &opts.emu,
                )?;
                verify_layer(&emu, &shape, lk, opts, &mut rng)?
            }
        };
        out.extend(lines);
    }
    Ok(out)
}

fn verify_layer<E: LayerExec>(
    emu: &E,
    shape: &LayerShape,
    lk: &moac::ir::LayerKernels,
    opts: &VerifyOptions,
    rng: &mut Rng,
) -> Result<Vec<KernelCheck>> {
    let dtype = opts.dtype;
    let tol = tolerance(dtype);
    let (hq, hkv, d) = (shape.num_query_heads, shape.num_kv_heads, shape.head_dim);
    let b_ = opts.prompt_lens.len();
    let p_ = opts.prompt_lens.iter().copied().max().unwrap_or(0);
    let scale = 1.0 / (d as f32).sqrt();
    let dev = Device::Cpu;
    let bits = |x: &[f32]| x.iter().map(|&v| to_bits(v, dtype)).collect::<Vec<u16>>();
    let tensor = |x: &[f32], dims: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(x.to_vec(), dims, &dev)?.to_dtype(cdt(dtype))?)
    };
    let lens_i32: Vec<i32> = opts.prompt_lens.iter().map(|&l| l as i32).collect();
    let check = |kernel: &str, kind: &str, acc: Acc| KernelCheck {
        layer: shape.layer,
        kernel: kernel.to_string(),
        kind: kind.to_string(),
        max_abs: acc.max_abs,
        max_rel: acc.max_rel,
        passed: acc.passed && acc.seen > 0,
    };
    let mut lines = Vec::new();

    let qp = rng.vec(b_ * p_ * hq * d, dtype);
    let kp = rng.vec(b_ * p_ * hkv * d, dtype);
    let vp = rng.vec(b_ * p_ * hkv * d, dtype);
    let (q, k, v) = (
        tensor(&qp, &[b_, p_, hq, d])?,
        tensor(&kp, &[b_, p_, hkv, d])?,
        tensor(&vp, &[b_, p_, hkv, d])?,
    );
    for (mode, name, kind) in [
        (PrefillMode::Block64, &lk.prefill_block64, "prefill_block64"),
        (PrefillMode::Token, &lk.prefill_token, "prefill_token"),
    ] {
        if opts.only.is_some_and(|k| k != KernelKind::Prefill(mode)) {
            continue;
        }
        let want = reference::prefill(&q, &k, &v, &opts.prompt_lens, shape, mode, scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = emu.prefill(
            &bits(&qp),
            &bits(&kp),
            &bits(&vp),
            &lens_i32,
            p_,
            mode,
            scale,
        )?;
        let mut acc = Acc::new();
        for (&g, &w) in got.iter().zip(&want) {
            acc.add(from_bits(g, dtype) as f64, w as f64, tol);
        }
        lines.push(check(name, kind, acc));
    }

    let mut cache = emu.new_cache(b_)?;
    emu.fill(&mut cache, &bits(&kp), &bits(&vp), &lens_i32, p_)?;
    let mut rcache = reference::fill(&k, &v, &opts.prompt_lens, shape)?;
    lines.push(check(
        &lk.fill,
        "fill",
        compare_cache(
            &emu.cache_to_host(&cache)?,
            &rcache,
            shape,
            &opts.prompt_lens,
            dtype,
        )?,
    ));

    let mut dec = Acc::new();
    let mut lens = opts.prompt_lens.clone();
    for _ in 0..opts.steps {
        for l in lens.iter_mut() {
            *l += 1;
        }
        let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let qd = rng.vec(b_ * hq * d, dtype);
        let kd = rng.vec(b_ * hkv * d, dtype);
        let vd = rng.vec(b_ * hkv * d, dtype);
        emu.append(&mut cache, &bits(&kd), &bits(&vd), &lens_i)?;
        reference::append(
            &mut rcache,
            &tensor(&kd, &[b_, hkv, d])?,
            &tensor(&vd, &[b_, hkv, d])?,
            &lens,
            shape,
        )?;
        let got = emu.decode(&cache, &bits(&qd), &lens_i, scale)?;
        let want = reference::decode(&tensor(&qd, &[b_, hq, d])?, &rcache, &lens, shape, scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (&g, &w) in got.iter().zip(&want) {
            dec.add(from_bits(g, dtype) as f64, w as f64, tol);
        }
    }
    if opts.steps > 0 {
        lines.push(check(
            &lk.append,
            "append",
            compare_cache(&emu.cache_to_host(&cache)?, &rcache, shape, &lens, dtype)?,
        ));
        lines.push(check(&lk.decode, "decode", dec));
        let merged = Acc {
            passed: lines.last().map(|l| l.passed).unwrap_or(false),
            max_abs: lines.last().map(|l| l.max_abs).unwrap_or(0.0),
            max_rel: lines.last().map(|l| l.max_rel).unwrap_or(0.0),
            seen: 1,
        };
        lines.push(check(&lk.merge, "merge", merged));
    }
    Ok(lines)
}

/// Valid slots must hold exactly the reference's values.
fn compare_cache(
    got: &HostCache,
    want: &reference::LayerCache,
    shape: &LayerShape,
    lens: &[usize],
    dtype: Dtype,
) -> Result<Acc> {
    let d = shape.head_dim;
    let mut acc = Acc::new();
    for (g, w) in [(&got.k, &want.k), (&got.v, &want.v)] {
        let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for (b, &t) in lens.iter().enumerate() {
            for j in 0..shape.num_kv_heads {
                for slot in 0..t.min(shape.kv_capacity[j]) {
                    let base = (b * shape.total_slots + shape.kv_offset[j] + slot) * d;
                    for i in 0..d {
                        acc.add(
                            from_bits(g[base + i], dtype) as f64,
                            w[base + i] as f64,
                            (0.0, 0.0),
                        );
                    }
                }
            }
        }
    }
    Ok(acc)
}
