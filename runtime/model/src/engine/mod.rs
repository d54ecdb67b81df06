//! The device engine: a whole Llama decoded on a GPU-shaped machine ([`Gpu`]: a real
//! GPU through cudarc and cuBLAS, or emu, the same kernels' CUDA source on the CPU with
//! a CPU GEMM). Weights (f16/bf16), activations and moac's compacted KV cache stay in
//! device buffers; per decode step the host uploads nothing but the tokens it chooses
//! itself and downloads nothing but the tokens sampled on the device.
//!
//! A step: embedding gather, then per layer RMSNorm -> fused QKV GEMM -> RoPE split at
//! each row's position -> moac's append + split-KV decode + merge -> output GEMM added
//! into the f32 residual stream -> RMSNorm -> fused gate/up GEMM -> SiLU x up -> down
//! GEMM added into the residual; the final RMSNorm and the LM head; greedy or nucleus
//! sampling on the device. Everything but the GEMMs and the attention is an op of
//! [`moac::ops`], generated and built like the attention kernels. Prefill runs the same
//! layers over every prompt position (row-wise work in chunks), moac's sparse prefill
//! attention and the cache fill.
//!
//! A session holds a batch of sequences with different prompt lengths; a sequence that
//! finishes leaves the batch ([`DeviceEngine::retain`]): its rows are closed up, so it
//! costs no further work.
//!
//! The parts, one file each: `seeded.rs` (the seeded random model, on the host and on
//! the device), `upload.rs` (a loaded model's weights onto the device, the ops module),
//! `sizing.rs` (bytes of the weights and of a session), `session.rs` ([`Session`]: a
//! batch's caches and buffers), `step.rs` (prefill and the decode step), `sample.rs`
//! (choosing the next tokens, reading the logits), `source.rs` ([`Source`]: a loaded
//! model or a seeded one for a config, and the plan, host model and engine of either). This file holds [`DeviceEngine`]
//! itself and the launch of one op.

mod sample;
mod seeded;
mod session;
mod sizing;
mod source;
mod step;
mod upload;

pub use sample::DeviceSampling;
pub use seeded::{hash_uniform, seeded_llama};
pub use session::Session;
pub use sizing::{session_bytes, weight_bytes};
pub use source::{HostLlama, Source};

use crate::llama::LlamaConfig;
use crate::{Error, Result};
use moac::abi::{Arg, ArgPack, Elem};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;
use moac::ops::Op;
use moac_runtime::gpu::{Gpu, GpuModule};
use moac_runtime::Artifact;
use std::sync::Arc;
use upload::DeviceWeights;

/// The engine's kernels and weights for one model, plan and dtype.
pub struct DeviceEngine {
    gpu: Arc<Gpu>,
    config: LlamaConfig,
    ff: usize,
    dtype: Dtype,
    mode: PrefillMode,
    artifact: Artifact,
    ops: GpuModule,
    weights: DeviceWeights,
    /// Capture the decode step as a CUDA graph (cuda; default on).
    graphs: bool,
}

impl DeviceEngine {
    fn assemble(
        gpu: Arc<Gpu>,
        config: LlamaConfig,
        ff: usize,
        artifact: Artifact,
        mode: PrefillMode,
        weights: DeviceWeights,
        ops: GpuModule,
    ) -> Result<DeviceEngine> {
        let want = config.shape();
        if *artifact.plan().model() != want {
            return Err(usage(format!(
                "the artifact's plan is for another attention shape than the model's ({} layers x {} heads)",
                want.num_layers, want.num_query_heads
            )));
        }
        let compiled = artifact.layers();
        if compiled.len() != config.num_layers {
            return Err(usage(format!(
                "the device engine needs every layer compiled; the artifact holds layers {compiled:?} of {}",
                config.num_layers
            )));
        }
        let dtype = artifact.dtype();
        Ok(DeviceEngine {
            gpu,
            config,
            ff,
            dtype,
            mode,
            artifact,
            ops,
            weights,
            graphs: true,
        })
    }

    /// Whether decode steps are captured as a CUDA graph once per batch size and
    /// replayed (cuda only; on by default; a capture that fails falls back to plain
    /// launches with one line on stderr).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The MLP width.
    pub fn intermediate(&self) -> usize {
        self.ff
    }

    /// Bytes of the weights on the device.
    pub fn weight_bytes(&self) -> u64 {
        weight_bytes(&self.config, self.ff, self.weights.lm_head.is_none())
    }

    fn op(&self, op: Op, rows: usize, args: Vec<(&'static str, Arg)>) -> Result<()> {
        run_op(&self.gpu, &self.ops, op, rows, args)
    }
}

/// An engine error that is the caller's to fix.
fn usage(m: impl Into<String>) -> Error {
    Error::Usage(m.into())
}

fn ptr(p: u64, e: Elem) -> Arg {
    Arg::Ptr(p, e)
}

fn run_op(
    gpu: &Gpu,
    ops: &GpuModule,
    op: Op,
    rows: usize,
    args: Vec<(&'static str, Arg)>,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let mut pack = ArgPack::with_params(op.entry(), "engine op", op.params(), &args)?;
    Ok(gpu.launch(ops, op.entry(), op.grid(rows), op.block(), &mut pack)?)
}
