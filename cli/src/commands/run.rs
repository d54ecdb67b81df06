//! `moac run`: one layer's attention (prefill, then decode steps) over inputs from a
//! safetensors file.

use super::{parse, PlanInput};
use crate::tools::run::{self, RunOptions};
use crate::{CliError, Result};
use clap::Args;
use moac::geometry::Dtype;
use moac::inspect;
use moac::ir::PrefillMode;
use moac_runtime::Backend;
use std::path::PathBuf;

#[derive(Args)]
#[command(
    after_help = "Inputs (f32, f16 or bf16; converted to --dtype): q_prefill [B,P,Hq,D], k_prefill and v_prefill [B,P,Hkv,D], q_decode [S,B,Hq,D], k_decode and v_decode [S,B,Hkv,D], optional prompt_lens [B] (int32; shorter rows are right-padded). Outputs (f32): o_prefill [B,P,Hq,D] (padding rows zero), o_decode [S,B,Hq,D]."
)]
pub struct RunArgs {
    #[command(flatten)]
    input: PlanInput,
    /// The layer to run.
    #[arg(long)]
    layer: usize,
    /// Input tensors (safetensors).
    #[arg(long)]
    inputs: PathBuf,
    /// Output tensors (safetensors), written atomically.
    #[arg(long)]
    out: PathBuf,
    /// cpu, emu or cuda.
    #[arg(long, value_parser = parse::<Backend>, default_value = "cpu")]
    backend: Backend,
    /// M: N = P + M (default: the plan's setting, 1024); S > M is an error.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// moa-block64 or token.
    #[arg(long, value_parser = parse::<PrefillMode>, default_value = "moa-block64")]
    prefill_mode: PrefillMode,
    /// f16 or bf16.
    #[arg(long, value_parser = parse::<Dtype>, default_value = "f16")]
    dtype: Dtype,
}

pub fn run(a: RunArgs) -> Result<()> {
    let plan = a.input.load()?;
    if a.layer >= plan.num_layers() {
        return Err(CliError::Usage(format!(
            "--layer {} does not exist: the plan has {} layers",
            a.layer,
            plan.num_layers()
        )));
    }
    let opts = RunOptions {
        layer: a.layer,
        backend: a.backend,
        dtype: a.dtype,
        max_new_tokens: a
            .max_new_tokens
            .unwrap_or(plan.settings().max_new_tokens as usize),
        prefill_mode: a.prefill_mode,
    };
    let r = run::run(&plan, &a.inputs, &a.out, &opts)?;
    eprintln!(
        "layer {}: batch {}, prompt {}, {} decode steps, N = {}; KV cache {} (dense {}, {:.3}x); wrote {}",
        a.layer,
        r.batch,
        r.prompt_len,
        r.steps,
        r.n,
        inspect::human_bytes(r.kv_bytes),
        inspect::human_bytes(r.dense_kv_bytes),
        r.kv_bytes as f64 / r.dense_kv_bytes as f64,
        a.out.display()
    );
    Ok(())
}
