//! The runtime API: a compacted KV cache and per-layer prefill / decode, the same on
//! every backend.

use crate::artifact::Artifact;
use crate::cuda_layer::{CudaDevice, CudaLayer, DeviceCache};
use crate::emu::EmuBuild;
use crate::emu_layer::{from_bits, EmuLayer, HostCache};
use crate::error::{shape_err, Error, Result};
use crate::layer::LayerShape;
use crate::reference::{self, LayerCache};
use candle_core::{DType, Device, Tensor};
use moac::geometry::{CacheGeometry, Dtype};
use moac::ir::PrefillMode;

/// Where the attention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The candle-core reference (obviously right, not fast).
    Cpu,
    /// The generated CUDA source, run on the CPU.
    Emu,
    /// The generated kernels on an NVIDIA GPU.
    Cuda,
}

impl std::str::FromStr for Backend {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "emu" => Ok(Backend::Emu),
            "cuda" => Ok(Backend::Cuda),
            _ => Err(Error::Backend(format!(
                "unknown backend {s:?} (cpu, emu or cuda)"
            ))),
        }
    }
}

enum Store {
    Cpu(LayerCache),
    Emu(Box<EmuLayer>, HostCache),
    Cuda(Box<CudaLayer>, DeviceCache),
}

/// One layer's part of the cache.
struct LayerState {
    layer: usize,
    shape: LayerShape,
    lens: Vec<usize>,
    store: Store,
}

/// The compacted KV cache of a batch: every compiled layer, sized for one N.
pub struct KvCache {
    pub batch: usize,
    pub geometry: CacheGeometry,
    dtype: Dtype,
    layers: Vec<LayerState>,
}

impl KvCache {
    /// Bytes of K and V over the compiled layers: exactly the sum of capacities
    /// (the layout has no padding), as the geometry gives.
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
                Error::Shape(format!(
                    "layer {layer} is not in this artifact (compiled layers: {compiled:?})"
                ))
            })
    }
}

/// A loaded artifact bound to a backend.
pub struct Runtime {
    pub artifact: Artifact,
    pub backend: Backend,
    pub emu: EmuBuild,
    /// The GPU, for the cuda backend.
    cuda: Option<std::sync::Arc<CudaDevice>>,
}

fn cdt(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

fn bits(t: &Tensor, dtype: Dtype) -> Result<Vec<u16>> {
    let t = t.to_dtype(cdt(dtype))?.flatten_all()?;
    Ok(match dtype {
        Dtype::F16 => t
            .to_vec1::<half::f16>()?
            .into_iter()
            .map(|x| x.to_bits())
            .collect(),
        Dtype::Bf16 => t
            .to_vec1::<half::bf16>()?
            .into_iter()
            .map(|x| x.to_bits())
            .collect(),
    })
}

fn from_bits_tensor(v: &[u16], dtype: Dtype, dims: &[usize]) -> Result<Tensor> {
    let f: Vec<f32> = v.iter().map(|&b| from_bits(b, dtype)).collect();
    Ok(Tensor::from_vec(f, dims, &Device::Cpu)?)
}

fn expect_dims(t: &Tensor, name: &str, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return shape_err(format!("{name} must be {want:?}, got {:?}", t.dims()));
    }
    Ok(())
}

impl Runtime {
    /// Binds an artifact to a backend. The cuda backend checks for a driver and a GPU
    /// first and fails with one clear error where there is none.
    pub fn new(artifact: Artifact, backend: Backend) -> Result<Runtime> {
        let cuda = match backend {
            // Checks `cuda_available()` before any other driver call.
            Backend::Cuda => Some(CudaDevice::open()?),
            _ => None,
        };
        Ok(Runtime {
            artifact,
            backend,
            emu: EmuBuild::default(),
            cuda,
        })
    }

    /// The GPU of the cuda backend (`None` on the others).
    pub fn cuda_device(&self) -> Option<&std::sync::Arc<CudaDevice>> {
        self.cuda.as_ref()
    }

    /// Allocates a cache for `batch` sequences of N = prompt_len + max_new_tokens.
    pub fn allocate_cache(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new_tokens: usize,
    ) -> Result<KvCache> {
        if batch == 0 {
            return shape_err("batch must be at least 1");
        }
        if let Some((p, m)) = self.artifact.fixed {
            if (p + m) as usize != prompt_len + max_new_tokens {
                return shape_err(format!(
                    "this artifact is specialized to N = {} (prompt {p} + {m}); asked for N = {}",
                    p + m,
                    prompt_len + max_new_tokens
                ));
            }
        }
        let geometry = CacheGeometry::new(
            &self.artifact.plan,
            prompt_len as u64,
            max_new_tokens as u64,
        )?;
        let units = &self.artifact.units;
        let dtype = self.artifact.dtype;
        let mut layers = Vec::new();
        for lk in &self.artifact.lowered.layers {
            let shape = LayerShape::new(&geometry, lk.layer);
            let elems = batch * shape.total_slots * shape.head_dim;
            let store = match self.backend {
                Backend::Cpu => {
                    let z = Tensor::zeros(
                        (batch, shape.total_slots, shape.head_dim),
                        cdt(dtype),
                        &Device::Cpu,
                    )?;
                    debug_assert_eq!(z.elem_count(), elems);
                    Store::Cpu(LayerCache { k: z.clone(), v: z })
                }
                Backend::Emu => {
                    let emu = EmuLayer::new(
                        shape.clone(),
                        dtype,
                        lk,
                        &self.artifact.lowered.kernels,
                        units,
                        &self.emu,
                    )?;
                    let cache = emu.new_cache(batch);
                    Store::Emu(Box::new(emu), cache)
                }
                Backend::Cuda => {
                    let dev = self.cuda.as_ref().ok_or_else(|| {
                        Error::Unavailable("cuda backend: no GPU was opened".into())
                    })?;
                    let layer = CudaLayer::new(
                        dev,
                        shape.clone(),
                        dtype,
                        lk,
                        &self.artifact.lowered.kernels,
                        units,
                        &self.artifact.binaries,
                    )?;
                    let cache = layer.new_device_cache(batch)?;
                    Store::Cuda(Box::new(layer), cache)
                }
            };
            layers.push(LayerState {
                layer: lk.layer,
                shape,
                lens: vec![0; batch],
                store,
            });
        }
        Ok(KvCache {
            batch,
            geometry,
            dtype,
            layers,
        })
    }

    /// Prefill of one layer: sparse attention over the prompt (returned, f32
    /// [B,P,Hq,D], rows past a row's length zero) and the cache fill.
    /// `q` [B,P,Hq,D], `k`/`v` [B,P,Hkv,D]; `prompt_lens[b] <= P <= the cache's prompt_len`.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill(
        &self,
        cache: &mut KvCache,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prompt_lens: &[usize],
        mode: PrefillMode,
        scale: Option<f32>,
    ) -> Result<Tensor> {
        let batch = cache.batch;
        let max_prompt = cache.geometry.prompt_len as usize;
        let dtype = cache.dtype;
        let st = cache.state(layer)?;
        let s = &st.shape;
        let p = q.dims().get(1).copied().unwrap_or(0);
        expect_dims(q, "q", &[batch, p, s.num_query_heads, s.head_dim])?;
        expect_dims(k, "k", &[batch, p, s.num_kv_heads, s.head_dim])?;
        expect_dims(v, "v", &[batch, p, s.num_kv_heads, s.head_dim])?;
        if prompt_lens.len() != batch {
            return shape_err(format!(
                "prompt_lens has {} rows, the cache {batch}",
                prompt_lens.len()
            ));
        }
        if p > max_prompt {
            return Err(Error::Capacity(format!(
                "prompt of {p} tokens does not fit a cache allocated for prompts of {max_prompt}"
            )));
        }
        if let Some((b, &l)) = prompt_lens.iter().enumerate().find(|(_, &l)| l > p) {
            return shape_err(format!(
                "prompt_lens[{b}] = {l} exceeds the padded length {p}"
            ));
        }
        let scale = scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt());
        let out = match &mut st.store {
            Store::Cpu(c) => {
                let (k, v) = (k.to_dtype(cdt(dtype))?, v.to_dtype(cdt(dtype))?);
                let o = reference::prefill(
                    &q.to_dtype(cdt(dtype))?,
                    &k,
                    &v,
                    prompt_lens,
                    s,
                    mode,
                    scale,
                )?;
                *c = reference::fill(&k, &v, prompt_lens, s)?;
                o
            }
            Store::Emu(emu, c) => {
                let lens: Vec<i32> = prompt_lens.iter().map(|&l| l as i32).collect();
                let (kb, vb) = (bits(k, dtype)?, bits(v, dtype)?);
                let o = emu.prefill(&bits(q, dtype)?, &kb, &vb, &lens, p, mode, scale)?;
                emu.fill(c, &kb, &vb, &lens, p)?;
                from_bits_tensor(&o, dtype, &[batch, p, s.num_query_heads, s.head_dim])?
            }
            Store::Cuda(cl, c) => {
                let lens: Vec<i32> = prompt_lens.iter().map(|&l| l as i32).collect();
                let (kb, vb) = (bits(k, dtype)?, bits(v, dtype)?);
                let o =
                    cl.prefill_and_fill(c, &bits(q, dtype)?, &kb, &vb, &lens, p, mode, scale)?;
                from_bits_tensor(&o, dtype, &[batch, p, s.num_query_heads, s.head_dim])?
            }
        };
        st.lens = prompt_lens.to_vec();
        Ok(out)
    }

    /// One decode step of one layer: appends the newest token's K/V ([B,Hkv,D]) and
    /// attends with its queries ([B,Hq,D]); returns f32 [B,Hq,D].
    pub fn decode_step(
        &self,
        cache: &mut KvCache,
        layer: usize,
        q: &Tensor,
        k_new: &Tensor,
        v_new: &Tensor,
        scale: Option<f32>,
    ) -> Result<Tensor> {
        let batch = cache.batch;
        let n = cache.geometry.n as usize;
        let (pl, mn) = (cache.geometry.prompt_len, cache.geometry.max_new_tokens);
        let dtype = cache.dtype;
        let st = cache.state(layer)?;
        let s = &st.shape;
        expect_dims(q, "q", &[batch, s.num_query_heads, s.head_dim])?;
        expect_dims(k_new, "k_new", &[batch, s.num_kv_heads, s.head_dim])?;
        expect_dims(v_new, "v_new", &[batch, s.num_kv_heads, s.head_dim])?;
        let lens: Vec<usize> = st.lens.iter().map(|&l| l + 1).collect();
        if let Some((b, _)) = lens.iter().enumerate().find(|(_, &l)| l > n) {
            return Err(Error::Capacity(format!(
                "layer {layer}, row {b}: a decode step past N = {n} (the cache was allocated for {pl} prompt + {mn} new tokens)"
            )));
        }
        let scale = scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt());
        let out = match &mut st.store {
            Store::Cpu(c) => {
                reference::append(
                    c,
                    &k_new.to_dtype(cdt(dtype))?,
                    &v_new.to_dtype(cdt(dtype))?,
                    &lens,
                    s,
                )?;
                reference::decode(&q.to_dtype(cdt(dtype))?, c, &lens, s, scale)?
            }
            Store::Emu(emu, c) => {
                let li: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
                emu.append(c, &bits(k_new, dtype)?, &bits(v_new, dtype)?, &li)?;
                let o = emu.decode(c, &bits(q, dtype)?, &li, scale)?;
                from_bits_tensor(&o, dtype, &[batch, s.num_query_heads, s.head_dim])?
            }
            Store::Cuda(cl, c) => {
                let li: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
                cl.append_device(c, &bits(k_new, dtype)?, &bits(v_new, dtype)?, &li)?;
                let o = cl.decode_device(c, &bits(q, dtype)?, &li, scale)?;
                from_bits_tensor(&o, dtype, &[batch, s.num_query_heads, s.head_dim])?
            }
        };
        st.lens = lens;
        Ok(out)
    }
}
