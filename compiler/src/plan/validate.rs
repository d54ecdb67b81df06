//! Semantic checks that turn raw plans into a [`ValidPlan`].

use super::{HeadRule, Location, MoaPlanJson, MoacPlanFile, ModelShape, Settings, ValidPlan};
use super::{MOAC_PLAN_FORMAT, MOAC_PLAN_VERSION};
use crate::error::{Error, Result};
use std::path::Path;

/// Validates raw rules against a model shape and settings.
pub fn validate(
    path: &Path,
    model: ModelShape,
    settings: Settings,
    alphas: &[Vec<f64>],
    betas: &[Vec<f64>],
) -> Result<ValidPlan> {
    let plan_err = |location, message: String| Error::plan(path, location, message);
    check_model(path, &model)?;
    check_settings(path, &settings)?;
    if alphas.is_empty() && betas.is_empty() {
        return Err(plan_err(
            Location::Plan,
            "the plan is empty (no layers)".into(),
        ));
    }
    if alphas.len() != betas.len() {
        return Err(plan_err(
            Location::Plan,
            format!(
                "\"alphas\" has {} layers but \"betas\" has {}",
                alphas.len(),
                betas.len()
            ),
        ));
    }
    if alphas.len() != model.num_layers {
        return Err(plan_err(
            Location::Plan,
            format!(
                "the plan has {} layers but the model has {} (num_hidden_layers)",
                alphas.len(),
                model.num_layers
            ),
        ));
    }
    let mut layers = Vec::with_capacity(alphas.len());
    for (layer, (a_row, b_row)) in alphas.iter().zip(betas).enumerate() {
        for (key, row) in [("alphas", a_row), ("betas", b_row)] {
            if row.len() != model.num_query_heads {
                return Err(plan_err(
                    Location::Layer(layer),
                    format!(
                        "\"{key}\" has {} heads but the model has {} query heads (num_attention_heads)",
                        row.len(),
                        model.num_query_heads
                    ),
                ));
            }
        }
        let mut rules = Vec::with_capacity(a_row.len());
        for (head, (&alpha, &beta)) in a_row.iter().zip(b_row).enumerate() {
            let at = Location::Head { layer, head };
            if !alpha.is_finite() {
                return Err(plan_err(at, format!("alpha must be finite, got {alpha}")));
            }
            if !beta.is_finite() || beta < 0.0 {
                return Err(plan_err(
                    at,
                    format!("beta must be finite and >= 0, got {beta}"),
                ));
            }
            // Normalise -0.0 so that equal rules hash and compare equal.
            rules.push(HeadRule {
                alpha: alpha + 0.0,
                beta: beta + 0.0,
            });
        }
        layers.push(rules);
    }
    Ok(ValidPlan {
        name: String::new(),
        source: path.to_path_buf(),
        model,
        settings,
        layers,
    })
}

pub(crate) fn validate_moa(
    path: &Path,
    raw: MoaPlanJson,
    model: ModelShape,
    settings: Settings,
) -> Result<ValidPlan> {
    validate(path, model, settings, &raw.alphas, &raw.betas)
}

pub(crate) fn validate_moac(path: &Path, file: MoacPlanFile) -> Result<ValidPlan> {
    if file.format != MOAC_PLAN_FORMAT {
        return Err(Error::plan(
            path,
            Location::Plan,
            format!(
                "\"format\" must be \"{MOAC_PLAN_FORMAT}\", got \"{}\"",
                file.format
            ),
        ));
    }
    if file.version != MOAC_PLAN_VERSION {
        return Err(Error::plan(
            path,
            Location::Plan,
            format!(
                "plan format version {} is not supported (this moac reads version {MOAC_PLAN_VERSION})",
                file.version
            ),
        ));
    }
    let mut plan = validate(path, file.model, file.settings, &file.alphas, &file.betas)?;
    plan.name = match file.name {
        Some(n) if !n.is_empty() => n,
        _ => path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plan")
            .to_string(),
    };
    Ok(plan)
}

fn check_model(path: &Path, m: &ModelShape) -> Result<()> {
    let err = |message: String| Err(Error::plan(path, Location::Plan, message));
    if m.num_layers == 0 || m.num_query_heads == 0 || m.num_kv_heads == 0 || m.head_dim == 0 {
        return err(format!("every model dimension must be positive, got {m:?}"));
    }
    if !m.num_query_heads.is_multiple_of(m.num_kv_heads) {
        return err(format!(
            "{} query heads is not a multiple of {} KV heads",
            m.num_query_heads, m.num_kv_heads
        ));
    }
    Ok(())
}

fn check_settings(path: &Path, s: &Settings) -> Result<()> {
    let err = |message: String| Err(Error::plan(path, Location::Plan, message));
    if s.sink == 0 || s.granularity == 0 {
        return err(format!(
            "settings: sink and granularity must be positive, got {s:?}"
        ));
    }
    if s.min_capacity <= s.sink {
        return err(format!(
            "settings: min_capacity ({}) must exceed sink ({}) so that every window has a ring",
            s.min_capacity, s.sink
        ));
    }
    if s.sink > 1 << 20 || s.min_capacity > 1 << 30 || s.granularity > 1 << 20 {
        return err(format!("settings: values out of range: {s:?}"));
    }
    Ok(())
}
