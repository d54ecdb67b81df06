//! Plans: parsing the two input forms, validating them into a [`ValidPlan`].
//!
//! Form 1 is the official MoA JSON (`{"alphas": [[..]], "betas": [[..]]}`) together
//! with the model's Hugging Face `config.json`. Form 2 is moac's own versioned plan file,
//! which carries the geometry and the settings beside the rules (see [`MoacPlanFile`]).
//! Every later stage takes a [`ValidPlan`], so the type system proves validation ran.

pub mod optimize;
mod parse;
pub mod synthetic;
mod validate;

pub use parse::{
    HfConfig, MoaPlanJson, MoacPlanFile, SourceSection, MOAC_PLAN_FORMAT, MOAC_PLAN_VERSION,
};
pub use synthetic::synthetic;
pub use validate::validate;

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The attention shape of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub num_layers: usize,
    pub num_query_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl ModelShape {
    /// Query heads per KV head (`g` of the semantics).
    pub fn group_size(&self) -> usize {
        self.num_query_heads / self.num_kv_heads
    }
}

/// Plan-level settings of the span rule. Defaults are MoA's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Attention-sink tokens at the start of every window.
    pub sink: u64,
    /// Smallest capacity of any head.
    pub min_capacity: u64,
    /// Capacities are rounded up to a multiple of this.
    pub granularity: u64,
    /// Default number of generated tokens when the caller gives none (N = P + this).
    pub max_new_tokens: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sink: 64,
            min_capacity: 128,
            granularity: 64,
            max_new_tokens: 1024,
        }
    }
}

/// One head's span rule: S = alpha + beta * N.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HeadRule {
    pub alpha: f64,
    pub beta: f64,
}

impl HeadRule {
    /// A key that is equal exactly when the rules are bit-for-bit equal (f64 is not Eq).
    pub fn key(&self) -> (u64, u64) {
        (self.alpha.to_bits(), self.beta.to_bits())
    }
}

/// A plan that passed validation: shapes agree with the model, every number is legal.
/// Only [`validate`] (through [`load`]) makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPlan {
    name: String,
    source: PathBuf,
    model: ModelShape,
    settings: Settings,
    layers: Vec<Vec<HeadRule>>,
}

impl ValidPlan {
    /// A short human name (the plan's folder or file stem).
    /// The same plan under another name (reports and artifacts show it).
    pub fn with_name(mut self, name: impl Into<String>) -> ValidPlan {
        self.name = name.into();
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// The file the plan was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }
    pub fn model(&self) -> &ModelShape {
        &self.model
    }
    pub fn settings(&self) -> &Settings {
        &self.settings
    }
    /// Rules of one layer, one per query head in the model's head order.
    pub fn layer(&self, layer: usize) -> &[HeadRule] {
        &self.layers[layer]
    }
    pub fn layers(&self) -> impl ExactSizeIterator<Item = &[HeadRule]> {
        self.layers.iter().map(|l| l.as_slice())
    }
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The same plan with one head's rule replaced (used by tools and tests that perturb
    /// a plan). The new rule is validated like any input.
    pub fn with_rule(&self, layer: usize, head: usize, rule: HeadRule) -> Result<ValidPlan> {
        let mut file = self.to_moac_file();
        let row_a = file.alphas.get_mut(layer);
        let ok = match row_a.and_then(|r| r.get_mut(head)) {
            Some(a) => {
                *a = rule.alpha;
                true
            }
            None => false,
        };
        if !ok {
            return Err(Error::plan(
                &self.source,
                Location::Head { layer, head },
                "no such head",
            ));
        }
        file.betas[layer][head] = rule.beta;
        validate::validate_moac(&self.source, file)
    }

    /// The plan in moac's own file format.
    pub fn to_moac_file(&self) -> MoacPlanFile {
        MoacPlanFile {
            format: MOAC_PLAN_FORMAT.to_string(),
            version: MOAC_PLAN_VERSION,
            name: Some(self.name.clone()),
            model: self.model,
            settings: self.settings,
            alphas: self
                .layers
                .iter()
                .map(|l| l.iter().map(|r| r.alpha).collect())
                .collect(),
            betas: self
                .layers
                .iter()
                .map(|l| l.iter().map(|r| r.beta).collect())
                .collect(),
            source: None,
        }
    }

    /// SHA-256 of what the plan means (geometry, settings, rules), independent of the
    /// form it was read from and of its name.
    pub fn sha256(&self) -> String {
        let mut file = self.to_moac_file();
        file.name = None;
        let canonical = serde_json::to_vec(&file).unwrap_or_default();
        hex(&Sha256::digest(&canonical))
    }
}

pub use crate::error::Location;

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// A human name for a plan file: its parent folder for `moa_alpha_beta.json`-style
/// names, else the file stem.
fn plan_name(path: &Path) -> String {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plan");
    match path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|s| s.to_str())
    {
        Some(parent) if stem.ends_with("alpha_beta") => format!("{parent}/{stem}"),
        _ => stem.to_string(),
    }
}

/// Reads a plan in either form and validates it.
///
/// `config` is required for the official MoA JSON. For a moac plan file it is optional;
/// when given, it must agree with the geometry the file carries.
pub fn load(plan: &Path, config: Option<&Path>) -> Result<ValidPlan> {
    let text = read(plan)?;
    load_str(plan, &text, config)
}

/// Like [`load`], with the plan's text already in memory (`path` names it in errors).
pub fn load_str(path: &Path, text: &str, config: Option<&Path>) -> Result<ValidPlan> {
    match parse::parse_plan(path, text)? {
        parse::Parsed::Moa(raw) => {
            let Some(config_path) = config else {
                return Err(Error::Usage(format!(
                    "{}: this is an official MoA plan, which holds no model geometry; pass the model's config.json with --config",
                    path.display()
                )));
            };
            let cfg = parse::parse_config(config_path, &read(config_path)?)?;
            let model = cfg.shape(config_path)?;
            let mut plan = validate::validate_moa(path, raw, model, Settings::default())?;
            plan.name = plan_name(path);
            Ok(plan)
        }
        parse::Parsed::Moac(file) => {
            let plan = validate::validate_moac(path, *file)?;
            if let Some(config_path) = config {
                let cfg = parse::parse_config(config_path, &read(config_path)?)?;
                let model = cfg.shape(config_path)?;
                if model != plan.model {
                    return Err(Error::Config {
                        path: config_path.to_path_buf(),
                        message: format!(
                            "disagrees with the geometry in {}: config has {:?}, plan has {:?}",
                            path.display(),
                            model,
                            plan.model
                        ),
                    });
                }
            }
            Ok(plan)
        }
    }
}

/// Reads a plan in either form for a model whose shape the caller already knows (from a
/// GGUF file or a model folder, say): an official MoA plan takes the shape from
/// `model`; a moac plan file must carry the same shape. `model_source` names where the
/// shape came from in errors.
pub fn load_for_model(plan: &Path, model: ModelShape, model_source: &Path) -> Result<ValidPlan> {
    let text = read(plan)?;
    match parse::parse_plan(plan, &text)? {
        parse::Parsed::Moa(raw) => {
            let mut p = validate::validate_moa(plan, raw, model, Settings::default())?;
            p.name = plan_name(plan);
            Ok(p)
        }
        parse::Parsed::Moac(file) => {
            let p = validate::validate_moac(plan, *file)?;
            if p.model != model {
                return Err(Error::Config {
                    path: model_source.to_path_buf(),
                    message: format!(
                        "disagrees with the geometry in {}: the model has {:?}, the plan has {:?}",
                        plan.display(),
                        model,
                        p.model
                    ),
                });
            }
            Ok(p)
        }
    }
}

/// The attention shape in a Hugging Face `config.json`.
pub fn read_config_shape(config: &Path) -> Result<ModelShape> {
    parse::parse_config(config, &read(config)?)?.shape(config)
}
