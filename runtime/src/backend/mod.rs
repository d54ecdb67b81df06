//! The backends: one trait, [`LayerBackend`], implemented by [`cpu`] (the candle-core
//! reference), [`emu`] (the generated CUDA source run on the CPU) and, for cuda, by
//! [`crate::gpu::attention::DeviceLayer`] over the device API ([`cuda`] here holds the
//! device and module loading). [`crate::BackendHandle::open_layer`] (above both this
//! module and [`crate::gpu`]) is the one place that picks an implementation;
//! [`crate::Runtime`] and `moac verify` both go through it.
//!
//! A backend works on one layer, on raw element bits (`u16` of f16 or bf16) in the
//! layouts of docs/kernel-abi.md; the runtime converts tensors at its edge.

pub mod cpu;
pub mod cuda;
pub mod emu;
pub mod launch;

/// The shape every backend method takes, and the bytes model over it (defined in
/// `shape.rs`, below both the backends and the reference).
pub use crate::shape::{bytes_moved, LayerShape};

use crate::artifact::UnitBinaries;
use crate::error::{Error, Result};
use moac::emit::SourceUnit;
use moac::geometry::Dtype;
use moac::ir::{KernelKind, KernelSpec, LaunchConfig, LayerKernels, PrefillMode};

/// Where the attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// The candle-core reference (obviously right, not fast).
    Cpu,
    /// The generated CUDA source, run on the CPU.
    Emu,
    /// The generated kernels on an NVIDIA GPU.
    Cuda,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Cpu, Backend::Emu, Backend::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Emu => "emu",
            Backend::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| Error::Usage(format!("unknown backend {s:?} (cpu, emu or cuda)")))
    }
}

/// One layer's compacted cache on the host: K and V `[B, total_slots, D]` as raw bits.
#[derive(Debug, Clone)]
pub struct HostCache {
    pub batch: usize,
    pub k: Vec<u16>,
    pub v: Vec<u16>,
}

/// A prompt's keys and values: `k`/`v` [B,P,Hkv,D] (rows right-padded to `p`), and each
/// row's length.
#[derive(Debug, Clone, Copy)]
pub struct Prompt<'a> {
    pub k: &'a [u16],
    pub v: &'a [u16],
    pub lens: &'a [i32],
    /// The padded length P (the stride of a row).
    pub p: usize,
}

/// Prompt lengths must lie in `0..=min(P, N)`.
pub(crate) fn check_lens(shape: &LayerShape, lens: &[i32], p: usize) -> Result<()> {
    for (b, &l) in lens.iter().enumerate() {
        if l < 0 || l as usize > p.min(shape.n) {
            return Err(Error::shape(
                format!("prompt_lens[{b}]"),
                format!("a length in 0..={}", p.min(shape.n)),
                l,
            ));
        }
    }
    Ok(())
}

/// Token counts of a step must lie in `1..=N`.
pub(crate) fn check_steps(shape: &LayerShape, seq_lens: &[i32]) -> Result<()> {
    for (b, &t) in seq_lens.iter().enumerate() {
        if t < 1 || t as usize > shape.n {
            return Err(Error::CapacityExceeded {
                layer: shape.layer,
                row: b,
                tokens: t.max(0) as usize,
                n: shape.n,
            });
        }
    }
    Ok(())
}

/// The sizes of a prompt's buffers: q [B,P,Hq,D] (when given), k and v [B,P,Hkv,D].
pub(crate) fn check_prompt(shape: &LayerShape, q: Option<&[u16]>, pr: &Prompt) -> Result<()> {
    let (b, p, d) = (pr.lens.len(), pr.p, shape.head_dim);
    if let Some(q) = q {
        crate::error::expect_len(
            "q",
            "[B,P,Hq,D]",
            b * p * shape.num_query_heads * d,
            q.len(),
        )?;
    }
    let kv = b * p * shape.num_kv_heads * d;
    crate::error::expect_len("k", "[B,P,Hkv,D]", kv, pr.k.len())?;
    crate::error::expect_len("v", "[B,P,Hkv,D]", kv, pr.v.len())?;
    check_lens(shape, pr.lens, p)
}

/// Where one of a layer's kernels lives: its kind and launch configuration, the
/// translation unit that defines it (an index into the units given) and its slot there.
#[derive(Debug, Clone)]
pub struct BoundKernel {
    pub name: String,
    pub kind: KernelKind,
    pub launch: LaunchConfig,
    pub unit: usize,
    pub slot: i32,
}

/// The six kernels a layer runs, in [`KernelKind::ALL`] order, found in the lowered
/// specs and the units.
pub fn bind_layer(
    layer: &LayerKernels,
    specs: &[KernelSpec],
    units: &[SourceUnit],
) -> Result<Vec<BoundKernel>> {
    KernelKind::ALL
        .into_iter()
        .map(|kind| {
            let name = layer.kernel(kind);
            let spec = specs.iter().find(|s| &s.name == name).ok_or_else(|| {
                Error::Internal(format!("kernel {name} is not in the lowered plan"))
            })?;
            let (unit, slot) = units
                .iter()
                .enumerate()
                .find_map(|(u, x)| x.slot(name).map(|s| (u, s)))
                .ok_or_else(|| Error::Internal(format!("no source defines {name}")))?;
            Ok(BoundKernel {
                name: name.clone(),
                kind,
                launch: spec.launch,
                unit,
                slot: slot as i32,
            })
        })
        .collect()
}

/// The kernel of `kind` among a layer's bound kernels.
pub(crate) fn kernel_of<T>(
    kernels: &[(BoundKernel, T)],
    kind: KernelKind,
) -> Result<&(BoundKernel, T)> {
    kernels
        .iter()
        .find(|(k, _)| k.kind == kind)
        .ok_or_else(|| Error::Internal(format!("no {} kernel bound", kind.slug())))
}

/// One layer's kernels on one backend, with the layer's cache. Inputs are raw bits of the
/// element type; outputs come back as f32 (exactly the kernels' element values on emu
/// and cuda; the reference's f32 on cpu). Every output is poisoned (NaN) before a
/// launch, so an element a kernel fails to write shows up as a wrong number.
pub trait LayerBackend: Send {
    fn shape(&self) -> &LayerShape;
    /// Replaces the cache with a new one of `batch` rows, poisoned with NaN (zeros on
    /// cpu).
    fn new_cache(&mut self, batch: usize) -> Result<()>;
    /// Prefill attention: `q` [B,P,Hq,D] -> o [B,P,Hq,D] (rows past a prompt: zeros).
    /// Leaves the cache alone.
    fn prefill(
        &self,
        q: &[u16],
        prompt: &Prompt,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<f32>>;
    /// The cache fill from a prompt.
    fn fill(&mut self, prompt: &Prompt) -> Result<()>;
    /// Prefill attention and the cache fill (one upload of the prompt on cuda).
    fn prefill_and_fill(
        &mut self,
        q: &[u16],
        prompt: &Prompt,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let o = self.prefill(q, prompt, mode, scale)?;
        self.fill(prompt)?;
        Ok(o)
    }
    /// Appends one token per row (`k_new`/`v_new` [B,Hkv,D]); `seq_lens`: tokens held
    /// after the append.
    fn append(&mut self, k_new: &[u16], v_new: &[u16], seq_lens: &[i32]) -> Result<()>;
    /// Decode attention of the newest token (`q` [B,Hq,D]) -> o [B,Hq,D].
    fn decode(&self, q: &[u16], seq_lens: &[i32], scale: f32) -> Result<Vec<f32>>;
    /// The cache's contents on the host.
    fn cache_to_host(&self) -> Result<HostCache>;
}

/// What opening one layer needs: its shape, its kernels and their units (with the
/// artifact's binaries, if any, for cuda).
#[derive(Debug, Clone, Copy)]
pub struct LayerSetup<'a> {
    pub shape: &'a LayerShape,
    pub dtype: Dtype,
    pub kernels: &'a LayerKernels,
    pub specs: &'a [KernelSpec],
    pub units: &'a [SourceUnit],
    /// Per unit, where the artifact has them (may be empty).
    pub binaries: &'a [UnitBinaries],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
        }
        assert!("gpu".parse::<Backend>().is_err());
    }
}
