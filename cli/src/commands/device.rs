//! What `moac generate --engine device` and `moac bench decode` share: the flags that
//! choose the weights (`--model`, or `--shape CONFIG`: random weights from a seed for
//! any Llama config, or a known shape's name) and the plan, mapped onto
//! [`moac_model::engine::Source`], and the machine (emu or cuda).

use super::model::ModelArgs;
use crate::{CliError, Result};
use moac::ValidPlan;
use moac_model::engine::Source;
use moac_runtime::backend::emu::EmuOptions;
use moac_runtime::gpu::Gpu;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Model shapes known by name (`--shape llama-3-8b`), with their official MoA plans:
/// (name, example folder, config.json, moa_alpha_beta.json), compiled into the binary
/// (the plans are the MoA repository's, MIT; examples/plans/NOTICE).
const NAMED: [(&str, &str, &str, &str); 3] = [
    (
        "llama-3-8b",
        "gradientai--Llama-3-8B-Instruct-262k",
        include_str!("../../../examples/plans/gradientai--Llama-3-8B-Instruct-262k/config.json"),
        include_str!(
            "../../../examples/plans/gradientai--Llama-3-8B-Instruct-262k/moa_alpha_beta.json"
        ),
    ),
    (
        "llama-3.2-1b",
        "meta-llama--Llama-3.2-1B-Instruct",
        include_str!("../../../examples/plans/meta-llama--Llama-3.2-1B-Instruct/config.json"),
        include_str!(
            "../../../examples/plans/meta-llama--Llama-3.2-1B-Instruct/moa_alpha_beta.json"
        ),
    ),
    (
        "vicuna-7b",
        "lmsys--vicuna-7b-v1.5-16k",
        include_str!("../../../examples/plans/lmsys--vicuna-7b-v1.5-16k/config.json"),
        include_str!("../../../examples/plans/lmsys--vicuna-7b-v1.5-16k/moa_alpha_beta.json"),
    ),
];

/// `--shape`: a config file or folder, or a known name (`llama-3-8b`, `llama-3.2-1b`,
/// `vicuna-7b`), whose config and MoA plan are written to a folder under the temporary
/// directory. Returns the config's path and, for a name, its MoA plan's.
pub fn resolve_shape(arg: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if arg.exists() {
        return Ok((arg.to_path_buf(), None));
    }
    let name = arg.to_string_lossy().to_ascii_lowercase();
    let Some((_, folder, config, plan)) = NAMED.iter().find(|(n, ..)| *n == name) else {
        return Err(CliError::Usage(format!(
            "--shape {}: no such file, and not a known shape ({})",
            arg.display(),
            NAMED.iter().map(|n| n.0).collect::<Vec<_>>().join(", ")
        )));
    };
    let dir = std::env::temp_dir().join("moac-shapes").join(folder);
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Usage(format!("{}: {e}", dir.display())))?;
    let (c, p) = (dir.join("config.json"), dir.join("moa_alpha_beta.json"));
    for (path, text) in [(&c, config), (&p, plan)] {
        if std::fs::read_to_string(path).ok().as_deref() != Some(*text) {
            moac::fsutil::write_atomic(path, text.as_bytes())?;
        }
    }
    Ok((c, Some(p)))
}

/// `--model M` or `--shape CONFIG` (exactly one): the weights' [`Source`].
pub fn open_source(model: &ModelArgs, shape: Option<&Path>, seed: u64) -> Result<Source> {
    match (&model.model, shape) {
        (Some(_), Some(_)) => Err(CliError::Usage(
            "--model and --shape exclude each other".into(),
        )),
        (None, None) => Err(CliError::Usage(
            "name the weights: --model M, or --shape CONFIG (random weights from --seed)".into(),
        )),
        (Some(_), None) => Ok(Source::Model(Box::new(model.load()?))),
        (None, Some(p)) => {
            let (p, _) = resolve_shape(p)?;
            Ok(Source::shape(p, seed)?)
        }
    }
}

/// `--plan P` or `--dense` (exactly one), checked against `source`'s attention shape.
pub fn source_plan(source: &Source, plan: Option<&Path>, dense: bool) -> Result<ValidPlan> {
    match (plan, dense) {
        (Some(p), false) => Ok(source.plan(p)?),
        (None, true) => Ok(source.dense_plan()?),
        (Some(_), true) => Err(CliError::Usage(
            "--plan and --dense exclude each other".into(),
        )),
        (None, false) => Err(CliError::Usage(
            "say which attention to run: --plan P or --dense".into(),
        )),
    }
}

/// The device engine's machine for `--backend` (emu or cuda; cpu is refused with what
/// to use instead).
pub fn open_gpu(args: &ModelArgs) -> Result<Arc<Gpu>> {
    Ok(Gpu::open(args.backend, EmuOptions::default())?)
}
