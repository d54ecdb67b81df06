//! `moac verify`: every generated kernel of the chosen layers against the cpu reference,
//! on fresh random inputs: prefill in both modes, cache fill (slot by slot, exact),
//! appends and decode steps that wrap the rings. Outputs are poisoned before every
//! launch, so an element a kernel never writes fails.

use crate::error::{CliError, Result};
use candle_core::{Device, Tensor};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::{KernelKind, LaunchConfig, LowerOptions, PlantedBug, PrefillMode};
use moac::plan::ValidPlan;
use moac_runtime::backend::cpu::candle_dtype;
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::backend::{Backend, HostCache, LayerBackend, LayerShape, Prompt};
use moac_runtime::reference::check::{tolerance, ErrorStats, Rng};
use moac_runtime::reference::{self, LayerCache};
use moac_runtime::Artifact;
use moac_runtime::BackendHandle;
use std::collections::BTreeMap;

/// What to verify and on which inputs.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub layers: Vec<usize>,
    pub dtype: Dtype,
    /// Where the generated kernels run: emu or cuda.
    pub backend: Backend,
    /// Prompt length of each batch row (ragged rows are right-padded).
    pub prompt_lens: Vec<usize>,
    pub max_new_tokens: usize,
    /// Decode steps run after the prefill (at most max_new_tokens).
    pub steps: usize,
    pub seed: u64,
    pub emu: EmuOptions,
    /// Test-only: lower with a deliberately planted bug (see `moac::ir::PlantedBug`).
    pub planted_bug: Option<PlantedBug>,
    /// Launch configurations to use instead of the heuristic's, by kind slug (the
    /// tuner's candidates; plans only, not artifacts).
    pub launch_overrides: BTreeMap<String, LaunchConfig>,
    /// Run the prefill of this kind only (`None`: both modes; a non-prefill kind: none).
    /// Fill, append, decode and merge always run: they share the cache.
    pub only: Option<KernelKind>,
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

/// Runs the checks. Each returned line is one kernel of one layer.
pub fn verify(plan: &ValidPlan, opts: &VerifyOptions) -> Result<Vec<KernelCheck>> {
    check_options(opts)?;
    let art = Artifact::from_lowering(
        plan,
        &LowerOptions {
            dtype: opts.dtype,
            layers: Some(opts.layers.clone()),
            planted_bug: opts.planted_bug,
            launch_overrides: opts.launch_overrides.clone(),
            ..LowerOptions::default()
        },
    )?;
    verify_lowered(&art, opts)
}

/// Runs the checks on the kernels of an artifact written by `moac compile`: its sources
/// on emu, its CUBINs (or PTX) on cuda, so no NVRTC is needed on a GPU machine. The
/// layers must be among the artifact's; its dtype is used.
pub fn verify_artifact(art: &Artifact, opts: &VerifyOptions) -> Result<Vec<KernelCheck>> {
    check_options(opts)?;
    if opts.planted_bug.is_some() || !opts.launch_overrides.is_empty() {
        return Err(CliError::Usage(
            "planted bugs and launch overrides need a plan, not an artifact".into(),
        ));
    }
    if let Some((p, m)) = art.fixed() {
        let p_ = opts.prompt_lens.iter().copied().max().unwrap_or(0) as u64;
        if p_ + opts.max_new_tokens as u64 != p + m {
            return Err(CliError::Usage(format!(
                "the artifact is specialized to N = {} (prompt {p} + {m}); choose --prompt-lens and --max-new-tokens with max prompt + M = {}",
                p + m,
                p + m
            )));
        }
    }
    let art = art.with_layers(&opts.layers)?;
    let opts = VerifyOptions {
        dtype: art.dtype(),
        ..opts.clone()
    };
    verify_lowered(&art, &opts)
}

fn check_options(opts: &VerifyOptions) -> Result<()> {
    if opts.backend == Backend::Cpu {
        return Err(CliError::Usage(
            "verify runs the generated kernels: --backend emu or cuda".into(),
        ));
    }
    if opts.prompt_lens.is_empty() || opts.steps > opts.max_new_tokens {
        return Err(CliError::Usage(format!(
            "verify needs at least one prompt and steps <= max_new_tokens (got {} steps, M = {})",
            opts.steps, opts.max_new_tokens
        )));
    }
    Ok(())
}

fn verify_lowered(art: &Artifact, opts: &VerifyOptions) -> Result<Vec<KernelCheck>> {
    let p_ = opts.prompt_lens.iter().copied().max().unwrap_or(0);
    let geo = CacheGeometry::new(art.plan(), p_ as u64, opts.max_new_tokens as u64)?;
    let mut rng = Rng::new(opts.seed);
    let handle = BackendHandle::open(opts.backend, opts.emu.clone())?;
    let mut out = Vec::new();
    for lk in &art.lowered().layers {
        let shape = LayerShape::new(&geo, lk.layer);
        let mut session = handle.open_layer(&art.layer_setup(&shape)?, opts.prompt_lens.len())?;
        out.extend(verify_layer(session.as_mut(), &shape, lk, opts, &mut rng)?);
    }
    Ok(out)
}

fn verify_layer(
    layer: &mut dyn LayerBackend,
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
    let bits = |x: &[f32]| x.iter().map(|&v| dtype.to_bits(v)).collect::<Vec<u16>>();
    let tensor = |x: &[f32], dims: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(x.to_vec(), dims, &dev)?.to_dtype(candle_dtype(dtype))?)
    };
    let lens_i32: Vec<i32> = opts.prompt_lens.iter().map(|&l| l as i32).collect();
    let check = |kernel: &str, kind: KernelKind, acc: ErrorStats| KernelCheck {
        layer: shape.layer,
        kernel: kernel.to_string(),
        kind: kind.slug(),
        max_abs: acc.max_abs,
        max_rel: acc.max_rel,
        passed: acc.ok(),
    };
    let mut lines = Vec::new();

    let qp = rng.vec_in(b_ * p_ * hq * d, dtype);
    let kp = rng.vec_in(b_ * p_ * hkv * d, dtype);
    let vp = rng.vec_in(b_ * p_ * hkv * d, dtype);
    let (q, k, v) = (
        tensor(&qp, &[b_, p_, hq, d])?,
        tensor(&kp, &[b_, p_, hkv, d])?,
        tensor(&vp, &[b_, p_, hkv, d])?,
    );
    let (kb, vb) = (bits(&kp), bits(&vp));
    let prompt = Prompt {
        k: &kb,
        v: &vb,
        lens: &lens_i32,
        p: p_,
    };
    for mode in PrefillMode::ALL {
        let kind = KernelKind::Prefill(mode);
        if opts.only.is_some_and(|k| k != kind) {
            continue;
        }
        let want = reference::prefill(&q, &k, &v, &opts.prompt_lens, shape, mode, scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = layer.prefill(&bits(&qp), &prompt, mode, scale)?;
        let mut acc = ErrorStats::default();
        for (&g, &w) in got.iter().zip(&want) {
            acc.add(g as f64, w as f64, tol);
        }
        lines.push(check(lk.kernel(kind), kind, acc));
    }

    layer.new_cache(b_)?;
    layer.fill(&prompt)?;
    let mut rcache = reference::fill(&k, &v, &opts.prompt_lens, shape)?;
    lines.push(check(
        &lk.fill,
        KernelKind::Fill,
        compare_cache(
            &layer.cache_to_host()?,
            &rcache,
            shape,
            &opts.prompt_lens,
            dtype,
        )?,
    ));

    let mut dec = ErrorStats::default();
    let mut lens = opts.prompt_lens.clone();
    for _ in 0..opts.steps {
        for l in lens.iter_mut() {
            *l += 1;
        }
        let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let qd = rng.vec_in(b_ * hq * d, dtype);
        let kd = rng.vec_in(b_ * hkv * d, dtype);
        let vd = rng.vec_in(b_ * hkv * d, dtype);
        layer.append(&bits(&kd), &bits(&vd), &lens_i)?;
        reference::append(
            &mut rcache,
            &tensor(&kd, &[b_, hkv, d])?,
            &tensor(&vd, &[b_, hkv, d])?,
            &lens,
            shape,
        )?;
        let got = layer.decode(&bits(&qd), &lens_i, scale)?;
        let want = reference::decode(&tensor(&qd, &[b_, hq, d])?, &rcache, &lens, shape, scale)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (&g, &w) in got.iter().zip(&want) {
            dec.add(g as f64, w as f64, tol);
        }
    }
    if opts.steps > 0 {
        lines.push(check(
            &lk.append,
            KernelKind::Append,
            compare_cache(&layer.cache_to_host()?, &rcache, shape, &lens, dtype)?,
        ));
        lines.push(check(&lk.decode, KernelKind::Decode, dec));
        // The merge runs inside every decode step: its result is the decode's.
        lines.push(check(&lk.merge, KernelKind::Merge, dec));
    }
    Ok(lines)
}

/// Valid slots must hold exactly the reference's values.
fn compare_cache(
    got: &HostCache,
    want: &LayerCache,
    shape: &LayerShape,
    lens: &[usize],
    dtype: Dtype,
) -> Result<ErrorStats> {
    let d = shape.head_dim;
    let mut acc = ErrorStats::default();
    for (g, w) in [(&got.k, &want.k), (&got.v, &want.v)] {
        let w = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (b, &t) in lens.iter().enumerate() {
            for j in 0..shape.num_kv_heads {
                for slot in 0..t.min(shape.kv_capacity[j]) {
                    let base = (b * shape.total_slots + shape.kv_offset[j] + slot) * d;
                    for i in 0..d {
                        acc.add(
                            dtype.from_bits(g[base + i]) as f64,
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
