//! What `moac verify` needs of a layer executor, implemented by the `emu` executor
//! ([`EmuLayer`], host buffers) and the `cuda` one ([`CudaLayer`], a device-resident
//! cache), so the same checks run on both.

use crate::cuda_layer::{CudaLayer, DeviceCache};
use crate::emu_layer::{EmuLayer, HostCache};
use crate::error::{shape_err, Error, Result};
use crate::layer::LayerShape;
use moac::ir::PrefillMode;

/// One layer's kernels on some backend. Buffers are raw bits of the element type.
pub trait LayerExec {
    /// Where the layer's cache lives.
    type Cache;
    /// A cache for `batch` rows, poisoned with NaN.
    fn new_cache(&self, batch: usize) -> Result<Self::Cache>;
    /// Prefill attention: `q` [B,P,Hq,D], `k`/`v` [B,P,Hkv,D] -> o [B,P,Hq,D].
    #[allow(clippy::too_many_arguments)]
    fn prefill(
        &self,
        q: &[u16],
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<u16>>;
    fn fill(
        &self,
        cache: &mut Self::Cache,
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
    ) -> Result<()>;
    fn append(
        &self,
        cache: &mut Self::Cache,
        k_new: &[u16],
        v_new: &[u16],
        seq_lens: &[i32],
    ) -> Result<()>;
    fn decode(
        &self,
        cache: &Self::Cache,
        q: &[u16],
        seq_lens: &[i32],
        scale: f32,
    ) -> Result<Vec<u16>>;
    /// The cache's contents on the host.
    fn cache_to_host(&self, cache: &Self::Cache) -> Result<HostCache>;
}

impl LayerExec for EmuLayer {
    type Cache = HostCache;
    fn new_cache(&self, batch: usize) -> Result<HostCache> {
        Ok(EmuLayer::new_cache(self, batch))
    }
    fn prefill(
        &self,
        q: &[u16],
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<u16>> {
        EmuLayer::prefill(self, q, k, v, prompt_lens, p, mode, scale)
    }
    fn fill(
        &self,
        cache: &mut HostCache,
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
    ) -> Result<()> {
        EmuLayer::fill(self, cache, k, v, prompt_lens, p)
    }
    fn append(
        &self,
        cache: &mut HostCache,
        k_new: &[u16],
        v_new: &[u16],
        seq_lens: &[i32],
    ) -> Result<()> {
        EmuLayer::append(self, cache, k_new, v_new, seq_lens)
    }
    fn decode(
        &self,
        cache: &HostCache,
        q: &[u16],
        seq_lens: &[i32],
        scale: f32,
    ) -> Result<Vec<u16>> {
        EmuLayer::decode(self, cache, q, seq_lens, scale)
    }
    fn cache_to_host(&self, cache: &HostCache) -> Result<HostCache> {
        Ok(cache.clone())
    }
}

impl LayerExec for CudaLayer {
    type Cache = DeviceCache;
    fn new_cache(&self, batch: usize) -> Result<DeviceCache> {
        self.new_device_cache(batch)
    }
    fn prefill(
        &self,
        q: &[u16],
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
        mode: PrefillMode,
        scale: f32,
    ) -> Result<Vec<u16>> {
        CudaLayer::prefill(self, q, k, v, prompt_lens, p, mode, scale)
    }
    fn fill(
        &self,
        cache: &mut DeviceCache,
        k: &[u16],
        v: &[u16],
        prompt_lens: &[i32],
        p: usize,
    ) -> Result<()> {
        self.fill_device(cache, k, v, prompt_lens, p)
    }
    fn append(
        &self,
        cache: &mut DeviceCache,
        k_new: &[u16],
        v_new: &[u16],
        seq_lens: &[i32],
    ) -> Result<()> {
        self.append_device(cache, k_new, v_new, seq_lens)
    }
    fn decode(
        &self,
        cache: &DeviceCache,
        q: &[u16],
        seq_lens: &[i32],
        scale: f32,
    ) -> Result<Vec<u16>> {
        self.decode_device(cache, q, seq_lens, scale)
    }
    fn cache_to_host(&self, cache: &DeviceCache) -> Result<HostCache> {
        CudaLayer::cache_to_host(self, cache)
    }
}

/// Prompt lengths must lie in `0..=min(P, N)` (the same check as the emu executor's).
pub(crate) fn check_lens(shape: &LayerShape, lens: &[i32], p: usize) -> Result<()> {
    for (b, &l) in lens.iter().enumerate() {
        if l < 0 || l as usize > p || l as usize > shape.n {
            return shape_err(format!(
                "row {b}: length {l} outside 0..={}",
                p.min(shape.n)
            ));
        }
    }
    Ok(())
}

/// Token counts of a step must lie in `1..=N` (the same check as the emu executor's).
pub(crate) fn check_steps(shape: &LayerShape, seq_lens: &[i32]) -> Result<()> {
    for (b, &t) in seq_lens.iter().enumerate() {
        if t < 1 || t as usize > shape.n {
            return Err(Error::Capacity(format!(
                "row {b}: {t} tokens do not fit a cache built for N = {}",
                shape.n
            )));
        }
    }
    Ok(())
}
