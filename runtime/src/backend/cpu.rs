//! The `cpu` backend: the candle-core reference ([`crate::reference`]) behind the
//! backend trait. Obviously right, not fast; its cache is a pair of tensors.

use super::{check_prompt, check_steps, from_bits, to_bits, HostCache};
use super::{LayerBackend, LayerShape, Prompt};
use crate::error::{expect_len, Error, Result};
use crate::reference::{self, LayerCache};
use candle_core::{DType, Device, Tensor};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;

/// The candle dtype of an element type.
pub fn candle_dtype(d: Dtype) -> DType {
    match d {
        Dtype::F16 => DType::F16,
        Dtype::Bf16 => DType::BF16,
    }
}

/// Element bits as a tensor of the element type.
pub fn tensor_of(bits: &[u16], dtype: Dtype, dims: &[usize]) -> Result<Tensor> {
    let f: Vec<f32> = bits.iter().map(|&b| from_bits(b, dtype)).collect();
    Ok(Tensor::from_vec(f, dims, &Device::Cpu)?.to_dtype(candle_dtype(dtype))?)
}

/// A tensor's values as element bits (rounded to the element type).
pub fn bits_of(t: &Tensor, dtype: Dtype) -> Result<Vec<u16>> {
    let f = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f.iter().map(|&x| to_bits(x, dtype)).collect())
}

/// One layer on the reference, with its cache.
pub struct CpuLayer {
    shape: LayerShape,
    dtype: Dtype,
    cache: Option<LayerCache>,
}

fn lens_of(v: &[i32]) -> Vec<usize> {
    v.iter().map(|&l| l.max(0) as usize).collect()
}

impl CpuLayer {
    /// The layer without a cache yet ([`LayerBackend::new_cache`] makes one).
    pub fn new(shape: LayerShape, dtype: Dtype) -> CpuLayer {
        CpuLayer {
            shape,
            dtype,
            cache: None,
        }
    }

    fn cache(&self) -> Result<&LayerCache> {
        self.cache
            .as_ref()
            .ok_or_else(|| Error::Usage("cpu layer: no cache allocated (new_cache)".into()))
    }

    fn prompt_tensors(&self, pr: &Prompt) -> Result<(Tensor, Tensor)> {
        let dims = [
            pr.lens.len(),
            pr.p,
            self.shape.num_kv_heads,
            self.shape.head_dim,
        ];
        Ok((
            tensor_of(pr.k, self.dtype, &dims)?,
            tensor_of(pr.v, self.dtype, &dims)?,
        ))
    }
}

impl LayerBackend for CpuLayer {
    fn shape(&self) -> &LayerShape {
        &self.shape
    }

    fn new_cache(&mut self, batch: usize) -> Result<()> {
        let s = &self.shape;
        let z = Tensor::zeros(
            (batch, s.total_slots, s.head_dim),
            candle_dtype(self.dtype),
            &Device::Cpu,
        )?;
        self.cache = Some(LayerCache { k: z.clone(), v: z });
        Ok(())
    }

    fn prefill(&self, q: &[u16], pr: &Prompt, mode: PrefillMode, scale: f32) -> Result<Vec<f32>> {
        check_prompt(&self.shape, Some(q), pr)?;
        let s = &self.shape;
        let qt = tensor_of(
            q,
            self.dtype,
            &[pr.lens.len(), pr.p, s.num_query_heads, s.head_dim],
        )?;
        let (k, v) = self.prompt_tensors(pr)?;
        let o = reference::prefill(&qt, &k, &v, &lens_of(pr.lens), s, mode, scale)?;
        Ok(o.flatten_all()?.to_vec1::<f32>()?)
    }

    fn fill(&mut self, pr: &Prompt) -> Result<()> {
        check_prompt(&self.shape, None, pr)?;
        let (k, v) = self.prompt_tensors(pr)?;
        self.cache = Some(reference::fill(&k, &v, &lens_of(pr.lens), &self.shape)?);
        Ok(())
    }

    fn append(&mut self, k_new: &[u16], v_new: &[u16], seq_lens: &[i32]) -> Result<()> {
        let s = &self.shape;
        check_steps(s, seq_lens)?;
        let dims = [seq_lens.len(), s.num_kv_heads, s.head_dim];
        let n = dims.iter().product();
        expect_len("k_new", "[B,Hkv,D]", n, k_new.len())?;
        expect_len("v_new", "[B,Hkv,D]", n, v_new.len())?;
        let cache = self
            .cache
            .as_mut()
            .ok_or_else(|| Error::Usage("cpu layer: no cache allocated (new_cache)".into()))?;
        reference::append(
            cache,
            &tensor_of(k_new, self.dtype, &dims)?,
            &tensor_of(v_new, self.dtype, &dims)?,
            &lens_of(seq_lens),
            s,
        )
    }

    fn decode(&self, q: &[u16], seq_lens: &[i32], scale: f32) -> Result<Vec<f32>> {
        let s = &self.shape;
        check_steps(s, seq_lens)?;
        let dims = [seq_lens.len(), s.num_query_heads, s.head_dim];
        expect_len("q", "[B,Hq,D]", dims.iter().product(), q.len())?;
        let o = reference::decode(
            &tensor_of(q, self.dtype, &dims)?,
            self.cache()?,
            &lens_of(seq_lens),
            s,
            scale,
        )?;
        Ok(o.flatten_all()?.to_vec1::<f32>()?)
    }

    fn cache_to_host(&self) -> Result<HostCache> {
        let c = self.cache()?;
        Ok(HostCache {
            batch: c.k.dims().first().copied().unwrap_or(0),
            k: bits_of(&c.k, self.dtype)?,
            v: bits_of(&c.v, self.dtype)?,
        })
    }
}
