//! The runtime API: a compacted KV cache and per-layer prefill / decode, the same on
//! every backend (dispatched through [`BackendHandle::open_layer`], defined here: above
//! both the backends and [`crate::gpu`], whose `DeviceLayer` is the cuda backend).

use crate::artifact::Artifact;
use crate::backend::cpu::bits_of;
use crate::backend::{Backend, LayerBackend, LayerSetup, LayerShape, Prompt};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::PrefillMode;
use std::sync::Arc;

/// Options of [`Runtime::prefill`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefillOptions {
    /// Each row's prompt length (rows are right-padded to the tensors' P); `None`: every
    /// row is P long.
    pub prompt_lens: Option<Vec<usize>>,
    /// The prefill mask (default: `moa-block64`, MoA's own).
    pub mode: PrefillMode,
    /// Softmax scale (default `1/sqrt(head_dim)`).
    pub scale: Option<f32>,
}

impl PrefillOptions {
    pub fn prompt_lens(mut self, lens: impl Into<Vec<usize>>) -> Self {
        self.prompt_lens = Some(lens.into());
        self
    }
    pub fn mode(mut self, mode: PrefillMode) -> Self {
        self.mode = mode;
        self
    }
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
}

/// Options of [`Runtime::decode_step`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodeOptions {
    /// Softmax scale (default `1/sqrt(head_dim)`).
    pub scale: Option<f32>,
}

impl DecodeOptions {
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }
}

/// Options of [`Runtime::new`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// emu: build the kernels with ASan/UBSan.
    pub sanitize: bool,
}

/// One layer's part of the cache.
struct LayerState {
    layer: usize,
    lens: Vec<usize>,
    kernels: Box<dyn LayerBackend>,
}

/// The compacted KV cache of a batch: every compiled layer, sized for one N.
pub struct KvCache {
    batch: usize,
    geometry: CacheGeometry,
    dtype: Dtype,
    layers: Vec<LayerState>,
}

impl KvCache {
    /// Rows of the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The geometry (capacities, offsets) the cache was sized with.
    pub fn geometry(&self) -> &CacheGeometry {
        &self.geometry
    }

    /// Bytes of K and V over the compiled layers: exactly the sum of capacities (the
    /// layout has no padding), as the geometry gives.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| {
                self.geometry
                    .layer_kv_bytes(l.layer, self.dtype, self.batch as u64)
            })
            .sum()
    }

    /// Bytes a dense cache of N tokens would take for the same layers.
    pub fn dense_bytes(&self) -> u64 {
        let per_layer = self.geometry.dense_kv_bytes(self.dtype, self.batch as u64)
            / self.geometry.layers.len() as u64;
        per_layer * self.layers.len() as u64
    }

    /// Tokens held by each row in `layer`.
    pub fn seq_lens(&self, layer: usize) -> Option<&[usize]> {
        self.layers
            .iter()
            .find(|l| l.layer == layer)
            .map(|l| l.lens.as_slice())
    }

    fn state(&mut self, layer: usize) -> Result<&mut LayerState> {
        let compiled: Vec<usize> = self.layers.iter().map(|l| l.layer).collect();
        self.layers
            .iter_mut()
            .find(|l| l.layer == layer)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "layer {layer} is not in this artifact (compiled layers: {compiled:?})"
                ))
            })
    }
}

impl Artifact {
    /// What opening `layer` on a backend needs, for a cache geometry's `shape`. Built
    /// here, where the artifact meets the backends: the backends read the artifact's
    /// types, the artifact knows no backend.
    pub fn layer_setup<'a>(&'a self, shape: &'a LayerShape) -> Result<LayerSetup<'a>> {
        let lowered = self.lowered();
        let kernels = lowered
            .layers
            .iter()
            .find(|l| l.layer == shape.layer)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "layer {} is not in this artifact (compiled layers: {:?})",
                    shape.layer,
                    self.layers()
                ))
            })?;
        Ok(LayerSetup {
            shape,
            dtype: self.dtype(),
            kernels,
            specs: &lowered.kernels,
            units: self.units(),
            binaries: self.binaries(),
        })
    }
}

/// An opened backend: the GPU for cuda (kernels only: no cuBLAS), the build options
/// for emu.
#[derive(Debug, Clone)]
pub enum BackendHandle {
    Cpu,
    Emu(crate::backend::emu::EmuOptions),
    Cuda(Arc<crate::gpu::Gpu>),
}

impl BackendHandle {
    /// Opens `backend`; cuda checks for a driver and a GPU first and fails with one clear
    /// error where there is none.
    pub fn open(backend: Backend, emu: crate::backend::emu::EmuOptions) -> Result<BackendHandle> {
        Ok(match backend {
            Backend::Cpu => BackendHandle::Cpu,
            Backend::Emu => BackendHandle::Emu(emu),
            Backend::Cuda => BackendHandle::Cuda(crate::gpu::Gpu::kernels_only(
                &crate::backend::cuda::CudaDevice::open()?,
            )),
        })
    }

    pub fn backend(&self) -> Backend {
        match self {
            BackendHandle::Cpu => Backend::Cpu,
            BackendHandle::Emu(_) => Backend::Emu,
            BackendHandle::Cuda(_) => Backend::Cuda,
        }
    }

    /// The layer's kernels on this backend with a cache of `batch` rows.
    pub fn open_layer(&self, setup: &LayerSetup, batch: usize) -> Result<Box<dyn LayerBackend>> {
        let mut layer: Box<dyn LayerBackend> = match self {
            BackendHandle::Cpu => Box::new(crate::backend::cpu::CpuLayer::new(
                setup.shape.clone(),
                setup.dtype,
            )?),
            BackendHandle::Emu(opts) => Box::new(crate::backend::emu::EmuLayer::new(setup, opts)?),
            BackendHandle::Cuda(gpu) => {
                Box::new(crate::gpu::attention::DeviceLayer::new(gpu, setup)?)
            }
        };
        layer.new_cache(batch)?;
        Ok(layer)
    }
}

/// A loaded artifact bound to a backend.
pub struct Runtime {
    artifact: Artifact,
    handle: BackendHandle,
}

fn expect_dims(t: &Tensor, name: &str, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::shape(
            name,
            format!("{want:?}"),
            format!("{:?}", t.dims()),
        ));
    }
    Ok(())
}

/// Each row's prompt length (`lens`, or every row the padded length `p`), checked
/// against the batch, the padded length and the cache's prompt length.
fn checked_lens(
    lens: Option<&[usize]>,
    batch: usize,
    p: usize,
    max_prompt: usize,
) -> Result<Vec<usize>> {
    let lens = lens
        .map(<[usize]>::to_vec)
        .unwrap_or_else(|| vec![p; batch]);
    if lens.len() != batch {
        return Err(Error::shape(
            "prompt_lens",
            format!("{batch} rows"),
            lens.len(),
        ));
    }
    if p > max_prompt {
        return Err(Error::PromptTooLong {
            len: p,
            max: max_prompt,
        });
    }
    if let Some((b, &l)) = lens.iter().enumerate().find(|(_, &l)| l > p) {
        return Err(Error::shape(
            format!("prompt_lens[{b}]"),
            format!("at most the padded length {p}"),
            l,
        ));
    }
    Ok(lens)
}

/// The output in the dtype of the input it answers (f32 stays f32).
fn output(values: Vec<f32>, dims: &[usize], like: DType) -> Result<Tensor> {
    Ok(Tensor::from_vec(values, dims, &candle_core::Device::Cpu)?.to_dtype(like)?)
}

impl Runtime {
    /// Binds an artifact to a backend. The cuda backend checks for a driver and a GPU
    /// first and fails with one clear error where there is none.
    pub fn new(artifact: Artifact, backend: Backend) -> Result<Runtime> {
        Runtime::with_options(artifact, backend, &RuntimeOptions::default())
    }

    pub fn with_options(
        artifact: Artifact,
        backend: Backend,
        opts: &RuntimeOptions,
    ) -> Result<Runtime> {
        let emu = crate::backend::emu::EmuOptions {
            sanitize: opts.sanitize,
        };
        Ok(Runtime {
            artifact,
            handle: BackendHandle::open(backend, emu)?,
        })
    }

    pub fn artifact(&self) -> &Artifact {
        &self.artifact
    }

    pub fn backend(&self) -> Backend {
        self.handle.backend()
    }

    /// Allocates a cache for `batch` sequences of N = prompt_len + max_new_tokens.
    pub fn allocate_cache(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new_tokens: usize,
    ) -> Result<KvCache> {
        if batch == 0 {
            return Err(Error::shape("batch", "at least 1 row", 0));
        }
        if let Some((p, m)) = self.artifact.fixed() {
            if (p + m) as usize != prompt_len + max_new_tokens {
                return Err(Error::Usage(format!(
                    "this artifact is specialized to N = {} (prompt {p} + {m}); asked for N = {}",
                    p + m,
                    prompt_len + max_new_tokens
                )));
            }
        }
        let geometry = CacheGeometry::new(
            self.artifact.plan(),
            prompt_len as u64,
            max_new_tokens as u64,
        )?;
        let mut layers = Vec::new();
        for layer in self.artifact.layers() {
            let shape = LayerShape::new(&geometry, layer);
            let setup = self.artifact.layer_setup(&shape)?;
            layers.push(LayerState {
                layer,
                lens: vec![0; batch],
                kernels: self.handle.open_layer(&setup, batch)?,
            });
        }
        Ok(KvCache {
            batch,
            geometry,
            dtype: self.artifact.dtype(),
            layers,
        })
    }

    /// Prefill of one layer: sparse attention over the prompt (returned [B,P,Hq,D] in
    /// `q`'s dtype, rows past a row's length zero) and the cache fill. `q` [B,P,Hq,D],
    /// `k`/`v` [B,P,Hkv,D]; P at most the cache's prompt length.
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        opts: &PrefillOptions,
    ) -> Result<Tensor> {
        let batch = cache.batch;
        let max_prompt = cache.geometry.prompt_len as usize;
        let dtype = cache.dtype;
        let st = cache.state(layer)?;
        let s = st.kernels.shape().clone();
        let p = q.dims().get(1).copied().unwrap_or(0);
        expect_dims(q, "q", &[batch, p, s.num_query_heads, s.head_dim])?;
        expect_dims(k, "k", &[batch, p, s.num_kv_heads, s.head_dim])?;
        expect_dims(v, "v", &[batch, p, s.num_kv_heads, s.head_dim])?;
        let prompt_lens = checked_lens(opts.prompt_lens.as_deref(), batch, p, max_prompt)?;
        let scale = opts.scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt());
        let lens: Vec<i32> = prompt_lens.iter().map(|&l| l as i32).collect();
        let (kb, vb) = (bits_of(k, dtype)?, bits_of(v, dtype)?);
        let prompt = Prompt {
            k: &kb,
            v: &vb,
            lens: &lens,
            p,
        };
        let o = st
            .kernels
            .prefill_and_fill(&bits_of(q, dtype)?, &prompt, opts.mode, scale)?;
        st.lens = prompt_lens;
        output(o, &[batch, p, s.num_query_heads, s.head_dim], q.dtype())
    }

    /// Cache fill of one layer without attention: writes each row's prompt K/V
    /// ([B,P,Hkv,D], rows right-padded, `prompt_lens` or every row P long) into the
    /// compacted cache, as [`Runtime::prefill`] does, for callers that need no prefill
    /// output (a cache restored from elsewhere, a decode benchmark).
    pub fn fill(
        &self,
        cache: &mut KvCache,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        prompt_lens: Option<&[usize]>,
    ) -> Result<()> {
        let batch = cache.batch;
        let max_prompt = cache.geometry.prompt_len as usize;
        let dtype = cache.dtype;
        let st = cache.state(layer)?;
        let s = st.kernels.shape().clone();
        let p = k.dims().get(1).copied().unwrap_or(0);
        expect_dims(k, "k", &[batch, p, s.num_kv_heads, s.head_dim])?;
        expect_dims(v, "v", &[batch, p, s.num_kv_heads, s.head_dim])?;
        let prompt_lens = checked_lens(prompt_lens, batch, p, max_prompt)?;
        let lens: Vec<i32> = prompt_lens.iter().map(|&l| l as i32).collect();
        let (kb, vb) = (bits_of(k, dtype)?, bits_of(v, dtype)?);
        st.kernels.fill(&Prompt {
            k: &kb,
            v: &vb,
            lens: &lens,
            p,
        })?;
        st.lens = prompt_lens;
        Ok(())
    }

    /// One decode step of one layer: appends the newest token's K/V ([B,Hkv,D]) and
    /// attends with its queries ([B,Hq,D]); returns [B,Hq,D] in `q`'s dtype.
    pub fn decode_step(
        &self,
        cache: &mut KvCache,
        layer: usize,
        q: &Tensor,
        k_new: &Tensor,
        v_new: &Tensor,
        opts: &DecodeOptions,
    ) -> Result<Tensor> {
        let batch = cache.batch;
        let n = cache.geometry.n as usize;
        let dtype = cache.dtype;
        let st = cache.state(layer)?;
        let s = st.kernels.shape().clone();
        expect_dims(q, "q", &[batch, s.num_query_heads, s.head_dim])?;
        expect_dims(k_new, "k_new", &[batch, s.num_kv_heads, s.head_dim])?;
        expect_dims(v_new, "v_new", &[batch, s.num_kv_heads, s.head_dim])?;
        let lens: Vec<usize> = st.lens.iter().map(|&l| l + 1).collect();
        if let Some((row, &tokens)) = lens.iter().enumerate().find(|(_, &l)| l > n) {
            return Err(Error::CapacityExceeded {
                layer,
                row,
                tokens,
                n,
            });
        }
        let scale = opts.scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt());
        let li: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        st.kernels
            .append(&bits_of(k_new, dtype)?, &bits_of(v_new, dtype)?, &li)?;
        let o = st.kernels.decode(&bits_of(q, dtype)?, &li, scale)?;
        st.lens = lens;
        output(o, &[batch, s.num_query_heads, s.head_dim], q.dtype())
    }
}
