//! Reading plan and config files into raw structures, with JSON line and column in every
//! syntax or type error. No semantic checks here: that is `validate`'s job.

use super::{ModelShape, Settings};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MOAC_PLAN_FORMAT: &str = "moac-plan";
pub const MOAC_PLAN_VERSION: u32 = 1;

/// The official MoA plan JSON: one row per layer, one entry per query head.
/// Other keys are ignored (MoA tools sometimes store extra metadata).
#[derive(Debug, Clone, Deserialize)]
pub struct MoaPlanJson {
    pub alphas: Vec<Vec<f64>>,
    pub betas: Vec<Vec<f64>>,
}

/// Where an imported plan came from (informational).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub plan: String,
    pub config: String,
}

/// moac's self-contained, versioned plan file (`moac plan import` writes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoacPlanFile {
    /// Always `"moac-plan"`.
    pub format: String,
    /// Format version, currently 1.
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub model: ModelShape,
    #[serde(default)]
    pub settings: Settings,
    pub alphas: Vec<Vec<f64>>,
    pub betas: Vec<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceSection>,
}

/// The part of a Hugging Face `config.json` moac reads; other keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub num_hidden_layers: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub hidden_size: Option<u64>,
}

impl HfConfig {
    /// The attention shape, applying Hugging Face's defaults (`num_key_value_heads`
    /// absent: MHA; `head_dim` absent: `hidden_size / num_attention_heads`).
    pub fn shape(&self, path: &Path) -> Result<ModelShape> {
        let err = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        let need = |v: Option<u64>, key: &str| -> Result<usize> {
            match v {
                None => Err(err(format!("missing \"{key}\""))),
                Some(0) => Err(err(format!("\"{key}\" must be positive"))),
                Some(v) => usize::try_from(v).map_err(|_| err(format!("\"{key}\" is too large"))),
            }
        };
        let num_layers = need(self.num_hidden_layers, "num_hidden_layers")?;
        let num_query_heads = need(self.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = match self.num_key_value_heads {
            None => num_query_heads,
            v => need(v, "num_key_value_heads")?,
        };
        let head_dim = match self.head_dim {
            Some(_) => need(self.head_dim, "head_dim")?,
            None => {
                let hidden = need(
                    self.hidden_size,
                    "hidden_size (needed because head_dim is absent)",
                )?;
                if !hidden.is_multiple_of(num_query_heads) {
                    return Err(err(format!(
                        "head_dim is absent and hidden_size {hidden} is not a multiple of num_attention_heads {num_query_heads}"
                    )));
                }
                hidden / num_query_heads
            }
        };
        if !num_query_heads.is_multiple_of(num_kv_heads) {
            return Err(err(format!(
                "num_attention_heads {num_query_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        Ok(ModelShape {
            num_layers,
            num_query_heads,
            num_kv_heads,
            head_dim,
        })
    }
}

pub(crate) enum Parsed {
    Moa(MoaPlanJson),
    Moac(Box<MoacPlanFile>),
}

/// Parses either plan form. The moac form is recognised by its `"format"` key.
pub(crate) fn parse_plan(path: &Path, text: &str) -> Result<Parsed> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::json(path, &e))?;
    let Some(obj) = value.as_object() else {
        return Err(Error::Json {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: "expected a JSON object with \"alphas\" and \"betas\"".to_string(),
        });
    };
    if obj.contains_key("format") {
        // Parse the text again (not the Value) so type errors keep their line and column.
        let file: MoacPlanFile = serde_json::from_str(text).map_err(|e| Error::json(path, &e))?;
        Ok(Parsed::Moac(Box::new(file)))
    } else {
        let raw: MoaPlanJson = serde_json::from_str(text).map_err(|e| Error::json(path, &e))?;
        Ok(Parsed::Moa(raw))
    }
}

pub(crate) fn parse_config(path: &Path, text: &str) -> Result<HfConfig> {
    serde_json::from_str(text).map_err(|e| Error::json(path, &e))
}
