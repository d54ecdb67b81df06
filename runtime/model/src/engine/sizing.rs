//! Device memory sizing: the bytes of the weights ([`weight_bytes`]) and of a session
//! beyond them ([`session_bytes`]: the compacted cache, the step buffers, the prefill
//! workspace), and the check that a session fits the free memory before it is allocated.

use super::seeded::SeededLayout;
use super::step::PREFILL_CHUNK;
use super::{usage, DeviceEngine};
use crate::llama::LlamaConfig;
use crate::Result;
use moac::geometry::{CacheGeometry, Dtype};

/// Bytes the engine's weights take on the device.
pub fn weight_bytes(c: &LlamaConfig, ff: usize, tied: bool) -> u64 {
    let lay = SeededLayout::of(c, ff);
    let per_layer = (lay.qkv * lay.hidden + lay.hidden * lay.attn + 3 * ff * lay.hidden) * 2
        + 2 * 4 * lay.hidden;
    let embed = c.vocab_size * c.hidden * 2;
    (c.num_layers * per_layer + embed * if tied { 1 } else { 2 } + 4 * c.hidden) as u64
}

/// Device bytes of a session beyond the weights (see [`DeviceEngine::session_bytes`]).
pub fn session_bytes(
    c: &LlamaConfig,
    ff: usize,
    geometry: &CacheGeometry,
    dtype: Dtype,
    batch: usize,
    prompt_len: usize,
) -> u64 {
    let b = batch as u64;
    let kv: u64 = (0..c.num_layers)
        .map(|l| geometry.layer_kv_bytes(l, dtype, b))
        .sum();
    let (hq, hkv, d, h, v) = (
        c.num_heads as u64,
        c.num_kv_heads as u64,
        c.head_dim as u64,
        c.hidden as u64,
        c.vocab_size as u64,
    );
    let ff = ff as u64;
    let max_cap = geometry
        .layers
        .iter()
        .flat_map(|l| l.kv_capacity.iter().copied())
        .max()
        .unwrap_or(1);
    let nsplit = max_cap.div_ceil(64).max(1);
    let step = b
        * (h * 6
            + (hq + 2 * hkv) * d * 4
            + (hq + 2 * hkv) * d * 2
            + hq * nsplit * (d + 1) * 4
            + hq * d * 2
            + ff * 10
            + v * 4
            + 12);
    let rows = b * prompt_len as u64;
    let chunk = rows.min(PREFILL_CHUNK as u64);
    let prefill = rows * (h * 4 + (2 * hq + 2 * hkv) * d * 2 + 16)
        + chunk * (h * 2 + (hq + 2 * hkv) * d * 4 + ff * 10);
    kv + step + prefill
}

impl DeviceEngine {
    /// Bytes a session of `batch` rows and N = `prompt_len + max_new` takes on the
    /// device beyond the weights: the compacted cache plus the step buffers, and with
    /// `with_prefill` the workspace of prefilling every row's `prompt_len` tokens at once
    /// (allocated while the cache lives).
    pub fn session_bytes(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new: usize,
        with_prefill: bool,
    ) -> Result<u64> {
        let geometry = CacheGeometry::new(self.artifact.plan(), prompt_len as u64, max_new as u64)
            .map_err(moac_runtime::Error::from)?;
        Ok(session_bytes(
            &self.config,
            self.ff,
            &geometry,
            self.dtype,
            batch,
            if with_prefill { prompt_len } else { 0 },
        ))
    }

    /// Checks that a session fits the device's free memory, else names what would.
    pub(super) fn check_fits(
        &self,
        batch: usize,
        prompt_len: usize,
        max_new: usize,
        with_prefill: bool,
    ) -> Result<()> {
        let Some((free, _)) = self.gpu.memory()? else {
            return Ok(());
        };
        let need = self.session_bytes(batch, prompt_len, max_new, with_prefill)?;
        // Headroom for cuBLAS workspaces and the driver.
        let usable = free.saturating_sub(512 << 20);
        if need > usable {
            let per_row = self
                .session_bytes(1, prompt_len, max_new, with_prefill)?
                .max(1);
            let fits = usable / per_row;
            return Err(usage(format!(
                "a batch of {batch} at {} tokens needs {:.2} GiB on the GPU, {:.2} GiB are free: at most {fits} rows fit at this length",
                prompt_len + max_new,
                need as f64 / (1u64 << 30) as f64,
                usable as f64 / (1u64 << 30) as f64,
            )));
        }
        Ok(())
    }
}
