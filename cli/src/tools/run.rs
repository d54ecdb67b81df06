//! `moac run`: one layer of a plan over inputs from a safetensors file, prefill then
//! decode steps, outputs to a safetensors file. The tool a user runs to compare moac with
//! their own model code.

use crate::error::{CliError, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use moac::geometry::Dtype;
use moac::ir::PrefillMode;
use moac::plan::ValidPlan;
use moac_runtime::{Artifact, Backend, DecodeOptions, PrefillOptions, Runtime};
use std::collections::HashMap;
use std::path::Path;

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub layer: usize,
    pub backend: Backend,
    pub dtype: Dtype,
    /// M; N = P + M.
    pub max_new_tokens: usize,
    pub prefill_mode: PrefillMode,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub batch: usize,
    pub prompt_len: usize,
    pub steps: usize,
    pub n: usize,
    pub kv_bytes: u64,
    pub dense_kv_bytes: u64,
}

fn input_err(path: &Path, message: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("{}: {message}", path.display()))
}

/// Input `name` of rank `rank`, as f32 (the runtime rounds it to the build's dtype; the
/// outputs then come back in f32, the reference's own precision on cpu).
fn get(inputs: &HashMap<String, Tensor>, path: &Path, name: &str, rank: usize) -> Result<Tensor> {
    let t = inputs
        .get(name)
        .ok_or_else(|| input_err(path, format!("no tensor named {name}")))?;
    if t.rank() != rank {
        return Err(input_err(
            path,
            format!("{name} must have {rank} dimensions, got {:?}", t.dims()),
        ));
    }
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(t.to_dtype(DType::F32)?),
        d => Err(input_err(
            path,
            format!("{name} must be f32, f16 or bf16, got {d:?}"),
        )),
    }
}

/// Runs prefill and the decode steps of `inputs` (see `moac run --help` for the names).
pub fn run(
    plan: &ValidPlan,
    inputs_path: &Path,
    out_path: &Path,
    opts: &RunOptions,
) -> Result<RunReport> {
    let inputs = candle_core::safetensors::load(inputs_path, &Device::Cpu)
        .map_err(|e| input_err(inputs_path, e))?;
    let q = get(&inputs, inputs_path, "q_prefill", 4)?;
    let k = get(&inputs, inputs_path, "k_prefill", 4)?;
    let v = get(&inputs, inputs_path, "v_prefill", 4)?;
    let (b, p) = (q.dims()[0], q.dims()[1]);
    let qd = get(&inputs, inputs_path, "q_decode", 4)?;
    let kd = get(&inputs, inputs_path, "k_decode", 4)?;
    let vd = get(&inputs, inputs_path, "v_decode", 4)?;
    let steps = qd.dims()[0];
    if steps > opts.max_new_tokens {
        return Err(input_err(
            inputs_path,
            format!(
                "{steps} decode steps exceed --max-new-tokens {} (N = P + M is fixed at prefill)",
                opts.max_new_tokens
            ),
        ));
    }
    for (name, t) in [("q_decode", &qd), ("k_decode", &kd), ("v_decode", &vd)] {
        if t.dims()[0] != steps || t.dims()[1] != b {
            return Err(input_err(
                inputs_path,
                format!(
                    "{name} must be [S={steps}, B={b}, H, D], got {:?}",
                    t.dims()
                ),
            ));
        }
    }
    let prompt_lens: Vec<usize> = match inputs.get("prompt_lens") {
        None => vec![p; b],
        Some(t) => {
            if t.dims() != [b] {
                return Err(input_err(
                    inputs_path,
                    format!("prompt_lens must be [B={b}], got {:?}", t.dims()),
                ));
            }
            let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let mut out = Vec::with_capacity(b);
            for (i, x) in v.into_iter().enumerate() {
                if x < 0.0 || x > p as f64 || x.fract() != 0.0 {
                    return Err(input_err(
                        inputs_path,
                        format!("prompt_lens[{i}] = {x} is not a length in 0..={p}"),
                    ));
                }
                out.push(x as usize);
            }
            out
        }
    };
    let artifact = Artifact::from_plan(plan, opts.dtype, Some(vec![opts.layer]))?;
    let rt = Runtime::new(artifact, opts.backend)?;
    let mut cache = rt.allocate_cache(b, p, opts.max_new_tokens)?;
    let popts = PrefillOptions::default()
        .prompt_lens(prompt_lens)
        .mode(opts.prefill_mode);
    let o_prefill = rt.prefill(&mut cache, opts.layer, &q, &k, &v, &popts)?;
    let mut o_steps = Vec::with_capacity(steps);
    for s in 0..steps {
        o_steps.push(rt.decode_step(
            &mut cache,
            opts.layer,
            &qd.i(s)?,
            &kd.i(s)?,
            &vd.i(s)?,
            &DecodeOptions::default(),
        )?);
    }
    let o_decode = if steps == 0 {
        Tensor::zeros((0, b, qd.dims()[2], qd.dims()[3]), DType::F32, &Device::Cpu)?
    } else {
        Tensor::stack(&o_steps, 0)?
    };
    let mut out = HashMap::new();
    out.insert("o_prefill".to_string(), o_prefill.to_dtype(DType::F32)?);
    out.insert("o_decode".to_string(), o_decode.to_dtype(DType::F32)?);
    // Written next to the destination, then renamed: never half a file.
    let dir = out_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".moac-run-")
        .suffix(".safetensors")
        .tempfile_in(dir)
        .map_err(|e| input_err(dir, e))?;
    candle_core::safetensors::save(&out, tmp.path())?;
    tmp.persist(out_path).map_err(|e| input_err(out_path, e))?;
    Ok(RunReport {
        batch: b,
        prompt_len: p,
        steps,
        n: cache.geometry().n as usize,
        kv_bytes: cache.bytes(),
        dense_kv_bytes: cache.dense_bytes(),
    })
}
